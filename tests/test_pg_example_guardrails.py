"""The example rule pack's guardrails against a server the tests may change: a throwaway cluster
(tests/pgcluster.py, with pg_stat_statements loaded) behind a real ``lictor run`` gateway, reached with psycopg
and psql. Roles, tablespaces and other server-wide objects are created here, never on a shared server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lictor_addons.postgres import _protocol as pg

from tests.conftest import ROOT, GatewayProcess, free_port, require
from tests.pgcluster import DEFAULT_HBA, PgCluster, running_cluster
from tests.test_pg_e2e import RawClient

pytestmark = pytest.mark.timeout(120)

EXAMPLE_PACKS = ROOT / "examples" / "postgres" / "rulepacks"
PASSWORD = "hunter2-" + os.urandom(4).hex()
# A standby's connection string, as a human would set it (this server is no standby: the setting only sits
# there, readable by a superuser): a quoted password with characters secret_assignment stops at.
REPLICATION_PASSWORD = "r3p,l;" + os.urandom(4).hex()
PRIMARY_CONNINFO = f"host=primary.internal user=replicator password='{REPLICATION_PASSWORD} x' sslmode=prefer"


class Env:
    def __init__(self, cluster: PgCluster, gateway: GatewayProcess, port: int) -> None:
        self.cluster = cluster
        self.gateway = gateway
        self.port = port
        self.tokens: dict[str, str] = {}

    def connect(self, role: str, **kw: Any) -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=f"agent-{role}",
            dbname="app",
            password=self.tokens[role],
            sslmode="disable",
            connect_timeout=5,
            autocommit=True,
            **kw,
        )

    def direct(self) -> Any:
        """A session of a human at the server, beside the gateway's."""
        import psycopg

        return psycopg.connect(
            host=str(self.cluster.socket_dir), port=self.cluster.port, user="postgres", dbname="app", autocommit=True
        )

    def psql(self, role: str, sql: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PGPASSWORD": self.tokens[role], "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "5"}
        env.pop("PGSERVICE", None)
        cmd = ["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(self.port), "-U", f"agent-{role}", "-d", "app"]
        return subprocess.run([*cmd, "-c", sql], capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require(shutil.which("psql") is not None, "psql is not installed")
    work: Path = tmp_path_factory.mktemp("pg-example")
    settings = {
        "shared_preload_libraries": "'pg_stat_statements'",
        "pg_stat_statements.track_utility": "on",
        "primary_conninfo": "'" + PRIMARY_CONNINFO.replace("'", "''") + "'",
        "wal_level": "logical",  # a change-data capture slot, as a human would set one up
    }
    with running_cluster(settings=settings) as cluster:
        cluster.execute("CREATE DATABASE app")
        cluster.execute(
            "CREATE EXTENSION pg_stat_statements; CREATE TABLE customers (id int PRIMARY KEY, email text)", dbname="app"
        )
        port = free_port()
        config = {
            "version": 1,
            "state_dir": str(work / "state"),
            "identity": {"issuers": [{"type": "lictor"}]},
            "rulepacks": [str(EXAMPLE_PACKS)],
            "targets": {
                "app": {
                    "protocol": "postgres",
                    "listen": f"127.0.0.1:{port}",
                    "upstream": {
                        "host": cluster.host,
                        "port": cluster.port,
                        "user": "postgres",  # a superuser login, as in the example: it sees every session
                        "database": "app",
                        "sslmode": "disable",
                    },
                    "read_only_roles": ["pg-readonly"],
                }
            },
        }
        gateway = GatewayProcess(work, config).start()
        try:
            e = Env(cluster, gateway, port)
            for role in ("readonly", "writer", "dba"):
                e.tokens[role] = gateway.token(f"agent-{role}", role=role)
            yield e
        finally:
            gateway.stop()


def test_other_sessions_statements_come_back_with_passwords_masked(env: Env) -> None:
    import psycopg

    # A human sets a password and stays connected: pg_stat_activity keeps the statement as the session's last,
    # pg_stat_statements keeps it too (utility statements are tracked with their text).
    with env.direct() as human:
        human.execute(f"CREATE ROLE report_user LOGIN PASSWORD '{PASSWORD}'")
        human.execute(f"ALTER ROLE report_user PASSWORD $${PASSWORD}$$")
        try:
            for role in ("readonly", "writer", "dba"):
                with env.connect(role) as conn:
                    rows = conn.execute(
                        "SELECT pid, state, query_start, now(), query AS q FROM pg_stat_activity "
                        "WHERE query LIKE '%report_user%' AND pid <> pg_backend_pid()"
                    ).fetchall()
                    assert len(rows) == 1 and rows[0][1] == "idle", rows
                    assert PASSWORD not in rows[0][4] and "[REDACTED:sql_password" in rows[0][4], rows
                    texts = conn.execute(
                        "SELECT query FROM pg_stat_statements WHERE query LIKE '%report_user%'"
                    ).fetchall()
                    assert len(texts) == 2 and not any(PASSWORD in t for (t,) in texts), texts
                    for sql in (
                        "SELECT reverse(query) FROM pg_stat_activity",
                        "SELECT query FROM pg_stat_get_activity(NULL)",
                        "SELECT translate(query, 'aeiou', 'AEIOU') FROM pg_stat_statements",
                    ):
                        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                            conn.execute(sql)
                        assert "other sessions' statements" in str(info.value), info.value
            with env.connect("dba") as conn:
                for sql in (
                    "CREATE TABLE seen AS SELECT query FROM pg_stat_activity",
                    "CREATE VIEW seen AS SELECT query FROM pg_stat_activity",
                    "CREATE FUNCTION seen() RETURNS SETOF text LANGUAGE sql AS 'SELECT query FROM pg_stat_activity'",
                ):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(sql)
            proc = env.psql("readonly", "SELECT query FROM pg_stat_activity WHERE query LIKE 'ALTER ROLE%'")
            assert proc.returncode == 0 and "ALTER ROLE report_user" in proc.stdout, proc
            assert PASSWORD not in proc.stdout, proc
        finally:
            human.execute("DROP ROLE report_user")


def test_a_prepared_fetch_or_execute_is_decided_on_what_it_names_when_it_runs(env: Env) -> None:
    # psycopg prepares a statement run often enough (or with prepare=True): a prepared FETCH or EXECUTE kept the
    # decision and masks of the cursor or statement it named when prepared, and ran on the one declared or
    # prepared under that name since: other sessions' passwords came back in clear.
    activity = "SELECT query FROM pg_stat_activity WHERE query LIKE '%report_user%' AND pid <> pg_backend_pid()"
    with env.direct() as human:
        human.execute(f"CREATE ROLE report_user LOGIN PASSWORD '{PASSWORD}'")
        try:
            # In one pipeline: a portal bound on the FETCH, then the cursor declared again, then the portal run.
            raw = RawClient(env.port, env.tokens["dba"])
            raw.send(pg.query("DECLARE b CURSOR WITH HOLD FOR SELECT 'harmless'"))
            raw.until_ready()
            redeclare = ("CLOSE b", f"DECLARE b CURSOR WITH HOLD FOR {activity}")
            raw.send(
                pg.parse("fetch_b", "FETCH 1 FROM b"),
                pg.bind("p", "fetch_b"),
                *(m for sql in redeclare for m in (pg.parse("", sql), pg.bind("", ""), pg.execute(""))),
                pg.execute("p"),
                pg.sync(),
            )
            reply = raw.until_ready()
            raw.close()
            rows = [pg.decode_datarow(m.raw) for m in reply if isinstance(m, pg.DataRow)]
            denied = [m for m in reply if isinstance(m, pg.ErrorResponse)]
            assert not rows and len(denied) == 1, reply
            assert "lictor:renamed-after-bind" in denied[0].fields.get("D", ""), denied
            for role in ("readonly", "dba"):
                with env.connect(role) as conn:
                    conn.execute("DECLARE a CURSOR WITH HOLD FOR SELECT 'harmless'")
                    assert conn.execute("FETCH 1 FROM a", prepare=True).fetchone() == ("harmless",)
                    conn.execute("CLOSE a")
                    conn.execute(f"DECLARE a CURSOR WITH HOLD FOR {activity}")
                    (fetched,) = conn.execute("FETCH 1 FROM a", prepare=True).fetchone()
                    conn.execute("PREPARE p AS SELECT 'harmless'")
                    assert conn.execute("EXECUTE p", prepare=True).fetchone() == ("harmless",)
                    conn.execute("DEALLOCATE p")
                    conn.execute(f"PREPARE p AS {activity}")
                    (executed,) = conn.execute("EXECUTE p", prepare=True).fetchone()
                    for text in (fetched, executed):
                        assert PASSWORD not in text and "[REDACTED:sql_password" in text, (role, text)
        finally:
            human.execute("DROP ROLE report_user")


def test_a_cursor_a_do_block_may_have_opened_is_not_fetched_as_the_one_declared_before(env: Env) -> None:
    import psycopg

    # A DO block closed the cursor the gateway knew as `a` and opened another portal under that name; FETCH was
    # decided and masked as the DECLARE before it, and showed other sessions' passwords in clear.
    activity = "SELECT query FROM pg_stat_activity WHERE query LIKE '%report_user%' AND pid <> pg_backend_pid()"
    reopen = f"DO $$DECLARE r refcursor := 'a'; BEGIN CLOSE r; OPEN r FOR {activity}; END$$"
    with env.direct() as human:
        human.execute(f"CREATE ROLE report_user LOGIN PASSWORD '{PASSWORD}'")
        try:
            with env.connect("dba") as conn:
                conn.execute("BEGIN")
                conn.execute("DECLARE a CURSOR FOR SELECT 'harmless'")
                conn.execute(reopen)
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="declare it with DECLARE"):
                    conn.execute("FETCH ALL FROM a")
                conn.execute("ROLLBACK")
                # a cursor declared after the DO block is fetched as usual
                conn.execute("BEGIN")
                conn.execute(reopen.replace("CLOSE r; ", ""))
                conn.execute("DECLARE b CURSOR FOR SELECT 'harmless'")
                assert conn.execute("FETCH ALL FROM b").fetchall() == [("harmless",)]
                conn.execute("ROLLBACK")
        finally:
            human.execute("DROP ROLE report_user")


def test_code_that_reads_a_cursor_by_name_does_not_run_while_a_masked_cursor_is_open(env: Env) -> None:
    import psycopg

    # FETCH from a cursor over pg_stat_activity is masked; a DO block's PL/pgSQL FETCH of a refcursor holding its
    # name, or cursor_to_xml('a', ...), read the same rows past the masking, and stored them in a table.
    activity = "SELECT query FROM pg_stat_activity WHERE query LIKE '%report_user%' AND pid <> pg_backend_pid()"
    store = "DO $$DECLARE r refcursor := 'a'; q text; BEGIN FETCH r INTO q; INSERT INTO seen VALUES (q); END$$"
    with env.direct() as human:
        human.execute(f"CREATE ROLE report_user LOGIN PASSWORD '{PASSWORD}'")
        human.execute("CREATE TABLE seen (q text)")
        try:
            with env.connect("dba") as conn:
                for sql in (store, "SELECT cursor_to_xml('a', 1, false, false, '')"):
                    conn.execute("BEGIN")
                    conn.execute(f"DECLARE a CURSOR FOR {activity}")
                    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="CLOSE ALL"):
                        conn.execute(sql)
                    conn.execute("ROLLBACK")
                    conn.execute("CLOSE ALL")
                # with no masked cursor open, a DO block runs; prepared then, it is decided again once one is
                conn.execute("BEGIN")
                conn.execute("DECLARE a CURSOR FOR SELECT 'harmless'")
                conn.execute(store, prepare=True)
                conn.execute("CLOSE a")
                conn.execute(f"DECLARE a CURSOR FOR {activity}")
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="CLOSE ALL"):
                    conn.execute(store, prepare=True)
                conn.execute("ROLLBACK")
            # nor when the cursor is declared in the same query as the code that reads it
            for sql in (store, "SELECT cursor_to_xml('a', 1, false, false, '')"):
                proc = env.psql("dba", f"BEGIN; DECLARE a CURSOR FOR {activity}; {sql}; COMMIT")
                assert "CLOSE ALL" in proc.stderr and PASSWORD not in proc.stdout, (proc.stdout, proc.stderr)
            assert human.execute("SELECT q FROM seen").fetchall() == []
        finally:
            human.execute("DROP TABLE seen")
            human.execute("DROP ROLE report_user")


def test_settings_that_hold_passwords_come_back_masked_and_cannot_be_computed_over(env: Env) -> None:
    import psycopg

    # Where a password sits in settings: the server's primary_conninfo, a database's and a role's settings
    # (ALTER DATABASE/ROLE ... SET: pg_db_role_setting, and current_setting() in their sessions), a subscription.
    env.cluster.execute(f"ALTER DATABASE app SET app.dsn = 'postgresql://report:{PASSWORD}@db.internal/app'")
    env.cluster.execute(f"ALTER ROLE postgres IN DATABASE app SET app.secret = 'password={PASSWORD}'")
    env.cluster.execute(
        f"CREATE SUBSCRIPTION mirror CONNECTION 'host=127.0.0.1 port=1 dbname=app password={PASSWORD}' "
        "PUBLICATION p WITH (connect = false)",
        dbname="app",
    )
    secrets = (PASSWORD, REPLICATION_PASSWORD, REPLICATION_PASSWORD[::-1])
    try:
        for role in ("readonly", "writer", "dba"):
            with env.connect(role) as conn:
                # the same statements with other constants first: what they read is not what these read
                conn.execute("SELECT current_setting('search_path')")
                conn.execute("SELECT setting FROM pg_settings WHERE name = 'work_mem'")
                for sql in (
                    "SHOW primary_conninfo",
                    "SELECT current_setting('primary_conninfo')",
                    "SELECT setting FROM pg_settings WHERE name = 'primary_conninfo'",
                ):
                    ((value,),) = conn.execute(sql).fetchall()
                    assert value.startswith("host=primary.internal user=replicator password='"), (sql, value)
                    assert value.endswith("' sslmode=prefer") and "[REDACTED:conninfo_password]" in value, value
                    assert not any(secret in value for secret in secrets), (sql, value)
                for sql in (
                    "SHOW ALL",
                    "SELECT * FROM pg_settings",
                    "SELECT * FROM pg_show_all_settings()",
                    "SELECT current_setting('app.dsn'), current_setting('app.secret')",
                    "SELECT setdatabase, setconfig FROM pg_db_role_setting",
                    "SELECT unnest(setconfig) FROM pg_db_role_setting",
                    "SELECT subname, subconninfo FROM pg_subscription",
                ):
                    rows = conn.execute(sql).fetchall()
                    assert rows and not any(secret in str(rows) for secret in secrets), (sql, rows)
                assert "db.internal" in str(conn.execute("SELECT current_setting('app.dsn')").fetchall())
                # ordinary settings come back as they are, computed over or not (no mask applies: the session
                # is not masked by them)
                assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)
                assert conn.execute(
                    "SELECT setting::int * 8192 FROM pg_settings WHERE name = 'shared_buffers'"
                ).fetchone() == (16 * 1024 * 1024,)
                for sql in (
                    "SELECT reverse(current_setting('primary_conninfo'))",
                    "SELECT encode(convert_to(current_setting('primary_conninfo'), 'UTF8'), 'hex')",
                    "SELECT reverse(setting) FROM pg_settings WHERE name = 'primary_conninfo'",
                    "SELECT name, translate(setting, 'abc', 'ABC') FROM pg_settings",
                    "SELECT reverse(v) FROM current_setting('primary_conninfo') v",
                    "SELECT reverse(array_to_string(setconfig, ',')) FROM pg_db_role_setting",
                    "SELECT set_config('application_name', current_setting('primary_conninfo'), false)",
                    "SELECT reverse(c) FROM (SELECT subconninfo AS c FROM pg_subscription) s",
                ):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                        conn.execute(sql)
                    assert "come back with passwords masked" in str(info.value), (sql, info.value)
                assert conn.execute("SHOW application_name").fetchone() != (PRIMARY_CONNINFO,)
        with env.connect("dba") as conn:
            for sql in (
                "CREATE TABLE seen AS SELECT current_setting('primary_conninfo') AS c",
                "CREATE TABLE seen AS SELECT name, setting FROM pg_settings",
                "CREATE VIEW seen AS SELECT setconfig FROM pg_db_role_setting",
                "CREATE TABLE seen AS SELECT subconninfo FROM pg_subscription",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql)
            # the error of a cast while the statement ran would print the value: computing, denied before it runs
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT current_setting('primary_conninfo')::int")
        assert env.cluster.execute("SELECT count(*) FROM pg_class WHERE relname = 'seen'", dbname="app") == [(0,)]
        # psql's \dconfig, \drds and \dRs+ and pg_dump read them, and show them masked
        for command, expected in (
            ("\\dconfig *conninfo*", "host=primary.internal"),
            ("\\dconfig+ primary_conninfo", "password='[REDACTED:conninfo_password]' sslmode=prefer"),
            ("\\drds", "app.dsn=postgresql://report:[REDACTED:conninfo_password]@db.internal/app"),
            ("\\dRs+", "mirror"),
        ):
            proc = env.psql("readonly", command)
            assert proc.returncode == 0 and expected in proc.stdout, (command, proc)
            assert not any(secret in proc.stdout for secret in secrets), proc
        require(shutil.which("pg_dump") is not None, "pg_dump is not installed")
        environ = {**os.environ, "PGPASSWORD": env.tokens["readonly"], "PGSSLMODE": "disable"}
        proc = subprocess.run(
            ["pg_dump", "-h", "127.0.0.1", "-p", str(env.port), "-U", "agent-readonly", "-d", "app", "-C", "-s"],
            capture_output=True,
            text=True,
            timeout=90,
            env=environ,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert (
            "CREATE SUBSCRIPTION mirror CONNECTION 'host=127.0.0.1 port=1 dbname=app password=[REDACTED" in proc.stdout
        )
        assert 'ALTER DATABASE app SET "app.dsn" TO' in proc.stdout, proc.stdout
        assert not any(secret in proc.stdout for secret in secrets), proc.stdout
    finally:
        env.cluster.execute("ALTER SUBSCRIPTION mirror SET (slot_name = NONE); DROP SUBSCRIPTION mirror", dbname="app")
        env.cluster.execute("ALTER ROLE postgres IN DATABASE app RESET ALL; ALTER DATABASE app RESET ALL")


def test_a_dba_opens_no_connection_or_directory_of_the_server_to_carry_data_out(env: Env) -> None:
    # A foreign server or a subscription makes the database connect where the statement says, with the
    # credentials of a user mapping or a connection string: INSERT INTO a foreign table sends rows there. A
    # tablespace is a directory of the server's file system. Here the "elsewhere" is another database of the
    # same cluster, which is where the rows would land.
    import psycopg

    env.cluster.execute("CREATE DATABASE sink")
    env.cluster.execute("CREATE TABLE loot (id int, email text)", dbname="sink")
    env.cluster.execute("INSERT INTO customers VALUES (1, 'ann@example.com') ON CONFLICT DO NOTHING", dbname="app")
    env.cluster.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw", dbname="app")
    directory = Path(tempfile.mkdtemp(prefix="lictor-space-"))  # one the server could use: empty, its own
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    # a server and a mapping set up by a human: the dba may still use them
    env.cluster.execute(
        f"CREATE SERVER reviewed FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', port "
        f"'{env.cluster.port}', dbname 'sink'); CREATE USER MAPPING FOR postgres SERVER reviewed OPTIONS (user 'postgres')",
        dbname="app",
    )
    try:
        with env.connect("dba") as conn:
            for sql in (
                f"CREATE SERVER out FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', port "
                f"'{env.cluster.port}', dbname 'sink')",
                "ALTER SERVER reviewed OPTIONS (SET dbname 'postgres')",
                "CREATE USER MAPPING FOR CURRENT_USER SERVER reviewed OPTIONS (user 'someone', password 'x')",
                "ALTER USER MAPPING FOR postgres SERVER reviewed OPTIONS (SET user 'someone')",
                "CREATE SUBSCRIPTION copy CONNECTION 'host=127.0.0.1 dbname=sink' PUBLICATION p WITH (connect = false)",
                f"CREATE TABLESPACE space LOCATION '{directory}'",
                "DO $$ BEGIN CREATE SERVER out2 FOREIGN DATA WRAPPER postgres_fdw; END $$",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql)
                assert "pg-deny-remote-and-server-objects" in str(info.value), (sql, info.value)
            # what a human reviewed stays usable: a foreign table on that server
            conn.execute("CREATE FOREIGN TABLE loot (id int, email text) SERVER reviewed")
            assert conn.execute("SELECT count(*) FROM loot").fetchone() == (0,)
            conn.execute("DROP FOREIGN TABLE loot")
        assert env.cluster.execute("SELECT srvname FROM pg_foreign_server ORDER BY 1", dbname="app") == [("reviewed",)]
        assert env.cluster.execute("SELECT count(*) FROM pg_subscription") == [(0,)]
        assert env.cluster.execute("SELECT count(*) FROM pg_tablespace WHERE spcname = 'space'") == [(0,)]
        assert env.cluster.execute("SELECT count(*) FROM pg_user_mappings", dbname="app") == [(1,)]
    finally:
        env.cluster.execute(
            "DROP SERVER IF EXISTS out CASCADE; DROP SERVER IF EXISTS out2 CASCADE; DROP SERVER reviewed CASCADE",
            dbname="app",
        )
        env.cluster.execute("DROP SUBSCRIPTION IF EXISTS copy")
        env.cluster.execute("DROP TABLESPACE IF EXISTS space")
        env.cluster.execute("DROP DATABASE sink")
        shutil.rmtree(directory, ignore_errors=True)


def test_a_session_knows_its_own_notifications_by_the_pid_it_was_given(env: Env) -> None:
    # Drivers skip their own notifications by comparing the notification's pid with the session's
    # (psycopg's conn.info.backend_pid, asyncpg's get_server_pid(): the BackendKeyData the gateway gave them).
    import asyncio

    import asyncpg

    with env.connect("writer") as conn, env.direct() as human:
        conn.execute("LISTEN jobs")
        gen = conn.notifies(timeout=5, stop_after=2)
        conn.execute("NOTIFY jobs, 'from the agent'")
        human.execute("NOTIFY jobs, 'from someone else'")
        got = [(n.pid, n.payload) for n in gen]
        expected = [(conn.info.backend_pid, "from the agent"), (human.info.backend_pid, "from someone else")]
    assert got == expected, got

    async def with_asyncpg() -> tuple[int, int]:
        aconn = await asyncpg.connect(
            host="127.0.0.1", port=env.port, user="agent", database="app", password=env.tokens["writer"], ssl=False
        )
        try:
            received: asyncio.Queue[int] = asyncio.Queue()
            await aconn.add_listener("jobs", lambda _c, pid, _ch, _payload: received.put_nowait(pid))
            await aconn.execute("NOTIFY jobs")
            return await asyncio.wait_for(received.get(), 5), aconn.get_server_pid()
        finally:
            await aconn.close()

    notified, own = asyncio.run(with_asyncpg())
    assert notified == own


def test_no_agent_reads_consumes_or_writes_the_change_stream(env: Env) -> None:
    # A logical slot a human set up for change-data capture holds every table's changes: reading them gave a
    # writer or a dba rows of any table whatever its rules say (get_* also consumed them, so the subscriber lost
    # them), and pg_logical_emit_message wrote into the stream every consumer reads. Backups and log rotation
    # (under pg_rotate_logfile_old, the built-in behind an old name) were theirs too. (Read-only agents were
    # already refused these as writes or computed reads.)
    import psycopg

    with env.direct() as human:
        human.execute("CREATE TABLE IF NOT EXISTS payroll (id int, salary int)")
        human.execute("SELECT pg_create_logical_replication_slot('cdc', 'test_decoding')")
        try:
            human.execute("SET synchronous_commit = on")  # decoding reads only what is flushed (the cluster has it off)
            human.execute("INSERT INTO payroll VALUES (1, 250000)")
            for role, sql in (
                ("writer", "SELECT data FROM pg_logical_slot_get_changes('cdc', NULL, NULL)"),
                ("writer", "SELECT data FROM pg_catalog.pg_logical_slot_peek_changes('cdc', NULL, NULL)"),
                ("dba", "SELECT * FROM pg_logical_slot_get_binary_changes('cdc', NULL, NULL)"),
                ("writer", "SELECT pg_logical_emit_message(true, 'cdc', 'injected')"),
                ("dba", "SELECT pg_backup_start('agent')"),
                ("dba", "SELECT pg_rotate_logfile_old()"),
            ):
                with env.connect(role) as conn:
                    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                        conn.execute(sql).fetchall()
                    assert "pg-deny-dangerous-functions" in str(info.value), (role, sql, info.value)
            changes = [r[0] for r in human.execute("SELECT data FROM pg_logical_slot_peek_changes('cdc', NULL, NULL)")]
            assert any("salary[integer]:250000" in c for c in changes), changes  # still there for the subscriber
            assert not any("injected" in c for c in changes), changes
        finally:
            human.execute("SELECT pg_drop_replication_slot('cdc')")
            human.execute("DROP TABLE payroll")


def test_a_readonly_agent_on_a_read_replica_cannot_pause_its_replay(tmp_path: Path) -> None:
    # Read-only agents are typically pointed at a standby. pg_wal_replay_pause() runs there in a read-only
    # transaction, and the replica then stays behind its primary until someone resumes it.
    import psycopg

    with running_cluster(hba=(*DEFAULT_HBA, "local replication all trust")) as primary:
        primary.execute("CREATE DATABASE app")
        standby = primary.standby()
        try:
            port = free_port()
            config = {
                "version": 1,
                "state_dir": str(tmp_path / "state"),
                "identity": {"issuers": [{"type": "lictor"}]},
                "rulepacks": [str(EXAMPLE_PACKS)],
                "targets": {
                    "replica": {
                        "protocol": "postgres",
                        "listen": f"127.0.0.1:{port}",
                        "upstream": {
                            "host": standby.host,
                            "port": standby.port,
                            "user": "postgres",
                            "database": "app",
                            "sslmode": "disable",
                        },
                        "read_only_roles": ["pg-readonly"],
                    }
                },
            }
            gateway = GatewayProcess(tmp_path, config).start()
            try:
                token = gateway.token("agent-reader", role="readonly")
                dsn = dict(host="127.0.0.1", port=port, user="agent", dbname="app", sslmode="disable")
                with psycopg.connect(**dsn, password=token, autocommit=True, connect_timeout=5) as conn:
                    assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
                    for sql in ("SELECT pg_wal_replay_pause()", "SELECT pg_catalog.pg_wal_replay_resume()"):
                        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                            conn.execute(sql)
                        assert "pg-deny-dangerous-functions" in str(info.value), (sql, info.value)
            finally:
                gateway.stop()
            assert standby.execute("SELECT pg_is_wal_replay_paused()") == [(False,)]
        finally:
            standby.stop()


def test_no_agent_reads_a_server_file_through_pg_read_file_old(env: Env) -> None:
    # PostgreSQL 11 to 15 keep the function behind adminpack 1.0's pg_file_read as a built-in of its own,
    # pg_read_file_old: a superuser login (the gateway's) reads any file of the server with it
    import psycopg

    if env.cluster.execute("SELECT count(*) FROM pg_proc WHERE proname = 'pg_read_file_old'") == [(0,)]:
        pytest.skip("this PostgreSQL has no pg_read_file_old")
    for role in ("readonly", "writer", "dba"):
        with env.connect(role) as conn:
            for sql in (
                "SELECT pg_read_file_old('PG_VERSION', 0, 100)",
                "SELECT pg_catalog.pg_read_file_old(f, 0, 100) FROM (VALUES ('PG_VERSION')) v(f)",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql).fetchall()
                assert "pg-deny-dangerous-functions" in str(info.value.diag.message_detail), (role, sql, info.value)


def test_a_dba_makes_no_table_a_view_of_a_catalog_with_an_on_select_rule(env: Env) -> None:
    # PostgreSQL 15 and older turn a table into a view with CREATE RULE "_RETURN" AS ON SELECT: over pg_proc,
    # an updatable view through which pg_read_file is renamed and then called under its new name
    import psycopg

    with env.connect("dba") as conn:
        conn.execute("CREATE TABLE procs (LIKE pg_catalog.pg_proc)")
        try:
            for sql in (
                'CREATE RULE "_RETURN" AS ON SELECT TO procs DO INSTEAD SELECT * FROM pg_catalog.pg_proc',
                'CREATE OR REPLACE RULE "_RETURN" AS ON SELECT TO procs DO INSTEAD SELECT * FROM pg_proc',
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql)
                assert "pg-no-views-over-catalogs" in str(info.value.diag.message_detail), (sql, info.value)
            with pytest.raises(psycopg.errors.UndefinedFunction):
                conn.execute("UPDATE procs SET proname = 'innocent' WHERE proname = 'pg_read_file'")
                conn.execute("SELECT innocent('PG_VERSION')")
        finally:
            conn.execute("DROP TABLE IF EXISTS procs")
    assert env.cluster.execute("SELECT count(*) FROM pg_proc WHERE proname = 'innocent'", dbname="app") == [(0,)]


def test_a_dba_makes_no_foreign_table_over_a_catalog_on_a_loopback_server(env: Env) -> None:
    # A human's postgres_fdw server that is this very database: a foreign table on it over pg_proc is updatable,
    # and renaming pg_read_file through it lets the dba call it under the new name
    import psycopg

    env.cluster.execute(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw; CREATE SERVER loopback FOREIGN DATA WRAPPER postgres_fdw "
        f"OPTIONS (host '{env.cluster.socket_dir}', port '{env.cluster.port}', dbname 'app'); "
        "CREATE USER MAPPING FOR postgres SERVER loopback OPTIONS (user 'postgres')",
        dbname="app",
    )
    try:
        with env.connect("dba") as conn:
            # what a human reviewed stays usable
            # over a remote table that does not exist: without table_name it is public.procs, itself, and reading
            # it opens loopback connections until the server has no slot left
            conn.execute(
                "CREATE FOREIGN TABLE procs (oid oid, proname name, pronargs int2) SERVER loopback "
                "OPTIONS (table_name 'no_such_table')"
            )
            for sql in (
                "CREATE FOREIGN TABLE fp (oid oid, proname name, pronargs int2) SERVER loopback "
                "OPTIONS (schema_name 'pg_catalog', table_name 'pg_proc')",
                "CREATE FOREIGN TABLE public.pg_proc (oid oid, proname name, pronargs int2) SERVER loopback "
                "OPTIONS (schema_name 'pg_catalog')",
                "ALTER FOREIGN TABLE procs OPTIONS (ADD schema_name 'pg_catalog', table_name 'pg_proc')",
                "ALTER FOREIGN TABLE procs OPTIONS (ADD table_name 'pg_proc')",
                "ALTER FOREIGN TABLE procs OPTIONS (ADD schema_name 'pg_catalog')",
                "IMPORT FOREIGN SCHEMA pg_catalog LIMIT TO (pg_proc) FROM SERVER loopback INTO public",
                "IMPORT FOREIGN SCHEMA pg_catalog FROM SERVER loopback INTO public",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql)
                assert "pg-no-views-over-catalogs" in str(info.value.diag.message_detail), (sql, info.value)
            with pytest.raises(psycopg.errors.UndefinedTable):  # procs reads public.no_such_table
                conn.execute("UPDATE procs SET proname = 'innocent' WHERE proname = 'pg_read_file'")
        tables = env.cluster.execute("SELECT relname FROM pg_class WHERE relkind = 'f' ORDER BY 1", dbname="app")
        assert tables == [("procs",)]
        assert env.cluster.execute("SELECT count(*) FROM pg_proc WHERE proname = 'innocent'", dbname="app") == [(0,)]
    finally:
        env.cluster.execute("DROP SERVER loopback CASCADE", dbname="app")


def test_no_agent_reads_password_hashes_from_the_statistics_toast_table(env: Env) -> None:
    # With a few dozen roles, ANALYZE stores pg_authid's histogram of password hashes out of line, in pg_statistic's
    # TOAST table: its chunks hold the hashes as they are
    import psycopg

    roles = [f"toasted_{i}" for i in range(40)]
    env.cluster.execute("; ".join(f"CREATE ROLE {r} LOGIN PASSWORD 'pw-{r}'" for r in roles))
    try:
        env.cluster.execute("ANALYZE pg_authid", dbname="app")
        found = env.cluster.execute(
            "SELECT count(*) FROM pg_authid a WHERE rolname LIKE 'toasted_%' AND EXISTS (SELECT FROM "
            "pg_toast.pg_toast_2619 t WHERE position(convert_to(substr(rolpassword, 20, 16), 'UTF8') IN chunk_data) > 0)",
            dbname="app",
        )
        assert found[0][0] > 0  # what an agent would read
        for role in ("readonly", "dba"):
            with env.connect(role) as conn:
                for sql in (
                    "SELECT chunk_data FROM pg_toast.pg_toast_2619",
                    "SET search_path = pg_toast; SELECT chunk_data FROM pg_toast_2619",
                ):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                        psycopg.ClientCursor(conn).execute(sql)
                    assert "pg-deny-credential-catalogs" in str(info.value.diag.message_detail), (role, sql, info.value)
    finally:
        env.cluster.execute("; ".join(f"DROP ROLE {r}" for r in roles))


def test_a_user_mapping_password_under_a_quoted_option_name_comes_back_masked(env: Env) -> None:
    # Tools that quote every identifier write OPTIONS ("user" 'app', "password" '...'): the statement stays in
    # pg_stat_activity (the human's session is idle) and in pg_stat_statements
    env.cluster.execute(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw; CREATE SERVER quoted FOREIGN DATA WRAPPER postgres_fdw",
        dbname="app",
    )
    try:
        with env.direct() as human:
            human.execute(
                f"""CREATE USER MAPPING FOR postgres SERVER quoted OPTIONS ("user" 'app', "password" '{PASSWORD}')"""
            )
            for role in ("readonly", "dba"):
                with env.connect(role) as conn:
                    (activity,) = conn.execute(
                        "SELECT query FROM pg_stat_activity WHERE query LIKE '%SERVER quoted%' AND pid <> pg_backend_pid()"
                    ).fetchone()
                    assert PASSWORD not in activity and "[REDACTED:sql_password" in activity, activity
                    texts = conn.execute("SELECT query FROM pg_stat_statements WHERE query LIKE '%SERVER quoted%'")
                    assert not any(PASSWORD in t for (t,) in texts), texts
    finally:
        env.cluster.execute("DROP SERVER quoted CASCADE", dbname="app")


def test_a_dba_creates_no_untrusted_language_as_the_extension_it_ships_as(env: Env) -> None:
    # CREATE LANGUAGE was denied, and CREATE EXTENSION plpython3u, which creates the same language, went through.
    done = env.psql("dba", "CREATE EXTENSION plpython3u")
    assert done.returncode != 0 and "pg-deny-language-changes" in done.stderr, done
    with env.direct() as human:
        assert human.execute("SELECT count(*) FROM pg_language WHERE lanname = 'plpython3u'").fetchone() == (0,)
    created = env.psql("dba", "CREATE EXTENSION IF NOT EXISTS pgcrypto; DROP EXTENSION pgcrypto")
    assert created.returncode == 0, created  # other extensions stay the dba's to install


def test_a_cursor_or_statement_is_used_in_the_query_that_declares_or_prepares_it(env: Env) -> None:
    # psql -c "BEGIN; DECLARE c ...; FETCH ..." was denied: the FETCH named a cursor the gateway did not know yet.
    env.cluster.execute(
        "INSERT INTO customers VALUES (9101, 'jane.roe@example.com') ON CONFLICT DO NOTHING", dbname="app"
    )
    try:
        proc = env.psql(
            "readonly", "BEGIN; DECLARE c CURSOR FOR SELECT email FROM customers WHERE id = 9101; FETCH c; COMMIT"
        )
        assert proc.stdout.split() == ["BEGIN", "DECLARE", "CURSOR", "[REDACTED:email]", "COMMIT"], (
            proc.stdout,
            proc.stderr,
        )
        proc = env.psql("writer", "PREPARE p(int) AS UPDATE customers SET email = email WHERE id = $1; EXECUTE p(9101)")
        assert proc.returncode == 0, proc.stderr
        # what the query's own PREPARE or DECLARE no longer holds is still unknown
        for sql in (
            "PREPARE p AS SELECT 1; DEALLOCATE p; EXECUTE p",
            "BEGIN; DECLARE c CURSOR FOR SELECT 1; CLOSE c; DO $$BEGIN NULL; END$$; FETCH c; COMMIT",
        ):
            proc = env.psql("dba", sql)
            assert "through the gateway" in proc.stderr, (sql, proc.stderr)
    finally:
        env.cluster.execute("DELETE FROM customers WHERE id = 9101", dbname="app")


def test_a_writers_merge_inserts_freely_and_changes_no_row_its_key_does_not_match(env: Env) -> None:
    import psycopg

    try:
        with env.connect("writer") as conn:
            # an insert-only MERGE changes no row: it was denied as an UPDATE without a WHERE
            upsert = (
                "MERGE INTO customers c USING (VALUES (9201, 'a@example.org')) v(id, email) ON c.id = v.id "
                "WHEN NOT MATCHED THEN INSERT (id, email) VALUES (v.id, v.email)"
            )
            assert conn.execute(upsert).rowcount == 1
            # WHEN NOT MATCHED BY SOURCE (PostgreSQL 17) deletes every row the key does not match; it was let through
            # (this server is older: the gateway denies it before the server could)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="need a WHERE"):
                conn.execute(
                    "MERGE INTO customers c USING (VALUES (9201)) v(id) ON c.id = v.id "
                    "WHEN MATCHED THEN UPDATE SET email = c.email WHEN NOT MATCHED BY SOURCE THEN DELETE"
                )
    finally:
        env.cluster.execute("DELETE FROM customers WHERE id = 9201", dbname="app")
