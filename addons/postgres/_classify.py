"""Classify SQL with the real PostgreSQL grammar (libpg_query, through ``pgparse``).

Every decision the PostgreSQL addon makes about a statement starts here. The text is parsed exactly as the
server parses it, so comments, quoting, dollar quotes and multi-statement strings cannot hide a keyword;
there is no keyword matching anywhere. What the parse tree cannot show is reported as such instead of being
guessed: ``dynamic_sql`` when SQL is built at run time, ``unknown`` for a statement type this module does not
map, :class:`ClassificationError` when the text does not parse. The addon denies all three by default.

Theory of operation
===================

``pgparse.parse`` returns one raw statement per ``;``-separated statement, as JSON-like dicts. A node is
written ``{"TypeName": {fields}}`` where its field is typed as a generic node, and as the bare ``{fields}``
where the field has a fixed type (``InsertStmt.relation`` is a bare RangeVar). The walker is iterative (a
deep expression cannot exhaust Python's stack) and visits every node of every statement:

* a statement node adds its kind to ``kinds`` (nested ones too: data-modifying CTEs, ``EXPLAIN ANALYZE``,
  ``PREPARE``, ``CREATE TABLE AS``, rule actions, ``BEGIN ATOMIC`` bodies);
* a RangeVar is a table read, unless it sits where the statement writes (its target), or it names a CTE
  visible at that point (CTE scoping follows the server: a non-recursive CTE sees the CTEs before it);
* a FuncCall adds its name (bare and schema-qualified);
* code the statement carries but the core grammar does not parse is parsed on its own and folded in:
  ``DO`` blocks and ``CREATE FUNCTION`` bodies in PL/pgSQL (``pgparse.parse_pgsql``, then every SQL
  statement and expression inside), SQL-language function bodies, and ``EXECUTE`` of a constant string in
  PL/pgSQL. ``EXECUTE`` of anything else, and bodies in other languages, set ``dynamic_sql``.

Parsing assumes ``standard_conforming_strings = on`` and UTF-8, like libpg_query: the listener must keep
the session there (see :data:`PARSER_SENSITIVE_SETTINGS`), or the server could split a string differently.
"""

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pgparse

from ._pg_names import CATALOG_RELATIONS, ROW_FUNCTIONS

__all__ = [
    "MODIFYING_FUNCTIONS",
    "MODIFYING_KINDS",
    "PARSER_SENSITIVE_SETTINGS",
    "READ_ONLY_GUCS",
    "READ_ONLY_KINDS",
    "RELATION_READING_FUNCTIONS",
    "ROUNDING_FUNCTIONS",
    "SQL_EXECUTING_FUNCTIONS",
    "ClassificationError",
    "Statement",
    "classify",
    "fingerprint",
]


class ClassificationError(ValueError):
    """The SQL could not be classified (parse error, or a body that could not be analyzed).

    ``position`` is the parser's 1-based character position in the text it was given, when known.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message if position is None else f"{message} (at character {position})")
        self.message = message
        self.position = position


@dataclass(frozen=True, slots=True)
class Statement:
    """What one statement does, as far as the grammar can tell."""

    kind: str
    """Kind of the top-level statement, e.g. ``select``, ``delete``, ``create_table``, ``unknown``."""
    kinds: frozenset[str]
    """Every kind involved, nested ones included (``{"select", "delete"}`` for a DELETE in a CTE)."""
    text: str
    """The statement's own text, from its multi-statement string."""
    node: str
    """The parse-tree node type of the top-level statement (``SelectStmt``, ...)."""
    tables_read: frozenset[str]
    tables_written: frozenset[str]
    functions: frozenset[str]
    """Functions called anywhere: the bare name always, ``schema.name`` too when qualified."""
    columns: frozenset[str]
    """Best effort: columns named in target and RETURNING lists (``*`` for a star)."""
    settings: frozenset[str]
    """Run-time parameters (GUCs) set or reset, lower-cased; ``all`` for RESET ALL / DISCARD ALL."""
    has_where: bool | None
    """None without UPDATE/DELETE; False if any UPDATE/DELETE anywhere in the statement has no WHERE."""
    limit: int | None
    """The constant LIMIT / FETCH FIRST of a top-level SELECT."""
    modifies: bool
    """Any data or schema modification anywhere inside (or code that cannot be seen)."""
    read_write_attempt: bool
    """The statement tries to leave read-only mode (or could, through a value the parser cannot see)."""
    dynamic_sql: bool
    """The statement runs SQL the parser cannot see (dynamic EXECUTE, a body in another language, ...)."""
    prepared_name: str | None = None
    """Name of the prepared statement for PREPARE / EXECUTE / DEALLOCATE (None for DEALLOCATE ALL)."""
    object_type: str | None = None
    """For DDL, GRANT, COMMENT...: the object type, e.g. ``table``, ``function``, ``role``."""
    copy_target: str | None = None
    """For COPY: ``stdin``, ``stdout``, ``file`` (server-side file) or ``program``."""
    copy_file: str | None = None
    copy_program: str | None = None
    copy_rewrites: bool = False
    """A COPY ... TO whose options make COPY rewrite characters inside values (a QUOTE or ESCAPE other than
    ``"``, a text-format DELIMITER other than tab, comma, semicolon or bar, an ENCODING other than UTF8):
    the output then holds values in a form that masking detectors do not recognise."""
    languages: frozenset[str] = frozenset()
    """Languages of DO blocks and function bodies involved (``plpgsql``, ``sql``, ``plpython3u``...)."""
    transforms_data: bool = False
    """The statement computes what it returns (or stores) from table data, rather than returning values as
    stored: a function, operator or cast applied to a column, a whole row or a subquery's value (``reverse(card)``,
    ``substr(card, 1, 8)``, ``card::bytea``, ``string_agg(email, ',')``), in a target, RETURNING or VALUES list
    or a function in FROM. Plain columns, constants, comparisons (true/false), ``count``, and ``min``/``max``/
    ``sum``/``avg`` of a column do not count, and neither does computing over the system catalogs only
    (psql's ``\\d`` queries). Masking recognises values as stored: a role whose results are masked needs
    this denied, or a transformed value carries the data past the detectors."""
    roles: frozenset[str] = frozenset()
    """Roles whose definition the statement changes (ALTER, DROP or RENAME of a role or user): their names,
    ``current_user``, ``session_user`` or ``current_role`` as written, ``*`` for ``ALTER ROLE ALL``."""
    objects: frozenset[str] = frozenset()
    """Types of the objects that DDL, GRANT or COMMENT statements (nested ones included) create, alter, drop,
    rename or name: ``table``, ``function``, ``foreign_server``, ``user_mapping``, ``subscription``,
    ``tablespace``, ``fdw``..."""
    settings_read: frozenset[str] = frozenset()
    """Run-time parameters whose values the statement reads, lower-cased: ``SHOW name``, ``current_setting('name')``,
    ``pg_settings`` with ``WHERE name = 'name'``; ``all`` for ``SHOW ALL``, a name that is not a constant, and any
    other read of ``pg_settings``, ``pg_show_all_settings()``, ``pg_file_settings`` or ``pg_db_role_setting``
    (roles' and databases' settings)."""
    transforms_settings: bool = False
    """An output computes over a setting's value or a subscription's connection string instead of returning it
    as it is: a function, operator or cast over ``current_setting()``, ``pg_settings.setting``,
    ``pg_db_role_setting.setconfig`` or ``pg_subscription.subconninfo`` (``reverse(current_setting('x'))``,
    ``setting::int``), also a new value of ``set_config`` taken from one, anywhere. The value itself,
    ``current_setting(name)`` of any name, ``unnest`` or ``array_to_string`` of such an array with constant
    separators (psql's ``\\drds``, pg_dump's database settings) and other columns do not count; where a
    statement reads those relations through a subquery, CTE or function in FROM, any column may be one of them."""


READ_ONLY_GUCS = frozenset({"default_transaction_read_only", "transaction_read_only"})

# The parser assumes these keep their defaults; a session that changes them reads SQL differently.
PARSER_SENSITIVE_SETTINGS = frozenset({"standard_conforming_strings", "backslash_quote", "client_encoding"})

# SET of these to the value the gateway holds them at changes nothing (pg_dump/pg_restore scripts and
# many drivers send ``SET client_encoding = 'UTF8'`` and ``SET standard_conforming_strings = on``): such a
# SET is not reported as a setting change. Encoding names are compared as PostgreSQL does (case and
# punctuation ignored).
_TRUE_WORDS = frozenset({"on", "true", "yes", "1", "t", "y"})
_UTF8_NAMES = frozenset({"utf8", "unicode"})


def _set_value(body: Any) -> str | None:
    """The single constant value of ``SET name = value`` (lower-cased), or None."""
    if body.get("kind") != "VAR_SET_VALUE":
        return None
    args = body.get("args") or ()
    if len(args) != 1:
        return None
    value = _sval(args[0])
    if value is None:
        number = _const_int(args[0])
        return None if number is None else str(number)
    return value.strip().lower()


def _keeps_fixed_value(name: str, value: str | None) -> bool:
    if value is None:
        return False
    if name == "client_encoding":
        return "".join(ch for ch in value if ch.isalnum()) in _UTF8_NAMES
    if name == "standard_conforming_strings":
        return value in _TRUE_WORDS
    return False


# Functions that run SQL given as a string (locally or on another server).
SQL_EXECUTING_FUNCTIONS = frozenset(
    {
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "ts_stat",
        "ts_rewrite",  # ts_rewrite(query, 'SELECT target, substitute FROM ...')
        "dblink",
        "dblink_exec",
        "dblink_open",
        "dblink_send_query",
        # contrib modules that run a query given as text, or built from names given as text (unquoted, so
        # any expression fits in): tablefunc's crosstab and connectby, xml2's xpath_table
        "crosstab",
        "crosstab2",
        "crosstab3",
        "crosstab4",
        "connectby",
        "xpath_table",
        # refint's trigger functions, which build their queries from the trigger's arguments, unquoted
        "check_primary_key",
        "check_foreign_key",
    }
)

# Functions that read a relation named by their first argument (a regclass, or a relation name as text):
# the table they read is that argument's, which the statement names only as a constant.
RELATION_READING_FUNCTIONS = frozenset(
    {"table_to_xml", "table_to_xml_and_xmlschema", "table_to_xmlschema", "get_raw_page", "bt_page_items"}
)
# Functions that read every table of a schema or of the database: no `tables:` rule can see which.
_SCHEMA_READERS = frozenset(
    {"schema_to_xml", "schema_to_xml_and_xmlschema", "database_to_xml", "database_to_xml_and_xmlschema"}
)

# Built-in functions that change the database even inside a read-only transaction (PostgreSQL lets
# large objects be written there, BRIN and GIN indexes be summarized or cleaned, and a superuser's
# pg_import_system_collations writes the catalog), or
# change what other sessions see or wait for (notifications, advisory locks, replication state, the WAL,
# transaction ids): calling one modifies.
MODIFYING_FUNCTIONS = frozenset(
    {
        "lo_create",
        "lo_creat",
        "lo_from_bytea",
        "lo_put",
        "lo_unlink",
        "lo_truncate",
        "lo_truncate64",
        "lowrite",
        "lo_import",
        "lo_export",
        "pg_notify",
        "nextval",
        "setval",
        "pg_stat_reset",
        "pg_stat_reset_shared",
        "pg_stat_reset_single_table_counters",
        "pg_stat_reset_single_function_counters",
        "pg_stat_reset_slru",
        "pg_stat_reset_replication_slot",
        "pg_stat_reset_subscription_stats",
        "pg_stat_statements_reset",
        "pg_create_restore_point",
        "pg_switch_wal",
        "pg_replication_origin_create",
        "pg_replication_origin_drop",
        "pg_replication_origin_advance",
        "pg_replication_origin_session_setup",
        "pg_replication_origin_session_reset",
        "pg_replication_origin_xact_setup",
        "pg_replication_origin_xact_reset",
        "pg_replication_slot_advance",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_logical_slot_get_changes",
        "pg_logical_slot_get_binary_changes",
        "pg_logical_emit_message",
        "pg_import_system_collations",
        "brin_summarize_new_values",  # index maintenance, allowed in a read-only transaction
        "brin_summarize_range",
        "brin_desummarize_range",
        "gin_clean_pending_list",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
        "txid_current",
        "pg_current_xact_id",
        # contrib: pg_surgery kills or freezes heap tuples, pg_visibility clears the visibility map, and
        # neither looks at whether the transaction is read-only
        "heap_force_kill",
        "heap_force_freeze",
        "pg_truncate_visibility_map",
    }
)

# Statement options that name a function the object will call later (CREATE OPERATOR ... PROCEDURE,
# CREATE AGGREGATE ... SFUNC, CREATE TYPE ... INPUT, ...): the function is "called" by the statement.
_FUNCTION_OPTIONS = frozenset(
    {
        "procedure",
        "function",
        "restrict",
        "join",
        "sfunc",
        "finalfunc",
        "combinefunc",
        "serialfunc",
        "deserialfunc",
        "msfunc",
        "minvfunc",
        "mfinalfunc",
        "input",
        "output",
        "receive",
        "send",
        "typmod_in",
        "typmod_out",
        "analyze",
        "subscript",
        "handler",
        "validator",
        "inline",
        "canonical",
        "subtype_diff",
    }
)
_FUNCTION_REFERENCING = frozenset(
    {
        "DefineStmt",
        "AlterOperatorStmt",
        "AlterTypeStmt",
        "CreateCastStmt",
        "CreateTransformStmt",
        "CreateConversionStmt",
        "CreateOpClassStmt",
        "AlterOpFamilyStmt",
        "CreatePLangStmt",
        "CreateFdwStmt",
        "AlterFdwStmt",
        "CreateRangeStmt",
        # statements on an existing function (its name in ObjectWithArgs): renaming pg_read_file, moving it to
        # another schema or dropping it is as good as calling it under another name
        "RenameStmt",
        "AlterFunctionStmt",
        "AlterObjectSchemaStmt",
        "AlterOwnerStmt",
        "AlterObjectDependsStmt",
        "DropStmt",
        "GrantStmt",
    }
)
# Settings whose change is an identity switch (SET ROLE, SET SESSION AUTHORIZATION), by their statement kind.
_IDENTITY_SETTINGS = {"role": "set_role", "session_authorization": "set_session_authorization"}
# Foreign-table and server options with which file_fdw reads server files or runs programs.
_FDW_SERVER_ACCESS = {"program": "program", "filename": "file"}

READ_ONLY_KINDS = frozenset(
    {
        "select",
        "show",
        "explain",
        "explain_analyze",
        "begin",
        "commit",
        "rollback",
        "savepoint",
        "release",
        "set",
        "reset",
        "set_role",
        "set_session_authorization",
        "set_transaction",
        "set_constraints",
        "prepare",
        "execute",
        "deallocate",
        "listen",
        "unlisten",
        "notify",
        "fetch",
        "close_cursor",
        "declare_cursor",
        "discard",
        "do",
        "return",
        "copy_to",
        "lock",  # modifies unless it takes ACCESS SHARE, the lock SELECT takes (see _Analysis.locks)
    }
)

_SIMPLE_KINDS: dict[str, str] = {
    "InsertStmt": "insert",
    "UpdateStmt": "update",
    "DeleteStmt": "delete",
    "MergeStmt": "merge",
    "CreateStmt": "create_table",
    "IndexStmt": "create_index",
    "ViewStmt": "create_view",
    "CreateFunctionStmt": "create_function",
    "CreateSchemaStmt": "create_schema",
    "CreateRoleStmt": "create_role",
    "CreateExtensionStmt": "create_extension",
    "CreateTrigStmt": "create_trigger",
    "RuleStmt": "create_rule",
    "CreatePolicyStmt": "create_policy",
    "CreateSeqStmt": "create_sequence",
    "CreatedbStmt": "create_database",
    "CreateForeignTableStmt": "create_foreign_table",
    "CreateEventTrigStmt": "create_event_trigger",
    "CreatePublicationStmt": "create_publication",
    "CreateSubscriptionStmt": "create_subscription",
    "CreateDomainStmt": "create_other",
    "CompositeTypeStmt": "create_other",
    "CreateEnumStmt": "create_other",
    "CreateRangeStmt": "create_other",
    "DefineStmt": "create_other",
    "CreateTableSpaceStmt": "create_other",
    "CreateFdwStmt": "create_other",
    "CreateForeignServerStmt": "create_other",
    "CreateUserMappingStmt": "create_other",
    "CreatePLangStmt": "create_other",
    "CreateCastStmt": "create_other",
    "CreateConversionStmt": "create_other",
    "CreateOpClassStmt": "create_other",
    "CreateOpFamilyStmt": "create_other",
    "CreateStatsStmt": "create_other",
    "CreateTransformStmt": "create_other",
    "CreateAmStmt": "create_other",
    "AlterTableStmt": "alter_table",
    "ReplicaIdentityStmt": "alter_table",
    "AlterRoleStmt": "alter_role",
    "AlterRoleSetStmt": "alter_role",
    "AlterSystemStmt": "alter_system",
    "AlterDefaultPrivilegesStmt": "alter_default_privileges",
    "AlterDatabaseStmt": "alter_other",
    "AlterDatabaseSetStmt": "alter_other",
    "AlterDatabaseRefreshCollStmt": "alter_other",
    "AlterDomainStmt": "alter_other",
    "AlterEnumStmt": "alter_other",
    "AlterExtensionStmt": "alter_other",
    "AlterExtensionContentsStmt": "alter_other",
    "AlterFunctionStmt": "alter_other",
    "AlterSeqStmt": "alter_other",
    "AlterTableSpaceOptionsStmt": "alter_other",
    "AlterTableMoveAllStmt": "alter_other",
    "AlterPolicyStmt": "alter_other",
    "AlterPublicationStmt": "alter_other",
    "AlterSubscriptionStmt": "alter_other",
    "AlterEventTrigStmt": "alter_other",
    "AlterFdwStmt": "alter_other",
    "AlterForeignServerStmt": "alter_other",
    "AlterUserMappingStmt": "alter_other",
    "AlterOpFamilyStmt": "alter_other",
    "AlterOperatorStmt": "alter_other",
    "AlterTypeStmt": "alter_other",
    "AlterStatsStmt": "alter_other",
    "AlterTSDictionaryStmt": "alter_other",
    "AlterTSConfigurationStmt": "alter_other",
    "AlterCollationStmt": "alter_other",
    "AlterObjectDependsStmt": "alter_other",
    "DropStmt": "drop",
    "DropRoleStmt": "drop",
    "DropdbStmt": "drop",
    "DropTableSpaceStmt": "drop",
    "DropSubscriptionStmt": "drop",
    "DropUserMappingStmt": "drop",
    "DropOwnedStmt": "drop_owned",
    "ReassignOwnedStmt": "reassign_owned",
    "TruncateStmt": "truncate",
    "VariableShowStmt": "show",
    "DoStmt": "do",
    "CallStmt": "call",
    "PrepareStmt": "prepare",
    "ExecuteStmt": "execute",
    "DeallocateStmt": "deallocate",
    "ListenStmt": "listen",
    "NotifyStmt": "notify",
    "UnlistenStmt": "unlisten",
    "ClusterStmt": "cluster",
    "ReindexStmt": "reindex",
    "LockStmt": "lock",
    "DiscardStmt": "discard",
    "CheckPointStmt": "checkpoint",
    "LoadStmt": "load",
    "CommentStmt": "comment",
    "SecLabelStmt": "security_label",
    "DeclareCursorStmt": "declare_cursor",
    "FetchStmt": "fetch",
    "ClosePortalStmt": "close_cursor",
    "RefreshMatViewStmt": "refresh_matview",
    "ImportForeignSchemaStmt": "import_foreign_schema",
    "ConstraintsSetStmt": "set_constraints",
    "ReturnStmt": "return",
}

_TRANSACTION_KINDS = {
    "TRANS_STMT_BEGIN": "begin",
    "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback",
    "TRANS_STMT_PREPARE": "prepare_transaction",
    "TRANS_STMT_COMMIT_PREPARED": "commit_prepared",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback_prepared",
}

# Every kind this module can report (besides "unknown").
_ALL_KINDS = frozenset(
    {
        *_SIMPLE_KINDS.values(),
        *_TRANSACTION_KINDS.values(),
        "select",
        "select_into",
        "create_table_as",
        "create_matview",
        "alter_other",
        "copy_to",
        "copy_from",
        "copy_program",
        "grant",
        "revoke",
        "set",
        "reset",
        "set_role",
        "set_session_authorization",
        "set_transaction",
        "explain",
        "explain_analyze",
        "vacuum",
        "analyze",
    }
)
MODIFYING_KINDS = frozenset({*(_ALL_KINDS - READ_ONLY_KINDS), "unknown"})

# Where a statement names the relation it writes (bare RangeVars, or lists of them).
_WRITE_KEYS: dict[str, tuple[str, ...]] = {
    "InsertStmt": ("relation",),
    "UpdateStmt": ("relation",),
    "DeleteStmt": ("relation",),
    "MergeStmt": ("relation",),
    "CreateStmt": ("relation",),
    "CreateForeignTableStmt": ("base",),
    "CreateTableAsStmt": ("into",),
    "SelectStmt": ("intoClause",),
    "IndexStmt": ("relation",),
    "AlterTableStmt": ("relation",),
    "ClusterStmt": ("relation",),
    "ReindexStmt": ("relation",),
    "RenameStmt": ("relation",),
    "RefreshMatViewStmt": ("relation",),
    "CreateTrigStmt": ("relation",),
    "RuleStmt": ("relation",),
    "AlterObjectSchemaStmt": ("relation",),
    "AlterOwnerStmt": ("relation",),
    "ViewStmt": ("view",),
    "CreatePolicyStmt": ("table",),
    "AlterPolicyStmt": ("table",),
    "CreateSeqStmt": ("sequence",),
    "AlterSeqStmt": ("sequence",),
    "CompositeTypeStmt": ("typevar",),
    "TruncateStmt": ("relations",),
    "LockStmt": ("relations",),
    "VacuumStmt": ("rels",),
}
_RELATION_OBJECTS = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_INDEX", "OBJECT_SEQUENCE", "OBJECT_FOREIGN_TABLE"}
)
_OBJECT_TYPE_KEYS = ("removeType", "objtype", "renameType", "objectType")

# PL/pgSQL statements whose expression is a string of SQL built at run time.
_PLPGSQL_DYNAMIC = {
    "PLpgSQL_stmt_dynexecute": "query",
    "PLpgSQL_stmt_dynfors": "query",
    "PLpgSQL_stmt_return_query": "dynquery",
    "PLpgSQL_stmt_open": "dynquery",
}
_PLPGSQL_KINDS = {"PLpgSQL_stmt_commit": "commit", "PLpgSQL_stmt_rollback": "rollback"}

_WRITE = 1
_TARGET = 2
# Statements and clauses with output expressions, for Statement.transforms_data.
_OUTPUT_STATEMENTS = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "ExecuteStmt"})
_OUTPUT_CLAUSES = frozenset({"MergeWhenClause", "OnConflictClause", "RangeFunction", "RangeTableFunc", "JsonTable"})
_NO_CTES: frozenset[str] = frozenset()
MAX_NESTING = 8  # DO inside EXECUTE inside a function body...
_MAX_ASSIGNMENT_SPLITS = 64
_CACHE_SIZE = 4096
_CACHE_MAX_TEXT = 16384

type _Node = dict[str, Any]


# Python's recursion limit reached (decoding the parser's tree, or walking it): the statement is not analyzed.
_TOO_DEEP = "statement nested too deeply to analyze"


def _parse(sql: str, where: str) -> list[_Node]:
    try:
        tree: list[_Node] = pgparse.parse(sql)
        return tree
    except pgparse.PGQueryError as exc:
        position = getattr(exc, "position", None)
        message = getattr(exc, "message", None) or str(exc)
        raise ClassificationError(f"{where}: {message}" if where else message, position or None) from None
    except RecursionError:
        # pgparse decodes the tree with the json module, which recurses once per level of nesting.
        message = _TOO_DEEP
        raise ClassificationError(f"{where}: {message}" if where else message) from None


def _sval(node: Any) -> str | None:
    """The value of a String node or of a string constant, through casts and COLLATE."""
    while isinstance(node, dict) and len(node) == 1:
        ((key, body),) = node.items()
        if key == "String":
            return str(body.get("sval", ""))
        if key == "A_Const":
            sval = body.get("sval")
            return str(sval.get("sval", "")) if isinstance(sval, dict) else None
        if key in ("TypeCast", "CollateClause"):
            node = body.get("arg")
            continue
        return None
    return None


def _dicts(node: Any) -> Iterator[_Node]:
    """Every mapping in a parse (sub)tree, depth first."""
    stack: list[Any] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            yield item
            stack.extend(v for v in item.values() if isinstance(v, (dict, list)))


def _refers_to(node: Any, tables: set[str]) -> bool:
    """Whether an expression has a column reference that is, or may be, a column of one of ``tables``
    (qualified by one of those names, or unqualified)."""
    for item in _dicts(node):
        ref = item.get("ColumnRef")
        if isinstance(ref, dict):
            fields = list(ref.get("fields", ()))
            qualifiers = [
                str(f["String"].get("sval", "")).lower() for f in fields[:-1] if isinstance(f, dict) and "String" in f
            ]
            if not qualifiers or qualifiers[-1] in tables:
                return True
    return False


# Output expressions that hand a stored value back as it is, or compute nothing from stored data, for
# Statement.transforms_data. Functions whose result says only how big a value is:
_SIZE_FUNCTIONS = frozenset({"length", "char_length", "character_length", "octet_length", "bit_length"})
# Functions that return one of their arguments as it is, or a part of a date (of plain arguments):
_PICKING_FUNCTIONS = frozenset({"min", "max", "date_trunc", "date_part", "extract"})
# Numbers rounded (of plain numbers: round(avg(amount), 2)).
ROUNDING_FUNCTIONS = frozenset({"round", "trunc", "ceil", "ceiling", "floor", "abs"})
# Ordered-set aggregates that return one of the sorted values (percentile_cont interpolates between two).
_PICKING_ORDERED_SETS = frozenset({"mode", "percentile_disc"})
# Whitespace trimmed from the ends (with one argument: trim(both '4' from card) would cut digits off).
_TRIM_FUNCTIONS = frozenset({"btrim", "ltrim", "rtrim"})
# Aggregates of one column: a total, not a value (numbers stored as numbers can still be combined with
# chosen values; see docs/masking.md).
_TOTAL_AGGREGATES = frozenset({"sum", "avg"})
# Casts without a length or precision that keep a value's characters, or that only a date, time, truth
# value or uuid passes. Not numbers: a text card made a number can be summed with a chosen row
# (card::int8 + 1 is a card that masking no longer sees), and float, numeric and money respell digits.
_PLAIN_CASTS = frozenset(
    {"text", "varchar", "bool", "boolean", "uuid", "date", "time", "timetz", "timestamp", "timestamptz"}
)
# Operators whose result is true or false: what they tell is what a WHERE clause could tell.
_COMPARISONS = frozenset({"=", "<>", "!=", "<", ">", "<=", ">=", "~", "~*", "!~", "!~*", "~~", "~~*", "!~~", "!~~*"})
_BOOLEAN_EXPR_KINDS = frozenset(
    {"AEXPR_LIKE", "AEXPR_ILIKE", "AEXPR_SIMILAR", "AEXPR_IN", "AEXPR_DISTINCT", "AEXPR_NOT_DISTINCT"}
    | {"AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM", "AEXPR_NOT_BETWEEN_SYM", "AEXPR_OP_ANY"}
    | {"AEXPR_OP_ALL"}
)
# JSON members by a constant key or path: a value as the document stores it.
_JSON_MEMBER_OPERATORS = frozenset({"->", "->>", "#>", "#>>"})
# Functions that return stored data without naming a column: large objects, tables and cursors as XML,
# other sessions' statements, raw pages and decoded WAL (extensions).
_DATA_FUNCTIONS = frozenset(
    {"lo_get", "loread", "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema", "schema_to_xml"}
    | {"schema_to_xmlschema", "schema_to_xml_and_xmlschema", "database_to_xml", "database_to_xmlschema"}
    | {"database_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema", "query_to_xml", "query_to_xmlschema"}
    | {"query_to_xml_and_xmlschema", "pg_stat_get_activity", "pg_stat_get_backend_activity", "get_raw_page"}
    | {"pg_stat_statements"}  # the function behind the pg_stat_statements view: statements' texts
    | {"heap_page_items", "bt_page_items", "pg_logical_slot_peek_changes", "pg_logical_slot_peek_binary_changes"}
    | {"pg_logical_slot_get_changes", "pg_logical_slot_get_binary_changes"}
    | {"crosstab", "crosstab2", "crosstab3", "crosstab4", "connectby", "xpath_table"}
)
# PostgreSQL reads (card).reverse as reverse(card) and c.record_send as record_send(c) (functional notation):
# alias.f for a built-in function that takes a whole row is that call (see _pg_names.py), and (x).f may be a
# call of any function, an extension's too. These keep values or tell a size:
_PRESERVING_CALLS = frozenset(
    {"text", "varchar", "bpchar", "name", "length", "char_length", "character_length", "octet_length", "textlen"}
    | {"bit_length", "btrim", "ltrim", "rtrim", "min", "max", "count", "date", "time", "timetz", "timestamp"}
    | {"timestamptz", "bool", "uuid", "num_nulls", "num_nonnulls", "pg_column_size", "pg_typeof"}
)
# System catalogs and statistics views that hold table data (most common values, other sessions' query
# texts with their constants): computing over these counts as computing over tables.
_DATA_CATALOGS = frozenset(
    {"pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data", "pg_largeobject"}
    | {"pg_stat_activity"}
)


# Large objects' contents, in pages of 2 KB (see _Analysis.reads_large_object_pages).
_LARGE_OBJECT_PAGES = frozenset({"pg_largeobject", "pg_catalog.pg_largeobject"})


# Relations whose rows hold settings' values or connection strings (passwords in libpq's conninfo, in a
# custom setting), and their columns that hold them (Statement.transforms_settings).
_SETTING_RELATIONS = frozenset({"pg_settings", "pg_file_settings", "pg_db_role_setting", "pg_subscription"})
_SETTING_COLUMNS = frozenset({"setting", "reset_val", "boot_val", "setconfig", "subconninfo"})
# Functions that return settings' values: current_setting(name), the function behind pg_settings.
_SETTING_FUNCTIONS = frozenset({"current_setting", "pg_show_all_settings"})
# Calls that return the elements of an array as they are: psql's \drds array_to_string(setconfig, E'\n'),
# pg_dump's unnest(setconfig). With constant separators, each element (a name=value) stays whole.
_ELEMENT_CALLS = frozenset({"unnest", "array_to_string"})
_A_SETTING = {"ColumnRef": {"fields": [{"String": {"sval": "setting"}}]}}


def _calls_one_of(item: _Node, names: frozenset[str]) -> bool:
    """A node that calls a function of ``names``, also in attribute notation (``(oid).lo_get``,
    ``('primary_conninfo'::text).current_setting``)."""
    call = item.get("FuncCall")
    if isinstance(call, dict) and _call_name(call) in names:
        return True
    indirection = item.get("A_Indirection")
    return isinstance(indirection, dict) and any(_field_name(f) in names for f in indirection.get("indirection", ()))


def _calls_setting_function(item: _Node) -> bool:
    """A node that calls current_setting() or pg_show_all_settings()."""
    return _calls_one_of(item, _SETTING_FUNCTIONS)


def _setting_source(node: Any, derived: bool, aliases: frozenset[str]) -> bool:
    """Whether an expression may hold a setting's value or a connection string (see
    Statement.transforms_settings) in a statement that reads some: a call of current_setting() or
    pg_show_all_settings(), a column of _SETTING_COLUMNS, a whole row of a relation of _SETTING_RELATIONS, ``*``,
    a subquery, or any column when ``derived``: a subquery, CTE or function in FROM of the statement may pass one
    on under another name (FROM current_setting('x') v, see :func:`_carries_settings`)."""
    for item in _dicts(node):
        if _calls_setting_function(item) or "SubLink" in item or "A_Star" in item:
            return True
        ref = item.get("ColumnRef")
        if isinstance(ref, dict):
            names = [_field_name(f) for f in ref.get("fields", ())]
            if derived or (names and names[-1] in _SETTING_COLUMNS) or (len(names) == 1 and names[0] in aliases):
                return True
    return False


def _carries_settings(node: Any, aliases: frozenset[str]) -> bool:
    """Whether a subquery, CTE or function in FROM may pass a setting's value or a connection string on under
    another name: it calls current_setting() or pg_show_all_settings(), reads a relation of _SETTING_RELATIONS,
    or refers to a column of _SETTING_COLUMNS or to one of those relations (LATERAL unnest(s.setconfig))."""
    for item in _dicts(node):
        if _calls_setting_function(item):
            return True
        relation = str(item.get("relname", ""))
        if relation in _SETTING_RELATIONS and item.get("schemaname") in (None, "pg_catalog"):
            return True
        ref = item.get("ColumnRef")
        if isinstance(ref, dict):
            names = [_field_name(f) for f in ref.get("fields", ())]
            if names and (names[-1] in _SETTING_COLUMNS or names[0] in aliases):
                return True
    return False


def _settings_as_columns(node: Any) -> Any:
    """A copy of an expression with the calls that return a setting's value as it is replaced by a column:
    current_setting(...), pg_show_all_settings(), unnest(column) and array_to_string(column, constant...).
    :func:`_plain_output` then tells a value as it is from one computed over."""
    if isinstance(node, list):
        return [_settings_as_columns(item) for item in node]
    if not isinstance(node, dict):
        return node
    call = node.get("FuncCall")
    if isinstance(call, dict) and len(node) == 1:
        name = _call_name(call)
        args = call.get("args") or ()
        if name in _SETTING_FUNCTIONS:
            return _A_SETTING
        if name in _ELEMENT_CALLS and args and not any(k in call for k in ("agg_order", "agg_filter", "over")):
            first, *rest = args
            inner = _settings_as_columns(first)
            column = isinstance(inner, dict) and "ColumnRef" in inner and not _is_star(inner)
            if column and len(rest) <= (2 if name == "array_to_string" else 0) and all(_untyped(a) for a in rest):
                return _A_SETTING
    return {key: _settings_as_columns(value) for key, value in node.items()}


def _output_expressions(body: _Node) -> Iterator[Any]:
    """The output expressions of a statement or clause body (as :func:`_plain_outputs` reads them)."""
    pending = [body]
    while pending:
        part = pending.pop()
        for field in ("targetList", "returningList", "values", "params"):
            yield from part.get(field) or ()
        for row in part.get("valuesLists") or ():
            yield from row.get("List", {}).get("items", ())
        pending.extend(
            p for p in (part.get("larg"), part.get("rarg"), part.get("onConflictClause")) if isinstance(p, dict)
        )


def _reads_data(node: Any) -> bool:
    """Whether an expression reads stored data: a column, a whole row, a subquery or a large object."""
    for item in _dicts(node):
        if "ColumnRef" in item or "SubLink" in item or _calls_one_of(item, _DATA_FUNCTIONS):
            return True
    return False


def _plain_output(node: Any) -> bool:
    """Whether an output expression returns stored values as they are (or constants, sizes, true or
    false): masking then sees what the table holds. See :attr:`Statement.transforms_data`."""
    if not isinstance(node, dict) or len(node) != 1:
        return not _reads_data(node)
    ((key, body),) = node.items()
    if key == "ResTarget":
        return _plain_output(body.get("val"))
    if key == "ColumnRef":
        fields = body.get("fields", ())
        return not _is_call(_row_call(fields), ROW_FUNCTIONS)  # c.record_send
    if key in ("SubLink", "NullTest", "BooleanTest", "BoolExpr", "GroupingFunc") or not _reads_data(node):
        # A subquery's value is its own target list's, checked where the walk reaches it; the others are
        # true or false, as a WHERE clause could tell.
        return True
    if key == "TypeCast":
        type_name = body.get("typeName", {})
        names = _names(type_name.get("names", ()))
        plain = bool(names) and names[-1].lower() in _PLAIN_CASTS
        return (
            plain
            and not type_name.get("typmods")
            and not type_name.get("arrayBounds")
            and _plain_output(body.get("arg"))
        )
    if key == "FuncCall":
        name = _call_name(body)
        args = body.get("args", ())
        if name in _DATA_FUNCTIONS:  # lo_get(16400): stored data without a column
            return False
        if body.get("agg_within_group"):  # mode() WITHIN GROUP (ORDER BY x) returns an x
            if name not in _PICKING_ORDERED_SETS:  # percentile_cont interpolates: card / 2
                return not _reads_data(body.get("agg_order"))
            order = [item.get("SortBy", {}).get("node") for item in body.get("agg_order", ())]
            return not _reads_data(args) and all(_plain_output(expr) for expr in order)
        if name == "count" or not _reads_data(args):  # row_number() OVER (ORDER BY card): no value of it
            return True
        if name in _TOTAL_AGGREGATES:
            return _is_total(node)
        if name in _TRIM_FUNCTIONS and len(args) != 1:
            return False
        if name in ROUNDING_FUNCTIONS:  # of a column or a total, not of a cast: round(card::int8, -8)
            value, *scale = args
            # to constant decimal places: a negative scale drops digits, round(card, -4) is substr(card, 1, 12)
            return (not _reads_data(value) or _is_plain_column(value) or _is_total(value)) and all(
                _keeps_digits(s) for s in scale
            )
        kinds = (_PICKING_FUNCTIONS, _TRIM_FUNCTIONS, _SIZE_FUNCTIONS)
        return any(name in kind for kind in kinds) and all(_plain_output(a) for a in args)
    if key == "CollateClause":
        return _plain_output(body.get("arg"))
    if key in ("CoalesceExpr", "MinMaxExpr"):
        return _one_of_plain(body.get("args", ()))
    if key == "CaseExpr":  # one of its results; the conditions tell only which
        results = [when.get("CaseWhen", {}).get("result") for when in body.get("args", ())]
        return _one_of_plain([*results, body.get("defresult")])
    if key == "A_Expr":
        kind = body.get("kind")
        operator = _names(body.get("name", ()))
        binary = body.get("lexpr") is not None and body.get("rexpr") is not None  # prefix ~ is bitwise NOT
        if kind in _BOOLEAN_EXPR_KINDS or (kind == "AEXPR_OP" and binary and operator and operator[-1] in _COMPARISONS):
            return True
        if kind == "AEXPR_NULLIF":
            return _one_of_plain([body.get("lexpr"), body.get("rexpr")])
        if kind == "AEXPR_OP" and operator[-1:] and operator[-1] in _JSON_MEMBER_OPERATORS:
            return _plain_output(body.get("lexpr")) and not _reads_data(body.get("rexpr"))
        return False
    if key == "A_Indirection":
        # (row).*: stored values. (x).name is a field of a row or a call of name(x): (card).reverse, and
        # (card).show_trgm of an extension, which no list here knows; a row's name may be a column's too (FROM
        # customers card: (card) is the column). Only names that keep values are followed (alias.column reads
        # a column); a subscript or slice is not
        for item in body.get("indirection", ()):
            if "A_Star" in item:
                continue
            if "String" not in item or _field_name(item) not in _PRESERVING_CALLS:
                return False
        return _plain_output(body.get("arg"))
    return False


def _one_of_plain(choices: Any) -> bool:
    """Whether an expression that returns one of ``choices`` (COALESCE, GREATEST, CASE, NULLIF) returns a
    stored value as it is. PostgreSQL gives all of them one type: beside a value read from a table, only
    untyped constants and NULL keep its type (COALESCE(x, 0::float8) prints x as 4.111111111111111e+15)."""
    choices = [c for c in choices if c is not None]
    if not any(_reads_data(c) for c in choices):
        return True
    return all(_plain_output(c) if _reads_data(c) else _untyped(c) for c in choices)


def _untyped(node: Any) -> bool:
    """An untyped constant or NULL (it takes the type of what it stands beside)."""
    return isinstance(node, dict) and "A_Const" in node


def _row_call(fields: Any) -> str:
    """The last name of a qualified reference (alias.f, schema.table.f, db.schema.table.f), which
    PostgreSQL calls with the whole row when the relation has no such column; "" for a bare name."""
    return _field_name(fields[-1]) if 2 <= len(fields) <= 4 else ""


def _is_call(name: str, functions: frozenset[str]) -> bool:
    """Whether a field ``name`` is a call of one of ``functions`` that changes what it is given."""
    return name in functions and name not in _PRESERVING_CALLS


def _field_name(node: Any) -> str:
    value = node.get("String", {}).get("sval") if isinstance(node, dict) else None
    return str(value).lower() if value is not None else ""


def _keeps_digits(scale: Any) -> bool:
    """Whether a rounding's scale is a constant number of decimal places (0 or more)."""
    places = _const_int(scale)
    return places is not None and places >= 0


def _is_plain_column(node: Any) -> bool:
    return isinstance(node, dict) and "ColumnRef" in node and _plain_output(node)


def _is_total(node: Any) -> bool:
    """sum(column) or avg(column), cast or not: a number computed from numbers, which rounding may round."""
    while isinstance(node, dict) and "TypeCast" in node:
        node = node["TypeCast"].get("arg")
    call = node.get("FuncCall") if isinstance(node, dict) else None
    if not isinstance(call, dict):
        return False
    args = call.get("args", ())
    return _call_name(call) in _TOTAL_AGGREGATES and len(args) == 1 and _is_plain_column(args[0])


def _call_name(call: _Node) -> str:
    """A FuncCall's function name, bare and lower-case ("" if it has none)."""
    names = _names(call.get("funcname", ()))
    return names[-1].lower() if names else ""


def _plain_outputs(body: _Node) -> bool:
    """Whether every output expression of a statement or clause body is plain (see :func:`_plain_output`).
    The arms of a UNION and an INSERT's ON CONFLICT clause are bodies without a node name of their own."""
    if body.get("larg") is not None and not _set_operation_keeps_types(body):
        return False
    rows = [row.get("List", {}).get("items", ()) for row in body.get("valuesLists") or ()]
    if len(rows) > 1 and not all(_one_of_plain(column) for column in zip(*rows, strict=False)):
        return False  # VALUES rows give each column one type, as a UNION does
    pending = [body]
    while pending:  # iterative: a UNION of hundreds of arms nests that deep
        part = pending.pop()
        for field in ("targetList", "returningList", "values", "params"):
            if not all(_plain_output(item) for item in part.get(field) or ()):
                return False
        for row in part.get("valuesLists") or ():
            if not all(_plain_output(item) for item in row.get("List", {}).get("items", ())):
                return False
        pending.extend(
            p for p in (part.get("larg"), part.get("rarg"), part.get("onConflictClause")) if isinstance(p, dict)
        )
    return True


def _set_operation_keeps_types(body: _Node) -> bool:
    """Whether the arms of a UNION/INTERSECT/EXCEPT keep the types of what they read from tables: column by
    column, beside a value read from a table only untyped constants and NULL (a UNION ALL SELECT 0::float8
    arm makes every arm's column float8)."""
    arms: list[list[Any]] = []
    pending = [body]
    while pending:
        part = pending.pop()
        if part.get("larg") is not None:
            pending.extend(p for p in (part.get("larg"), part.get("rarg")) if isinstance(p, dict))
            continue
        targets = [t.get("ResTarget", {}).get("val") for t in part.get("targetList") or ()]
        rows = [row.get("List", {}).get("items", ()) for row in part.get("valuesLists") or ()]
        arms.extend([targets] if targets else rows)
    if any(any(_is_star(value) for value in arm) for arm in arms):
        return not any(not _reads_data(value) and not _untyped(value) for arm in arms for value in arm)
    return all(_one_of_plain(column) for column in zip(*arms, strict=False))


def _outputs_merged_column(body: _Node, ctes: frozenset[str]) -> bool:
    """Whether a SELECT (or an arm of its UNION) outputs a column that ``JOIN ... USING`` or ``NATURAL JOIN``
    merges with a side whose column types the statement picks (a subquery, a function, a CTE, a table
    with column aliases). PostgreSQL gives a merged column the type both sides share:
    ``customers LEFT JOIN (SELECT 0::float8 AS card) t USING (card)`` prints a bigint card as
    4.111111111111111e+15, which no detector recognises. Unqualified names, ``*`` and names qualified by
    the join's alias may be merged columns; ``customers.card`` is the table's own."""
    pending = [body]
    while pending:
        part = pending.pop()
        pending.extend(p for p in (part.get("larg"), part.get("rarg")) if isinstance(p, dict))
        visible = ctes | {str(c.get("CommonTableExpr", {}).get("ctename", "")) for c in _with_ctes(part)}
        merged: set[str] = set()  # "*": a NATURAL join, any name
        aliases: set[str] = set()
        joins = list(part.get("fromClause") or ())
        while joins:
            item = joins.pop()
            join = item.get("JoinExpr") if isinstance(item, dict) else None
            if not isinstance(join, dict):
                continue
            joins.extend(side for side in (join.get("larg"), join.get("rarg")) if isinstance(side, dict))
            if not (join.get("usingClause") or join.get("isNatural")):
                continue
            if _stored_columns(join.get("larg"), visible) and _stored_columns(join.get("rarg"), visible):
                continue
            merged.update(["*"] if join.get("isNatural") else (n.lower() for n in _names(join["usingClause"])))
            for key in ("alias", "join_using_alias"):
                alias = (join.get(key) or {}).get("aliasname")
                if alias:
                    aliases.add(str(alias).lower())
        if not merged:
            continue
        for node in _dicts(part.get("targetList") or ()):
            ref = node.get("ColumnRef")
            fields = ref.get("fields", ()) if isinstance(ref, dict) else ()
            if len(fields) == 1 and ("A_Star" in fields[0] or "*" in merged or _field_name(fields[0]) in merged):
                return True
            if len(fields) >= 2 and _field_name(fields[-2]) in aliases:
                return True
    return False


def _with_ctes(body: _Node) -> list[Any]:
    with_clause = body.get("withClause")
    return list(with_clause.get("ctes", ())) if isinstance(with_clause, dict) else []


def _stored_columns(side: Any, ctes: frozenset[str]) -> bool:
    """Whether a join side's columns have the types a table stores: a table (not a CTE) without column
    aliases, or a join of such tables."""
    if not isinstance(side, dict):
        return False
    relation = side.get("RangeVar")
    if isinstance(relation, dict):
        renamed = bool((relation.get("alias") or {}).get("colnames"))
        cte = not relation.get("schemaname") and str(relation.get("relname", "")) in ctes
        return not renamed and not cte
    join = side.get("JoinExpr")
    if isinstance(join, dict):
        return _stored_columns(join.get("larg"), ctes) and _stored_columns(join.get("rarg"), ctes)
    return False


def _is_star(node: Any) -> bool:
    """``*``, ``t.*`` or ``(t).*``: a number of columns the parse tree does not tell."""
    if not isinstance(node, dict):
        return False
    ref = node.get("ColumnRef") or {}
    indirection = node.get("A_Indirection") or {}
    return any("A_Star" in f for f in [*ref.get("fields", ()), *indirection.get("indirection", ())])


def _catalog_relation(name: str) -> bool:
    """Whether a relation read is a system catalog without table data (``pg_class``, ``information_schema.columns``).
    A bare name is one if pg_catalog has it: PostgreSQL looks there first (``pg_stat_statements``, an
    extension's view in another schema, is not)."""
    parts = name.split(".")
    if parts[-1] in _DATA_CATALOGS:
        return False
    if len(parts) >= 2:
        return parts[-2] in ("pg_catalog", "information_schema")
    return parts[0] in CATALOG_RELATIONS


def _relation_named(text: str) -> _Node | None:
    """The relation a regclass-like text names (``pg_authid``, ``"Orders"``, ``pg_catalog.pg_authid``), as a
    RangeVar, or None if the text is not just a relation name."""
    try:
        tree = _parse(f"SELECT FROM {text}", "relation name")
    except ClassificationError:
        return None
    if len(tree) != 1:
        return None
    select = tree[0]["stmt"].get("SelectStmt") or {}
    sources = select.get("fromClause") or ()
    if set(select) - {"fromClause", "limitOption", "op"} or len(sources) != 1:
        return None
    relation = sources[0].get("RangeVar")
    if not isinstance(relation, dict) or relation.get("alias") or not relation.get("inh", False):
        return None
    return relation


def _names(items: Iterable[Any]) -> list[str]:
    return [str(item.get("String", {}).get("sval", "")) for item in items if isinstance(item, dict)]


def _bool_option(arg: Any) -> bool:
    """A DefElem value as PostgreSQL reads a boolean option; no value means true, anything odd true."""
    if arg is None:
        return True
    ((key, body),) = arg.items()
    if key == "String":
        return str(body.get("sval", "")).lower() not in ("false", "off", "0", "no")
    if key == "Integer":
        return bool(body.get("ival", 0))
    if key == "Boolean":
        return bool(body.get("boolval", False))
    return True


def _const_int(node: Any) -> int | None:
    if isinstance(node, dict) and "A_Const" in node:
        const = node["A_Const"]
        if "ival" in const:
            return int(const["ival"].get("ival", 0))
    return None


_OBJECT_TYPES = {
    "CreateRoleStmt": "role",
    "AlterRoleStmt": "role",
    "AlterRoleSetStmt": "role",
    "DropRoleStmt": "role",
    "GrantRoleStmt": "role",
    "CreatedbStmt": "database",
    "DropdbStmt": "database",
    "AlterDatabaseStmt": "database",
    "AlterDatabaseSetStmt": "database",
    "CreateSchemaStmt": "schema",
    "CreateExtensionStmt": "extension",
    "CreateStmt": "table",
    "CreateTableAsStmt": "table",
    "IndexStmt": "index",
    "ViewStmt": "view",
    "CreateSeqStmt": "sequence",
    "CreateTrigStmt": "trigger",
    "RuleStmt": "rule",
    "CreatePolicyStmt": "policy",
    "CreatePLangStmt": "language",
    # where the server connects to, with which credentials, and its directories (no OBJECT_ field in these)
    "CreateForeignServerStmt": "foreign_server",
    "AlterForeignServerStmt": "foreign_server",
    "CreateUserMappingStmt": "user_mapping",
    "AlterUserMappingStmt": "user_mapping",
    "DropUserMappingStmt": "user_mapping",
    "CreateSubscriptionStmt": "subscription",
    "AlterSubscriptionStmt": "subscription",
    "DropSubscriptionStmt": "subscription",
    "CreatePublicationStmt": "publication",
    "AlterPublicationStmt": "publication",
    "CreateTableSpaceStmt": "tablespace",
    "AlterTableSpaceOptionsStmt": "tablespace",
    "DropTableSpaceStmt": "tablespace",
    "CreateFdwStmt": "fdw",
    "AlterFdwStmt": "fdw",
}


def _object_type(node_type: str, body: _Node) -> str | None:
    if node_type == "CreateFunctionStmt":
        return "procedure" if body.get("is_procedure") else "function"
    for key in _OBJECT_TYPE_KEYS:
        value = body.get(key)
        if isinstance(value, str) and value.startswith("OBJECT_"):
            return value[7:].lower()
    return _OBJECT_TYPES.get(node_type)


_LEADING_WORD = re.compile(r"\s*([A-Za-z_]+)")


def _skip_comments(sql: str, pos: int) -> int:
    """The position of the first character at or after ``pos`` that is not white space or a comment."""
    while True:
        while pos < len(sql) and sql[pos].isspace():
            pos += 1
        if sql.startswith("--", pos):
            end = sql.find("\n", pos)
            pos = len(sql) if end < 0 else end + 1
        elif sql.startswith("/*", pos):
            depth, pos = 1, pos + 2  # block comments nest
            while pos < len(sql) and depth:
                if sql.startswith("/*", pos):
                    depth, pos = depth + 1, pos + 2
                elif sql.startswith("*/", pos):
                    depth, pos = depth - 1, pos + 2
                else:
                    pos += 1
        else:
            return pos


def _spelled_create_extension(sql: str) -> bool:
    """Whether a statement parsed as CreateExtensionStmt was written CREATE EXTENSION (not CREATE LANGUAGE)."""
    words = []
    pos = 0
    for _ in range(2):
        match = _LEADING_WORD.match(sql, _skip_comments(sql, pos))
        if match is None:
            return False
        words.append(match.group(1).lower())
        pos = match.end()
    return words == ["create", "extension"]


def _dollar_quote(body: str) -> str:
    """A dollar-quote tag that cannot end early inside ``body`` (no ``$tag`` anywhere in it)."""
    tag = "lictor_do"
    n = 0
    while f"${tag}" in body:
        n += 1
        tag = f"lictor_do{n}"
    return f"${tag}$"


_ROLE_SPECS = {
    "ROLESPEC_CURRENT_USER": "current_user",
    "ROLESPEC_SESSION_USER": "session_user",
    "ROLESPEC_CURRENT_ROLE": "current_role",
    "ROLESPEC_PUBLIC": "public",
}


def _role_name(spec: Any) -> str:
    """A RoleSpec node as a name: the role's (as the parser folded it), or the keyword it was written as."""
    if not isinstance(spec, dict):
        return "*"
    roletype = spec.get("roletype")
    if roletype == "ROLESPEC_CSTRING":
        return str(spec.get("rolename", ""))
    return _ROLE_SPECS.get(str(roletype), "*")


def _slice(sql: str, encoded: bytes | None, location: int, length: int) -> str:
    """libpg_query locations are byte offsets into the UTF-8 text."""
    if encoded is None:
        piece = sql[location : location + length] if length else sql[location:]
        return piece.strip()
    raw = encoded[location : location + length] if length else encoded[location:]
    return raw.decode("utf-8").strip()


class _Analysis:
    """Accumulates what the statements and bodies under one top-level statement do."""

    def __init__(self) -> None:
        self.kinds: set[str] = set()
        self.read: set[str] = set()
        self.written: set[str] = set()
        self.functions: set[str] = set()
        self.function_aliases: set[str] = set()  # names a function in FROM gives its value (FROM lower(x) t)
        self.qualified: set[tuple[str, str]] = set()  # (alias, name) of every alias.name
        self.columns: set[str] = set()
        self.settings: set[str] = set()
        self.languages: set[str] = set()
        self.roles: set[str] = set()
        self.objects: set[str] = set()
        self.wheres: list[bool] = []
        self.read_write_attempt = False
        self.dynamic = False
        self.copy_target: str | None = None
        self.copy_file: str | None = None
        self.copy_program: str | None = None
        self.copy_rewrites = False
        self.locks = False
        self.transforms = False  # an output expression computes from stored data (see transforms_data)
        # set_config() name arguments (by node identity) that a WHERE pins to these setting names
        self.pinned_names: dict[int, list[str]] = {}
        # settings' values read (Statement.settings_read), and what transforms_settings is decided from
        self.settings_read: set[str] = set()
        self.pinned_reads: dict[int, list[str]] = {}  # pg_settings in FROM (by node identity), its rows pinned
        self.setting_relations = False  # a relation of _SETTING_RELATIONS, or pg_show_all_settings(), is read
        self.setting_aliases: set[str] = set()  # their names and aliases (a whole row: reverse(s::text))
        self.derived: list[Any] = []  # subqueries, CTEs and functions in FROM
        self.output_bodies: list[tuple[str, _Node]] = []
        self.copied: list[_Node] = []  # COPY table TO statements
        self.new_setting_values: list[Any] = []  # set_config's new values
        self.root_kind: str | None = None

    # -- entry points ---------------------------------------------------------------------------------

    def sql(self, text: str, depth: int, where: str) -> None:
        """Fold in every statement of a piece of SQL found inside another statement."""
        if depth > MAX_NESTING:
            raise ClassificationError(f"{where}: nested more than {MAX_NESTING} levels deep")
        if "\0" in text:
            raise ClassificationError(f"{where}: NUL character in SQL text")
        encoded = None if text.isascii() else text.encode("utf-8")
        for raw in _parse(text, where):
            location = raw.get("stmt_location", 0)
            length = raw.get("stmt_len", 0)
            self.statement(raw["stmt"], lambda loc=location, n=length: _slice(text, encoded, loc, n), depth)

    def statement(self, stmt: _Node, text: Any, depth: int) -> None:
        """Walk one statement (``text`` returns its text, needed only for PL/pgSQL function bodies)."""
        self._walk(stmt, depth, text, root=True)
        # A function in FROM that returns one value gives its alias that value's type: alias.f is then f(value),
        # for any f (FROM lower('/etc/hostname') t ... t.pg_read_file), as (x).f is.
        for alias, name in self.qualified:
            if alias in self.function_aliases:
                self._field_call(name)

    # -- the tree walk --------------------------------------------------------------------------------

    def _walk(self, start: _Node, depth: int, text: Any, root: bool) -> None:
        """Visit every node under ``start``; ``root``: ``start`` is a statement of its own (not nested)."""
        stack: list[tuple[Any, frozenset[str], int]] = [(start, _NO_CTES, 0)]
        first = True
        while stack:
            node, ctes, flags = stack.pop()
            if type(node) is list:
                stack.extend((item, ctes, flags) for item in node if type(item) is dict or type(item) is list)
                continue
            if len(node) == 1:
                ((key, body),) = node.items()
                if type(body) is dict and key[:1].isupper():
                    is_root = first and root
                    first = False
                    self._node(key, body, ctes, flags, stack, depth, text, is_root)
                    continue
            first = False
            if "relname" in node:
                self._range_var(node, ctes, flags)
                continue
            stack.extend((v, ctes, flags) for v in node.values() if type(v) is dict or type(v) is list)

    def _push_children(
        self, body: _Node, ctes: frozenset[str], flags: int, stack: list[tuple[Any, frozenset[str], int]]
    ) -> None:
        stack.extend((v, ctes, flags) for v in body.values() if type(v) is dict or type(v) is list)

    def _node(
        self,
        key: str,
        body: _Node,
        ctes: frozenset[str],
        flags: int,
        stack: list[tuple[Any, frozenset[str], int]],
        depth: int,
        text: Any,
        is_root: bool,
    ) -> None:
        if key == "RangeVar":
            self._range_var(body, ctes, flags)
        elif key == "FuncCall":
            self._func_call(body, depth)
            self._push_children(body, ctes, flags, stack)
        elif key == "A_Indirection":
            for item in body.get("indirection", ()):
                name = _field_name(item)
                if name:
                    # (x).name is a field of x or a call of name(x): PostgreSQL tries both, and extensions'
                    # functions (dblink_exec, adminpack's) are in no list here, so every name counts as called
                    # (function rules are deny lists: a field that shares a dangerous function's name is rare)
                    self._field_call(name)
            self._push_children(body, ctes, flags, stack)
        elif key == "ColumnRef":
            fields = body.get("fields", ())
            if _row_call(fields) in ROW_FUNCTIONS:
                self._field_call(_row_call(fields))
            if 2 <= len(fields) <= 4 and _field_name(fields[-2]) and _field_name(fields[-1]):
                self.qualified.add((_field_name(fields[-2]), _field_name(fields[-1])))
            if flags & _TARGET:
                if fields:
                    last = fields[-1]
                    self.columns.add("*" if "A_Star" in last else str(last.get("String", {}).get("sval", "")).lower())
        elif key in ("A_Const", "String", "Integer", "Float", "Boolean", "ParamRef", "TypeName", "A_Star"):
            pass
        elif key in _OUTPUT_CLAUSES:
            if key in ("RangeFunction", "RangeTableFunc", "JsonTable"):
                self.derived.append(body)
            if key == "RangeFunction":
                self._function_alias(body)
            self._outputs(key, body)
            self._push_children(body, ctes, flags, stack)
        elif key.endswith("Stmt"):
            self._statement(key, body, ctes, stack, depth, text, is_root)
        else:
            if key == "RangeSubselect":
                self.derived.append(body)
            self._push_children(body, ctes, flags, stack)

    def _function_alias(self, body: _Node) -> None:
        """The name a function in FROM gives its result: its alias, or the function's own name."""
        alias = body.get("alias")
        if isinstance(alias, dict) and alias.get("aliasname"):
            self.function_aliases.add(str(alias["aliasname"]).lower())
            return
        for item in body.get("functions", ()):
            for node in item.get("List", {}).get("items", ()) if isinstance(item, dict) else item:
                call = node.get("FuncCall") if isinstance(node, dict) else None
                if isinstance(call, dict):
                    names = _names(call.get("funcname", ()))
                    if names:
                        self.function_aliases.add(names[-1].lower())

    def _outputs(self, key: str, body: _Node) -> None:
        """Note an output expression (target, RETURNING or VALUES list, function in FROM) that computes
        from stored data."""
        self.output_bodies.append((key, body))
        if self.transforms:
            return
        if key in ("RangeFunction", "RangeTableFunc", "JsonTable"):
            self.transforms = _reads_data(body)
            return
        self.transforms = not _plain_outputs(body)

    def _range_var(self, rv: _Node, ctes: frozenset[str], flags: int) -> None:
        name = str(rv.get("relname", ""))
        schema = rv.get("schemaname")
        catalog = rv.get("catalogname")
        if flags & _WRITE:
            target = self.written
        else:
            if not schema and not catalog and name in ctes:
                return
            target = self.read
        # db.schema.table names the current database's schema.table (any other database is an error):
        # recorded without it, so that rules on schema.table (pg_catalog.*) see it
        parts = [p for p in (schema, name) if p]
        target.add(".".join(parts).lower())
        if name in _SETTING_RELATIONS and schema in (None, "pg_catalog"):
            self.setting_relations = True
            alias = (rv.get("alias") or {}).get("aliasname")
            self.setting_aliases.add(str(alias or name).lower())
            if name == "pg_settings":
                self.settings_read.update(self.pinned_reads.get(id(rv), ["all"]))
            elif name != "pg_subscription":
                self.settings_read.add("all")

    def _func_call(self, body: _Node, depth: int) -> None:
        names = _names(body.get("funcname", ()))
        if not names:
            return
        bare = names[-1].lower()
        self._add_function(names)
        if bare in _SETTING_FUNCTIONS:
            self._setting_call(bare, body.get("args") or [])
        if bare == "set_config":
            self._set_config(body.get("args", []))
        elif bare in RELATION_READING_FUNCTIONS:
            self._relation_argument(bare, body.get("args", []))
        elif bare in _SCHEMA_READERS:
            self.dynamic = True
        elif bare in SQL_EXECUTING_FUNCTIONS:
            for arg in body.get("args", []):
                sql = _sval(arg.get("NamedArgExpr", {}).get("arg") if "NamedArgExpr" in arg else arg)
                if sql:
                    # Best effort: a constant argument that parses as SQL is folded in (a connection
                    # string does not parse and is skipped); the call stays dynamic either way.
                    try:
                        self.sql(sql, depth + 1, f"in {bare}() argument")
                    except ClassificationError:
                        continue

    def _relation_argument(self, name: str, args: list[_Node]) -> None:
        """``table_to_xml('pg_authid', ...)``, ``get_raw_page('customers', 0)``: the relation named by the first
        argument is read, as ``SELECT * FROM pg_authid`` reads it. A name that is not a constant (an oid, a
        column, an expression) could be any relation, the credential catalogs included: what is read is unseen.
        bt_page_items also takes a page that get_raw_page read (its relation is recorded there)."""
        positional = [arg for arg in args if "NamedArgExpr" not in arg]
        named = {a["NamedArgExpr"].get("name"): a["NamedArgExpr"].get("arg") for a in args if "NamedArgExpr" in a}
        first = positional[0] if positional else named.get("tbl", named.get("relname"))
        if name == "bt_page_items" and _call_name((first or {}).get("FuncCall") or {}) == "get_raw_page":
            return
        text = _sval(first)
        relation = _relation_named(text) if text is not None else None
        if relation is None:
            self.dynamic = True
            return
        self._range_var(relation, _NO_CTES, 0)

    def _field_call(self, name: str) -> None:
        """A function called in functional notation ((x).name, alias.name): counted as called, so that
        function rules and the checks by name (SQL-running, modifying, data-reading) see it."""
        self._add_function([name])
        if name in _SETTING_FUNCTIONS:
            self._setting_call(name, [])

    def _setting_call(self, name: str, args: list[_Node]) -> None:
        """current_setting('name') reads that setting; of a name that is not a constant, any (also
        pg_show_all_settings(), every setting)."""
        if name == "pg_show_all_settings":
            self.setting_relations = True  # a function in FROM, whose columns are then any column
        first = args[0] if args else None
        if isinstance(first, dict) and "NamedArgExpr" in first:
            first = None
        value = _sval(first) if name == "current_setting" and first is not None else None
        self.settings_read.add(value.strip().lower() if value is not None else "all")

    def transforms_settings(self) -> bool:
        """See Statement.transforms_settings."""
        if not (self.settings_read or self.setting_relations):
            return False
        aliases = frozenset(self.setting_aliases)
        derived = any(_carries_settings(body, aliases) for body in self.derived)

        def source(node: Any) -> bool:
            return _setting_source(node, derived, aliases)

        if self.languages:
            return True  # a DO block's or a function's variables carry a value where no output shows it
        if any(source(value) for value in self.new_setting_values):
            return True  # a setting keeps it for later statements to show, under a name no rule masks
        for key, body in self.output_bodies:
            if key == "RangeFunction":
                items = [item.get("List", {}).get("items", ()) for item in body.get("functions", ())]
                expressions: list[Any] = [parts[0] for parts in items if parts]
            elif key in _OUTPUT_STATEMENTS:
                expressions = list(_output_expressions(body))
            else:  # XMLTABLE, JSON_TABLE, MERGE's and ON CONFLICT's clauses: over any of them, computed
                expressions = [body]
                if source(body):
                    return True
            if any(source(e) and not _plain_output(_settings_as_columns(e)) for e in expressions):
                return True
        return False

    def reads_large_object_pages(self) -> bool:
        """Whether the statement outputs anything of ``pg_largeobject`` but its keys (``loid``, ``pageno``): a
        page is a 2 KB piece of a large object, and a value written across two pages is whole in neither, where
        detectors would see it (any column named otherwise, a whole row or ``*`` counts)."""
        if not self.read & _LARGE_OBJECT_PAGES:
            return False
        for copy in self.copied:
            relation = copy.get("relation", {})
            listed = {_field_name(column) for column in copy.get("attlist") or ()}
            named = ".".join(p for p in (relation.get("schemaname"), relation.get("relname")) if p).lower()
            if named in _LARGE_OBJECT_PAGES and (not listed or listed - {"loid", "pageno"}):
                return True
        for key, body in self.output_bodies:
            expressions = list(_output_expressions(body)) if key in _OUTPUT_STATEMENTS else [body]
            for item in _dicts(expressions):
                ref = item.get("ColumnRef")
                if isinstance(ref, dict):
                    fields = ref.get("fields", ())
                    if not fields or _field_name(fields[-1]) not in ("loid", "pageno"):
                        return True
        return False

    def _add_function(self, names: list[str]) -> None:
        """A function the statement calls, or names for an object to call later (an operator's or a cast's
        function, a trigger's, one renamed): a SQL-running one makes the statement dynamic wherever it is
        named, since the object then runs text the gateway does not see (``CREATE OPERATOR !! (RIGHTARG =
        text, FUNCTION = ts_stat)``, then ``SELECT !! '...'``)."""
        names = [n for n in names if n]
        if names:
            self.functions.add(names[-1].lower())
            if len(names) > 1:
                self.functions.add(".".join(names).lower())
            if names[-1].lower() in SQL_EXECUTING_FUNCTIONS:
                self.dynamic = True

    def _referenced_functions(self, body: _Node) -> None:
        """Functions an object created here will call (operators, aggregates, casts, types, ...)."""
        for node in _dicts(body):
            for key, value in node.items():
                if key == "DefElem" and isinstance(value, dict):
                    if str(value.get("defname", "")).lower() in _FUNCTION_OPTIONS:
                        arg = value.get("arg")
                        if isinstance(arg, dict) and "TypeName" in arg:
                            self._add_function(_names(arg["TypeName"].get("names", ())))
                        elif isinstance(arg, dict) and "List" in arg:
                            self._add_function(_names(arg["List"].get("items", ())))
                        elif isinstance(arg, list):
                            self._add_function(_names(arg))
                        elif _sval(arg):
                            self._add_function([str(_sval(arg))])
                elif key in ("objname", "funcname", "handler_name", "plhandler", "plinline", "plvalidator"):
                    if isinstance(value, list):
                        self._add_function(_names(value))

    def _fdw_options(self, body: _Node) -> None:
        """``OPTIONS (program '...')`` / ``(filename '...')``: file_fdw's COPY PROGRAM and COPY FROM a file.
        ``OPTIONS (schema_name 'pg_catalog', table_name 'pg_authid')``: the table postgres_fdw reads for a foreign
        table, on a server that may be this one (a loopback server reads pg_authid under another name)."""
        remote: dict[str, str] = {}
        for node in _dicts(body):
            elem = node.get("DefElem")
            if isinstance(elem, dict):
                defname = str(elem.get("defname", "")).lower()
                where = _FDW_SERVER_ACCESS.get(defname)
                if defname in ("schema_name", "table_name") and elem.get("defaction") != "DEFELEM_DROP":
                    remote[defname] = str(_sval(elem.get("arg")) or "")
                if where is not None and elem.get("defaction") != "DEFELEM_DROP":
                    value = _sval(elem.get("arg"))
                    if self.copy_target != "program":
                        self.copy_target = where
                    if where == "program":
                        self.copy_program = value
                    else:
                        self.copy_file = value
        # postgres_fdw's default table_name is the foreign table's own name (schema_name's is its own schema's,
        # which is a catalog's only if the foreign table is in pg_catalog, a write there)
        local = body.get("relation") or (body.get("base") or {}).get("relation") or {}
        table = remote.get("table_name") or (str(local.get("relname", "")) if remote.get("schema_name") else "")
        if table:
            self.read.add(".".join(p for p in (remote.get("schema_name"), table) if p).lower())

    def _imported_tables(self, body: _Node) -> None:
        """``IMPORT FOREIGN SCHEMA pg_catalog FROM SERVER loopback INTO public``: the foreign tables it makes read
        the remote schema's tables, those of ``LIMIT TO`` or, otherwise, every one (``pg_catalog.*``)."""
        schema = str(body.get("remote_schema", "")).lower()
        names = [str(item.get("RangeVar", {}).get("relname", "")).lower() for item in body.get("table_list") or ()]
        if body.get("list_type") == "FDW_IMPORT_SCHEMA_LIMIT_TO":
            self.read.update(f"{schema}.{name}" for name in names)
        else:
            self.read.add(f"{schema}.*")

    def _merge_where(self, body: _Node) -> None:
        """A MERGE that updates or deletes matched rows is a WHERE-less write unless a condition (the join
        condition, or the WHEN MATCHED clause's AND) looks at the target table: ``ON true`` touches every row."""
        relation = body.get("relation") or {}
        names = {str(relation.get("relname", "")).lower()}
        alias = (relation.get("alias") or {}).get("aliasname")
        if alias:
            names = {str(alias).lower()}
        join_refers = _refers_to(body.get("joinCondition"), names)
        changes = False
        for clause in body.get("mergeWhenClauses", ()):
            when = clause.get("MergeWhenClause", {})
            if when.get("commandType") not in ("CMD_UPDATE", "CMD_DELETE"):
                continue
            changes = True
            kind = when.get("matchKind")
            if kind == "MERGE_WHEN_MATCHED" or (kind is None and when.get("matched") is True):
                self.wheres.append(join_refers or _refers_to(when.get("condition"), names))
            else:
                # WHEN NOT MATCHED BY SOURCE (PostgreSQL 17) changes the target's rows that the join condition
                # does not match: only the clause's own condition restricts them
                self.wheres.append(_refers_to(when.get("condition"), names))
        if not changes:
            # it only inserts (or does nothing): no row of the target is changed, as with INSERT ... SELECT
            self.wheres.append(True)

    def _set_config(self, args: list[_Node]) -> None:
        # Positional arguments come first in a call; the first one is the parameter name.
        positional = [arg for arg in args if "NamedArgExpr" not in arg]
        named = {a["NamedArgExpr"].get("name"): a["NamedArgExpr"].get("arg") for a in args if "NamedArgExpr" in a}
        name_arg = positional[0] if positional else named.get("setting_name")
        # A setting keeps what it is given for later statements to return (current_setting, SHOW),
        # wherever the call sits, a WHERE clause included: a value from table data counts as output.
        new_value = positional[1] if len(positional) > 1 else named.get("new_value")
        if _reads_data(new_value):
            self.transforms = True
        if new_value is not None:
            self.new_setting_values.append(new_value)
        name = _sval(name_arg)
        if name is None:
            pinned = self.pinned_names.get(id(name_arg))
            if pinned is not None:
                for name in pinned:
                    self._set_config_name(name)
                return
            # The parameter name is computed: it could be any of them, the identity switches included, and
            # no `settings:` rule can tell which (dynamic_library_path, say): what it changes is unseen.
            self.read_write_attempt = True
            self.dynamic = True
            self.kinds.update(_IDENTITY_SETTINGS.values())
            return
        self._set_config_name(name)

    def _set_config_name(self, name: str) -> None:
        name = name.strip().lower()
        self.settings.add(name)
        if name in READ_ONLY_GUCS:
            self.read_write_attempt = True
        # set_config('role', ...) is SET ROLE, set_config('session_authorization', ...) is SET SESSION
        # AUTHORIZATION: the same identity switch by a function call.
        if name in _IDENTITY_SETTINGS:
            self.kinds.add(_IDENTITY_SETTINGS[name])

    # -- statements -----------------------------------------------------------------------------------

    def _statement(
        self,
        key: str,
        body: _Node,
        ctes: frozenset[str],
        stack: list[tuple[Any, frozenset[str], int]],
        depth: int,
        text: Any,
        is_root: bool,
    ) -> None:
        if key == "VariableSetStmt":
            kind = self._variable_set(body)
            # Nested, it is a function's SET clause: no SET runs now, but the setting changes whenever the
            # function runs, so settings and read_write_attempt are recorded all the same.
            if is_root:
                self.kinds.add(kind)
                self.root_kind = self.root_kind or kind
            return
        if key == "CreateExtensionStmt" and not _spelled_create_extension(text()):
            # CREATE LANGUAGE without HANDLER: the server runs it as CREATE EXTENSION of that name, which
            # creates the language; it is decided as the language creation it was written as.
            key = "CreatePLangStmt"
        kind = self._kind(key, body)
        self.kinds.add(kind)
        if is_root:
            self.root_kind = self.root_kind or kind
        object_type = _object_type(key, body)
        if object_type is not None and key not in _OUTPUT_STATEMENTS:
            self.objects.add(object_type)
        if key == "CreateExtensionStmt" and str(body.get("extname", "")).lower().startswith("pl"):
            # procedural languages ship as extensions of their name (plpython3u, plperlu, pltclu, plsh, ...):
            # CREATE EXTENSION of one creates the language, so it also counts as a language object
            self.objects.add("language")
        write_keys = _WRITE_KEYS.get(key, ())

        if key in _OUTPUT_STATEMENTS:
            self._outputs(key, body)
        if key == "SelectStmt":
            if not self.transforms and _outputs_merged_column(body, ctes):
                self.transforms = True
            if "lockingClause" in body:
                self.locks = True  # FOR UPDATE / SHARE: row locks, written into the rows
            self._pin_setting_names(body, ctes)
            self._pin_setting_reads(body, ctes)
        elif key == "VariableShowStmt":
            self.settings_read.add(str(body.get("name", "")).lower() or "all")
        elif key == "LockStmt" and body.get("mode") != _ACCESS_SHARE_LOCK:
            self.locks = True  # stronger than the lock a SELECT takes
        if key in ("UpdateStmt", "DeleteStmt"):
            self.wheres.append("whereClause" in body)
        elif key == "MergeStmt":
            self._merge_where(body)
        if key in _FUNCTION_REFERENCING:
            self._referenced_functions(body)
        if key in ("CreateForeignTableStmt", "AlterTableStmt", "CreateForeignServerStmt", "AlterForeignServerStmt"):
            self._fdw_options(body)
        elif key == "ImportForeignSchemaStmt":
            self._imported_tables(body)
        if key in ("UpdateStmt", "InsertStmt"):
            for item in body.get("targetList" if key == "UpdateStmt" else "cols", ()):
                name = item.get("ResTarget", {}).get("name")
                if name:
                    self.columns.add(str(name).lower())
        elif key == "CopyStmt":
            self._copy(body)
            write_keys = ("relation",) if body.get("is_from") else ()
            if not body.get("is_from") and "relation" in body:
                # COPY table TO: the table's columns (or those listed) are its output
                self.copied.append(body)
        elif key == "TransactionStmt":
            self._transaction_modes(body.get("options", ()))
        elif key == "DiscardStmt":
            if body.get("target") == "DISCARD_ALL":  # includes RESET ALL (see _variable_set)
                self.settings.add("all")
        elif key in ("AlterRoleSetStmt", "AlterDatabaseSetStmt", "AlterSystemStmt"):
            setstmt = body.get("setstmt")
            if setstmt:
                self._variable_set(setstmt)
            if key == "AlterRoleSetStmt":
                role = body.get("role")
                self.roles.add(_role_name(role) if role else "*")  # no role: ALTER ROLE ALL
        elif key == "AlterRoleStmt":
            self.roles.add(_role_name(body.get("role")))
        elif key == "DropRoleStmt":
            self.roles.update(_role_name(r.get("RoleSpec")) for r in body.get("roles", ()))
        elif key == "RenameStmt" and body.get("renameType") == "OBJECT_ROLE":
            self.roles.add(str(body.get("subname", "")))
        elif key == "RenameStmt" and body.get("renameType") in _RELATION_OBJECTS and body.get("newname"):
            # the relation under its new name is written too: a view made over it still reads it, whatever
            # it is named now (a foreign table renamed pg_authid reads a loopback server's pg_authid)
            schema = (body.get("relation") or {}).get("schemaname")
            self.written.add(".".join(p for p in (schema, str(body["newname"])) if p).lower())
        elif key == "RuleStmt" and body.get("event") == "CMD_SELECT":
            # An ON SELECT rule is a view's query: CREATE RULE "_RETURN" turns a table into a view of what the
            # rule selects (PostgreSQL 15 and older), updatable like any simple view
            self.kinds.add("create_view")
        elif key == "CallStmt":
            call = body.get("funccall")
            if call:
                self._func_call(call, depth)
        elif key in ("CreateTrigStmt", "CreateEventTrigStmt"):
            self._add_function(_names(body.get("funcname", ())))
        elif key == "DropStmt":
            if body.get("removeType") in _RELATION_OBJECTS:
                for obj in body.get("objects", ()):
                    items = obj.get("List", {}).get("items", ())
                    self.written.add(".".join(_names(items)).lower())
        elif key == "GrantStmt":
            if body.get("objtype") in _RELATION_OBJECTS:
                if body.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA":
                    for schema in _names(body.get("objects", ())):
                        self.written.add(f"{schema.lower()}.*")
                else:
                    write_keys = ("objects",)
        elif key == "DoStmt":
            self._do(body, depth)
        elif key == "CreateFunctionStmt":
            self._create_function(body, depth, text)

        inner = ctes
        with_clause = body.get("withClause")
        if with_clause:
            inner = self._with(with_clause, ctes, stack)
        for field, value in body.items():
            if type(value) is not dict and type(value) is not list:
                continue
            if field == "withClause":
                continue
            if field in write_keys:
                stack.append((value, inner, _WRITE))
            elif field in ("targetList", "returningList"):
                stack.append((value, inner, _TARGET))
            else:
                stack.append((value, inner, 0))

    def _pin_setting_names(self, body: _Node, ctes: frozenset[str]) -> None:
        """``SELECT set_config(name, ...) FROM pg_settings WHERE name = 'x'`` (or ``name IN ('x', ...)``, also
        AND-ed with other conditions), as pg_dump sends it: the parameter name is a column, but the WHERE
        lets only those constants through, so the call sets exactly those settings."""
        sources = body.get("fromClause") or ()
        if len(sources) != 1 or "RangeVar" not in sources[0] or "withClause" in body:
            return
        relation = sources[0]["RangeVar"]
        schema = relation.get("schemaname")
        if relation.get("relname") != "pg_settings" or relation.get("catalogname"):
            return
        if schema not in (None, "pg_catalog"):
            return
        if schema is None and "pg_settings" in ctes:
            return
        alias = (relation.get("alias") or {}).get("aliasname")
        qualifiers = {alias} if alias else {"pg_settings"}
        names = _pinned_names(body.get("whereClause"), qualifiers)
        if names is None:
            return
        for target in body.get("targetList", ()):
            call = target.get("ResTarget", {}).get("val", {}).get("FuncCall")
            if not call or [n.lower() for n in _names(call.get("funcname", ()))] not in _SET_CONFIG_NAMES:
                continue
            args = call.get("args") or ()
            if args and _is_name_column(args[0], qualifiers):
                self.pinned_names[id(args[0])] = names

    def _pin_setting_reads(self, body: _Node, ctes: frozenset[str]) -> None:
        """``SELECT setting FROM pg_settings WHERE name = 'x'`` (or ``name IN ('x', ...)``, also AND-ed with other
        conditions) reads only setting x: settings_read names those, not ``all``."""
        sources = body.get("fromClause") or ()
        if len(sources) != 1 or "RangeVar" not in sources[0] or "withClause" in body:
            return
        relation = sources[0]["RangeVar"]
        if relation.get("relname") != "pg_settings" or relation.get("catalogname"):
            return
        schema = relation.get("schemaname")
        if schema not in (None, "pg_catalog") or (schema is None and "pg_settings" in ctes):
            return
        alias = (relation.get("alias") or {}).get("aliasname")
        names = _pinned_names(body.get("whereClause"), {alias} if alias else {"pg_settings"})
        if names is not None:
            self.pinned_reads[id(relation)] = [n.strip().lower() for n in names]

    def _with(
        self, with_clause: _Node, ctes: frozenset[str], stack: list[tuple[Any, frozenset[str], int]]
    ) -> frozenset[str]:
        entries = [cte.get("CommonTableExpr", {}) for cte in with_clause.get("ctes", ())]
        names = [str(entry.get("ctename", "")) for entry in entries]
        self.derived.extend(entries)
        recursive = bool(with_clause.get("recursive"))
        for index, entry in enumerate(entries):
            visible = ctes | frozenset(names if recursive else names[:index])
            stack.append((entry, visible, 0))
        return ctes | frozenset(names)

    def _kind(self, key: str, body: _Node) -> str:
        kind = _SIMPLE_KINDS.get(key)
        if kind is not None:
            return kind
        if key == "SelectStmt":
            return "select_into" if "intoClause" in body else "select"
        if key == "CreateTableAsStmt":
            return "create_matview" if body.get("objtype") == "OBJECT_MATVIEW" else "create_table_as"
        if key in ("RenameStmt", "AlterObjectSchemaStmt", "AlterOwnerStmt"):
            return "alter_table" if "relation" in body else "alter_other"
        if key == "CopyStmt":
            if body.get("is_program"):
                self.kinds.add("copy_from" if body.get("is_from") else "copy_to")
                return "copy_program"
            return "copy_from" if body.get("is_from") else "copy_to"
        if key in ("GrantStmt", "GrantRoleStmt"):
            return "grant" if body.get("is_grant") else "revoke"
        if key == "ExplainStmt":
            for option in body.get("options", ()):
                elem = option.get("DefElem", {})
                if elem.get("defname") == "analyze" and _bool_option(elem.get("arg")):
                    return "explain_analyze"
            return "explain"
        if key == "VacuumStmt":
            return "vacuum" if body.get("is_vacuumcmd") else "analyze"
        if key == "TransactionStmt":
            return _TRANSACTION_KINDS.get(str(body.get("kind")), "unknown")
        return "unknown"

    def _variable_set(self, body: _Node) -> str:
        kind = body.get("kind", "")
        name = str(body.get("name", "")).lower()
        if kind == "VAR_SET_MULTI":
            if name == "transaction snapshot":
                self.settings.add("transaction_snapshot")
            else:
                prefix = "default_" if name == "session characteristics" else ""
                for option in body.get("args", ()):
                    elem = option.get("DefElem", {})
                    self.settings.add(prefix + str(elem.get("defname", "")))
                self._transaction_modes(body.get("args", ()))
            return "set_transaction"
        if kind == "VAR_RESET_ALL":
            # RESET ALL returns default_transaction_read_only to the session's reset value: in a read-only
            # session that is the gateway's startup setting (on), so it does not leave read-only mode
            # (asyncpg's pool sends RESET ALL whenever a connection goes back to the pool).
            self.settings.add("all")
            return "reset"
        value = _set_value(body)
        if not _keeps_fixed_value(name, value):
            self.settings.add(name)
        if name in READ_ONLY_GUCS and value not in _TRUE_WORDS:
            # any other value, RESET or DEFAULT: setting it is how read-only is left (SET ... = on, as
            # psycopg2's set_session(readonly=True) sends in autocommit, stays read-only)
            self.read_write_attempt = True
        if kind == "VAR_RESET":
            return "reset"
        return _IDENTITY_SETTINGS.get(name, "set")

    def _transaction_modes(self, options: Iterable[_Node]) -> None:
        """BEGIN / SET TRANSACTION / SESSION CHARACTERISTICS: READ WRITE leaves read-only mode."""
        for option in options:
            elem = option.get("DefElem", {})
            if elem.get("defname") == "transaction_read_only":
                value = _const_int(elem.get("arg"))
                if value is None or value == 0:
                    self.read_write_attempt = True

    def _copy(self, body: _Node) -> None:
        target = body.get("filename")
        if body.get("is_program"):
            where, program, path = "program", target, None
        elif target is not None:
            where, program, path = "file", None, target
        else:
            where, program, path = ("stdin" if body.get("is_from") else "stdout"), None, None
        if not body.get("is_from") and _copy_rewrites(body.get("options", ())):
            self.copy_rewrites = True
        if self.copy_target is None or where in ("program", "file"):
            self.copy_target, self.copy_program, self.copy_file = where, program, path

    # -- bodies ---------------------------------------------------------------------------------------

    def _do(self, body: _Node, depth: int) -> None:
        language = "plpgsql"
        code = None
        for arg in body.get("args", ()):
            elem = arg.get("DefElem", {})
            if elem.get("defname") == "language":
                language = str(_sval(elem.get("arg")) or "").lower()
            elif elem.get("defname") == "as":
                code = _sval(elem.get("arg"))
        self.languages.add(language)
        if language != "plpgsql":
            self.dynamic = True  # code in another language: the grammar cannot see what it runs
            return
        if code is None:
            raise ClassificationError("DO block without a body")
        quote = _dollar_quote(code)
        source = f"CREATE FUNCTION lictor_do() RETURNS void AS {quote}{code}{quote} LANGUAGE plpgsql"
        self._plpgsql(source, depth + 1, "in DO block")

    def _create_function(self, body: _Node, depth: int, text: Any) -> None:
        language = None
        code: list[str] = []
        for option in body.get("options", ()):
            elem = option.get("DefElem", {})
            if elem.get("defname") == "language":
                language = str(_sval(elem.get("arg")) or "").lower()
            elif elem.get("defname") == "as":
                arg = elem.get("arg", {})
                items = arg.get("List", {}).get("items", ()) if "List" in arg else [arg]
                code = [s for s in (_sval(item) for item in items) if s is not None]
        if "sql_body" in body:
            self.languages.add("sql")  # BEGIN ATOMIC ... END: already parsed, walked with the statement
            return
        language = language or ""
        self.languages.add(language)
        if language == "sql" and len(code) == 1:
            self.sql(code[0], depth + 1, "in SQL function body")
        elif language == "plpgsql" and len(code) == 1:
            self._plpgsql(text(), depth + 1, "in PL/pgSQL function body")
        else:
            self.dynamic = True  # C, internal, plpython, ...: runs code the grammar cannot see

    def _plpgsql(self, source: str, depth: int, where: str) -> None:
        if depth > MAX_NESTING:
            raise ClassificationError(f"{where}: nested more than {MAX_NESTING} levels deep")
        try:
            functions = pgparse.parse_pgsql(source)
        except pgparse.PGQueryError as exc:
            message = getattr(exc, "message", None) or str(exc)
            raise ClassificationError(f"{where}: {message}") from None
        except RecursionError:
            raise ClassificationError(f"{where}: body nested too deeply to analyze") from None
        bodies = [f.get("PLpgSQL_function", {}) for f in functions]
        if not bodies or not all("action" in b for b in bodies):
            raise ClassificationError(f"{where}: the PL/pgSQL body could not be analyzed")
        stack: list[tuple[Any, bool]] = [(b, False) for b in bodies]
        while stack:
            node, dynamic = stack.pop()
            if type(node) is list:
                stack.extend((item, False) for item in node)
                continue
            if type(node) is not dict:
                continue
            for key, value in node.items():
                if key == "PLpgSQL_expr":
                    self._plpgsql_expr(value, dynamic, depth, where)
                    continue
                if key in _PLPGSQL_KINDS:
                    self.kinds.add(_PLPGSQL_KINDS[key])
                dynamic_field = _PLPGSQL_DYNAMIC.get(key)
                if dynamic_field is not None and type(value) is dict:
                    stack.extend((v, k == dynamic_field) for k, v in value.items())
                elif type(value) is dict or type(value) is list:
                    stack.append((value, False))

    def _plpgsql_expr(self, expr: _Node, dynamic: bool, depth: int, where: str) -> None:
        query = str(expr.get("query", ""))
        mode = expr.get("parseMode", 0)
        if dynamic and mode != 2:
            self.dynamic = True  # not the expression shape EXECUTE has: do not guess
        if mode == 0:  # a whole SQL statement
            self.sql(query, depth, where)
            return
        if mode in (3, 4, 5):  # assignment: target := expression
            self._assignment(query, depth, where)
            return
        if mode != 2:
            raise ClassificationError(f"{where}: unsupported PL/pgSQL expression mode {mode}")
        tree = _parse("SELECT " + query, where)
        if dynamic:
            constant = _constant_select(tree)
            if constant is None:
                self.dynamic = True
            else:
                self.sql(constant, depth + 1, f"{where}, EXECUTE")
                return
        self._fold(tree, depth)

    def _assignment(self, query: str, depth: int, where: str) -> None:
        """``target := expr`` (or ``=``): find the split where both sides parse, the left as a target.

        The core grammar parses assignments only in a PL/pgSQL mode that pgparse does not expose; trying
        each ``=`` in turn with the real parser finds the same split (a wrong split cannot parse on both
        sides, since the target is only names, dots and subscripts), and both sides are walked.
        """
        tries = 0
        for index, char in enumerate(query):
            if char != "=":
                continue
            tries += 1
            if tries > _MAX_ASSIGNMENT_SPLITS:
                break
            lhs = query[: index - 1] if index and query[index - 1] == ":" else query[:index]
            try:
                left = _parse("SELECT " + lhs, where)
                right = _parse("SELECT " + query[index + 1 :], where)
            except ClassificationError:
                continue
            if _is_assignment_target(left):
                self._fold(left, depth)
                self._fold(right, depth)
                return
        raise ClassificationError(f"{where}: cannot analyze the assignment {query!r}")

    def _fold(self, tree: list[_Node], depth: int) -> None:
        """Walk a PL/pgSQL expression parsed as ``SELECT <expression>``: everything but that wrapper."""
        for raw in tree:
            stmt = raw["stmt"]
            select = stmt.get("SelectStmt")
            self._walk(select if select is not None else stmt, depth, str, root=False)


_TEXT_COPY_DELIMITERS = frozenset({"\t", ",", ";", "|"})


def _copy_rewrites(options: Iterable[_Node]) -> bool:
    """Whether COPY ... TO with these options writes some characters of a value otherwise than as they
    are: CSV doubles or escapes the QUOTE and ESCAPE characters inside a value (``QUOTE '1'`` turns
    ``4111`` into ``41111111``), text format backslash-escapes the DELIMITER inside a value, a CSV DELIMITER
    that is a digit or a letter glues values to their neighbours (``07411111111111111170``, where a card
    number without that digit is not quoted), and ENCODING converts the bytes. The defaults (and a tab,
    comma, semicolon or bar delimiter, or a space in CSV) leave values alone."""
    values: dict[str, Any] = {}
    for option in options:
        elem = option.get("DefElem", {})
        values[str(elem.get("defname", "")).lower()] = elem.get("arg")
    for name in ("quote", "escape"):
        if name in values and _sval(values[name]) != '"':
            return True
    csv = (_sval(values.get("format")) or "text").lower() == "csv"
    # CSV quotes a value holding its delimiter (a space too), text format backslash-escapes it
    safe = _TEXT_COPY_DELIMITERS | {" "} if csv else _TEXT_COPY_DELIMITERS
    if "delimiter" in values and _sval(values["delimiter"]) not in safe:
        return True
    if "encoding" in values:
        encoding = "".join(ch for ch in (_sval(values["encoding"]) or "") if ch.isalnum()).lower()
        if encoding not in _UTF8_NAMES:
            return True
    return False


_ACCESS_SHARE_LOCK = 1  # LockStmt.mode of LOCK ... IN ACCESS SHARE MODE (the lock SELECT takes)
_SET_CONFIG_NAMES = (["set_config"], ["pg_catalog", "set_config"])


def _is_name_column(node: Any, qualifiers: set[str]) -> bool:
    """``name``, or ``q.name`` for one of ``qualifiers``: pg_settings' ``name`` column."""
    ref = node.get("ColumnRef") if isinstance(node, dict) else None
    if not isinstance(ref, dict):
        return False
    fields = ref.get("fields", ())
    if not fields or not all(isinstance(f, dict) and "String" in f for f in fields):
        return False
    parts = _names(fields)
    return parts[-1] == "name" and (len(parts) == 1 or (len(parts) == 2 and parts[0] in qualifiers))


def _pinned_names(where: Any, qualifiers: set[str]) -> list[str] | None:
    """The constants a WHERE restricts pg_settings' ``name`` to (``name = 'x'``, ``name IN ('x', ...)``,
    either one AND-ed with anything), or None when it does not restrict it to constants."""
    if not isinstance(where, dict):
        return None
    if "BoolExpr" in where:
        expr = where["BoolExpr"]
        if expr.get("boolop") != "AND_EXPR":
            return None
        for arg in expr.get("args", ()):
            names = _pinned_names(arg, qualifiers)
            if names is not None:
                return names
        return None
    expr = where.get("A_Expr")
    if not isinstance(expr, dict) or _names(expr.get("name", ())) != ["="]:
        return None
    left, right = expr.get("lexpr"), expr.get("rexpr")
    if not _is_name_column(left, qualifiers):
        left, right = right, left
        if expr.get("kind") != "AEXPR_OP" or not _is_name_column(left, qualifiers):
            return None
    if expr.get("kind") == "AEXPR_OP":
        items = [right]
    elif expr.get("kind") == "AEXPR_IN" and isinstance(right, dict) and "List" in right:
        items = list(right["List"].get("items", ()))
    else:
        return None
    names = [_sval(item) for item in items]
    if not names or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def _constant_select(tree: list[_Node]) -> str | None:
    """The string if ``tree`` is exactly ``SELECT '<constant>'``."""
    if len(tree) != 1:
        return None
    select = tree[0]["stmt"].get("SelectStmt")
    if select is None or set(select) - {"targetList", "limitOption", "op"}:
        return None
    targets = select.get("targetList", ())
    if len(targets) != 1:
        return None
    target = targets[0].get("ResTarget", {})
    value = target.get("val", {})
    if set(value) != {"A_Const"}:
        return None
    sval = value["A_Const"].get("sval")
    return str(sval.get("sval", "")) if isinstance(sval, dict) else None


def _is_assignment_target(tree: list[_Node]) -> bool:
    if len(tree) != 1:
        return False
    select = tree[0]["stmt"].get("SelectStmt")
    if select is None or set(select) - {"targetList", "limitOption", "op"}:
        return False
    targets = select.get("targetList", ())
    if len(targets) != 1:
        return False
    value = targets[0].get("ResTarget", {}).get("val", {})
    if "A_Indirection" in value:
        value = value["A_Indirection"].get("arg", {})
    return "ColumnRef" in value


def _limit(stmt: _Node) -> int | None:
    select = stmt.get("SelectStmt")
    if select is None:
        return None
    return _const_int(select.get("limitCount"))


def _statements(sql: str) -> Iterator[Statement]:
    if "\0" in sql:
        raise ClassificationError("NUL character in SQL text")
    encoded = None if sql.isascii() else sql.encode("utf-8")
    for raw in _parse(sql, ""):
        try:
            statement = _statement(raw, sql, encoded)
        except RecursionError:
            # The walks over the tree recurse once per level too; the parser takes deeper trees than they do.
            raise ClassificationError(_TOO_DEEP) from None
        yield statement


def _statement(raw: _Node, sql: str, encoded: bytes | None) -> Statement:
    stmt: _Node = raw["stmt"]
    location = raw.get("stmt_location", 0)
    length = raw.get("stmt_len", 0)
    text = _slice(sql, encoded, location, length)
    ((node_type, body),) = stmt.items()
    analysis = _Analysis()
    analysis.statement(stmt, lambda text=text: text, 0)
    kind = analysis.root_kind or "unknown"
    analysis.kinds.add(kind)
    kinds = frozenset(analysis.kinds)
    prepared = body.get("name") if node_type in ("PrepareStmt", "ExecuteStmt", "DeallocateStmt") else None
    dynamic = analysis.dynamic
    modifies = (
        bool(kinds & MODIFYING_KINDS)
        or analysis.locks
        or dynamic
        or analysis.copy_target in ("file", "program")
        or not analysis.functions.isdisjoint(MODIFYING_FUNCTIONS)
    )
    # EXPLAIN without ANALYZE shows a plan, not rows. But EXPLAIN EXECUTE evaluates the EXECUTE's parameters to
    # plan the statement with them, and the plan prints their values (Filter: (note = '...'::text)).
    plan_only = kind == "explain" and not _explains_execute_with_params(body)
    return Statement(
        kind=kind,
        kinds=kinds,
        text=text,
        node=node_type,
        tables_read=frozenset(analysis.read),
        tables_written=frozenset(analysis.written),
        functions=frozenset(analysis.functions),
        columns=frozenset(analysis.columns),
        settings=frozenset(analysis.settings),
        has_where=(all(analysis.wheres) if analysis.wheres else None),
        limit=_limit(stmt),
        modifies=modifies,
        read_write_attempt=analysis.read_write_attempt,
        dynamic_sql=dynamic,
        prepared_name=str(prepared) if prepared is not None else None,
        object_type=_object_type(node_type, body),
        copy_target=analysis.copy_target,
        copy_file=analysis.copy_file,
        copy_program=analysis.copy_program,
        copy_rewrites=analysis.copy_rewrites,
        transforms_data=(analysis.transforms or analysis.reads_large_object_pages())
        and not plan_only  # (EXPLAIN ANALYZE runs the statement: it counts)
        and (
            not all(_catalog_relation(name) for name in analysis.read | analysis.written)
            or not analysis.functions.isdisjoint(_DATA_FUNCTIONS)
        ),
        languages=frozenset(analysis.languages),
        roles=frozenset(analysis.roles),
        objects=frozenset(analysis.objects),
        settings_read=frozenset(analysis.settings_read),
        transforms_settings=not plan_only and analysis.transforms_settings(),
    )


def _explains_execute_with_params(body: _Node) -> bool:
    """Whether an EXPLAIN's statement is an EXECUTE with parameters (also as CREATE TABLE AS EXECUTE, which
    EXPLAIN plans as the EXECUTE, without creating anything), whose parameters EXPLAIN evaluates."""
    query = body.get("query", {})
    query = query.get("CreateTableAsStmt", {}).get("query", query)
    execute = query.get("ExecuteStmt") if isinstance(query, dict) else None
    return isinstance(execute, dict) and bool(execute.get("params"))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _classify_cached(sql: str) -> tuple[Statement, ...]:
    return tuple(_statements(sql))


_PASSWORD_WORD = re.compile(r"(?i)password")
# Statements whose options may carry a password in clear text (a role's, a user mapping's).
_PASSWORD_OPTION_NODES = frozenset({"CreateRoleStmt", "AlterRoleStmt", "CreateUserMappingStmt", "AlterUserMappingStmt"})
REDACTED_PASSWORD = b"PASSWORD [REDACTED]"


def redact_secrets(sql: str) -> str:
    """``sql`` as it may be shown and recorded: the password of ``CREATE/ALTER ROLE ... PASSWORD`` and
    of user mappings' ``OPTIONS (password ...)`` replaced by ``[REDACTED]`` (up to the next option).
    Texts that never say "password", or that do not parse, come back as they are. Every execution of a
    statement is recorded, so the parse behind this is cached like classification (texts up to 16 KiB)."""
    if _PASSWORD_WORD.search(sql) is None:
        return sql
    if len(sql) <= _CACHE_MAX_TEXT:
        return _redacted_cached(sql)
    return _redacted(sql)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _redacted_cached(sql: str) -> str:
    return _redacted(sql)


def _redacted(sql: str) -> str:
    try:
        raws = _parse(sql, "")
    except ClassificationError:
        return sql
    data = sql.encode("utf-8")
    cuts: list[tuple[int, int, bytes]] = []
    for raw in raws:
        ((node_type, body),) = raw["stmt"].items()
        if node_type not in _PASSWORD_OPTION_NODES:
            continue
        stmt_start = int(raw.get("stmt_location", 0))
        stmt_end = stmt_start + int(raw["stmt_len"]) if raw.get("stmt_len") else len(data)
        options = [o["DefElem"] for o in body.get("options") or () if isinstance(o, dict) and "DefElem" in o]
        starts = sorted(int(o.get("location", -1)) for o in options)
        for option in options:
            if option.get("defname") != "password" or int(option.get("location", -1)) < stmt_start:
                continue
            start = int(option["location"])
            later = [at for at in starts if at > start]
            if later:
                cuts.append((start, later[0], REDACTED_PASSWORD + b" "))
            else:
                cuts.append((start, stmt_end, REDACTED_PASSWORD))
    if not cuts:
        return sql
    out, last = [], 0
    for start, end, replacement in sorted(cuts):
        if start < last:
            continue
        out += [data[last:start], replacement]
        last = end
    out.append(data[last:])
    return b"".join(out).decode("utf-8", "replace")


# The parse tree of a statement takes several hundred bytes of memory per token (a 2 MB `IN (1,1,...)`
# list took 700 MB): a statement with more tokens than this is refused before it is parsed.
MAX_TOKENS = 100_000
# What the count takes as one token each: string constants (standard and escape) and quoted identifiers,
# which parse to one node whatever their length; then words and numbers; then any other character. The
# text of function and DO bodies counts token by token: they are parsed too. Each alternative either
# matches or fails at once or at the one unterminated quote, so the count stays linear in the text.
_LEXEME = re.compile(
    r"[Ee]'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'"
    r"|'[^']*(?:''[^']*)*'"
    r'|"[^"]*(?:""[^"]*)*"'
    r"|[A-Za-z_0-9.\x80-\uffff]+"
    r"|\S",
)


def _check_tokens(sql: str) -> None:
    """Refuse, before parsing, a text with more than :data:`MAX_TOKENS` tokens (a bound on memory)."""
    if len(sql) <= MAX_TOKENS:
        return
    for count, _ in enumerate(_LEXEME.finditer(sql), 1):
        if count > MAX_TOKENS:
            raise ClassificationError(
                f"the statement has more than {MAX_TOKENS:,} tokens, more than the gateway analyses at once; "
                "send it in smaller parts (fewer rows per INSERT, shorter IN lists; COPY for bulk data)"
            )


def classify(sql: str) -> list[Statement]:
    """One :class:`Statement` per statement of ``sql``, in order (empty for a blank or ``;``-only text).

    Raises :class:`ClassificationError` when the text, or a body inside it, does not parse, or when it
    has more than :data:`MAX_TOKENS` tokens. Results for texts up to 16 KiB are cached (LRU, 4096
    entries); Statements are immutable.
    """
    if len(sql) <= _CACHE_MAX_TEXT:
        return list(_classify_cached(sql))
    _check_tokens(sql)
    return list(_statements(sql))


def fingerprint(sql: str) -> str:
    """libpg_query's fingerprint: equal for statements that differ only in constants and formatting."""
    if "\0" in sql:
        raise ClassificationError("NUL character in SQL text")
    _check_tokens(sql)
    try:
        return str(pgparse.fingerprint(sql))
    except RecursionError:
        raise ClassificationError(_TOO_DEEP) from None
    except pgparse.PGQueryError as exc:
        position = getattr(exc, "position", None)
        raise ClassificationError(getattr(exc, "message", None) or str(exc), position or None) from None
