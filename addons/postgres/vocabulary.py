"""The ``when:`` vocabulary of PostgreSQL rules.

A request is one SQL statement (a multi-statement string is several requests, decided together;
deny wins). Its attributes come from the real PostgreSQL grammar (libpg_query), see
``_classify.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lictor import Request
from lictor.vocabulary import Boolean, Enum, Glob, Number, Vocabulary

STATEMENT_KINDS = (
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "select_into",
    "create_table",
    "create_table_as",
    "create_index",
    "create_view",
    "create_function",
    "create_schema",
    "create_role",
    "create_extension",
    "create_trigger",
    "create_rule",
    "create_policy",
    "create_other",
    "alter_table",
    "alter_role",
    "alter_system",
    "alter_other",
    "drop",
    "truncate",
    "copy_to",
    "copy_from",
    "copy_program",
    "grant",
    "revoke",
    "set",
    "reset",
    "show",
    "set_role",
    "set_session_authorization",
    "set_transaction",
    "do",
    "call",
    "explain",
    "explain_analyze",
    "begin",
    "commit",
    "rollback",
    "savepoint",
    "release",
    "prepare",
    "execute",
    "deallocate",
    "listen",
    "notify",
    "unlisten",
    "vacuum",
    "analyze",
    "cluster",
    "reindex",
    "lock",
    "discard",
    "checkpoint",
    "load",
    "comment",
    "security_label",
    "declare_cursor",
    "fetch",
    "close_cursor",
    "refresh_matview",
    "reassign_owned",
    "drop_owned",
    "import_foreign_schema",
    "create_sequence",
    "create_database",
    "create_matview",
    "create_foreign_table",
    "create_event_trigger",
    "create_publication",
    "create_subscription",
    "alter_default_privileges",
    "set_constraints",
    "prepare_transaction",
    "commit_prepared",
    "rollback_prepared",
    "return",
    "function_call",
    "empty",
    "unknown",
)

VOCABULARY_FIELDS = (
    Enum(
        "statements",
        attr="kinds",
        values=STATEMENT_KINDS,
        description="statement kinds, nested ones included (a CTE DELETE inside a SELECT is a delete)",
    ),
    Glob("tables", description="tables read or written (schema.table or table; globs)"),
    Glob("tables_read", description="tables read"),
    Glob("tables_written", description="tables written"),
    Glob("functions", description="functions called anywhere in the statement (bare or schema-qualified)"),
    Glob("columns", description="columns referenced, where known"),
    Boolean("where", attr="has_where", description="UPDATE/DELETE has a WHERE clause"),
    Number("limit", minimum=0, description="constant LIMIT of a SELECT: {max: N}"),
    Boolean("modifies", description="the statement changes data or schema anywhere inside"),
    Boolean(
        "dynamic_sql",
        description="runs SQL the gateway cannot see (PL/pgSQL EXECUTE of an expression), or sets a setting "
        "whose name is computed (set_config(expression, ...))",
    ),
    Boolean(
        "leaves_read_only",
        attr="read_write_attempt",
        description="tries to turn off read-only mode (SET/RESET/set_config, BEGIN READ WRITE)",
    ),
    Boolean(
        "transforms_data",
        description="returns (or stores) values computed from table data instead of values as stored: a "
        "function, operator or cast over a column or subquery (reverse(card), substr(card, 1, 8), card::bytea, "
        "string_agg(email, ','), (card).reverse, table_to_xml(...), set_config of a column's value); plain "
        "columns, constants, comparisons, count, length/min/max/sum/avg of a column, coalesce, CASE, trim, "
        "date parts and catalog-only queries do not count. Deny it where results are masked: masking "
        "recognises values as stored",
    ),
    Glob("settings", description="names of settings changed by SET/RESET"),
    Glob(
        "settings_read",
        description="names of settings whose values the statement reads: SHOW name, current_setting('name'), "
        "pg_settings WHERE name = 'name'; all for SHOW ALL, a computed name, any other read of pg_settings, "
        "pg_show_all_settings(), pg_file_settings or pg_db_role_setting (roles' and databases' settings)",
    ),
    Boolean(
        "transforms_settings",
        description="computes over a setting's value or a subscription's connection string instead of returning "
        "it as it is: a function, operator or cast over current_setting(), pg_settings.setting, "
        "pg_db_role_setting.setconfig or pg_subscription.subconninfo (reverse(current_setting('x')), "
        "setting::int), or set_config of such a value; the value itself, current_setting(name), unnest and "
        "array_to_string of such an array do not count. Deny it where those values are masked",
    ),
    Glob("databases", attr="database", description="the database the agent connected to"),
    Enum(
        "copy",
        attr="copy_target",
        values=("stdin", "stdout", "file", "program"),
        description="where COPY reads or writes: the client (stdin/stdout), a server file or a server program",
    ),
    Glob(
        "roles",
        description="roles altered, dropped or renamed (ALTER/DROP ROLE or USER): names, current_user, "
        "session_user, current_role, or * for ALTER ROLE ALL",
    ),
    Glob(
        "objects",
        description="types of the objects that DDL, GRANT or COMMENT statements create, alter, drop, rename or "
        "name, nested ones included: table, view, function, procedure, schema, role, database, extension, "
        "foreign_server, user_mapping, subscription, publication, tablespace, fdw, ...",
    ),
    Glob(
        "languages",
        description="languages of DO blocks and function bodies involved (plpgsql, sql, plpython3u, c, ...)",
    ),
)


def _build(case: Mapping[str, Any], target: str) -> Sequence[Request]:
    from ._requests import requests_for_sql

    sql = case.get("sql")
    if not isinstance(sql, str):
        raise ValueError("a postgres test request needs `sql:`")
    return requests_for_sql(sql, target=target, database=str(case.get("database", "")))


VOCABULARY = Vocabulary(
    protocol="postgres",
    fields=VOCABULARY_FIELDS,
    index="statements",
    secondary="tables",
    description="PostgreSQL statements, classified with the real PostgreSQL grammar",
    build_requests=_build,
    test_request_schema={"type": "object", "properties": {"sql": {}, "database": {}}},
)
