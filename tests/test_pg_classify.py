"""SQL classification with the real PostgreSQL grammar, including the known evasions."""

import pytest
from lictor_addons.postgres import _classify
from lictor_addons.postgres import _protocol as pg
from lictor_addons.postgres._classify import ClassificationError, Statement, classify, fingerprint

from tests.conftest import require

# (sql, expected fields of the single statement). Sets are compared exactly.
CASES: list[tuple[str, dict[str, object]]] = [
    # Plain DML and reads
    (
        "SELECT a, b FROM t WHERE c > 1 LIMIT 10",
        {"kind": "select", "kinds": {"select"}, "tables_read": {"t"}, "columns": {"a", "b"}, "limit": 10},
    ),
    ("SELECT 1 FETCH FIRST 3 ROWS ONLY", {"limit": 3, "modifies": False, "tables_read": set()}),
    ("SELECT 1 LIMIT ALL", {"limit": None}),
    ("SELECT 1 LIMIT $1", {"limit": None}),
    ("SELECT 1 LIMIT 0", {"limit": 0}),
    (
        'SELECT * FROM Public."MyTable" AS "A" JOIN u USING (id) WHERE x IN (SELECT y FROM s.v)',
        {"tables_read": {"public.mytable", "u", "s.v"}, "columns": {"*", "y"}},
    ),
    ("TABLE t", {"kind": "select", "tables_read": {"t"}}),
    # MERGE updating or deleting matched rows needs a condition on the target, like UPDATE/DELETE's WHERE
    ("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", {"kind": "merge", "has_where": False}),
    ("MERGE INTO t USING s ON 1 = 1 WHEN MATCHED THEN UPDATE SET a = 1", {"has_where": False}),
    ("MERGE INTO t USING s ON s.id = 3 WHEN MATCHED THEN DELETE", {"has_where": False}),
    ("MERGE INTO t USING s ON s.id = t.id WHEN MATCHED THEN DELETE", {"has_where": True}),
    ("MERGE INTO t AS x USING s ON s.id = x.id WHEN MATCHED THEN DELETE", {"has_where": True}),
    ("MERGE INTO t USING s ON true WHEN MATCHED AND t.id = 5 THEN DELETE", {"has_where": True}),
    # a MERGE that only inserts changes no row (`where: false` denies a missing attribute)
    ("MERGE INTO t USING s ON s.id = 1 WHEN NOT MATCHED THEN INSERT VALUES (1)", {"has_where": True}),
    # NOT MATCHED BY SOURCE changes the rows the join condition does not match: only its own AND restricts them
    (
        "MERGE INTO t USING s ON s.id = t.id WHEN MATCHED THEN DELETE WHEN NOT MATCHED BY SOURCE THEN DELETE",
        {"has_where": False},
    ),
    ("MERGE INTO t USING s ON s.id = t.id WHEN NOT MATCHED BY SOURCE AND t.id > 5 THEN DELETE", {"has_where": True}),
    # set_config() of role / session_authorization is SET ROLE / SET SESSION AUTHORIZATION
    ("SELECT set_config('role', 'pg_read_all_data', false)", {"kinds": {"select", "set_role"}}),
    ("SELECT set_config('Session_Authorization', 'root', false)", {"kinds": {"select", "set_session_authorization"}}),
    (
        "SELECT set_config(name, 'x', false) FROM t",
        {"kinds": {"select", "set_role", "set_session_authorization"}, "read_write_attempt": True},
    ),
    # writes that PostgreSQL allows in a read-only transaction (large objects) or that reach other sessions
    ("SELECT lo_from_bytea(0, 'x')", {"kind": "select", "modifies": True}),
    ("SELECT pg_catalog.lo_unlink(16400)", {"modifies": True}),
    ("SELECT pg_notify('ch', 'x')", {"modifies": True}),
    ("SELECT pg_stat_reset()", {"modifies": True}),
    ("SELECT lo_get(16400)", {"modifies": False}),
    # functions an object will call are functions of the statement that creates it
    (
        "CREATE OPERATOR ==> (PROCEDURE = pg_catalog.pg_read_file, RIGHTARG = text)",
        {"functions": {"pg_read_file", "pg_catalog.pg_read_file"}},
    ),
    ("CREATE AGGREGATE a(text) (SFUNC = pg_read_file, STYPE = text)", {"functions": {"pg_read_file"}}),
    ("CREATE CAST (text AS int) WITH FUNCTION pg_read_file(text)", {"functions": {"pg_read_file"}}),
    ("CREATE TYPE x (INPUT = pg_read_file, OUTPUT = textout)", {"functions": {"pg_read_file", "textout"}}),
    # file_fdw options are COPY FROM PROGRAM / FROM a server file
    (
        "CREATE FOREIGN TABLE ft (l text) SERVER fs OPTIONS (program 'id')",
        {"copy_target": "program", "copy_program": "id", "modifies": True},
    ),
    (
        "ALTER FOREIGN TABLE ft OPTIONS (SET filename '/etc/passwd')",
        {"copy_target": "file", "copy_file": "/etc/passwd"},
    ),
    ("UPDATE t SET a = 1", {"kind": "update", "has_where": False, "tables_written": {"t"}, "modifies": True}),
    (
        "UPDATE t SET a = 1 FROM u WHERE t.id = u.id RETURNING t.secret",
        {"has_where": True, "tables_written": {"t"}, "tables_read": {"u"}, "columns": {"a", "secret"}},
    ),
    ("DELETE FROM t", {"kind": "delete", "kinds": {"delete"}, "has_where": False, "tables_written": {"t"}}),
    (
        "DELETE FROM s.t USING u WHERE t.id = u.id",
        {"has_where": True, "tables_written": {"s.t"}, "tables_read": {"u"}},
    ),
    (
        "INSERT INTO t (a, b) SELECT a, b FROM src RETURNING id",
        {"kind": "insert", "kinds": {"insert", "select"}, "tables_written": {"t"}, "tables_read": {"src"}},
    ),
    (
        "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET n = excluded.n",
        {"kind": "insert", "tables_written": {"t"}, "has_where": None},
    ),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
        {"kind": "merge", "kinds": {"merge"}, "tables_written": {"t"}, "tables_read": {"s"}, "modifies": True},
    ),
    # Data-modifying CTEs, CTE names are not tables
    (
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        {"kind": "select", "kinds": {"select", "delete"}, "tables_written": {"t"}, "tables_read": set()},
    ),
    (
        "WITH a AS (SELECT * FROM b), c AS (SELECT * FROM a) SELECT * FROM c, t",
        {"tables_read": {"b", "t"}, "modifies": False},
    ),
    ("WITH a AS (SELECT * FROM a) SELECT * FROM a", {"tables_read": {"a"}}),  # not recursive: a real table
    ("WITH RECURSIVE a AS (SELECT * FROM a) SELECT * FROM a", {"tables_read": set()}),
    ("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) s, x", {"tables_read": {"x"}}),  # out of scope
    ("WITH t AS (SELECT 1) DELETE FROM t", {"tables_written": {"t"}}),  # a target is always a table
    ("WITH u AS (UPDATE t SET a = 1 RETURNING a) SELECT 1", {"kinds": {"select", "update"}, "has_where": False}),
    # Comments and quoting cannot hide anything
    ("/* SELECT */ DELETE FROM t", {"kind": "delete"}),
    ("-- SELECT 1\nDELETE FROM t -- trailing", {"kind": "delete", "text": "-- SELECT 1\nDELETE FROM t -- trailing"}),
    ("/* nested /* comment */ DROP TABLE x */ SELECT 1", {"kind": "select", "kinds": {"select"}}),
    ("SELECT $$; DROP TABLE t; $$", {"kind": "select", "kinds": {"select"}, "tables_written": set()}),
    ("SELECT $x$ $$; DROP TABLE t; $x$", {"kind": "select", "kinds": {"select"}}),
    ("SELECT E'\\'; DROP TABLE t; --'", {"kind": "select", "kinds": {"select"}}),  # escape string: one literal
    ('SELECT 1 AS "; DROP TABLE t; --"', {"kind": "select", "kinds": {"select"}}),
    # Functions, wherever they are called
    ("SELECT pg_read_file('/etc/passwd')", {"functions": {"pg_read_file"}, "modifies": False}),
    ("SELECT pg_catalog.pg_ls_dir('.')", {"functions": {"pg_ls_dir", "pg_catalog.pg_ls_dir"}}),
    ("SELECT lo_import('/etc/passwd')", {"functions": {"lo_import"}}),
    ("SELECT * FROM t WHERE a = ANY(SELECT unnest(f(x)))", {"functions": {"unnest", "f"}}),
    ("SELECT count(*) FILTER (WHERE g(a)) OVER (ORDER BY h(b)) FROM t", {"functions": {"count", "g", "h"}}),
    (
        "CREATE TABLE z (a int DEFAULT nextval('s'), b text CHECK (length(b) < 5) REFERENCES other (id))",
        {"kind": "create_table", "functions": {"nextval", "length"}, "tables_written": {"z"}, "tables_read": {"other"}},
    ),
    (
        "SELECT trim(both from x), extract(year from now())",
        {"functions": {"btrim", "pg_catalog.btrim", "extract", "pg_catalog.extract", "now"}},
    ),
    ("CALL s.p(f())", {"kind": "call", "functions": {"p", "s.p", "f"}, "modifies": True}),
    (
        "SELECT * FROM dblink('dbname=x', 'DELETE FROM t') AS r(a int)",
        {"functions": {"dblink"}, "dynamic_sql": True, "kinds": {"select", "delete"}, "tables_written": {"t"}},
    ),
    ("SELECT query_to_xml(q, true, false, '') FROM queries", {"dynamic_sql": True, "modifies": True}),
    # SELECT INTO, CREATE TABLE AS, views
    (
        "SELECT * INTO newt FROM t",
        {"kind": "select_into", "tables_written": {"newt"}, "tables_read": {"t"}, "modifies": True},
    ),
    (
        "CREATE TABLE x AS SELECT * FROM y",
        {
            "kind": "create_table_as",
            "kinds": {"create_table_as", "select"},
            "tables_written": {"x"},
            "tables_read": {"y"},
        },
    ),
    ("CREATE MATERIALIZED VIEW mv AS SELECT * FROM y", {"kind": "create_matview", "tables_written": {"mv"}}),
    ("CREATE VIEW v AS SELECT secret FROM y", {"kind": "create_view", "tables_written": {"v"}, "tables_read": {"y"}}),
    # EXPLAIN
    ("EXPLAIN ANALYZE DELETE FROM t", {"kind": "explain_analyze", "kinds": {"explain_analyze", "delete"}}),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", {"kinds": {"explain_analyze", "update"}}),
    ("EXPLAIN (ANALYZE off) DELETE FROM t", {"kind": "explain", "kinds": {"explain", "delete"}}),
    ("EXPLAIN (ANALYZE 0) SELECT 1", {"kind": "explain", "modifies": False}),
    ("EXPLAIN SELECT 1", {"kind": "explain", "modifies": False}),
    # COPY
    (
        "COPY t TO PROGRAM 'sh -c id'",
        {
            "kind": "copy_program",
            "kinds": {"copy_program", "copy_to"},
            "copy_program": "sh -c id",
            "copy_target": "program",
        },
    ),
    (
        "COPY t FROM PROGRAM 'curl x'",
        {"kinds": {"copy_program", "copy_from"}, "tables_written": {"t"}, "modifies": True},
    ),
    (
        "COPY (SELECT * FROM secrets) TO STDOUT",
        {
            "kind": "copy_to",
            "kinds": {"copy_to", "select"},
            "copy_target": "stdout",
            "tables_read": {"secrets"},
            "modifies": False,
        },
    ),
    ("COPY t FROM STDIN", {"kind": "copy_from", "copy_target": "stdin", "tables_written": {"t"}, "modifies": True}),
    ("COPY t TO '/tmp/out'", {"kind": "copy_to", "copy_target": "file", "copy_file": "/tmp/out", "modifies": True}),
    # PREPARE / EXECUTE
    ("PREPARE p AS DELETE FROM t", {"kind": "prepare", "kinds": {"prepare", "delete"}, "prepared_name": "p"}),
    ("EXECUTE p(1, f())", {"kind": "execute", "prepared_name": "p", "dynamic_sql": False, "functions": {"f"}}),
    ("DEALLOCATE p", {"kind": "deallocate", "prepared_name": "p"}),
    ("DEALLOCATE ALL", {"kind": "deallocate", "prepared_name": None}),
    # Roles, settings and read-only mode
    ("SET ROLE postgres", {"kind": "set_role", "settings": {"role"}, "read_write_attempt": False}),
    ("RESET ROLE", {"kind": "reset", "settings": {"role"}}),
    ("SET SESSION AUTHORIZATION postgres", {"kind": "set_session_authorization"}),
    ("SET search_path = evil, public", {"kind": "set", "settings": {"search_path"}, "modifies": False}),
    ("SET TIME ZONE 'UTC'", {"settings": {"timezone"}}),
    ("SET NAMES 'SJIS'", {"settings": {"client_encoding"}}),
    (
        "SET default_transaction_read_only = off",
        {"read_write_attempt": True, "settings": {"default_transaction_read_only"}},
    ),
    ("SET default_transaction_read_only = on", {"read_write_attempt": False}),  # stays read-only
    ("SET default_transaction_read_only = 'of'", {"read_write_attempt": True}),  # any other value counts
    ("SET LOCAL transaction_read_only TO DEFAULT", {"read_write_attempt": True}),
    ('SET "Transaction_Read_Only" = off', {"read_write_attempt": True}),
    ("RESET transaction_read_only", {"kind": "reset", "read_write_attempt": True}),
    # the reset value of default_transaction_read_only is the gateway's startup setting
    ("RESET ALL", {"kind": "reset", "settings": {"all"}, "read_write_attempt": False}),
    ("DISCARD ALL", {"kind": "discard", "read_write_attempt": False}),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", {"kind": "set_transaction", "read_write_attempt": True}),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", {"read_write_attempt": False}),
    ("SET TRANSACTION READ WRITE", {"kind": "set_transaction", "read_write_attempt": True}),
    (
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        {"read_write_attempt": False, "settings": {"transaction_isolation"}},
    ),
    ("BEGIN READ WRITE", {"kind": "begin", "read_write_attempt": True}),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE", {"kind": "begin", "read_write_attempt": True}),
    ("BEGIN READ ONLY", {"kind": "begin", "read_write_attempt": False}),
    ("BEGIN", {"kind": "begin", "read_write_attempt": False, "modifies": False}),
    ("SELECT set_config('default_transaction_read_only', 'off', false)", {"read_write_attempt": True}),
    ("SELECT pg_catalog.set_config('Transaction_Read_Only'::text, 'off', true)", {"read_write_attempt": True}),
    (
        "SELECT 1 WHERE set_config(is_local => false, new_value => 'off', setting_name => 'transaction_read_only') = ''",
        {"read_write_attempt": True},
    ),
    ("SELECT set_config('search_path', 'x', false)", {"read_write_attempt": False, "settings": {"search_path"}}),
    ("SELECT set_config(name, 'off', false) FROM names", {"read_write_attempt": True, "dynamic_sql": True}),
    ("SELECT set_config('default_' || 'transaction_read_only', 'off', false)", {"read_write_attempt": True}),
    # pg_dump's form: the name is pg_settings' column, pinned to constants by the WHERE
    (
        "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings "
        "WHERE name = 'restrict_nonsystem_relation_kind'",
        {"read_write_attempt": False, "settings": {"restrict_nonsystem_relation_kind"}, "kinds": {"select"}},
    ),
    (
        "SELECT pg_catalog.set_config(s.name, 'off', false) FROM pg_catalog.pg_settings s "
        "WHERE s.name IN ('jit', 'Role') AND s.setting <> 'off'",
        {"settings": {"jit", "role"}, "kinds": {"select", "set_role"}},
    ),
    (
        "SELECT set_config(name, 'off', false) FROM pg_settings WHERE name = 'transaction_read_only'",
        {"read_write_attempt": True, "settings": {"transaction_read_only"}},
    ),
    # not pinned: an OR, another table, a CTE of that name, a nested call
    ("SELECT set_config(name, 'x', false) FROM pg_settings WHERE name = 'jit' OR true", {"read_write_attempt": True}),
    ("SELECT set_config(name, 'x', false) FROM pg_settings, t WHERE name = 'jit'", {"read_write_attempt": True}),
    (
        "WITH pg_settings AS (SELECT 'role' AS name) SELECT set_config(name, 'x', false) FROM pg_settings "
        "WHERE name = 'jit'",
        {"read_write_attempt": True, "settings": set()},
    ),
    (
        "SELECT (SELECT set_config(name, 'x', false)) FROM pg_settings WHERE name = 'jit'",
        {"read_write_attempt": True, "kinds": {"select", "set_role", "set_session_authorization"}},
    ),
    ("ALTER ROLE me SET default_transaction_read_only = off", {"kind": "alter_role", "read_write_attempt": True}),
    ("ALTER DATABASE d SET default_transaction_read_only = off", {"kind": "alter_other", "read_write_attempt": True}),
    ("ALTER SYSTEM SET default_transaction_read_only = off", {"kind": "alter_system", "read_write_attempt": True}),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET transaction_read_only = off AS 'SELECT 1'",
        {"read_write_attempt": True, "kinds": {"create_function", "select"}},
    ),
    # DO blocks
    (
        "DO $$ BEGIN DELETE FROM t; END $$",
        {"kind": "do", "kinds": {"do", "delete"}, "tables_written": {"t"}, "has_where": False, "dynamic_sql": False},
    ),
    ("DO $$ BEGIN EXECUTE 'DROP TABLE ' || 't'; END $$", {"kind": "do", "dynamic_sql": True, "modifies": True}),
    ("DO $$ BEGIN EXECUTE format('DROP TABLE %I', 't'); END $$", {"dynamic_sql": True, "functions": {"format"}}),
    (
        "DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$",
        {"kinds": {"do", "drop"}, "tables_written": {"t"}, "dynamic_sql": False},
    ),
    ("DO $$ BEGIN EXECUTE E'DELETE\\x20FROM t'; END $$", {"kinds": {"do", "delete"}, "dynamic_sql": False}),
    (
        "DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT 1' || '' LOOP END LOOP; END $$",
        {"dynamic_sql": True},
    ),
    (
        "DO $$ DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE q(); END $$",
        {"dynamic_sql": True, "functions": {"q"}},
    ),
    (
        "DO $$ BEGIN PERFORM pg_sleep(1); IF (SELECT count(*) FROM secrets) > 0 THEN "
        "UPDATE t SET a = 1 WHERE id = 2; END IF; END $$",
        {"functions": {"pg_sleep", "count"}, "tables_read": {"secrets"}, "tables_written": {"t"}, "has_where": True},
    ),
    (
        "DO $$ DECLARE x text := pg_read_file('/etc/passwd'); arr int[]; BEGIN arr[g(1)] := 2; x = h(x); END $$",
        {"functions": {"pg_read_file", "g", "h"}},
    ),
    ("DO $$ BEGIN SET LOCAL transaction_read_only = off; END $$", {"read_write_attempt": True, "kinds": {"do", "set"}}),
    ("DO $$ BEGIN COMMIT; END $$", {"kinds": {"do", "commit"}}),
    ("DO $$ BEGIN PERFORM 1; -- $lictor_do$\nEND $$", {"kind": "do", "dynamic_sql": False}),  # tag collision
    ("DO $q$ BEGIN EXECUTE 'DO $$ BEGIN DROP TABLE t; END $$'; END $q$", {"kinds": {"do", "drop"}}),
    ("DO LANGUAGE plpython3u $$ plpy.execute('DROP TABLE t') $$", {"dynamic_sql": True, "modifies": True}),
    ("DO 'BEGIN DELETE FROM t; END'", {"kinds": {"do", "delete"}}),
    # Function bodies are classified when created
    (
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN UPDATE t SET a = pg_sleep(1); END $f$",
        {"kind": "create_function", "kinds": {"create_function", "update"}, "functions": {"pg_sleep"}},
    ),
    (
        "CREATE FUNCTION f(a int, OUT b int) LANGUAGE plpgsql AS $f$ BEGIN b := a + 1; END $f$",
        {"kinds": {"create_function"}, "dynamic_sql": False},
    ),
    (
        "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN NEW.a := now(); RETURN NEW; END $f$",
        {"functions": {"now"}},
    ),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'DELETE FROM t RETURNING 1'",
        {"kinds": {"create_function", "delete"}},
    ),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC DELETE FROM t; SELECT 1; END",
        {"kinds": {"create_function", "delete", "select"}},
    ),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'lib', 'sym'", {"dynamic_sql": True, "languages": {"c"}}),
    ("CREATE FUNCTION r() RETURNS text LANGUAGE internal AS 'pg_read_file_off_len'", {"dynamic_sql": True}),
    (
        "CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN TRUNCATE t; END $$",
        {"kinds": {"create_function", "truncate"}, "object_type": "procedure"},
    ),
    # DDL, privileges, maintenance
    ("DROP TABLE a.b, c CASCADE", {"kind": "drop", "tables_written": {"a.b", "c"}, "object_type": "table"}),
    ("DROP FUNCTION f(int)", {"kind": "drop", "tables_written": set(), "object_type": "function"}),
    ("DROP ROLE bob", {"kind": "drop", "object_type": "role"}),
    ("TRUNCATE a, ONLY b", {"kind": "truncate", "tables_written": {"a", "b"}}),
    (
        "ALTER TABLE t ADD COLUMN c int DEFAULT f()",
        {"kind": "alter_table", "tables_written": {"t"}, "functions": {"f"}},
    ),
    (
        "ALTER TABLE t RENAME TO u",
        {"kind": "alter_table", "tables_written": {"t", "u"}},
    ),  # u: the table under its new name
    ("ALTER FUNCTION f() OWNER TO bob", {"kind": "alter_other"}),
    ("CREATE INDEX ON t (lower(a))", {"kind": "create_index", "tables_written": {"t"}, "functions": {"lower"}}),
    (
        "CREATE SCHEMA s CREATE TABLE s.x (a int)",
        {"kinds": {"create_schema", "create_table"}, "tables_written": {"s.x"}},
    ),
    ("CREATE ROLE r SUPERUSER", {"kind": "create_role"}),
    ("ALTER ROLE r SUPERUSER", {"kind": "alter_role"}),
    ("CREATE EXTENSION dblink", {"kind": "create_extension"}),
    (
        "CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION s.trf()",
        {"kind": "create_trigger", "functions": {"trf", "s.trf"}},
    ),
    (
        "CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM u",
        {"kind": "create_rule", "kinds": {"create_rule", "delete"}},
    ),
    (
        'CREATE RULE "_RETURN" AS ON SELECT TO t DO INSTEAD SELECT * FROM pg_catalog.pg_proc',
        {
            "kind": "create_rule",
            "kinds": {"create_rule", "create_view", "select"},
            "tables_read": {"pg_catalog.pg_proc"},
        },
    ),
    ("CREATE POLICY p ON t USING (owner = current_user)", {"kind": "create_policy", "tables_written": {"t"}}),
    ("CREATE SEQUENCE sq", {"kind": "create_sequence", "tables_written": {"sq"}}),
    ("CREATE TYPE ty AS (a int)", {"kind": "create_other"}),
    ("GRANT SELECT ON t, s.u TO bob", {"kind": "grant", "tables_written": {"t", "s.u"}}),
    ("GRANT SELECT ON ALL TABLES IN SCHEMA s TO bob", {"kind": "grant", "tables_written": {"s.*"}}),
    ("GRANT pg_read_server_files TO bob", {"kind": "grant", "object_type": "role"}),
    ("REVOKE ALL ON t FROM bob", {"kind": "revoke", "tables_written": {"t"}}),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob", {"kind": "alter_default_privileges"}),
    ("VACUUM FULL t", {"kind": "vacuum", "tables_written": {"t"}}),
    ("ANALYZE t", {"kind": "analyze"}),
    ("CLUSTER t USING i", {"kind": "cluster"}),
    ("REINDEX TABLE t", {"kind": "reindex"}),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", {"kind": "lock", "modifies": True}),
    ("LOCK t", {"kind": "lock", "modifies": True}),
    ("LOCK TABLE t IN ROW SHARE MODE", {"kind": "lock", "modifies": True}),
    ("LOCK TABLE t IN ACCESS SHARE MODE", {"kind": "lock", "modifies": False}),  # SELECT's own lock
    ("SELECT * FROM t FOR KEY SHARE", {"kind": "select", "modifies": True}),  # row locks write the rows
    ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", {"kind": "declare_cursor", "modifies": True}),
    ("CHECKPOINT", {"kind": "checkpoint"}),
    # built-ins that write even in a read-only transaction, or make other sessions wait
    ("SELECT pg_import_system_collations('public')", {"kind": "select", "modifies": True}),
    ("SELECT pg_catalog.pg_logical_emit_message(true, 'p', 'x')", {"modifies": True}),
    ("SELECT brin_desummarize_range('orders_brin', 0)", {"modifies": True}),
    ("SELECT brin_summarize_new_values('orders_brin'), gin_clean_pending_list('t_gin')", {"modifies": True}),
    ("SELECT pg_try_advisory_lock(42)", {"modifies": True}),
    ("SELECT txid_current()", {"modifies": True}),
    ("SELECT pg_export_snapshot()", {"modifies": False}),
    ("LOAD 'auto_explain'", {"kind": "load", "modifies": True}),
    ("COMMENT ON TABLE t IS 'x'", {"kind": "comment", "object_type": "table"}),
    ("SECURITY LABEL ON TABLE t IS 'x'", {"kind": "security_label"}),
    ("REFRESH MATERIALIZED VIEW mv", {"kind": "refresh_matview", "tables_written": {"mv"}}),
    ("REASSIGN OWNED BY a TO b", {"kind": "reassign_owned"}),
    ("DROP OWNED BY a", {"kind": "drop_owned"}),
    ("IMPORT FOREIGN SCHEMA s FROM SERVER srv INTO t", {"kind": "import_foreign_schema", "tables_read": {"s.*"}}),
    (
        "IMPORT FOREIGN SCHEMA pg_catalog LIMIT TO (pg_proc) FROM SERVER srv INTO t",
        {"tables_read": {"pg_proc", "pg_catalog.pg_proc"}},
    ),
    # postgres_fdw reads the remote table of the foreign table's own name when the options give only a schema
    (
        "CREATE FOREIGN TABLE s.pg_proc (oid oid) SERVER srv OPTIONS (schema_name 'pg_catalog')",
        {"tables_read": {"pg_catalog.pg_proc"}, "tables_written": {"s.pg_proc"}},
    ),
    ("ALTER FOREIGN TABLE ft OPTIONS (ADD schema_name 'pg_catalog')", {"tables_read": {"pg_catalog.ft"}}),
    ("CREATE DATABASE d", {"kind": "create_database"}),
    # Session and transaction control
    ("SHOW search_path", {"kind": "show", "modifies": False}),
    ("COMMIT", {"kind": "commit", "modifies": False}),
    ("ROLLBACK", {"kind": "rollback"}),
    ("SAVEPOINT s", {"kind": "savepoint"}),
    ("RELEASE SAVEPOINT s", {"kind": "release"}),
    ("ROLLBACK TO SAVEPOINT s", {"kind": "rollback"}),
    ("PREPARE TRANSACTION 'x'", {"kind": "prepare_transaction", "modifies": True}),
    ("COMMIT PREPARED 'x'", {"kind": "commit_prepared"}),
    ("LISTEN c", {"kind": "listen", "modifies": False}),
    ("NOTIFY c, 'x'", {"kind": "notify"}),
    ("UNLISTEN *", {"kind": "unlisten"}),
    ("DECLARE c CURSOR FOR SELECT * FROM secrets", {"kind": "declare_cursor", "tables_read": {"secrets"}}),
    ("FETCH 10 FROM c", {"kind": "fetch"}),
    ("CLOSE c", {"kind": "close_cursor"}),
    ("SET CONSTRAINTS ALL DEFERRED", {"kind": "set_constraints"}),
    # Non-ASCII text: locations are byte offsets, text is sliced right
    ("SELECT 'é' FROM ü", {"tables_read": {"ü"}, "text": "SELECT 'é' FROM ü"}),
    # Object types of DDL: where the server connects and which of its directories it writes, nested ones too
    ("CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw", {"kind": "create_other", "objects": {"foreign_server"}}),
    ("ALTER SERVER s OPTIONS (SET host 'x')", {"kind": "alter_other", "objects": {"foreign_server"}}),
    ("ALTER SERVER s RENAME TO t", {"objects": {"foreign_server"}}),
    ("CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'x')", {"objects": {"user_mapping"}}),
    ("ALTER USER MAPPING FOR u SERVER s OPTIONS (SET user 'x')", {"objects": {"user_mapping"}}),
    ("CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p", {"objects": {"subscription"}}),
    ("ALTER SUBSCRIPTION s CONNECTION 'host=x'", {"kind": "alter_other", "objects": {"subscription"}}),
    ("CREATE TABLESPACE t LOCATION '/x'", {"kind": "create_other", "objects": {"tablespace"}}),
    ("CREATE TRUSTED LANGUAGE pl2 HANDLER plpython3_call_handler", {"kind": "create_other", "objects": {"language"}}),
    ("ALTER LANGUAGE plpython3u RENAME TO plpgsql", {"kind": "alter_other", "objects": {"language"}}),
    ("ALTER LANGUAGE plpgsql OWNER TO bob", {"kind": "alter_other", "objects": {"language"}}),
    # without HANDLER, the server runs CREATE LANGUAGE as CREATE EXTENSION: it still creates a language
    ("CREATE LANGUAGE plpython3u", {"kind": "create_other", "objects": {"language"}}),
    ("create /* x /* y */ */ or replace\n-- z\nTRUSTED PROCEDURAL LANGUAGE plperlu", {"objects": {"language"}}),
    ("CREATE EXTENSION pg_trgm", {"kind": "create_extension", "objects": {"extension"}}),
    ('/* language */ CREATE EXTENSION IF NOT EXISTS "language"', {"kind": "create_extension"}),
    ("ALTER TABLESPACE t SET (seq_page_cost = 2)", {"objects": {"tablespace"}}),
    ("CREATE FOREIGN DATA WRAPPER w", {"objects": {"fdw"}}),
    ("DO $$ BEGIN CREATE SERVER s FOREIGN DATA WRAPPER w; END $$", {"kind": "do", "objects": {"foreign_server"}}),
    ("CREATE TABLE t (a int)", {"objects": {"table"}}),
    ("SELECT a FROM t", {"objects": set()}),
]


def field_value(statement: Statement, name: str) -> object:
    value = getattr(statement, name)
    return set(value) if isinstance(value, frozenset) else value


@pytest.mark.parametrize(("sql", "expected"), CASES, ids=[sql[:60] for sql, _ in CASES])
def test_classification(sql: str, expected: dict[str, object]) -> None:
    (statement,) = classify(sql)
    for name, value in expected.items():
        assert field_value(statement, name) == value, f"{name} of {sql!r}"
    assert statement.kind in statement.kinds
    if statement.kinds & _classify.MODIFYING_KINDS:
        assert statement.modifies


def test_unmapped_statement_kinds_are_unknown_and_modifying(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every kind the module reports is either read-only or modifying; nothing falls in between.
    assert not (_classify.READ_ONLY_KINDS & _classify.MODIFYING_KINDS)
    assert "unknown" in _classify.MODIFYING_KINDS
    # A statement type the module does not know (as after a grammar upgrade) is "unknown", never allowed
    # by accident, and so is one nested inside a known statement.
    kinds = dict(_classify._SIMPLE_KINDS)
    del kinds["CheckPointStmt"], kinds["DeleteStmt"]
    monkeypatch.setattr(_classify, "_SIMPLE_KINDS", kinds)
    (statement,) = _classify._statements("CHECKPOINT")
    assert (statement.kind, statement.kinds, statement.modifies) == ("unknown", {"unknown"}, True)
    (statement,) = _classify._statements("WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d")
    assert statement.kind == "select" and statement.kinds == {"select", "unknown"} and statement.modifies


# Multi-statement strings: the evasions the addon exists to catch.


def kinds_of(sql: str) -> list[str]:
    return [s.kind for s in classify(sql)]


def test_backslash_quote_does_not_hide_a_second_statement() -> None:
    """Under standard_conforming_strings (the default, and what libpg_query assumes) ``'\\'`` is a whole
    literal: the DROP after it is a statement of its own, and the server runs it (see the real-server test).
    """
    statements = classify("SELECT '\\'; DROP TABLE t; --'")
    assert [s.kind for s in statements] == ["select", "drop"]
    assert statements[1].tables_written == {"t"}
    assert statements[0].text == "SELECT '\\'"
    assert statements[1].text == "DROP TABLE t"


def test_multi_statement_strings() -> None:
    assert kinds_of("SELECT 1; DELETE FROM t; /* c */ UPDATE t SET a = 1 WHERE b") == ["select", "delete", "update"]
    assert kinds_of("PREPARE p AS DELETE FROM t; EXECUTE p") == ["prepare", "execute"]
    statements = classify("SELECT 1;SELECT 'ü';  DROP TABLE x")
    assert [s.text for s in statements] == ["SELECT 1", "SELECT 'ü'", "DROP TABLE x"]
    prepare, execute = classify("PREPARE p AS DELETE FROM t; EXECUTE p")
    assert prepare.prepared_name == execute.prepared_name == "p"
    assert prepare.kinds == {"prepare", "delete"}


def test_blank_text_has_no_statements() -> None:
    assert classify("") == []
    assert classify(" ; ;\n-- only a comment\n") == []


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 1",
        "SELECT 1; DELETE FROM",
        "SELECT 'unterminated",
        "DO $$ BEGIN DELETE FROM ; END $$",
        "DO $$ BEGIN undeclared := 1; END $$",
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SELEC 1; END $$",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELEC 1'",
        "DO $$ BEGIN EXECUTE 'DROP TABL t'; END $$",
        "SELECT 1\0; DROP TABLE t",
        "SELECT " + " || ".join(["x"] * 3000),
    ],
    ids=lambda sql: sql[:50],
)
def test_unparseable_text_raises(sql: str) -> None:
    with pytest.raises(ClassificationError):
        classify(sql)


def test_parse_error_reports_message_and_position() -> None:
    with pytest.raises(ClassificationError) as info:
        classify("SELECT 1; SELEC 2")
    assert info.value.message == 'syntax error at or near "SELEC"'
    assert info.value.position == 11
    assert isinstance(info.value, ValueError)
    with pytest.raises(ClassificationError, match="in DO block"):
        classify("DO $$ BEGIN DELETE FROM ; END $$")


def test_nesting_is_bounded() -> None:
    def nest(levels: int) -> str:
        sql = "DELETE FROM t"
        for level in range(levels):
            literal = "'" + sql.replace("'", "''") + "'"
            sql = f"DO $q{level}$ BEGIN EXECUTE {literal}; END $q{level}$"
        return sql

    (statement,) = classify(nest(3))
    assert statement.kinds == {"do", "delete"} and not statement.dynamic_sql
    with pytest.raises(ClassificationError, match="nested"):
        classify(nest(_classify.MAX_NESTING + 2))


@pytest.mark.parametrize(
    "shape",
    [
        "SELECT {open}setting{close} FROM pg_settings",
        "SELECT {open}current_setting('work_mem'){close}",
        "SELECT {open}1{close}",
    ],
)
def test_deep_nesting_is_a_classification_error_at_every_depth(shape: str) -> None:
    # The parser takes trees deeper than the recursive walks over them (the settings analysis): between the
    # two, a RecursionError escaped, and the connection ended without the statement in any decision.
    for depth in range(100, 700, 20):
        sql = shape.format(open="upper(" * depth, close=")" * depth)
        try:
            classify(sql)
        except ClassificationError as exc:
            assert "too deeply" in str(exc) or "memory exhausted" in str(exc), exc


def test_cache_returns_equal_immutable_results() -> None:
    sql = "SELECT a FROM cached_table WHERE id = 1"
    first = classify(sql)
    second = classify(sql)
    assert first == second and first is not second  # fresh lists, shared immutable Statements
    first.clear()
    assert classify(sql) == second
    with pytest.raises(AttributeError):
        second[0].kind = "delete"  # type: ignore[misc]


def test_fingerprint() -> None:
    assert fingerprint("SELECT * FROM t WHERE id = 1") == fingerprint("select *  from t where id = 42")
    assert fingerprint("SELECT * FROM t") != fingerprint("DELETE FROM t")
    with pytest.raises(ClassificationError):
        fingerprint("SELEC 1")


# The server agrees: statement boundaries seen by the classifier are the ones the server executes.


SERVER_CASES = [
    "SELECT '\\'; DROP TABLE lictor_cls_t; --'",
    "SELECT $$; DROP TABLE lictor_cls_t; $$",
    "/* DROP TABLE lictor_cls_t; */ SELECT 1 -- ; DROP TABLE lictor_cls_t",
    "WITH d AS (DELETE FROM lictor_cls_t RETURNING *) SELECT * FROM d",
    "DO $$ BEGIN DELETE FROM lictor_cls_t; END $$",
    "SELECT 1; UPDATE lictor_cls_t SET a = 2; SELECT * INTO lictor_cls_new FROM lictor_cls_t",
    "PREPARE lictor_p AS DELETE FROM lictor_cls_t; EXECUTE lictor_p; DEALLOCATE lictor_p",
]
TAG_KINDS = {
    "SELECT": "select",
    "DROP TABLE": "drop",
    "DELETE": "delete",
    "DO": "do",
    "UPDATE": "update",
    "PREPARE": "prepare",
    "EXECUTE": "execute",
    "DEALLOCATE": "deallocate",
}


@pytest.mark.parametrize("sql", SERVER_CASES)
def test_server_runs_the_statements_the_classifier_sees(sql: str) -> None:
    from tests.pgcluster import WireClient

    try:
        client = WireClient("127.0.0.1", 5432)
    except OSError:
        require(False, "PostgreSQL is not running on 127.0.0.1:5432")
        raise
    with client:
        client.login("postgres", "test")
        assert client.parameters["standard_conforming_strings"] == "on"
        setup = client.simple("BEGIN; CREATE TEMP TABLE lictor_cls_t (a int); INSERT INTO lictor_cls_t VALUES (1)")
        assert not any(isinstance(m, pg.ErrorResponse) for m in setup)
        messages = client.simple(sql)
        client.simple("ROLLBACK")
    errors = [m for m in messages if isinstance(m, pg.ErrorResponse)]
    assert not errors, errors[0].message if errors else ""
    tags = [m.tag for m in messages if isinstance(m, pg.CommandComplete)]
    server_kinds = []
    for tag in tags:
        words = tag.split()
        key = " ".join(words[:2]) if " ".join(words[:2]) in TAG_KINDS else words[0]
        server_kinds.append(TAG_KINDS[key])
    # SELECT INTO reports "SELECT n" like a plain SELECT; EXECUTE reports the prepared statement's tag, which
    # the addon finds by mapping prepared_name to the classification stored at PREPARE.
    prepared: dict[str | None, str] = {}
    ours = []
    for statement in classify(sql):
        if statement.kind == "prepare":
            (inner,) = statement.kinds - {"prepare"}
            prepared[statement.prepared_name] = inner
        ours.append(
            prepared[statement.prepared_name]
            if statement.kind == "execute"
            else "select"
            if statement.kind == "select_into"
            else statement.kind
        )
    assert ours == server_kinds


@pytest.mark.parametrize(
    ("sql", "shown"),
    [
        ("ALTER ROLE bob PASSWORD 'hunter2'", "ALTER ROLE bob PASSWORD [REDACTED]"),
        (
            "CREATE ROLE c WITH LOGIN ENCRYPTED PASSWORD E'x\\'y' VALID UNTIL 'infinity'",
            "CREATE ROLE c WITH LOGIN PASSWORD [REDACTED] VALID UNTIL 'infinity'",
        ),
        (
            "SELECT 1; CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'x', password 'p2'); SELECT 2",
            "SELECT 1; CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'x', PASSWORD [REDACTED]; SELECT 2",
        ),
        ("SELECT 'password' AS password", "SELECT 'password' AS password"),
        ("ALTER ROLE bob PASSWORD 'unterminated", "ALTER ROLE bob PASSWORD 'unterminated"),  # does not parse
    ],
)
def test_role_passwords_are_redacted_for_display_and_records(sql: str, shown: str) -> None:
    from lictor_addons.postgres._classify import redact_secrets

    assert redact_secrets(sql) == shown


# -- transforms_data: values computed from table data, which masking would not recognise ----------------

TRANSFORMING = [
    "SELECT reverse(card) FROM customers",
    "SELECT substr(card, 1, 8), substr(card, 9) FROM customers",
    "SELECT card::bytea FROM customers",
    "SELECT card::varchar(8), card::char FROM customers",  # cut short
    "SELECT card::float8 FROM customers",  # 4.11111111111111e+15
    "SELECT card::numeric + 1 FROM customers",
    "SELECT translate(email, '@', '#'), upper(email) FROM customers",
    "SELECT string_agg(email, ','), json_agg(c) FROM customers c",
    "SELECT ascii(substr(card, g, 1)) FROM customers, generate_series(1, 19) g",
    "SELECT reverse((SELECT card FROM customers LIMIT 1))",
    "SELECT x FROM customers c, LATERAL regexp_split_to_table(c.card, '') x",
    "WITH x AS (SELECT reverse(card) AS r FROM customers) SELECT r FROM x",
    "SELECT card FROM customers UNION SELECT reverse(card) FROM customers",
    "SELECT 1 UNION ALL (SELECT card FROM customers EXCEPT SELECT reverse(card) FROM customers)",
    "INSERT INTO t (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET note = reverse(t.card)",
    "MERGE INTO t USING customers c ON t.id = c.id WHEN MATCHED THEN UPDATE SET note = reverse(c.card)",
    "COPY (SELECT reverse(card) FROM customers) TO STDOUT",
    "DECLARE c CURSOR FOR SELECT reverse(card) FROM customers",
    "PREPARE p AS SELECT encode(convert_to(email, 'UTF8'), 'hex') FROM customers",
    "EXPLAIN ANALYZE SELECT reverse(card) FROM customers",
    "SELECT * FROM (VALUES (reverse((SELECT card FROM customers LIMIT 1)))) v",
    "SELECT set_config('x.y', card, false) FROM customers",
    "SELECT card || '' FROM customers",
    "SELECT min(reverse(card)), sum(card::numeric) FROM customers",
    "SELECT trim(both '4' from card) FROM customers",
    "SELECT CASE WHEN true THEN reverse(card) END, coalesce(reverse(card), '') FROM customers",
    "SELECT doc ->> (card) FROM customers",
    "SELECT reverse(most_common_vals::text) FROM pg_stats",  # statistics hold table data
    "SELECT reverse(query) FROM pg_stat_activity",  # other sessions' statements, constants included
    "SELECT encode(lo_get(16400), 'hex')",
    "INSERT INTO copy_of SELECT reverse(card) FROM customers",
    "UPDATE t SET note = reverse(card) WHERE id = 1",
    # functional notation: (card).reverse is reverse(card), c.record_send is record_send(c)
    "SELECT (card).reverse, (email).bytea FROM customers",
    "SELECT ((c.card).reverse).md5, (c.card).bytea FROM customers c",
    "SELECT (card).macaddr8, (card).xid, trunc((card).numeric, -8) FROM customers",  # types respell digits
    "SELECT round(card::numeric, -8) FROM customers",  # rounding of a cast, not of a total
    # a negative (or unknown) scale drops digits: round(card, -4) is the first 12 digits of a number card
    "SELECT round(card_num, -4), trunc(card_num, -4) FROM customers",
    "SELECT round(avg(card_num), -4) FROM customers GROUP BY id",
    "SELECT round(card_num, $1) FROM customers",
    "SELECT trunc(card_num, 0 - 4) FROM customers",
    "SELECT encode((17560::oid).lo_get, 'hex')",
    "SELECT reverse((b).pg_stat_get_backend_activity) FROM generate_series(1, 50) b",
    "SELECT c.record_send FROM customers c",
    "SELECT public.customers.record_send, app.public.customers.row_to_json FROM public.customers",
    "SELECT coalesce((card).to_tsvector::text, '') FROM customers",
    # an extension's function is in no list: a field of a value other than a whole row counts as a call
    "SELECT (card).show_trgm, (c.email).soundex, (coalesce(card, '')).dmetaphone FROM customers c",
    "SELECT (c).email, (card).show_trgm FROM customers card",  # an alias may be a column's name
    # a size or a rounding of something computed is that computation
    "SELECT length(lpad('', substr(card, 1, 1)::int)) FROM customers",
    "SELECT round(ascii(substr(card, 1, 1))) FROM customers",
    "SELECT ~ replace(card, ' ', '')::bigint FROM customers",  # prefix ~ is bitwise NOT, not a regex match
    "SELECT mode() WITHIN GROUP (ORDER BY reverse(card)) FROM customers",
    # table data without a column or a table name
    "SELECT translate(table_to_xml('customers', true, false, '')::text, '0123456789', 'abcdefghij')",
    "SELECT encode(convert_to(cursor_to_xml('c', 10, false, true, '')::text, 'UTF8'), 'base64')",
    "SELECT reverse(query) FROM pg_stat_get_activity(NULL)",
    "SELECT reverse(query) FROM pg_stat_statements(true)",  # the function behind the view
    "SELECT reverse(query) FROM public.pg_stat_statements",
    # a setting keeps a value for later: set from table data anywhere, a WHERE clause included
    "SELECT count(*) FROM customers WHERE set_config('my.x', card, false) <> '' AND id = 1",
    "SELECT 1 FROM customers WHERE set_config(setting_name => 'my.x', new_value => email, is_local => false) > ''",
    "EXECUTE q(translate(table_to_xml('customers', true, false, '')::text, '0', 'a'))",
    # EXPLAIN evaluates an EXECUTE's parameters, and its plan prints them
    "EXPLAIN EXECUTE q(translate(table_to_xml('customers', true, false, '')::text, '0', 'a'))",
    "EXPLAIN CREATE TABLE t AS EXECUTE q(translate(table_to_xml('customers', true, false, '')::text, '0', 'a'))",
    "SELECT " + "btrim(" * 10 + "reverse(card)" + ")" * 10 + " FROM customers",
    # a text card made a number can be combined with chosen rows: card + 1, card / 2
    "SELECT card::int8 FROM customers",
    "SELECT id, sum(x) FROM (SELECT id, card::int8 FROM customers UNION ALL SELECT id, 1 FROM customers) s(id, x) "
    "GROUP BY id",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY amount) FROM orders",
    # one type for all branches: a typed constant beside a number respells it (4.111111111111111e+15)
    "SELECT coalesce(amount, 0::float8), greatest(amount, pi()) FROM orders",
    "SELECT CASE WHEN id > 0 THEN amount ELSE 0::float8 END FROM orders",
    "SELECT amount FROM orders UNION ALL SELECT 0::float8",
    "SELECT (o).* FROM orders o UNION ALL SELECT 1, 0::float8, now()",
    "VALUES ((SELECT amount FROM orders LIMIT 1)), (pi())",
    "SELECT lo_get(424242)",
    # a large object's 2 KB pages: a value written across two of them is whole in neither
    "SELECT loid, pageno, data FROM pg_largeobject ORDER BY 1, 2",
    "SELECT x FROM (SELECT l FROM pg_catalog.pg_largeobject l) s(x)",
    "COPY pg_largeobject TO STDOUT",
    "COPY pg_catalog.pg_largeobject (pageno, data) TO STDOUT",
    # JOIN ... USING / NATURAL JOIN gives a merged column the type both sides share: a float prints a bigint
    # card as 4.111111111111111e+15
    "SELECT card_big::text FROM customers LEFT JOIN (SELECT 0::float8 AS card_big) t USING (card_big)",
    "SELECT * FROM customers NATURAL FULL JOIN (VALUES (0::float8)) v(card_big)",
    "WITH t AS (SELECT 0::float8 AS card_big) SELECT card_big FROM customers JOIN t USING (card_big)",
    "SELECT j.card_big FROM customers JOIN pg_class AS p(card_big) USING (card_big) AS j",
    "SELECT 1 UNION SELECT card_big FROM customers JOIN unnest('{0}'::float8[]) u(card_big) USING (card_big)",
]

NOT_TRANSFORMING = [
    "SELECT card, email AS e FROM customers",
    "SELECT * FROM customers",
    "SELECT c, c.* FROM customers c",
    "SELECT (SELECT card FROM customers LIMIT 1)",
    "SELECT count(*), count(reverse(card)), length(card) FROM customers",
    "SELECT c.name, c.card, (c).*, (card).text, c.host FROM customers c",
    'SELECT name COLLATE "C", created_at::time, GROUPING(status) FROM orders GROUP BY ROLLUP (status)',
    "SELECT card, 'x' FROM customers UNION SELECT email, NULL FROM customers",
    "SELECT * FROM customers UNION ALL SELECT * FROM customers",
    "SELECT round(sum(amount)::numeric, 2) FROM orders",
    "SELECT round(amount), trunc(amount, 0), round(amount, 2) FROM orders",
    "SELECT " + "btrim(" * 30 + "card" + ")" * 30 + " FROM t",  # once per level, not twice (2**30)
    "SELECT round(avg(amount), 2), floor(sum(amount)), abs(amount) FROM orders",
    "SELECT mode() WITHIN GROUP (ORDER BY status) FROM orders",
    "EXPLAIN SELECT reverse(card) FROM customers",  # a plan, not rows
    "EXPLAIN EXECUTE q('a', 1 + 2)",
    "EXPLAIN CREATE TABLE t AS EXECUTE q",
    "SELECT set_config('search_path', '', false)",
    "SELECT id FROM customers WHERE reverse(card) LIKE '1%' ORDER BY upper(email)",  # picks rows only
    "SELECT max(card), min(email), sum(amount), avg(amount) FROM orders",
    "SELECT card::text, created_at::date FROM customers",
    "SELECT card LIKE '4%', card = 'x', card IS NULL, card IN ('a', 'b') FROM customers",
    "SELECT EXISTS (SELECT 1 FROM customers WHERE card LIKE '4%')",
    "SELECT coalesce(email, ''), nullif(email, ''), greatest(a, b) FROM customers",
    "SELECT CASE WHEN substr(card, 1, 1) = '4' THEN 'visa' ELSE card END FROM customers",
    "SELECT doc ->> 'card', doc #> '{a,b}' FROM t",
    "SELECT trim(email), ltrim(card) FROM customers",
    "SELECT date_trunc('day', created_at), extract(year FROM created_at), count(*) FROM orders GROUP BY 1, 2",
    "SELECT row_number() OVER (ORDER BY card), card FROM customers",
    "SELECT version(), now()::text, 'a' || 'b', $1::text",
    "SELECT * FROM generate_series(1, 3) g",
    "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a",
    "SELECT upper(table_name) FROM information_schema.tables",
    "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'",
    "SELECT customer_id, amount FROM orders JOIN customers USING (id)",  # tables' own types
    "SELECT c.card_big, count(*) FROM customers c JOIN (SELECT 0::float8 AS card_big) t USING (card_big) GROUP BY 1",
    "SELECT loid, count(*), max(pageno) FROM pg_largeobject GROUP BY loid",
    "COPY pg_largeobject (loid, pageno) TO STDOUT",
    "INSERT INTO t VALUES (1, 'a')",
    "UPDATE t SET a = 1 WHERE id = 2",
]


@pytest.mark.parametrize("sql", TRANSFORMING)
def test_values_computed_from_table_data_are_transforms(sql: str) -> None:
    assert any(st.transforms_data for st in classify(sql)), sql


@pytest.mark.parametrize("sql", NOT_TRANSFORMING)
def test_values_as_stored_counts_and_catalogs_are_not(sql: str) -> None:
    assert not any(st.transforms_data for st in classify(sql)), sql


def test_a_long_union_is_classified_without_recursing_per_arm() -> None:
    sql = "SELECT 1" + " UNION SELECT 1" * 499
    assert not any(st.transforms_data for st in classify(sql))
    assert any(st.transforms_data for st in classify(sql + " UNION SELECT reverse(card) FROM customers"))


@pytest.mark.parametrize(
    ("sql", "function"),
    [
        ("SELECT (('SELECT 1'::text).ts_stat).word", "ts_stat"),
        ("SELECT 1 FROM customers WHERE (card::bigint).pg_try_advisory_lock", "pg_try_advisory_lock"),
        ("SELECT c.record_send FROM customers c", "record_send"),
    ],
)
def test_functional_notation_is_a_function_call(sql: str, function: str) -> None:
    (st,) = classify(sql)
    assert function in st.functions
    assert st.dynamic_sql == (function == "ts_stat")
    assert st.modifies == (function in ("ts_stat", "pg_try_advisory_lock"))


SETTINGS_READ: list[tuple[str, set[str]]] = [
    ("SHOW primary_conninfo", {"primary_conninfo"}),
    ("SHOW ALL", {"all"}),
    ("SHOW TRANSACTION ISOLATION LEVEL", {"transaction_isolation"}),
    (
        "SELECT current_setting('Primary_Conninfo'), pg_catalog.current_setting('app.dsn', true)",
        {"primary_conninfo", "app.dsn"},
    ),
    ("SELECT current_setting($1)", {"all"}),
    ("SELECT current_setting(name) FROM t", {"all"}),
    ("SELECT ('primary_conninfo'::text).current_setting", {"all"}),
    ("SELECT setting FROM pg_settings WHERE name = 'primary_conninfo'", {"primary_conninfo"}),
    (
        "SELECT s.setting FROM pg_catalog.pg_settings s WHERE s.name IN ('work_mem', 'shared_buffers') AND true",
        {"work_mem", "shared_buffers"},
    ),
    ("SELECT setting FROM pg_settings WHERE name = 'work_mem' OR true", {"all"}),
    ("SELECT setting FROM pg_settings", {"all"}),
    ("SELECT * FROM pg_settings s, pg_class c WHERE s.name = 'work_mem'", {"all"}),
    ("SELECT * FROM pg_show_all_settings()", {"all"}),
    ("SELECT setconfig FROM pg_db_role_setting", {"all"}),
    ("SELECT * FROM pg_file_settings", {"all"}),
    ("DO $$ BEGIN RAISE NOTICE '%', current_setting('primary_conninfo'); END $$", {"primary_conninfo"}),
    ("SELECT subconninfo FROM pg_subscription", set()),
    ("SELECT setting FROM myschema.pg_settings", set()),
    ("WITH pg_settings AS (SELECT 1 AS setting) SELECT setting FROM pg_settings", set()),
    ("SET work_mem = '64MB'", set()),
]


@pytest.mark.parametrize(("sql", "names"), SETTINGS_READ)
def test_settings_whose_values_a_statement_reads(sql: str, names: set[str]) -> None:
    assert set().union(*(st.settings_read for st in classify(sql))) == names, sql


TRANSFORMING_SETTINGS = [
    "SELECT reverse(current_setting('primary_conninfo'))",
    "SELECT encode(convert_to(current_setting('primary_conninfo'), 'UTF8'), 'hex')",
    "SELECT current_setting('primary_conninfo')::int",
    "SELECT current_setting('primary_conninfo')::varchar(8)",
    "SELECT row(current_setting('primary_conninfo'))",
    "SELECT reverse(setting) FROM pg_settings WHERE name = 'primary_conninfo'",
    "SELECT name, translate(boot_val, 'a', 'b') FROM pg_catalog.pg_settings",
    "SELECT reverse(a.setting) FROM pg_show_all_settings() a",
    "SELECT reverse(v) FROM current_setting('primary_conninfo') v",
    "SELECT (SELECT reverse(t.v)) FROM (SELECT current_setting('primary_conninfo') v) t",
    "WITH c AS (SELECT setting AS v FROM pg_settings) SELECT reverse(v) FROM c",
    "SELECT reverse(s::text) FROM pg_db_role_setting s",
    "SELECT row_to_json(s.*) FROM pg_db_role_setting s",
    "SELECT setconfig[1] FROM pg_db_role_setting",
    "SELECT reverse(array_to_string(setconfig, ',')) FROM pg_db_role_setting",
    "SELECT array_to_string(setconfig, name) FROM pg_db_role_setting, t",
    "SELECT reverse(subconninfo) FROM pg_subscription",
    "SELECT reverse(u) FROM pg_db_role_setting s, unnest(s.setconfig) u",
    "SELECT reverse(c) FROM (SELECT subconninfo AS c FROM pg_catalog.pg_subscription) s",
    "SELECT 1 WHERE set_config('application_name', current_setting('primary_conninfo'), false) IS NOT NULL",
    "DO $$ DECLARE x text := current_setting('primary_conninfo'); BEGIN RAISE NOTICE '%', reverse(x); END $$",
    "EXPLAIN EXECUTE q(reverse(current_setting('primary_conninfo')))",
    "EXPLAIN CREATE TABLE t AS EXECUTE q(reverse(current_setting('primary_conninfo')))",
]
NOT_TRANSFORMING_SETTINGS = [
    "SHOW primary_conninfo",
    "SELECT current_setting('primary_conninfo'), current_setting('primary_conninfo')::text AS c",
    "SELECT coalesce(current_setting('app.dsn', true), ''), length(current_setting('primary_conninfo'))",
    "SELECT * FROM current_setting('primary_conninfo') v",
    "SELECT name, setting, COALESCE(unit, ''), short_desc, vartype FROM pg_settings WHERE vartype IN ('bool', 'integer')",
    # psql's \dconfig+, \drds and \dRs+, pg_dump's database settings and its set-up
    "SELECT s.name, pg_catalog.current_setting(s.name), s.vartype, pg_catalog.array_to_string(p.paracl, E'\\n') "
    "FROM pg_catalog.pg_settings s LEFT JOIN pg_catalog.pg_parameter_acl p ON pg_catalog.lower(s.name) = p.parname",
    "SELECT rolname, datname, pg_catalog.array_to_string(setconfig, E'\\n') FROM pg_catalog.pg_db_role_setting s "
    "LEFT JOIN pg_catalog.pg_database d ON d.oid = setdatabase LEFT JOIN pg_catalog.pg_roles r ON r.oid = setrole",
    "SELECT subname, pg_catalog.pg_get_userbyid(subowner), subconninfo FROM pg_catalog.pg_subscription",
    "SELECT unnest(setconfig) FROM pg_db_role_setting WHERE setrole = 0 AND setdatabase = '16384'::oid",
    "SELECT set_config(name, 'view, foreign-table', false) FROM pg_settings WHERE name = 'restrict_nonsystem_relation_kind'",
    "EXPLAIN SELECT reverse(current_setting('primary_conninfo'))",
    # a subquery in FROM that reads no setting passes none on (SQLAlchemy's reflection of tables)
    "SELECT CASE WHEN a.amname != current_setting($1) THEN a.amname END, i.names FROM pg_class c "
    "JOIN pg_am a ON c.relam = a.oid LEFT JOIN (SELECT inhrelid, array_agg(relname) AS names FROM pg_inherits "
    "JOIN pg_class ON inhparent = pg_class.oid GROUP BY inhrelid) i ON c.oid = i.inhrelid",
    "SELECT reverse(email) FROM customers",
]


@pytest.mark.parametrize("sql", TRANSFORMING_SETTINGS)
def test_values_computed_from_settings_are_transforms(sql: str) -> None:
    assert any(st.transforms_settings for st in classify(sql)), sql


@pytest.mark.parametrize("sql", NOT_TRANSFORMING_SETTINGS)
def test_settings_as_they_are_are_not(sql: str) -> None:
    assert not any(st.transforms_settings for st in classify(sql)), sql
