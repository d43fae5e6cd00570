"""PostgreSQL through a real ``lictor run`` gateway: real clients (psql, psycopg, pgbench) against the
PostgreSQL server at 127.0.0.1:5432, with the example rule pack (examples/postgres/rulepacks).

Every test database is created for this module (``lictor_test_<random>``) and dropped afterwards. A denied
statement is proven denied *and* the data proven unchanged by checking directly against PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lictor_addons.postgres import _protocol as pg

from tests.conftest import (
    ROOT,
    GatewayProcess,
    attach_strace,
    free_port,
    idle_connections,
    lictor,
    require,
    wait_until,
)
from tests.idp import HeldJwks

pytestmark = pytest.mark.timeout(120)

ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"
EXAMPLE_PACKS = ROOT / "examples" / "postgres" / "rulepacks"

CARDS = ["4111111111111111", "5500 0000 0000 0004", "3400-000000-00009", "6011000000000004"]


def _server_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(ADMIN_DSN):
            return True
    except Exception:
        return False


class PgEnv:
    """The test database, the gateway in front of it, and helpers to talk to both."""

    def __init__(self, workdir: Path, dbname: str) -> None:
        self.workdir = workdir
        self.dbname = dbname
        self.port = free_port()
        self.approvals_port = free_port()
        self.gateway: GatewayProcess | None = None
        self.tokens: dict[str, str] = {}

    # -- direct access (the gateway's view is never trusted to check itself) -------------------

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={self.dbname}", autocommit=True)

    def direct(self, sql: str, params: Any = None) -> list[Any]:
        with self.admin() as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def fingerprint(self) -> dict[str, Any]:
        """What the evasions must not change: every table's content, and the set of tables."""
        tables = [r[0] for r in self.direct("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        out: dict[str, Any] = {"tables": tables}
        for t in ("customers", "orders", "accounts"):
            out[t] = self.direct(
                f"SELECT count(*), md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) FROM {t} x"
            )
        return out

    # -- through the gateway -----------------------------------------------------------------------

    def dsn(self, role: str, **extra: str) -> str:
        parts = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "user": f"agent-{role}",
            "dbname": "app",
            "password": self.tokens[role],
            "sslmode": "disable",
            "connect_timeout": "5",
        }
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect(self, role: str, **kw: Any) -> Any:
        import psycopg

        extra = kw.pop("dsn_extra", {})
        kw.setdefault("autocommit", True)
        return psycopg.connect(self.dsn(role, **extra), **kw)

    def psql(self, role: str, *args: str, check: bool = False, sslmode: str = "disable", **kw: Any) -> Any:
        env = {**os.environ, "PGPASSWORD": self.tokens[role], "PGSSLMODE": sslmode, "PGCONNECT_TIMEOUT": "5"}
        env.update(kw.pop("env", {}))
        env.pop("PGSERVICE", None)
        cmd = [
            "psql",
            "-X",
            "-v",
            "ON_ERROR_STOP=0",
            "-h",
            kw.pop("host", "127.0.0.1"),
            "-p",
            str(self.port),
            "-U",
            f"agent-{role}",
            "-d",
            "app",
            *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 60), env=env, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"psql failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc


SETUP_SQL = """
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text, card text, note text);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, amount numeric(10,2));
CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);
INSERT INTO accounts SELECT g, 100 FROM generate_series(1, 10) g;
CREATE FUNCTION sneaky_write() RETURNS int LANGUAGE sql AS 'UPDATE accounts SET balance = 0 RETURNING 1';
"""


# Beside the example: a role with readonly's masks that may compute over columns (the example's readonly may
# not), to show what masking alone covers and what it does not; and a writer whose results are masked.
ANALYST_PACK = """
format: lictor/v1
metadata: {name: test-analyst, owner: tests}
identities:
  - {id: analysts, match: {claims: {role: analyst}}, roles: [pg-analyst]}
  - {id: loaders, match: {claims: {role: loader}}, roles: [pg-loader]}
roles:
  pg-loader:
    inherits: [pg-writer]
    rules:
      - {id: loader-mask-cards, protocol: postgres, action: mask, mask: {detectors: [card], style: partial, keep: 4}}
  pg-analyst:
    inherits: [pg-reader]
    rules:
      - {id: analyst-mask-cards, protocol: postgres, action: mask, mask: {detectors: [card], style: partial, keep: 4}}
      - {id: analyst-mask-emails, protocol: postgres, action: mask, mask: {detectors: [email], style: redact}}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgEnv]:
    require(_server_available(), "PostgreSQL at 127.0.0.1:5432 (user postgres, trust) is not reachable")
    for tool in ("psql", "pgbench"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    import psycopg

    dbname = f"lictor_test_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {dbname}")
    workdir = tmp_path_factory.mktemp("pg-e2e")
    e = PgEnv(workdir, dbname)
    try:
        with e.admin() as conn:
            conn.execute(SETUP_SQL)
            for i in range(1, 21):
                conn.execute(
                    "INSERT INTO customers VALUES (%s, %s, %s, %s, %s)",
                    (i, f"Customer {i}", f"user{i}@example.com", CARDS[i % len(CARDS)], f"note {i}"),
                )
            conn.execute("INSERT INTO orders (customer_id, amount) SELECT g, g * 1.5 FROM generate_series(1, 20) g")
        subprocess.run(
            ["pgbench", "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-U", "postgres", dbname],
            check=True,
            capture_output=True,
            timeout=120,
        )
        (workdir / "test-packs").mkdir()
        (workdir / "test-packs" / "analyst.yaml").write_text(ANALYST_PACK)
        config = {
            "version": 1,
            "state_dir": str(workdir / "state"),
            "log": {"level": "info"},
            "identity": {"issuers": [{"type": "lictor"}]},
            "rulepacks": [str(EXAMPLE_PACKS), str(workdir / "test-packs")],
            "approvals": {"listen": f"127.0.0.1:{e.approvals_port}", "poll_interval": "1s"},
            "targets": {
                "app": {
                    "protocol": "postgres",
                    "listen": f"127.0.0.1:{e.port}",
                    "upstream": {
                        "host": "127.0.0.1",
                        "port": 5432,
                        "user": "postgres",
                        "database": dbname,
                        "sslmode": "disable",
                    },
                    "read_only_roles": ["pg-readonly", "pg-analyst"],
                }
            },
        }
        gw = GatewayProcess(workdir, config)
        gw.start()
        e.gateway = gw
        for role in ("readonly", "writer", "dba", "approver", "analyst", "loader"):
            e.tokens[role] = gw.token(f"agent-{role}", role=role)
        yield e
    finally:
        if e.gateway is not None:
            e.gateway.stop()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


# -- a raw protocol client, for byte-exact checks ------------------------------------------------------


class RawClient:
    """Speaks the v3 protocol directly (with the codec's builders), to check message sequences."""

    def __init__(self, port: int, token: str, *, tls: bool = False, database: str = "app") -> None:
        self.sock: Any = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = pg.BackendReader()
        if tls:
            self.sock.sendall(pg.ssl_request())
            assert self.sock.recv(1) == b"S"
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock = ctx.wrap_socket(self.sock)
        self.sock.sendall(pg.startup_message({"user": "raw", "database": database}))
        first = self.read_messages(1)[0]
        assert isinstance(first, pg.AuthenticationCleartextPassword), first
        self.sock.sendall(pg.password_message(token))
        self.hello = self.until_ready()
        self.key = next(m for m in self.hello if isinstance(m, pg.BackendKeyData))

    def read_messages(self, count: int) -> list[pg.BackendMessage]:
        out: list[pg.BackendMessage] = []
        while len(out) < count:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            out.extend(self.reader.feed(data))
        return out

    def until_ready(self) -> list[pg.BackendMessage]:
        out: list[pg.BackendMessage] = []
        while not out or not isinstance(out[-1], pg.ReadyForQuery):
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed after {out}")
            out.extend(self.reader.feed(data))
        return out

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(messages))

    def close(self) -> None:
        try:
            self.sock.sendall(pg.terminate())
        finally:
            self.sock.close()


def names(messages: list[pg.BackendMessage]) -> list[str]:
    return [type(m).__name__ for m in messages]


def errors(messages: list[pg.BackendMessage]) -> list[pg.ErrorResponse]:
    return [m for m in messages if isinstance(m, pg.ErrorResponse)]


# -- connection set-up -----------------------------------------------------------------------------------


def test_psql_readonly_reads_masked_rows_over_tls(env: PgEnv) -> None:
    ca = env.gateway.state_dir / "tls" / "postgres" / "ca.pem"  # type: ignore[union-attr]
    proc = env.psql(
        "readonly",
        "-At",
        "-c",
        "SELECT id, email, card FROM customers ORDER BY id LIMIT 4",
        "-c",
        "SHOW ssl",
        sslmode="verify-full",
        host="localhost",
        env={"PGSSLROOTCERT": str(ca)},
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines()[:4]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    for _, email, card in rows:
        assert "@example.com" not in email and "[REDACTED:email]" in email
        assert card.endswith(("0004", "0009", "1111")) and "*" in card
        assert not any(c in card for c in CARDS)


def test_bad_or_missing_token_is_refused_with_28P01(env: PgEnv) -> None:
    import psycopg

    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(env.dsn("readonly", password="not-a-token"))
    assert "lictor: authentication failed" in str(info.value)
    tampered = env.tokens["dba"][:-4] + ("AAAA" if not env.tokens["dba"].endswith("AAAA") else "BBBB")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(env.dsn("dba", password=tampered))
    assert "authentication failed" in str(info.value)


def test_a_connection_ends_when_its_token_expires(env: PgEnv) -> None:
    import psycopg

    gw = env.gateway
    assert gw is not None
    short = gw.token("agent-short", ttl="3s", role="readonly")
    with psycopg.connect(env.dsn("readonly", password=short), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        time.sleep(3.5)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT 1")
        assert "token has expired" in str(info.value)


def own_gateway(env: PgEnv, tmp_path: Path, port: int) -> dict[str, Any]:
    """The config of a gateway of a test's own (the example pack, the test database) on ``port``."""
    return {
        "state_dir": str(tmp_path / "state"),
        "identity": {"issuers": [{"type": "lictor"}]},
        "rulepacks": [str(EXAMPLE_PACKS)],
        "targets": {
            "app": {
                "protocol": "postgres",
                "listen": f"127.0.0.1:{port}",
                "upstream": {"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": env.dbname},
            }
        },
    }


def test_a_recording_store_that_takes_no_writes_gives_clear_refusals(env: PgEnv, tmp_path: Path) -> None:
    import psycopg

    port = free_port()
    config = own_gateway(env, tmp_path, port)
    config["recordings"] = {"spool": {"max_bytes": "64KiB", "segment_bytes": "8KiB", "reserve_bytes": "8KiB"}}
    gw = GatewayProcess(tmp_path, config).start()
    try:
        token = gw.token("agent-ro", role="readonly")
        dsn = f"host=127.0.0.1 port={port} user=agent-ro dbname=app sslmode=disable connect_timeout=5"
        sessions = gw.state_dir / "recordings" / "sessions"
        shutil.rmtree(sessions, ignore_errors=True)
        sessions.parent.mkdir(parents=True, exist_ok=True)
        sessions.write_text("")  # a file where the local sink writes its directories: it takes no writes
        refusals: list[str] = []
        with psycopg.connect(dsn, password=token, autocommit=True) as conn:
            for i in range(2000):  # until the spool, which the sink no longer empties, is full
                try:
                    conn.execute("SELECT %s::text, repeat('x', 200)", (str(i),)).fetchone()
                except psycopg.errors.InsufficientPrivilege as exc:  # denied, and the connection goes on
                    assert "audit store is unavailable" in str(exc) and "lictor:audit-unavailable" in str(exc)
                    refusals.append(str(exc))
                    if len(refusals) == 3:
                        break
                except psycopg.Error as exc:  # a statement that ran but could not be recorded ends the connection
                    assert conn.closed and "can no longer be recorded" in str(exc), str(exc)
                    refusals.append(str(exc))
                    break
        assert refusals, "the spool never filled up"
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(dsn, password=token)
        assert "cannot record sessions right now" in str(info.value), str(info.value)
        sessions.unlink()  # the store is back: the sink catches up, the spool empties
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(dsn, password=token, autocommit=True) as conn:
                    assert conn.execute("SELECT 'back'").fetchone() == ("back",)
                break
            except psycopg.Error:
                assert time.monotonic() < deadline, "the gateway did not take connections again"
                time.sleep(0.2)
    finally:
        gw.stop()


def test_a_slow_identity_provider_holds_up_no_other_connection(env: PgEnv, tmp_path: Path) -> None:
    """A login whose token needs the identity provider's keys waits for them; the gateway's other
    connections go on meanwhile."""
    import psycopg

    idp = HeldJwks()
    port = free_port()
    config = own_gateway(env, tmp_path, port)
    config["identity"] = {"issuers": [{"type": "lictor"}, idp.issuer]}
    gw = GatewayProcess(tmp_path, config).start()
    try:
        dsn = f"host=127.0.0.1 port={port} dbname=app sslmode=disable connect_timeout=10"
        idp_token = idp.token("idp-agent", role="readonly")
        logins: list[Any] = []

        def login() -> None:
            try:
                with psycopg.connect(dsn, user="idp-agent", password=idp_token) as conn:
                    logins.append(conn.execute("SELECT 'in'").fetchone())
            except Exception as exc:
                logins.append(exc)

        with psycopg.connect(dsn, user="a", password=gw.token("agent-ro", role="readonly"), autocommit=True) as conn:
            answered_while_held = idp.others_go_on(login, lambda: conn.execute("SELECT 1").fetchone() == (1,))
        assert answered_while_held, "statements waited for another connection's login"
        assert logins == [("in",)], logins
    finally:
        gw.stop()
        idp.close()


def test_a_slow_identity_provider_holds_up_no_login_with_another_provider_s_token(env: PgEnv, tmp_path: Path) -> None:
    """Each JWKS issuer's tokens are verified in a thread of its own: while one provider is slow to answer,
    logins with another provider's tokens go on (they waited in line behind its fetch, for up to its 10 s)."""
    import psycopg

    slow, other = HeldJwks(), HeldJwks("https://other-idp")
    other.release.set()
    port = free_port()
    config = own_gateway(env, tmp_path, port)
    config["identity"] = {"issuers": [slow.issuer, other.issuer]}
    gw = GatewayProcess(tmp_path, config).start()
    try:
        dsn = f"host=127.0.0.1 port={port} dbname=app sslmode=disable connect_timeout=30"
        logins: list[Any] = []

        def login() -> None:
            try:
                with psycopg.connect(dsn, user="slow", password=slow.token("slow-agent", role="readonly")) as conn:
                    logins.append(conn.execute("SELECT 'in'").fetchone())
            except Exception as exc:
                logins.append(exc)

        def other_login() -> bool:
            with psycopg.connect(dsn, user="other", password=other.token("other-agent", role="readonly")) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)

        assert slow.others_go_on(login, other_login)
        # had the other logins waited for the slow provider's fetch, it would have been cut off at its deadline
        # before they ran, and this login refused
        assert logins == [("in",)], logins
    finally:
        gw.stop()
        slow.close()
        other.close()


def test_gssenc_refused_and_ssl_accepted_on_raw_socket(env: PgEnv) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        sock.sendall(pg.gssenc_request())
        assert sock.recv(1) == b"N"
        sock.sendall(pg.ssl_request())
        assert sock.recv(1) == b"S"
    raw = RawClient(env.port, env.tokens["readonly"], tls=True)
    raw.send(pg.query("SELECT 1"))
    assert names(raw.until_ready()) == ["RowDescription", "DataRow", "CommandComplete", "ReadyForQuery"]
    raw.close()


def test_startup_settings_are_decided_like_set(env: PgEnv) -> None:
    import psycopg

    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(env.dsn("readonly", options="'-c default_transaction_read_only=off'"))
    assert "default_transaction_read_only" in str(info.value) and "not allowed" in str(info.value)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(env.dsn("dba", options="'-c standard_conforming_strings=off'"))
    assert "not allowed" in str(info.value)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(env.dsn("readonly", options="'-D /tmp'"))
    assert "not accepted" in str(info.value)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(env.dsn("readonly", replication="database"))
    assert "replication" in str(info.value)
    # Ordinary settings pass (the policy allows SET of them for readonly).
    dsn = env.dsn("readonly", options="'-c search_path=public,pg_catalog -c statement_timeout=5s'")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(env.dsn("readonly", options="'-c statement_timeout=banana'"))
    assert "statement_timeout" in str(info.value)
    # A setting the server refuses at login for other reasons is the agent's to fix too, not the operators'
    for setting, reason in (
        ("transaction_isolation=serializable", "SET TRANSACTION ISOLATION LEVEL must be called before any query"),
        ("shared_buffers=1MB", 'parameter "shared_buffers" cannot be changed without restarting the server'),
    ):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(env.dsn("dba", options=f"'-c {setting}'"))
        assert reason in str(info.value) and "operators" not in str(info.value), info.value


# -- the readonly role ------------------------------------------------------------------------------------


def test_psql_meta_commands_work_for_readonly(env: PgEnv) -> None:
    proc = env.psql("readonly", "-c", r"\dt", "-c", r"\d customers", "-c", r"\df sneaky*", "-c", r"\dn")
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" not in proc.stderr, proc.stderr
    assert "customers" in proc.stdout and "orders" in proc.stdout
    assert 'Table "public.customers"' in proc.stdout and "customers_pkey" in proc.stdout
    assert "sneaky_write" in proc.stdout


def test_psql_file_with_several_statements(env: PgEnv, tmp_path: Path) -> None:
    script = tmp_path / "report.sql"
    script.write_text(
        "SELECT count(*) AS n FROM customers;\n"
        "SELECT name FROM customers WHERE id = 3;\n"
        "DELETE FROM orders;\n"
        "SELECT 'still connected' AS status;\n"
    )
    before = env.fingerprint()
    proc = env.psql("readonly", "-At", "-f", str(script))
    assert proc.stdout.splitlines() == ["20", "Customer 3", "still connected"], proc.stdout
    assert "42501" in proc.stderr or "lictor:" in proc.stderr
    assert env.fingerprint() == before


def test_readonly_session_is_read_only_at_the_database(env: PgEnv) -> None:
    import psycopg

    before = env.fingerprint()
    with env.connect("readonly") as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        # A write hidden in a function passes the statement check (it is a SELECT) but not the database.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("SELECT sneaky_write()")
        for sql in (
            "BEGIN READ WRITE",
            "SET default_transaction_read_only = off",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "RESET default_transaction_read_only",
            "SELECT set_config('default_transaction_read_only', 'off', false)",
            "SET TRANSACTION READ WRITE",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute(sql)
            assert "lictor:" in str(info.value), sql
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        assert conn.execute("SELECT count(*) FROM accounts").fetchone()[0] == 10
    assert env.fingerprint() == before


def test_readonly_takes_a_dump_with_pg_dump_masked(env: PgEnv, tmp_path: Path) -> None:
    # pg_dump sets row_security off, restrict_nonsystem_relation_kind through set_config over
    # pg_settings, locks every table IN ACCESS SHARE MODE and, with -j, shares a snapshot.
    for tool in ("pg_dump", "pg_restore"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    environ = {**os.environ, "PGPASSWORD": env.tokens["readonly"], "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "5"}
    base = ["pg_dump", "-h", "127.0.0.1", "-p", str(env.port), "-U", "agent-readonly", "-d", "app"]
    dumps = {
        "plain": ["-f", str(tmp_path / "plain.sql")],
        "custom": ["-Fc", "-f", str(tmp_path / "custom.dump")],
        "directory": ["-Fd", "-j", "2", "-f", str(tmp_path / "dir")],
        "schema": ["--schema-only", "-f", str(tmp_path / "schema.sql")],
    }
    for name, args in dumps.items():
        proc = subprocess.run([*base, *args], capture_output=True, text=True, timeout=90, env=environ)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    restored = subprocess.run(
        ["pg_restore", "-f", "-", str(tmp_path / "custom.dump")], capture_output=True, text=True, check=True
    ).stdout
    for text in ((tmp_path / "plain.sql").read_text(), restored):
        assert "COPY public.customers" in text and "[REDACTED:email]" in text
        assert "@example.com" not in text and not any(card in text for card in CARDS)
    assert "CREATE TABLE public.customers" in (tmp_path / "schema.sql").read_text()


# -- evasions ---------------------------------------------------------------------------------------------

EVASIONS: list[tuple[str, str]] = [
    ("readonly", "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d"),
    ("readonly", "SELECT 1; DELETE FROM orders"),
    ("readonly", "SELECT 1 /* harmless */; /* really */ DELETE FROM orders -- done"),
    ("readonly", "SELECT 1 -- comment \n; UPDATE accounts SET balance = 0"),
    ("readonly", "SELECT '\\'; DELETE FROM orders; --'"),
    ("readonly", "SELECT $$ ; $$; DELETE FROM orders"),
    ("readonly", "SELECT $a$ $$ $a$; DROP TABLE orders"),
    ("readonly", "DO $$ BEGIN DELETE FROM orders; END $$"),
    ("writer", "DO $$ BEGIN EXECUTE 'DELETE FROM ' || 'orders'; END $$"),
    ("dba", "DO $$ BEGIN EXECUTE 'DROP TABLE ' || 'orders'; END $$"),
    ("dba", "COPY orders TO PROGRAM 'touch /tmp/lictor-copy-program-ran'"),
    ("dba", "COPY (SELECT 1) TO '/tmp/lictor-copy-file-written'"),
    ("readonly", "PREPARE p1 AS DELETE FROM orders"),
    ("readonly", "EXECUTE never_prepared_here"),
    ("readonly", "SET ROLE postgres"),
    ("writer", "SET SESSION AUTHORIZATION postgres"),
    ("dba", "SELECT pg_read_file('/etc/passwd')"),
    ("dba", "SELECT pg_catalog.pg_ls_dir('.')"),
    ("dba", "SELECT lo_import('/etc/passwd')"),
    ("dba", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"),
    # a copied replication slot holds WAL back as a created one does (the server refuses a slot that does
    # not exist only after the gateway let the call through)
    ("dba", "SELECT pg_copy_physical_replication_slot('lictor_no_such_slot', 'lictor_copy')"),
    ("writer", "SELECT pg_replication_slot_advance('lictor_no_such_slot', pg_current_wal_lsn())"),
    # a signal to every backend to write its memory contexts to the server log
    ("writer", "SELECT pg_log_backend_memory_contexts(pid) FROM pg_stat_activity"),
    ("readonly", "SELECT pg_log_backend_memory_contexts(pg_backend_pid())"),
    ("dba", "SELECT * FROM dblink('dbname=postgres', 'select 1') AS t(x int)"),
    ("readonly", "SELECT * INTO stolen FROM customers"),
    ("readonly", "CREATE TABLE stolen AS SELECT * FROM customers"),
    ("readonly", "EXPLAIN ANALYZE DELETE FROM orders"),
    ("readonly", "EXPLAIN (ANALYZE) UPDATE accounts SET balance = 0"),
    ("writer", "DELETE FROM orders"),
    ("writer", "UPDATE accounts SET balance = 0"),
    ("writer", "WITH x AS (UPDATE accounts SET balance = 0 RETURNING 1) SELECT 1"),
    ("dba", "SET standard_conforming_strings = off"),
    ("dba", "SELECT set_config('client_encoding', 'SJIS', false)"),
    ("dba", "CREATE FUNCTION evil() RETURNS void LANGUAGE plpython3u AS 'import os'"),
    ("dba", "ALTER SYSTEM SET archive_command = 'curl evil'"),
    ("readonly", "SELEC * FRM customers"),
    ("readonly", "VACUUM orders"),
    ("readonly", "LOCK TABLE orders"),
    ("readonly", "TRUNCATE orders"),
    ("readonly", "NOTIFY x; DELETE FROM orders"),
    # built-ins that write or hold locks even in a read-only transaction
    ("readonly", "SELECT pg_import_system_collations('public')"),
    ("readonly", "SELECT pg_advisory_lock(42)"),
    ("readonly", "SELECT * FROM accounts FOR UPDATE"),
    ("readonly", "LOCK TABLE accounts IN ROW EXCLUSIVE MODE"),
    ("readonly", "SELECT set_config(name, 'postgres', false) FROM pg_settings WHERE name = 'role'"),
    # a computed setting name: no settings: rule can tell it is dynamic_library_path
    ("dba", "SELECT set_config(n, '/tmp', false) FROM (VALUES ('dynamic_library_path')) v(n)"),
    # what the gateway's (superuser) login could read for the agent: password hashes, the server's config
    ("readonly", "SELECT rolname, rolpassword FROM pg_authid"),
    ("dba", "SELECT usename, passwd FROM pg_catalog.pg_shadow"),
    ("readonly", "SELECT sourcefile, name, setting FROM pg_file_settings"),
    ("readonly", "SELECT sourcefile, name, setting FROM pg_show_all_file_settings()"),  # the function behind it
    ("dba", "SELECT * FROM pg_catalog.pg_hba_file_rules()"),
    # ... or the password hashes the planner's statistics hold once pg_authid is analyzed
    ("dba", "SELECT histogram_bounds FROM pg_stats WHERE tablename = 'pg_authid' AND attname = 'rolpassword'"),
    ("writer", "SELECT stavalues1 FROM pg_catalog.pg_statistic WHERE starelid = 'pg_authid'::regclass"),
    # an extension's function in functional notation: (x).f is f(x) when no field f exists
    ("readonly", "SELECT ('UPDATE accounts SET balance = 0'::text).dblink_exec"),
    ("readonly", "SELECT ('dbname=app'::text).dblink_connect"),
    # ... and on the alias of a function in FROM, which has that function's result type
    ("readonly", "SELECT t.pg_read_file FROM lower('/etc/hostname') t"),
    ("readonly", "SELECT t.pg_ls_dir FROM unnest(ARRAY['/']) AS t(c)"),
    # a dangerous function renamed (by DDL or in pg_proc), then called under its new name
    ("dba", "ALTER FUNCTION pg_catalog.pg_read_file(text) RENAME TO innocent"),
    ("dba", "UPDATE pg_catalog.pg_proc SET proname = 'innocent' WHERE proname = 'pg_read_file'"),
    ("dba", "CREATE VIEW procs AS SELECT * FROM pg_catalog.pg_proc"),  # an updatable view over pg_proc
    # a catalog named with its database (db.pg_catalog.pg_class is pg_catalog.pg_class)
    ("writer", "UPDATE app.pg_catalog.pg_class SET relname = 'renamed' WHERE relname = 'accounts'"),
]


@pytest.mark.parametrize(("role", "sql"), EVASIONS, ids=[f"{r}:{s[:40]}" for r, s in EVASIONS])
def test_evasion_denied_simple_protocol(env: PgEnv, role: str, sql: str) -> None:
    import psycopg

    before = env.fingerprint()
    with env.connect(role) as conn:
        cur = psycopg.ClientCursor(conn)  # client-side binding: the simple query protocol
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            cur.execute(sql)
        assert str(info.value).startswith("lictor: "), str(info.value)
        diag = info.value.diag
        assert diag.sqlstate == "42501"
        assert diag.message_detail and "policy version" in diag.message_detail
        assert diag.message_hint
        # The connection stays usable.
        assert conn.execute("SELECT 42").fetchone() == (42,)
    assert env.fingerprint() == before
    assert not Path("/tmp/lictor-copy-program-ran").exists()
    assert not Path("/tmp/lictor-copy-file-written").exists()


SINGLE_EVASIONS = [(r, s) for r, s in EVASIONS if ";" not in s.replace("'\\'; DELETE", "")]


@pytest.mark.parametrize(("role", "sql"), SINGLE_EVASIONS[:12], ids=[f"{r}:{s[:40]}" for r, s in SINGLE_EVASIONS[:12]])
def test_evasion_denied_extended_protocol(env: PgEnv, role: str, sql: str) -> None:
    import psycopg

    before = env.fingerprint()
    with env.connect(role) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql, prepare=True)
        assert conn.execute("SELECT %s::int", [7]).fetchone() == (7,)
    assert env.fingerprint() == before


# contrib functions that run SQL given as text (tablefunc's crosstab, connectby builds its query from names it
# is given unquoted, xml2's xpath_table from a relation and a condition): what they run is not seen
QUERY_RUNNING_CONTRIB: list[tuple[str, str]] = [
    ("dba", "SELECT * FROM crosstab('SELECT 1::text, 1::text, pg_read_file(''/etc/hostname'')') AS t(r text, c text)"),
    (
        "readonly",
        "SELECT * FROM crosstab('SELECT 1::text, 1::text, reverse(card) FROM customers') AS t(r text, c text)",
    ),
    (
        "readonly",
        "SELECT * FROM crosstab('SELECT 1::text, 1::text, lo_from_bytea(0, ''x'')::text') AS t(r text, c text)",
    ),
    (
        "dba",
        "SELECT * FROM connectby('accounts a, pg_read_file(''/etc/hostname'') f', 'f', 'f', '1', 0) "
        "AS t(k text, p text, l int)",
    ),
    (
        "readonly",
        "SELECT * FROM xpath_table('id', '''<a>''||reverse(card)||''</a>''', 'customers', '/a', 'true') "
        "AS t(k int, a text)",
    ),
]


def test_contrib_functions_that_run_sql_text_are_denied(env: PgEnv) -> None:
    import psycopg

    env.direct("CREATE EXTENSION IF NOT EXISTS tablefunc; CREATE EXTENSION IF NOT EXISTS xml2")
    try:
        objects = env.direct("SELECT count(*) FROM pg_largeobject_metadata")
        for role, sql in QUERY_RUNNING_CONTRIB:
            with env.connect(role) as conn:
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql).fetchall()
                assert "pg-deny-dynamic-sql" in str(info.value.diag.message_detail), (sql, info.value)
        assert env.direct("SELECT count(*) FROM pg_largeobject_metadata") == objects
    finally:
        env.direct("DROP EXTENSION IF EXISTS tablefunc; DROP EXTENSION IF EXISTS xml2")


def test_objects_that_would_run_sql_text_later_are_denied(env: PgEnv) -> None:
    """An operator, a cast or a trigger bound to a function that runs SQL text (or that function renamed)
    runs that text later under a name the statement that uses it does not show."""
    import psycopg

    env.direct("CREATE EXTENSION IF NOT EXISTS refint")
    try:
        for sql in (
            "CREATE OPERATOR !! (RIGHTARG = text, FUNCTION = ts_stat)",  # SELECT !! 'SELECT pg_read_file(...)'
            "CREATE TRIGGER leak BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION "
            "check_primary_key('customer_id', 'customers c, pg_read_file(''/etc/hostname'') f', 'id')",
            "ALTER FUNCTION ts_stat(text) RENAME TO innocent",
        ):
            with env.connect("dba") as conn:
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql)
                assert "pg-deny-dynamic-sql" in str(info.value.diag.message_detail), (sql, info.value)
        assert env.direct("SELECT count(*) FROM pg_operator WHERE oprname = '!!' AND oprright = 'text'::regtype") == [
            (0,)
        ]
        assert env.direct("SELECT count(*) FROM pg_trigger WHERE tgname = 'leak'") == [(0,)]
        assert env.direct("SELECT count(*) FROM pg_proc WHERE proname = 'innocent'") == [(0,)]
    finally:
        env.direct("DROP EXTENSION IF EXISTS refint")


def test_a_dba_reads_no_server_file_through_adminpack_1_0(env: PgEnv) -> None:
    # CREATE EXTENSION adminpack VERSION '1.0' brings back its old names: pg_file_read is pg_read_file (the
    # same built-in function, by its old C name), pg_file_length reads pg_stat_file, pg_logfile_rotate is
    # pg_rotate_logfile
    import psycopg

    with env.connect("dba") as conn:
        conn.execute("CREATE EXTENSION adminpack VERSION '1.0'")
        try:
            for sql in (
                "SELECT pg_file_read('/etc/hostname', 0, 100)",
                "SELECT pg_catalog.pg_file_length('/etc/hostname')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql).fetchall()
                assert "pg-deny-dangerous-functions" in str(info.value.diag.message_detail), (sql, info.value)
        finally:
            conn.execute("DROP EXTENSION adminpack")


def test_a_dba_cannot_put_an_untrusted_language_under_a_trusted_name(env: PgEnv) -> None:
    # With PL/Python installed, a dba renamed plpgsql away and plpython3u to plpgsql (or created a language
    # named plpgsql on PL/Python's handler): a body valid in both languages was analysed as PL/pgSQL and ran
    # Python, with the server's operating-system rights.
    import psycopg

    marker = f"/tmp/lictor-language-{secrets.token_hex(4)}"
    env.direct("CREATE EXTENSION IF NOT EXISTS plpython3u")
    languages = env.direct("SELECT lanname, lanplcallfoid FROM pg_language ORDER BY 1")
    try:
        with env.connect("dba") as conn:
            for sql in (
                "ALTER LANGUAGE plpgsql RENAME TO plpgsql_before",
                "ALTER LANGUAGE plpython3u RENAME TO plpgsql",
                "ALTER LANGUAGE plpgsql OWNER TO pg_database_owner",
                "CREATE LANGUAGE plpgsql_two HANDLER plpython3_call_handler",
                "CREATE TRUSTED LANGUAGE plpgsql_three HANDLER plpython3_call_handler",
                # without HANDLER the server runs it as CREATE EXTENSION IF NOT EXISTS plpython3u
                "CREATE OR REPLACE LANGUAGE plpython3u",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql)
                assert "pg-deny-language-changes" in str(info.value.diag.message_detail), (sql, info.value)
            conn.execute(
                "CREATE FUNCTION polyglot() RETURNS text LANGUAGE plpgsql AS "
                f"$$--1;import os;os.system('touch {marker}')\nBEGIN\nRETURN 'plpgsql';\nEND$$"
            )
            assert conn.execute("SELECT polyglot()").fetchone() == ("plpgsql",)  # it is still PL/pgSQL
        assert env.direct("SELECT lanname, lanplcallfoid FROM pg_language ORDER BY 1") == languages
        assert not os.path.exists(marker)
    finally:
        env.direct("DROP FUNCTION IF EXISTS polyglot()")
        env.direct("DROP EXTENSION IF EXISTS plpython3u")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)


def test_readonly_cannot_kill_rows_with_pg_surgery(env: PgEnv) -> None:
    # pg_surgery writes the heap without looking at whether the transaction is read-only
    import psycopg

    env.direct("CREATE EXTENSION IF NOT EXISTS pg_surgery; CREATE EXTENSION IF NOT EXISTS pg_visibility")
    try:
        before = env.fingerprint()
        with env.connect("readonly") as conn:
            for sql in (
                "SELECT heap_force_kill('accounts', ARRAY['(0,1)']::tid[])",
                "SELECT heap_force_freeze('accounts'::regclass, ARRAY['(0,2)'::tid])",
                "SELECT pg_truncate_visibility_map('accounts')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql)
                assert "pg-ro-no-writes" in str(info.value.diag.message_detail), (sql, info.value)
        assert env.fingerprint() == before
    finally:
        env.direct("DROP EXTENSION IF EXISTS pg_surgery; DROP EXTENSION IF EXISTS pg_visibility")


def test_readonly_cannot_read_index_keys_with_pageinspect(env: PgEnv) -> None:
    # bt_page_items(index, block) prints the index's keys as hex bytes, which no detector reads
    import psycopg

    env.direct("CREATE EXTENSION IF NOT EXISTS pageinspect; CREATE INDEX customers_email ON customers (email)")
    try:
        with env.connect("readonly") as conn:
            for sql in (
                "SELECT itemoffset, data FROM bt_page_items('customers_email', 1)",
                "SELECT (bt_page_items('customers_email', 1)).data",
                "SELECT bt_page_items(get_raw_page('customers_email', 1))",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql).fetchall()
                assert "pg-ro-no-transformed-reads" in str(info.value.diag.message_detail), (sql, info.value)
    finally:
        env.direct("DROP INDEX customers_email; DROP EXTENSION IF EXISTS pageinspect")


def test_readonly_cannot_call_an_extension_function_in_attribute_notation(env: PgEnv) -> None:
    # (card).show_trgm is show_trgm(card): pg_trgm's trigrams of a card are its digits three by three, which no
    # detector reads; an extension's function is in no list of the gateway, and a relation's alias may be a
    # column's name (FROM customers card), so a field of anything but a catalog counts as computed
    import psycopg

    env.direct("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    try:
        with env.connect("readonly") as conn:
            for sql in (
                "SELECT (card).show_trgm FROM customers WHERE id = 1",
                "SELECT (c.card).show_trgm FROM customers c WHERE id = 1",
                "SELECT (card).show_trgm FROM customers card WHERE id = 1",
                "SELECT (coalesce(card, '')).show_trgm FROM customers WHERE id = 1",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql).fetchall()
                assert "pg-ro-no-transformed-reads" in str(info.value.diag.message_detail), (sql, info.value)
            row = conn.execute("SELECT c.card, (c).* FROM customers c WHERE id = 1").fetchone()
            assert row is not None and CARDS[1] not in str(row) and "@example.com" not in str(row)
    finally:
        env.direct("DROP EXTENSION IF EXISTS pg_trgm")


def test_function_call_message_is_denied(env: PgEnv) -> None:
    raw = RawClient(env.port, env.tokens["readonly"])
    oid = 2240  # pg_read_file(text) in any catalog; the oid alone is all the message carries
    raw.send(pg.function_call(oid, [b"/etc/passwd"], [0], 0))
    reply = raw.until_ready()
    assert names(reply) == ["ErrorResponse", "ReadyForQuery"]
    assert reply[0].sqlstate == "42501" and "function" in reply[0].message.lower()  # type: ignore[union-attr]
    raw.send(pg.query("SELECT 1"))
    assert names(raw.until_ready())[-1] == "ReadyForQuery"
    raw.close()


def test_large_objects_through_libpq_fast_path(env: PgEnv, tmp_path: Path) -> None:
    # psql's \lo_import / \lo_export (like pg_dump and pg_restore) call lo_open, loread, lowrite... by oid.
    source = tmp_path / "in.txt"
    source.write_text("large object through the gateway\n")
    proc = env.psql("dba", "-c", f"\\lo_import {source}", check=True)
    oid = int(proc.stdout.split()[-1])
    env.psql("dba", "-c", f"\\lo_export {oid} {tmp_path / 'out.txt'}", check=True)
    assert (tmp_path / "out.txt").read_text() == source.read_text()
    # Where masking applies, large object contents (bytes the gateway cannot mask) are refused.
    proc = env.psql("readonly", "-c", f"\\lo_export {oid} {tmp_path / 'ro.txt'}")
    assert "large object contents cannot be masked" in proc.stderr and "pg-ro-mask" in proc.stderr
    assert "read table columns instead" in proc.stderr, proc.stderr
    assert not (tmp_path / "ro.txt").exists()
    env.direct("SELECT lo_unlink(%s)", [oid])


def _session_decisions(env: PgEnv, marker: str, denials: int) -> list[dict[str, Any]]:
    """The audited decisions of the one session that ran a statement with ``marker``, once it has ``denials``."""
    gw = env.gateway
    assert gw is not None
    found: list[dict[str, Any]] = []

    def audited() -> bool:
        lines = lictor("audit", "list", "--json", "--kind", "decision", "--state-dir", str(gw.state_dir)).stdout
        events = [json.loads(line) for line in lines.splitlines() if line.strip()]
        session = next((e["session"] for e in events if marker in e["request"]["summary"]), None)
        found[:] = [e for e in events if e["session"] == session]
        return sum(e["action"] == "deny" for e in found) >= denials

    wait_until(audited, 20, f"{denials} denials in the audit log of the session that ran {marker}")
    return found


def test_refusals_of_statements_the_rules_allow_are_audited_as_denials(env: PgEnv, tmp_path: Path) -> None:
    # A large object read, a COPY with options that rewrite values, a binary result masking cannot cover (asyncpg
    # reads an enum in binary) and a FETCH of a cursor the gateway never saw are allowed by readonly's rules and
    # refused by the gateway: the agent was told "Denied by rule ...", and the audit log said they were allowed.
    import asyncpg

    oid = env.direct("SELECT lo_from_bytea(0, 'large object')")[0][0]
    env.direct(
        "CREATE TYPE mood AS ENUM ('calm'); CREATE TABLE moods (id int, mood mood); INSERT INTO moods VALUES (1, 'calm')"
    )
    binary_marker = "binary_" + secrets.token_hex(4)

    async def binary_enum() -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=env.port, user="agent", database="app", password=env.tokens["readonly"], ssl=False
        )
        try:
            await conn.fetchval(f"SELECT 1 AS {binary_marker}")
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as denied:
                await conn.fetch("SELECT mood FROM moods")
            return str(denied.value)
        finally:
            await conn.close()

    try:
        marker = "refusals_" + secrets.token_hex(4)
        proc = env.psql(
            "readonly",
            "-c",
            f"SELECT 1 AS {marker}",
            "-c",
            "COPY (SELECT email FROM customers WHERE id = 1) TO STDOUT (FORMAT csv, QUOTE '@')",
            "-c",
            "FETCH 1 FROM no_such_cursor",
            "-c",
            f"\\lo_export {oid} {tmp_path / 'out'}",
        )
        assert proc.stderr.count("ERROR:  lictor:") == 3, proc.stderr
        assert "binary result format is refused" in asyncio.run(binary_enum())
    finally:
        env.direct("DROP TABLE moods; DROP TYPE mood")
        env.direct("SELECT lo_unlink(%s)", [oid])
    denied = {
        e["request"]["summary"].split(" (")[0]: (e["rule_ids"], e["phase"])
        for e in _session_decisions(env, f"1 AS {marker}", 3)
        if e["action"] == "deny"
    }
    assert denied == {
        "COPY TO: COPY": (["pg-ro-mask-cards"], "masking"),
        "FETCH: FETCH 1 FROM no_such_cursor": (["lictor:unknown-cursor"], "protocol"),
        "FUNCTION CALL: pg_catalog.lo_open": (["pg-ro-mask-cards"], "masking"),
    }, denied
    binary = [e for e in _session_decisions(env, f"1 AS {binary_marker}", 1) if e["action"] == "deny"]
    assert [(e["request"]["summary"], e["rule_ids"], e["phase"]) for e in binary] == [
        ("SELECT: SELECT mood FROM moods", ["pg-ro-mask-cards"], "masking")
    ], binary


# -- consistency after a denial ------------------------------------------------------------------------


def test_denied_message_in_a_pipeline_stops_the_batch(env: PgEnv) -> None:
    raw = RawClient(env.port, env.tokens["writer"])
    before = env.direct("SELECT count(*) FROM orders")
    raw.send(
        pg.parse("", "INSERT INTO orders (customer_id, amount) VALUES (1, 1)"),
        pg.bind("", ""),
        pg.execute(""),
        pg.parse("", "DELETE FROM orders"),  # denied: no WHERE
        pg.bind("", ""),
        pg.execute(""),
        pg.parse("", "INSERT INTO orders (customer_id, amount) VALUES (1, 2)"),
        pg.bind("", ""),
        pg.execute(""),
        pg.sync(),
    )
    reply = raw.until_ready()
    assert names(reply) == [
        "ParseComplete",
        "BindComplete",
        "CommandComplete",
        "ErrorResponse",
        "ReadyForQuery",
    ]
    assert reply[3].sqlstate == "42501"  # type: ignore[union-attr]
    assert reply[-1].status == "I"  # type: ignore[union-attr]
    # Like a failed statement, the denial rolled back the pipeline's implicit transaction.
    assert env.direct("SELECT count(*) FROM orders") == before
    raw.send(pg.parse("", "SELECT count(*) FROM orders"), pg.bind("", ""), pg.execute(""), pg.sync())
    reply = raw.until_ready()
    assert names(reply) == ["ParseComplete", "BindComplete", "DataRow", "CommandComplete", "ReadyForQuery"]
    raw.close()


def test_text_the_settings_decide_may_follow_begin_in_an_unsynced_batch(env: PgEnv) -> None:
    # pgjdbc sends BEGIN and a transaction's first statement without a Sync between them. BEGIN, SAVEPOINT and
    # RELEASE change no setting, so a backslash or non-ASCII text after them is read with the settings of the
    # last ReadyForQuery; after any other Bind or Execute the server's settings are unknown until the next one.
    raw = RawClient(env.port, env.tokens["readonly"])

    def batch(*before: str) -> list[pg.BackendMessage]:
        msgs = [m for sql in before for m in (pg.parse("", sql), pg.bind("", ""), pg.execute(""))]
        raw.send(*msgs, pg.parse("", "SELECT 'é\\'"), pg.bind("", ""), pg.execute(""), pg.sync())
        return raw.until_ready()

    reply = batch("BEGIN", "SAVEPOINT s", "RELEASE SAVEPOINT s")
    rows = [pg.decode_datarow(m.raw) for m in reply if isinstance(m, pg.DataRow)]
    assert not errors(reply) and rows == [["é\\".encode()]], reply
    assert reply[-1].status == "T"  # type: ignore[union-attr]
    raw.send(pg.query("ROLLBACK"))
    raw.until_ready()
    # after any other Bind and Execute the server's settings are unknown until its next ReadyForQuery
    for before in (
        ["SELECT 1"],
        ["BEGIN", "SAVEPOINT s", "ROLLBACK TO SAVEPOINT s"],  # restores what the savepoint saw
        ["BEGIN", "SELECT set_config('application_name', 'x', false)"],
    ):
        reply = batch(*before)
        denied = errors(reply)
        assert len(denied) == 1 and "lictor:pipeline-sensitive-text" in denied[0].fields.get("D", ""), (before, reply)
        raw.send(pg.query("ROLLBACK"))
        raw.until_ready()
    raw.close()


def test_text_the_settings_decide_after_unanswered_close_and_answered_bind(env: PgEnv) -> None:
    raw = RawClient(env.port, env.tokens["readonly"])
    raw.sock.settimeout(5)
    raw.send(pg.parse("s_1", "SELECT 1"), pg.sync())
    raw.until_ready()
    # pgjdbc closes statements it evicted from its cache ahead of the next query, without a Sync between: the
    # server answers the Close only at the Sync, behind the text, which waited for that answer for good
    raw.send(pg.close("S", "s_1"), pg.parse("", "SELECT 'é'"), pg.bind("", ""), pg.execute(""), pg.sync())
    reply = raw.until_ready()
    assert names(reply) == [
        "CloseComplete",
        "ParseComplete",
        "BindComplete",
        "DataRow",
        "CommandComplete",
        "ReadyForQuery",
    ], reply
    # a Bind plans its statement and can run functions (one marked immutable, a domain's check) that change a
    # setting, which the server reports only at its next ReadyForQuery: answered after a Flush, it is not enough
    raw.send(pg.parse("", "SELECT 1"), pg.bind("", ""), pg.flush())
    assert names(raw.read_messages(2)) == ["ParseComplete", "BindComplete"]
    raw.send(pg.parse("", "SELECT 'é\\'"), pg.bind("", ""), pg.execute(""), pg.sync())
    denied = errors(raw.until_ready())
    assert len(denied) == 1 and "lictor:pipeline-sensitive-text" in denied[0].fields.get("D", ""), denied
    raw.close()


def test_the_bytes_of_a_message_around_its_text_are_not_read_as_text(env: PgEnv) -> None:
    # A Parse's length (92 is a backslash, 128 and up not ASCII) and its parameter types (text[] is 0x03F1) are
    # binary: after an Execute in the same batch they made an ASCII statement "a statement with a backslash or
    # a non-ASCII character" and it was denied.
    raw = RawClient(env.port, env.tokens["readonly"])
    for length, types in ((92, ()), (0xF1, ()), (60, (1009,))):
        sql = "SELECT 2 AS x"
        sql += " " * (length + 1 - len(pg.parse("", sql, types)))
        parse = pg.parse("", sql, types)
        assert types or parse[4] == length, parse
        params = [b"{a}"] if types else []
        raw.send(
            pg.parse("", "SELECT 1"),
            pg.bind("", ""),
            pg.execute(""),
            parse,
            pg.bind("", "", params=params),
            pg.execute(""),
            pg.sync(),
        )
        reply = raw.until_ready()
        assert not errors(reply) and names(reply).count("DataRow") == 2, (length, types, reply)
    raw.close()


def test_a_query_inside_an_unsynced_extended_batch_ends_the_connection(env: PgEnv) -> None:
    # After an error the server skips everything up to Sync, a Query too; the gateway cannot know whether it
    # ran. Counted as answered, the next statement's rows were matched to the Sync's answer and relayed
    # without their masks (a readonly agent read card numbers in clear).
    c = RawClient(env.port, env.tokens["readonly"])
    c.sock.settimeout(5)
    seen: list[pg.BackendMessage] = []
    try:
        c.send(
            pg.parse("", "SELECT * FROM no_such_table"),
            pg.bind("", ""),
            pg.execute(),
            pg.query("SELECT 'skipped'"),
            pg.sync(),
        )
        for ready in range(1, 4):
            while sum(isinstance(m, pg.ReadyForQuery) for m in seen) < ready:
                data = c.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                seen += c.reader.feed(data)
            c.send(pg.query("SELECT card FROM customers WHERE id = 1"))
    except (ConnectionError, OSError):
        pass
    finally:
        c.sock.close()
    values = [v for m in seen if isinstance(m, pg.DataRow) for v in pg.decode_datarow(m.raw)]
    assert not any(card.encode() in values for card in CARDS), values
    fatal = [m for m in seen if isinstance(m, pg.ErrorResponse) and m.severity == "FATAL"]
    assert fatal and fatal[0].sqlstate == "08P01" and "send Sync before it" in fatal[0].message


def test_denial_inside_a_transaction_fails_the_transaction(env: PgEnv) -> None:
    import psycopg

    before = env.fingerprint()
    with env.connect("writer", autocommit=False) as conn:
        conn.execute("INSERT INTO orders (customer_id, amount) VALUES (2, 99)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM orders")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.rollback()
    assert env.fingerprint() == before
    # The simple protocol, inside a transaction block: the server's transaction failed too.
    raw = RawClient(env.port, env.tokens["writer"])
    raw.send(pg.query("BEGIN"))
    assert raw.until_ready()[-1].status == "T"  # type: ignore[union-attr]
    raw.send(pg.query("INSERT INTO orders (customer_id, amount) VALUES (3, 3)"))
    raw.until_ready()
    raw.send(pg.query("DELETE FROM orders"))
    reply = raw.until_ready()
    assert names(reply) == ["ErrorResponse", "ReadyForQuery"] and reply[-1].status == "E"  # type: ignore[union-attr]
    raw.send(pg.query("COMMIT"))  # a COMMIT of a failed transaction rolls back, on the server too
    reply = raw.until_ready()
    assert reply[-1].status == "I"  # type: ignore[union-attr]
    assert any(isinstance(m, pg.CommandComplete) and m.tag == "ROLLBACK" for m in reply)
    raw.close()
    assert env.fingerprint() == before


def test_statements_nested_too_deeply_to_analyze_are_denied_and_the_connection_stays(env: PgEnv) -> None:
    import psycopg

    denied = 0
    with env.connect("dba", autocommit=True) as conn:
        for depth in range(200, 600, 25):
            sql = "SELECT " + "upper(" * depth + "setting" + ")" * depth + " FROM pg_settings WHERE name = 'work_mem'"
            try:
                conn.execute(sql)
            except psycopg.errors.InsufficientPrivilege as exc:
                assert "too deeply" in str(exc) or "memory exhausted" in str(exc), exc
                denied += 1
            except psycopg.errors.ProgramLimitExceeded:
                pass  # the server's own limit
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert denied


def test_the_hint_of_a_denied_fetch_or_execute_speaks_of_several_statements_only_when_there_were(env: PgEnv) -> None:
    # FETCH and EXECUTE are decided as themselves and as what they run: two decisions for one statement, and
    # the hint of an unknown cursor's denial said "A message with several statements is denied as a whole".
    proc = env.psql(
        "readonly",
        "-c",
        "FETCH 1 FROM no_such_cursor",
        "-c",
        "EXECUTE no_such_statement",
        "-c",
        "SELECT 1; DELETE FROM orders WHERE id = 1",
    )
    hints = [line for line in proc.stderr.splitlines() if line.startswith("HINT:")]
    assert len(hints) == 3, proc.stderr
    assert ["several statements" in hint for hint in hints] == [False, False, True], hints


def test_connection_usable_after_denials_simple_and_extended(env: PgEnv) -> None:
    import psycopg

    with env.connect("readonly") as conn:
        for _ in range(3):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                psycopg.ClientCursor(conn).execute("DELETE FROM orders WHERE id = 1")
            assert psycopg.ClientCursor(conn).execute("SELECT 1").fetchone() == (1,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM orders WHERE id = %s", [1])
            assert conn.execute("SELECT %s::text", ["ok"]).fetchone() == ("ok",)


# -- psycopg: extended protocol, pipeline, binary, prepared ---------------------------------------------


def test_psycopg_pipeline_mode_with_a_denial(env: PgEnv) -> None:
    import psycopg

    before = env.fingerprint()
    with env.connect("writer") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.pipeline():
                c1 = conn.execute("SELECT %s::int", [1])
                conn.execute("UPDATE accounts SET balance = balance WHERE id = %s", [1])
                conn.execute("DELETE FROM accounts")  # denied
                conn.execute("SELECT %s::int", [3])
        assert c1.fetchone() == (1,)
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int * 2", [i]) for i in range(20)]
        assert [c.fetchone()[0] for c in cursors] == [i * 2 for i in range(20)]
    assert env.fingerprint() == before


def test_psycopg_binary_results_and_prepared_statements(env: PgEnv) -> None:
    import psycopg

    with env.connect("writer", prepare_threshold=0) as conn:
        cur = conn.cursor(binary=True)
        for i in range(3):
            row = cur.execute("SELECT id, balance, now() AS t FROM accounts WHERE id = %s", [i + 1]).fetchone()
            assert row[0] == i + 1 and row[1] == 100
        assert len(conn.execute("SELECT * FROM customers", binary=True).fetchall()) == 20
    with env.connect("analyst") as conn:
        # Binary results are masked where the gateway can read them: text-like values, and numbers (a
        # number that holds a card comes back as NULL); other binary values are refused, with the reason.
        # (analyst: readonly's masks, and it may compute a ROW over a column, which readonly may not.)
        cur = conn.cursor(binary=True)
        row = cur.execute(
            "SELECT id, email, card, 4111111111111111::bigint, 4111111111111111::numeric, 7::bigint, now() "
            "FROM customers WHERE id = %s",
            [1],
        ).fetchone()
        assert row is not None and row[0] == 1 and row[1] == "[REDACTED:email]" and "*" in row[2], row
        assert row[3:6] == (None, None, 7), row
        assert cur.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            cur.execute("SELECT ROW(email, 1) FROM customers WHERE id = %s", [1]).fetchall()
        assert "binary" in str(info.value)
        row = conn.execute("SELECT email, card FROM customers WHERE id = %s", [1]).fetchone()
        assert row[0] == "[REDACTED:email]" and row[1].endswith("0004") and "*" in row[1]


def test_sql_prepare_and_execute(env: PgEnv) -> None:
    import psycopg

    before = env.fingerprint()
    with env.connect("readonly") as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("PREPARE q(int) AS SELECT email FROM customers WHERE id = $1")
        assert cur.execute("EXECUTE q(2)").fetchone()[0] == "[REDACTED:email]"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("DEALLOCATE q; PREPARE q AS DELETE FROM orders")
        assert cur.execute("EXECUTE q(3)").fetchone()[0] == "[REDACTED:email]"
        cur.execute("DEALLOCATE q")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("EXECUTE q(3)")
    with env.connect("writer") as conn:
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("PREPARE wipe AS DELETE FROM orders")
        cur.execute("PREPARE one(int) AS DELETE FROM orders WHERE id = $1 AND false")
        cur.execute("EXECUTE one(1)")
        # EXPLAIN ANALYZE EXECUTE runs the statement: it is decided as that statement.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("EXPLAIN ANALYZE EXECUTE wipe")
    assert env.fingerprint() == before


@pytest.mark.parametrize("name", ["", "s"])
def test_a_parse_the_server_skips_does_not_replace_the_statement_it_holds(env: PgEnv, name: str) -> None:
    # After an error the server skips every message up to Sync, a Parse too, and keeps the statement it
    # held under that name. The gateway took the skipped Parse's text for it: a writer's DROP TABLE, held
    # for approval at its Bind, ran without one once a skipped "SELECT 1" stood for it.
    env.direct("CREATE TABLE IF NOT EXISTS parse_skip (id int)")
    c = RawClient(env.port, env.tokens["writer"])
    c.sock.settimeout(5)
    try:
        c.send(pg.parse(name, "DROP TABLE parse_skip"), pg.sync())
        assert not errors(c.until_ready())
        c.send(pg.parse("bad", "SELECT * FROM no_such_table"), pg.parse(name, "SELECT 1"), pg.sync())
        assert [e.sqlstate for e in errors(c.until_ready())] == ["42P01"]
        c.send(pg.bind("", name), pg.execute(), pg.sync())
        got = c.until_ready()
    finally:
        c.close()
    assert [e.sqlstate for e in errors(got)] == ["42501"]
    assert env.direct("SELECT to_regclass('parse_skip') IS NOT NULL") == [(True,)]
    env.direct("DROP TABLE parse_skip")


def test_a_prepare_the_server_skips_does_not_rename_what_it_holds(env: PgEnv) -> None:
    # A PREPARE sent as a Parse names its statement when executed; an Execute of its portal that the server
    # skipped (after an error, up to Sync) named it too: EXECUTE p was then decided and recorded as the skipped
    # text while the server ran the statement it held.
    c = RawClient(env.port, env.tokens["writer"])
    c.sock.settimeout(5)
    try:
        c.send(pg.query("BEGIN; PREPARE p AS SELECT 'held'"))
        assert not errors(c.until_ready())
        c.send(pg.parse("", "PREPARE p AS SELECT 'skipped'"), pg.bind("q", ""), pg.sync())
        assert names(c.until_ready()) == ["ParseComplete", "BindComplete", "ReadyForQuery"]
        c.send(pg.parse("bad", "SELECT * FROM no_such_table"), pg.flush())
        assert [e.sqlstate for e in errors(c.read_messages(1))] == ["42P01"]  # the rest is skipped, up to Sync
        c.send(pg.execute("q"), pg.sync())
        assert names(c.until_ready()) == ["ReadyForQuery"]
        c.send(pg.query("ROLLBACK"))  # the failed transaction; prepared statements outlive it
        assert not errors(c.until_ready())
        c.send(pg.query("EXECUTE p"))
        got = c.until_ready()
    finally:
        c.close()
    # Forgotten, so denied: the gateway does not know which statement the server holds as p.
    assert [pg.decode_datarow(m.raw) for m in got if isinstance(m, pg.DataRow)] == []
    assert [e.sqlstate for e in errors(got)] == ["42501"]


def test_a_failed_prepare_does_not_rename_what_the_server_holds(env: PgEnv) -> None:
    # PREPARE s over an s that exists fails on the server; had the gateway taken s for the new text,
    # EXECUTE s would be decided as SELECT 1 while the server ran the DDL prepared (and held) before.
    before = env.fingerprint()
    raw = RawClient(env.port, env.tokens["writer"])
    raw.send(pg.parse("s", "CREATE TABLE lictor_collision (x int)"), pg.sync())
    assert names(raw.until_ready()) == ["ParseComplete", "ReadyForQuery"]  # held at Bind, not at Parse
    raw.send(pg.query("PREPARE s AS SELECT 1"))
    [exists] = errors(raw.until_ready())
    assert exists.sqlstate == "42P05"
    raw.send(pg.query("EXECUTE s"))
    [denied] = errors(raw.until_ready())
    assert denied.sqlstate == "42501" and "prepare it again" in denied.message
    replies = []
    for sql in ("DEALLOCATE s", "PREPARE s AS SELECT 1", "EXECUTE s"):
        raw.send(pg.query(sql))
        replies += raw.until_ready()
    assert not errors(replies) and "DataRow" in names(replies)  # prepared again, it runs what it says
    # A PREPARE sent as a Parse message and never executed does not rename what the server holds either:
    # EXECUTE t is still the DDL, which needs an approval (and never runs here).
    raw.send(pg.parse("t", "CREATE TABLE lictor_collision (x int)"), pg.sync())
    assert names(raw.until_ready()) == ["ParseComplete", "ReadyForQuery"]
    raw.send(pg.parse("", "PREPARE t AS SELECT 1"), pg.sync())
    assert names(raw.until_ready()) == ["ParseComplete", "ReadyForQuery"]
    raw.send(pg.query("EXECUTE t"))
    held = raw.read_messages(1)
    assert isinstance(held[0], (pg.ErrorResponse, pg.NoticeResponse)) and "approv" in held[0].message, held
    assert "CommandComplete" not in names(held)
    raw.sock.close()
    assert env.fingerprint() == before


def test_names_created_in_a_pipeline_are_known_to_its_next_statements(env: PgEnv) -> None:
    # psycopg's pipeline mode and libpq send PREPARE (or DECLARE) and its EXECUTE (FETCH) before one Sync
    raw = RawClient(env.port, env.tokens["readonly"])

    def run(sql: str) -> bytes:
        return pg.parse("", sql) + pg.bind("", "") + pg.execute("")

    raw.send(run("PREPARE s1 AS SELECT 1"), run("EXECUTE s1"), pg.sync())
    reply = raw.until_ready()
    assert not errors(reply) and "DataRow" in names(reply), reply
    raw.send(pg.query("BEGIN"))
    raw.until_ready()
    raw.send(run("DECLARE c1 CURSOR FOR SELECT 1"), run("FETCH 1 FROM c1"), pg.sync())
    reply = raw.until_ready()
    assert not errors(reply) and "DataRow" in names(reply), reply
    raw.send(pg.query("COMMIT"))
    raw.until_ready()
    # DEALLOCATE ALL sent the same way forgets every name, as the server does
    raw.send(run("DEALLOCATE ALL"), pg.sync())
    assert not errors(raw.until_ready())
    raw.send(pg.query("EXECUTE s1"))
    [denied] = errors(raw.until_ready())
    assert denied.sqlstate == "42501" and "not prepared through the gateway" in denied.message
    raw.close()


TRANSFORMS = [
    "SELECT reverse(card) FROM customers",
    "SELECT left(card, 8), substr(card, 9) FROM customers",
    "SELECT card::bytea FROM customers",
    "SELECT translate(email, '@', '#') FROM customers",
    "SELECT string_agg(card, '') FROM customers",
    "SELECT ascii(substr(card, g, 1)) FROM customers, generate_series(1, 19) g",
    "SELECT x FROM customers c, LATERAL regexp_split_to_table(c.card, '') x",
    "SELECT reverse((SELECT card FROM customers ORDER BY id LIMIT 1))",
    "SELECT card::numeric + 1 FROM customers WHERE card !~ ' '",
    "SELECT (card).reverse, c.record_send FROM customers c",  # functional notation
    "SELECT count(*) FROM customers WHERE set_config('my.x', card, false) <> ''",  # kept for current_setting
    "SELECT translate(table_to_xml('customers', true, false, '')::text, '0123456789', 'abcdefghij')",
    "COPY (SELECT reverse(card) FROM customers) TO STDOUT",
]


def test_readonly_cannot_compute_values_past_the_masking(env: PgEnv) -> None:
    import psycopg

    # What masking alone lets through: a value computed from a card is not a card to the detectors.
    with env.connect("analyst") as conn:
        row = conn.execute("SELECT card, reverse(card) FROM customers WHERE id = 1").fetchone()
    assert row is not None and CARDS[1] not in row[0] and row[1] == CARDS[1][::-1]

    with env.connect("readonly") as conn:
        for sql in TRANSFORMS:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:  # extended protocol
                if sql.startswith("COPY"):
                    with conn.cursor().copy(sql) as copy:
                        list(copy)
                else:
                    conn.execute(sql).fetchall()
            assert "pg-ro-no-transformed-reads" in str(info.value) and "select the columns themselves" in str(
                info.value
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT reverse(email) FROM customers WHERE id = %s", (1,))
        # a WHERE clause may compute (it only picks rows), but an error there does not show the value
        for sql in (
            "SELECT id FROM customers WHERE reverse(card)::int = 0",
            "SELECT id FROM customers WHERE reverse(email)::date > now()",
            "SELECT id FROM customers WHERE (reverse(card) || E'\\n')::int = 0",
            "SELECT id FROM customers WHERE (reverse(card) || 'x')::json IS NULL",
            "SELECT id FROM customers WHERE translate(reverse(card), ' ', '_')::regclass IS NOT NULL",
            "SELECT id FROM customers WHERE quote_ident(reverse(email))::regclass IS NOT NULL",
            "SELECT 1 FROM customers WHERE convert_from('\\xf0'::bytea || card::bytea, 'UTF8') = ''",
            "SELECT 1 FROM customers WHERE make_date(substr(card, 1, 8)::int, 13, 1) IS NULL",
            "SELECT 1 FROM customers WHERE get_bit('\\x00'::bytea, replace(card, ' ', '')::int8 * 3) = 0",
            "SELECT 1 FROM customers WHERE xmlparse(document reverse(card)) IS NULL",
            "SELECT id FROM customers WHERE ('x ' || reverse(card))::regtype IS NULL",
        ):
            with pytest.raises(psycopg.Error) as error:
                conn.execute(sql)
            diag = error.value.diag
            text = f"{error.value} {diag.message_detail} {diag.message_hint} {diag.context}"
            assert "withheld" in text and f"SQLSTATE {diag.sqlstate}" in text, text
            assert not any(c[::-1].replace(" ", x) in text for c in CARDS for x in " _"), text
            assert "moc.elpmaxe" not in text and "moc,elpmaxe" not in text, text
            assert not re.search(r"\d{6}|0x", text), text  # no digits of a card, no bytes in hex
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("PREPARE leak AS SELECT encode(convert_to(email, 'UTF8'), 'hex') FROM customers")
        # the connection stays usable, and what keeps values as stored is allowed (and masked)
        row = conn.execute(
            "SELECT count(*), count(DISTINCT card), max(card), coalesce(min(email), ''), length(max(card)), "
            "CASE WHEN max(card) LIKE '4%' THEN 'visa' ELSE 'other' END FROM customers"
        ).fetchone()
        assert row is not None and row[0] == 20 and row[1] == 4
        assert not any(c in str(row) for c in CARDS) and "@example.com" not in str(row)
        assert row[3] == "[REDACTED:email]"
    proc = env.psql("readonly", "-c", TRANSFORMS[0], "-c", "SELECT card FROM customers WHERE id = 1")  # simple protocol
    assert "pg-ro-no-transformed-reads" in proc.stderr and "****" in proc.stdout, (proc.stdout, proc.stderr)
    assert CARDS[1][::-1] not in proc.stdout


def test_explain_does_not_print_execute_parameters_computed_from_table_data(env: PgEnv) -> None:
    # EXPLAIN EXECUTE evaluates the parameters to plan the prepared statement with them, and the plan prints
    # their values: a reversed table_to_xml of the customers would show every card and address.
    leak = "reverse(table_to_xml('customers', true, false, '')::text)"
    proc = env.psql(
        "readonly",
        "-c",
        "PREPARE by_note(text) AS SELECT id FROM customers WHERE note = $1",
        "-c",
        f"EXPLAIN EXECUTE by_note({leak})",
        "-c",
        "EXPLAIN EXECUTE by_note('note 1')",  # a parameter of the agent's own
    )
    assert "pg-ro-no-transformed-reads" in proc.stderr, (proc.stdout, proc.stderr)
    assert "moc.elpmaxe" not in proc.stdout and not any(c[::-1] in proc.stdout for c in CARDS), proc.stdout
    assert "Filter: (note = 'note 1'::text)" in proc.stdout, proc.stdout


def test_large_object_pages_are_not_read_where_masking_applies(env: PgEnv) -> None:
    # pg_largeobject holds a large object in pages of 2 KB: a card number written across two pages is whole in
    # neither, and each page came back unmasked, to be put together by the agent.
    content = "x" * 2040 + " card " + CARDS[0] + " and " + "y" * 100
    [(oid,)] = env.direct("SELECT lo_from_bytea(0, convert_to(%s, 'UTF8'))", (content,))
    try:
        proc = env.psql(
            "readonly",
            "-At",
            "-c",
            f"SELECT pageno, data FROM pg_largeobject WHERE loid = {oid} ORDER BY pageno",
            "-c",
            f"COPY (SELECT loid, pageno FROM pg_largeobject WHERE loid = {oid}) TO STDOUT",
        )
        assert proc.stderr.count("pg-ro-no-transformed-reads") == 1, proc.stderr
        assert CARDS[0][:2].encode().hex() not in proc.stdout and f"{oid}\t0" in proc.stdout, proc.stdout
    finally:
        env.direct("SELECT lo_unlink(%s)", (oid,))


def test_character_references_do_not_hide_what_is_masked(env: PgEnv) -> None:
    # An xml value (or HTML kept in a text column) read by any XML or HTML program holds the address and the card
    # number it writes with character references; the detectors read the bytes, in which there is neither.
    env.direct("DROP TABLE IF EXISTS pages; CREATE TABLE pages (id int, doc xml, note text, notes text[])")
    env.direct(
        "INSERT INTO pages VALUES (1, '<c><e>jane&#64;example.com</e><n>4111&#32;1111&#32;1111&#32;1111</n></c>', "
        "'<p>jane&#x40;example.com</p>', ARRAY['jane&#64;example.com', 'jane&commat;example&period;com']), "
        "(2, '<p>Tom &#38; Jerry&#33;</p>', '<p>Tom &#38; Jerry&#33;</p>', ARRAY['&#33;'])"
    )
    try:
        with env.connect("readonly") as conn:
            for binary in (False, True):
                with conn.cursor(binary=binary) as cur:
                    rows = cur.execute("SELECT doc::text, note, notes FROM pages ORDER BY id").fetchall()
                text = str(rows[0])
                assert "jane" not in text and "4111" not in text and "[REDACTED:email]" in text, rows
                assert "1111 1111 1111" not in text and "1111" in text, rows
                # nothing to mask: relayed as written
                assert rows[1] == ("<p>Tom &#38; Jerry&#33;</p>", "<p>Tom &#38; Jerry&#33;</p>", ["&#33;"]), rows
            with conn.cursor().copy("COPY (SELECT doc, note FROM pages ORDER BY id) TO STDOUT") as copy:
                out = b"".join(bytes(data) for data in copy).decode()
            assert "jane" not in out and "4111" not in out and "[REDACTED:email]" in out, out
            assert "<p>Tom &#38; Jerry&#33;</p>" in out, out
        proc = env.psql("readonly", "-At", "-c", "SELECT doc FROM pages ORDER BY id")
        assert proc.returncode == 0 and "jane" not in proc.stdout and "4111" not in proc.stdout, proc
    finally:
        env.direct("DROP TABLE pages")


def test_character_references_in_notifications_do_not_hide_what_is_masked(env: PgEnv) -> None:
    # An application's trigger notifies listeners with a row holding HTML (a rich-text note), written with
    # character references: a readonly agent listening gets it masked as the HTML reads.
    with env.connect("readonly") as conn:
        conn.execute("LISTEN lictor_html")
        gen = conn.notifies(timeout=5, stop_after=2)
        env.direct("SELECT pg_notify('lictor_html', '<p>jane&#64;example.com</p>')")
        env.direct("SELECT pg_notify('lictor_html', 'Tom &#38; Jerry&#33;')")
        payloads = [n.payload for n in gen]
    assert payloads == ["<p>[REDACTED:email]</p>", "Tom &#38; Jerry&#33;"], payloads


def test_html_in_json_strings_is_masked_as_its_character_references_read(env: PgEnv) -> None:
    # A json or jsonb field holding HTML (a CMS page, a rich-text note) writes an address with a character
    # reference that a browser rendering the field shows as one; the detectors read the string as written.
    env.direct("DROP TABLE IF EXISTS cms; CREATE TABLE cms (id int, page jsonb, raw json, pages jsonb[])")
    env.direct(
        """INSERT INTO cms VALUES
        (1, '{"body": "<p>jane&#64;example.com</p>"}', '{"body": "<p>4111&#32;1111&#32;1111&#32;1111</p>"}',
         ARRAY['"jane&#64;example.com"'::jsonb]),
        (2, '{"body": "<p>Tom &#38; Jerry&#33;</p>"}', '{"body": "&#33;"}', ARRAY['"&#33;"'::jsonb])"""
    )
    try:
        with env.connect("readonly") as conn:
            for binary in (False, True):
                with conn.cursor(binary=binary) as cur:
                    rows = cur.execute("SELECT page, raw, pages FROM cms ORDER BY id").fetchall()
                assert rows[0][:2] == ({"body": "<p>[REDACTED:email]</p>"}, {"body": "<p>**** **** **** 1111</p>"})
                assert "jane" not in str(rows[0][2]), rows
                # nothing to mask: relayed as written
                assert rows[1] == ({"body": "<p>Tom &#38; Jerry&#33;</p>"}, {"body": "&#33;"}, ["&#33;"]), rows
    finally:
        env.direct("DROP TABLE cms")


def test_errors_notices_notifications_and_settings_are_masked_too(env: PgEnv) -> None:
    # Row data also comes back in messages that are not rows: an error quoting the bad value, a
    # notice, a NOTIFY payload, a setting's new value reported with ParameterStatus. The analyst role has
    # readonly's masks and may compute over columns, as these queries do.
    import psycopg

    with env.connect("dba") as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION note(t text) RETURNS void LANGUAGE plpgsql AS $$BEGIN RAISE NOTICE 'value: %', t; END$$"
        )
        conn.execute(
            "CREATE OR REPLACE FUNCTION note_error(t text) RETURNS void LANGUAGE plpgsql "
            "AS $$BEGIN RAISE EXCEPTION 'value: %', t; END$$"
        )
    notices: list[str] = []
    with env.connect("analyst") as conn:
        conn.add_notice_handler(lambda d: notices.append(f"{d.message_primary} {d.message_detail or ''}"))
        # an error raised while the statement ran may print what it computed: only its SQLSTATE comes back
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as info:
            conn.execute("SELECT email::int FROM customers ORDER BY id LIMIT 1")
        assert "SQLSTATE 22P02" in str(info.value) and "withheld" in str(info.value)
        assert "@example.com" not in str(info.value) and info.value.diag.message_detail is None
        with pytest.raises(psycopg.errors.RaiseException) as raised:
            conn.execute("SELECT note_error(email) FROM customers ORDER BY id LIMIT 1")
        assert "SQLSTATE P0001" in str(raised.value) and "@example.com" not in str(raised.value)
        # one found in the statement's text before it ran keeps its message
        with pytest.raises(psycopg.errors.UndefinedColumn) as undefined:
            conn.execute("SELECT emial FROM customers")
        assert 'column "emial" does not exist' in str(undefined.value)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as read_only:
            conn.execute("SELECT sneaky_write()")
        assert "read-only transaction" in str(read_only.value)
        conn.execute(
            "SELECT pg_catalog.set_config('application_name', email, false) FROM customers ORDER BY id LIMIT 1"
        )
        app = conn.info.parameter_status("application_name") or ""
        assert "@example.com" not in app and "[REDACTED:email]" in app
        glued = conn.execute("SELECT 'a' || card, card || 'z', email || '1' FROM customers ORDER BY id").fetchall()
        assert glued and not any(c in v for row in glued for v in row for c in [*CARDS, "@example.com"]), glued
        # masked values still parse as their column's type: JSON stays JSON, a masked number is NULL
        row = conn.execute(
            "SELECT 4111111111111111::bigint, 42::bigint, row_to_json(x), jsonb_build_object('n', 4111111111111111) "
            "FROM (SELECT email, 4111111111111111::bigint AS n FROM customers ORDER BY id LIMIT 1) x"
        ).fetchone()
        assert row is not None and row[:2] == (None, 42)
        assert row[2] == {"email": "[REDACTED:email]", "n": "************1111"}, row
        assert row[3] == {"n": "************1111"}
        # the same number spelled by float8, money or a non-integral JSON number
        row = conn.execute(
            "SELECT 4111111111111111::float8, 4111111111111111::numeric::money, 7::float8, "
            "json_build_object('n', 4111111111111111::numeric(20, 1)), email || card, email || '-' || card "
            "FROM customers ORDER BY id LIMIT 1"
        ).fetchone()
        assert row is not None and row[:3] == (None, None, 7.0), row
        assert row[3] == {"n": "************1111"}, row
        assert not any(c in str(row[4:]) for c in [*CARDS, "@example.com"]), row
        # binary values of types that cannot hold a match are read, not refused
        with conn.cursor(binary=True) as cur:
            assert cur.execute("SELECT '{1,2}'::int4[], '10.0.0.1'::inet, true").fetchone()[0] == [1, 2]
        conn.execute("LISTEN lictor_masking")
        conn.execute("SELECT note(email) FROM customers ORDER BY id LIMIT 1")
        assert len(notices) == 1 and "SQLSTATE 00000" in notices[0] and "@" not in notices[0], notices
        gen = conn.notifies(timeout=5, stop_after=1)
        with env.connect("dba") as other:
            other.execute("SELECT pg_notify('lictor_masking', email) FROM customers ORDER BY id LIMIT 1")
        payloads = [n.payload for n in gen]
        assert payloads == ["[REDACTED:email]"], payloads
    with env.connect("dba") as conn:  # the dba's notice is not masked: the rules are analyst's and readonly's
        dba_notices: list[str] = []
        conn.add_notice_handler(lambda d: dba_notices.append(d.message_primary))
        conn.execute("SELECT note(email) FROM customers ORDER BY id LIMIT 1")
        assert dba_notices and "@example.com" in dba_notices[0]


def test_numbers_written_with_group_separators_are_masked_too(env: PgEnv) -> None:
    # money prints a card stored in it as $4,111,111,111,111,111.00: a detector sees no card there. As a plain
    # money column it comes back NULL; as text, inside a money[] or a composite it must too.
    import psycopg

    env.direct(
        "DROP TABLE IF EXISTS wallets; DROP TYPE IF EXISTS wallet_entry; "
        "CREATE TYPE wallet_entry AS (amount money, n int); "
        "CREATE TABLE wallets (id int, amounts money[], amount money, entry wallet_entry)"
    )
    env.direct(
        "INSERT INTO wallets VALUES (1, ARRAY[4111111111111111::money], 4111111111111111::money, "
        "ROW(4111111111111111::money, 1)), (2, ARRAY[12.5::money], 12.5::money, ROW(1234567.5::money, 2))"
    )
    try:
        with env.connect("readonly") as conn:
            rows = conn.execute(
                "SELECT amounts, amount, amount::text, entry, amounts::text FROM wallets ORDER BY id"
            ).fetchall()
            assert rows[0] == (None, None, None, None, None), rows
            assert rows[1][0] == ["$12.50"] and rows[1][2] == "$12.50" and "1,234,567.50" in rows[1][3], rows
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                with conn.cursor().copy("COPY wallets TO STDOUT") as copy:
                    list(copy)
            assert "group separators" in str(info.value)
        proc = env.psql("readonly", "-At", "-c", "SELECT id, amounts, entry FROM wallets ORDER BY id")
        assert proc.returncode == 0 and "4,111" not in proc.stdout and "1||\n" in proc.stdout, proc
    finally:
        env.direct("DROP TABLE wallets; DROP TYPE wallet_entry")


def test_cursor_fetch_is_masked_like_its_query(env: PgEnv) -> None:
    import psycopg

    with env.connect("readonly", autocommit=False) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("DECLARE c CURSOR FOR SELECT email FROM customers ORDER BY id")
        rows = cur.execute("FETCH 3 FROM c").fetchall()
        assert rows == [("[REDACTED:email]",)] * 3
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute('FETCH ALL FROM "some other cursor"')
        conn.rollback()
    with env.connect("readonly") as conn:
        with conn.transaction():
            named = conn.cursor(name="server_side")
            named.execute("SELECT email FROM customers ORDER BY id")
            assert named.fetchmany(2) == [("[REDACTED:email]",)] * 2


# -- COPY ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["CLOSE", "COMMIT", "failed Bind"])
def test_a_portal_name_taken_over_by_a_cursor_is_masked_like_the_cursor(env: PgEnv, how: str) -> None:
    # Portals and SQL cursors share one namespace on the server. The gateway kept a portal it had seen bound
    # (to a statement of one int4 column, in binary) after the server's portal of that name was gone, or when
    # its Bind failed; an Execute of that name then ran a cursor over card numbers, relayed as that int4.
    c = RawClient(env.port, env.tokens["readonly"])
    c.sock.settimeout(5)
    try:
        c.send(pg.query("BEGIN"))
        c.until_ready()
        if how == "failed Bind":
            c.send(pg.query("DECLARE x CURSOR FOR SELECT card FROM customers ORDER BY id"))
            c.until_ready()
        c.send(
            pg.parse("s1", "SELECT 1::int4 AS c"),
            pg.bind("x", "s1", result_formats=[1]),
            pg.describe("P", "x"),
            pg.execute("x"),
            pg.sync(),
        )
        c.until_ready()
        if how == "CLOSE":
            c.send(pg.query("CLOSE x"))
        elif how == "COMMIT":
            c.send(pg.query("COMMIT; BEGIN"))
        if how != "failed Bind":
            c.until_ready()
            c.send(pg.query("DECLARE x CURSOR FOR SELECT card FROM customers ORDER BY id"))
            c.until_ready()
        else:
            c.send(pg.query("ROLLBACK; BEGIN; DECLARE x CURSOR FOR SELECT card FROM customers ORDER BY id"))
            c.until_ready()
            c.send(pg.bind("x", "s1", result_formats=[1]), pg.sync())  # fails: cursor "x" already exists
            assert [e.sqlstate for e in errors(c.until_ready())] == ["42P03"]
        c.send(pg.execute("x", 4), pg.sync())
        got = c.until_ready()
    finally:
        c.close()
    values = [v for m in got if isinstance(m, pg.DataRow) for v in pg.decode_datarow(m.raw)]
    assert not any(card.encode() in values for card in CARDS), values
    assert values or errors(got)


def test_copy_from_stdin_and_copy_to_stdout_masked(env: PgEnv) -> None:
    with env.connect("writer") as conn:
        with conn.cursor().copy("COPY orders (customer_id, amount) FROM STDIN") as copy:
            for i in range(5):
                copy.write_row((4, 10 + i))
        assert conn.execute("SELECT count(*) FROM orders WHERE customer_id = 4 AND amount >= 10").fetchone()[0] == 5
        conn.execute("DELETE FROM orders WHERE customer_id = 4 AND amount >= 10")
    with env.connect("readonly") as conn:
        out = bytearray()
        with conn.cursor().copy("COPY (SELECT id, email, card FROM customers ORDER BY id) TO STDOUT") as copy:
            for chunk in copy:
                out += chunk
        text = out.decode()
        assert text.count("\n") == 20
        assert "@example.com" not in text and "[REDACTED:email]" in text
        assert not any(c in text for c in CARDS)
        out = bytearray()
        with conn.cursor().copy("COPY customers TO STDOUT (FORMAT csv)") as copy:
            for chunk in copy:
                out += chunk
        assert "@example.com" not in out.decode() and out.decode().count("\n") == 20
    proc = env.psql("readonly", "-c", r"\copy customers TO STDOUT")
    assert proc.returncode == 0 and proc.stdout.count("\n") == 20 and "@example.com" not in proc.stdout


def test_a_sync_the_server_ignores_during_copy_from_stdin_keeps_the_gateway_in_step(env: PgEnv) -> None:
    # The server ignores Sync while it reads COPY data. libpq sends one behind an Execute before it knows the
    # statement is a COPY (PQexecParams, tokio-postgres' copy_in), and one more after CopyDone: counting both,
    # the gateway waited for a ReadyForQuery that never came, and held every later text with a backslash or
    # a non-ASCII character for good.
    c = RawClient(env.port, env.tokens["writer"])
    try:
        c.send(pg.parse("", "COPY orders (customer_id, amount) FROM STDIN"), pg.bind("", ""), pg.execute(), pg.sync())
        assert names(c.read_messages(3)) == ["ParseComplete", "BindComplete", "CopyInResponse"]
        c.send(pg.copy_data(b"5\t77.25\n"), pg.copy_done(), pg.sync())
        assert names(c.until_ready()) == ["CommandComplete", "ReadyForQuery"]
        c.sock.settimeout(5)
        c.send(pg.query("SELECT 'caf\u00e9 \\ ok'"))
        rows = [m for m in c.until_ready() if isinstance(m, pg.DataRow)]
        assert [pg.decode_datarow(r.raw) for r in rows] == [["caf\u00e9 \\ ok".encode()]]
    finally:
        c.close()
    env.direct("DELETE FROM orders WHERE customer_id = 5 AND amount = 77.25")
    # A Sync sent inside COPY data on purpose: the results of the next statement used to be matched to no
    # statement at all, and relayed without their masks.
    c = RawClient(env.port, env.tokens["loader"])
    try:
        c.send(pg.query("COPY orders (customer_id, amount) FROM STDIN"))
        assert names(c.read_messages(1)) == ["CopyInResponse"]
        c.send(pg.sync(), pg.copy_done())
        assert names(c.until_ready()) == ["CommandComplete", "ReadyForQuery"]
        c.sock.settimeout(5)
        c.send(pg.query("SELECT card FROM customers ORDER BY id"))
        values = [pg.decode_datarow(m.raw)[0] for m in c.until_ready() if isinstance(m, pg.DataRow)]
        assert len(values) == 20 and not any(card.encode() in values for card in CARDS), values
    finally:
        c.close()


def test_copy_of_json_with_unicode_escapes_is_not_relayed_unmasked(env: PgEnv) -> None:
    import psycopg

    # A json value keeps its text as written: jane\\u0040example.com is an address to any JSON reader, but
    # not to detectors reading COPY's bytes. SELECT masks it as JSON; COPY carries no types.
    env.direct("CREATE TABLE profiles (id int, doc json)")
    try:
        env.direct(
            """INSERT INTO profiles VALUES (1, '{"email": "jane\\u0040example.com", "n": "zo\\u00eb@ex.com"}')"""
        )
        with env.connect("readonly") as conn:
            doc = conn.execute("SELECT doc FROM profiles").fetchone()[0]
            assert doc == {"email": "[REDACTED:email]", "n": "[REDACTED:email]"}
            # the same JSON text in a text column
            for binary in (False, True):
                text = conn.cursor(binary=binary).execute("SELECT doc::text AS t FROM profiles").fetchone()[0]
                assert "jane" not in text and "zo" not in text, text
                assert json.loads(text) == {"email": "[REDACTED:email]", "n": "[REDACTED:email]"}, text
            for sql in ("COPY profiles TO STDOUT", "COPY profiles TO STDOUT (FORMAT csv)"):
                out = bytearray()
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    with conn.cursor().copy(sql) as copy:
                        for chunk in copy:
                            out += chunk
                assert b"jane" not in out and b"zo" not in out, (sql, out)
            assert conn.execute("SELECT 1").fetchone() == (1,)
            # a notification payload with the value (a trigger's row_to_json(NEW)) is masked as JSON
            conn.execute("LISTEN lictor_json")
            gen = conn.notifies(timeout=5, stop_after=2)
            with env.connect("dba") as other:
                other.execute("SELECT pg_notify('lictor_json', row_to_json(p)::text) FROM profiles p")
                other.execute("SELECT pg_notify('lictor_json', 'x\\u0040' || doc::text) FROM profiles")
            payloads = [n.payload for n in gen]
            assert json.loads(payloads[0]) == {"id": 1, "doc": {"email": "[REDACTED:email]", "n": "[REDACTED:email]"}}
            assert "jane" not in payloads[1] and "zo" not in payloads[1], payloads
            # the escape in plain text, not JSON: whoever reads it reads the address
            env.direct("""CREATE TABLE notes (t text); INSERT INTO notes VALUES ('mail jane\\u0040example.com now')""")
            assert conn.execute("SELECT t FROM notes").fetchone() == ("mail [REDACTED:email] now",)
    finally:
        env.direct("DROP TABLE IF EXISTS profiles, notes")


def test_json_with_unicode_escapes_inside_a_row_or_an_array_is_masked(env: PgEnv) -> None:
    # A whole row or an array prints a json value inside its own text, its backslashes doubled
    # (""jane\\u0040example.com""): the escape is still one to whoever reads the row and then the JSON.
    env.direct("CREATE TABLE profiles (id int, doc json, docs json[])")
    try:
        env.direct(
            """INSERT INTO profiles VALUES (1, '{"email": "jane\\u0040example.com"}', """
            """ARRAY['{"email": "zo\\u00eb@ex.com"}'::json])"""
        )
        with env.connect("readonly") as conn:
            for sql in ("SELECT p FROM profiles p", "SELECT p::text FROM profiles p", "SELECT docs FROM profiles"):
                shown = str(conn.execute(sql).fetchall())
                assert "jane" not in shown and "zo" not in shown, (sql, shown)
                assert "[REDACTED:email]" in shown, (sql, shown)
            [(docs,)] = conn.execute("SELECT docs FROM profiles").fetchall()
            assert docs == [{"email": "[REDACTED:email]"}], docs  # still a json[] to the driver
    finally:
        env.direct("DROP TABLE IF EXISTS profiles")


def test_copy_options_that_rewrite_values_are_refused_where_masking_applies(env: PgEnv) -> None:
    import psycopg

    # QUOTE '1' would write the card 4111 1111 1111 1111 as 41111111 11111111..., QUOTE '@' an email
    # as user1@@example.com, a text-format DELIMITER ' ' as 4111\ 1111...: no detector sees them.
    rewriting = [
        "COPY customers TO STDOUT (FORMAT csv, QUOTE '1', FORCE_QUOTE *)",
        "COPY customers TO STDOUT WITH CSV QUOTE AS '@' FORCE QUOTE *",
        "COPY customers TO STDOUT (FORMAT csv, ESCAPE '1', FORCE_QUOTE *)",
        "COPY (SELECT card FROM customers) TO STDOUT (DELIMITER ' ')",
        "COPY customers TO STDOUT (ENCODING 'LATIN1')",
        # a CSV delimiter that is a digit: a card number without that digit is not quoted, and glued to
        # the delimiters around it (07411111111111111170) no detector sees it
        "COPY (SELECT 0, card, 0 FROM customers) TO STDOUT (FORMAT csv, DELIMITER '7')",
        "COPY customers TO STDOUT (FORMAT csv, DELIMITER 'x')",
    ]
    with env.connect("readonly") as conn:
        for sql in rewriting:
            out = bytearray()
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                with conn.cursor().copy(sql) as copy:
                    for chunk in copy:
                        out += chunk
            assert "rewrite characters inside values" in str(info.value), sql
            assert not out, sql
        # The default options, a CSV delimiter and a header still work, masked.
        out = bytearray()
        with conn.cursor().copy("COPY customers TO STDOUT (FORMAT csv, DELIMITER ' ', HEADER, QUOTE '\"')") as copy:
            for chunk in copy:
                out += chunk
        assert out.decode().count("\n") == 21 and "@example.com" not in out.decode()
    # The extended protocol is refused at Bind, before the server runs anything.
    raw = RawClient(env.port, env.tokens["readonly"])
    raw.send(pg.parse("", rewriting[0]), pg.bind("", ""), pg.execute(""), pg.sync())
    reply = raw.until_ready()
    assert names(reply) == ["ParseComplete", "ErrorResponse", "ReadyForQuery"]
    assert "rewrite characters" in reply[1].message  # type: ignore[union-attr]
    raw.close()
    # Where no masking applies, the options are the writer's own business.
    with env.connect("writer") as conn:
        with conn.cursor().copy(rewriting[0]) as copy:
            assert b"".join(bytes(c) for c in copy).count(b"\n") == 20


# -- cancel ------------------------------------------------------------------------------------------


def test_cancel_reaches_the_right_backend(env: PgEnv) -> None:
    import psycopg

    with env.connect("readonly") as conn, env.connect("readonly") as other:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - started < 10
        timer.join()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert other.execute("SELECT 2").fetchone() == (2,)
    # psql's cancel (SIGINT) goes through the same CancelRequest path.
    env_vars = {**os.environ, "PGPASSWORD": env.tokens["readonly"], "PGSSLMODE": "disable"}
    proc = subprocess.Popen(
        ["psql", "-X", "-h", "127.0.0.1", "-p", str(env.port), "-U", "a", "-d", "app", "-c", "SELECT pg_sleep(20)"],
        env=env_vars,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    proc.send_signal(2)
    _, err = proc.communicate(timeout=10)
    assert "canceling statement due to user request" in err


# -- clients -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_the_gateway(env: PgEnv, mode: str) -> None:
    env_vars = {**os.environ, "PGPASSWORD": env.tokens["writer"], "PGSSLMODE": "disable"}
    proc = subprocess.run(
        [
            "pgbench",
            "-n",
            "-M",
            mode,
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "50",
            "-h",
            "127.0.0.1",
            "-p",
            str(env.port),
            "-U",
            "bench",
            "app",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_vars,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "number of transactions actually processed: 200/200" in proc.stdout
    assert "number of failed transactions: 0" in proc.stdout


def test_a_withheld_error_message_says_since_which_rule_and_how_to_get_messages_back(env: PgEnv) -> None:
    # A writer's session is masked once it has read settings wholesale (SHOW ALL): from then on the server's
    # errors came back as "data exception (SQLSTATE 22012); the server's message is withheld ..." with nothing
    # saying why this session, or that a new connection has the messages.
    import psycopg

    with env.connect("writer") as conn:
        with pytest.raises(psycopg.errors.DivisionByZero) as before:
            conn.execute("SELECT 1/0")
        assert "division by zero" in str(before.value)
        conn.execute("SHOW ALL").fetchall()
        with pytest.raises(psycopg.errors.DivisionByZero) as after:
            conn.execute("SELECT 1/0")
        message = str(after.value)
        assert "SQLSTATE 22012" in message and "(this one since rule pg-mask-setting-secrets)" in message, message
        assert "a new connection gets full messages until it reads masked data" in message, message
    with env.connect("readonly") as conn:  # masked from its first statement, whatever it reads
        conn.execute("SELECT 1").fetchall()
        with pytest.raises(psycopg.errors.DivisionByZero) as ro:
            conn.execute("SELECT 1/0")
        assert "this one since rule" in str(ro.value) and "new connection" not in str(ro.value), ro.value


def test_writer_ddl_waits_for_an_approval(env: PgEnv) -> None:
    import psycopg

    notices: list[str] = []
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            with env.connect("writer") as conn:
                conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
                conn.execute("/* reason: ticket OPS-1 */ CREATE TABLE approved_table (id int)")
                result["ok"] = True
        except psycopg.Error as exc:
            result["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 15
    approval_id = None
    while time.monotonic() < deadline and approval_id is None:
        time.sleep(0.2)
        for note in notices:
            if "waiting for approval" in note:
                approval_id = note.split("waiting for approval ", 1)[1].split(":", 1)[0]
    assert approval_id, notices
    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    shown = lictor("approvals", "show", approval_id, "--url", url, env=env_cli)
    assert "ticket OPS-1" in shown.stdout
    lictor("approvals", "approve", approval_id, "--url", url, "--reason", "ok", env=env_cli)
    worker.join(20)
    assert result.get("ok"), result
    assert env.direct("SELECT to_regclass('approved_table') IS NOT NULL") == [(True,)]
    env.direct("DROP TABLE approved_table")


def test_writer_ddl_on_roles_and_default_privileges_waits_for_an_approval_too(env: PgEnv) -> None:
    # The contract: a writer's DDL waits for a human, whatever kind it is. CREATE ROLE and ALTER DEFAULT PRIVILEGES
    # were denied outright ("no rule allows it"), so a writer could not even ask.
    import psycopg

    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"

    def decide(verb: str) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pending = json.loads(lictor("approvals", "list", "--json", "--url", url, env=env_cli).stdout)
            if pending:
                lictor("approvals", verb, pending[0]["id"], "--url", url, "--reason", "checked", env=env_cli)
                return
            time.sleep(0.1)

    role = "lictor_rv_never_" + secrets.token_hex(3)
    with env.connect("writer") as conn:
        decider = threading.Thread(target=decide, args=("deny",))
        decider.start()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="was denied by"):
            conn.execute(f"CREATE ROLE {role} NOLOGIN")
        decider.join()
        decider = threading.Thread(target=decide, args=("approve",))
        decider.start()
        conn.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO PUBLIC")
        decider.join()
    assert env.direct("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)) == [(0,)]
    assert env.direct("SELECT count(*) FROM pg_default_acl") == [(1,)]
    env.direct("ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM PUBLIC")


def test_approvers_see_the_rest_of_the_query_and_search_path_changes_of_a_held_statement(env: PgEnv) -> None:
    # An unqualified name in a held statement is looked up with the connection's search_path: approvers of
    # DROP TABLE orders must see that an earlier statement (in the same query or before it) pointed it elsewhere.
    import psycopg

    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    shown: list[str] = []

    def deny_when_pending() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pending = json.loads(lictor("approvals", "list", "--json", "--url", url, env=env_cli).stdout)
            if pending:
                approval = pending[0]["id"]
                shown.append(lictor("approvals", "show", approval, "--url", url, env=env_cli).stdout)
                lictor("approvals", "deny", approval, "--url", url, "--reason", "not now", env=env_cli)
                return
            time.sleep(0.1)

    with env.connect("writer") as conn:
        conn.execute("SET search_path = lictor_staging, public")
        denier = threading.Thread(target=deny_when_pending)
        denier.start()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not now"):
            conn.execute("CREATE TABLE held_after_path (id int)")
        denier.join()
    assert (
        "search_path was changed earlier in this connection by: SET search_path = lictor_staging, public" in shown[0]
    ), shown

    denier = threading.Thread(target=deny_when_pending)
    denier.start()
    proc = env.psql("writer", "-c", "SET search_path = lictor_other, public; CREATE TABLE held_in_query (id int)")
    denier.join()
    assert "not now" in proc.stderr, proc.stderr
    assert "Statement 2 of 2 in one query; the whole query:" in shown[1], shown[1]
    assert "SET search_path = lictor_other, public; CREATE TABLE held_in_query (id int)" in shown[1]
    # What the approval is bound to (and what runs) is the held statement alone.
    assert "request:\n  CREATE TABLE held_in_query (id int)\n" in shown[1]
    assert env.direct("SELECT to_regclass('held_after_path'), to_regclass('held_in_query')") == [(None, None)]


def test_a_statement_approved_after_the_token_expired_is_denied_as_an_ended_approval(env: PgEnv) -> None:
    import psycopg

    token = env.gateway.token("agent-short-lived", ttl="2s", role="writer")  # type: ignore[union-attr]
    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    with env.connect("writer", dsn_extra={"password": token, "user": "agent-short-lived"}) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))

        def approve_after_expiry() -> None:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                for note in list(notices):
                    if "waiting for approval " in note:
                        approval = note.split("waiting for approval ", 1)[1].split(":", 1)[0]
                        time.sleep(3)  # the token expires while the statement waits
                        lictor("approvals", "approve", approval, "--url", url, env=env_cli)
                        return
                time.sleep(0.1)

        approver = threading.Thread(target=approve_after_expiry)
        approver.start()
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("CREATE TABLE approved_too_late (id int)")
        approver.join()
    assert "your token has expired; reconnect with a fresh one" in str(info.value)
    assert "lictor:token-expired" in (info.value.diag.message_detail or "")
    # the approval is over (withdrawn): the hint does not say to wait for it
    assert info.value.diag.message_hint == (
        "This approval request has ended; running the statement again asks for a new approval."
    )
    assert env.direct("SELECT to_regclass('approved_too_late') IS NULL") == [(True,)]


def test_held_statement_denied_by_an_approver_or_cancelled_by_the_agent(env: PgEnv) -> None:
    import psycopg

    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["approver"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    with env.connect("writer") as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))

        def deny_when_asked() -> None:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                for note in list(notices):
                    if "waiting for approval " in note:
                        approval = note.split("waiting for approval ", 1)[1].split(":", 1)[0]
                        lictor("approvals", "deny", approval, "--url", url, "--reason", "not now", env=env_cli)
                        return
                time.sleep(0.1)

        denier = threading.Thread(target=deny_when_asked)
        denier.start()
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("DROP TABLE orders")
        denier.join()
        assert "not now" in str(info.value) or "denied" in str(info.value)
        # a denied request cannot be approved any more: the hint does not say to wait for it
        assert info.value.diag.message_hint == (
            "This approval request has ended; running the statement again asks for a new approval."
        )
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] > 0
        # The agent gives up a held statement with an ordinary cancel.
        notices.clear()
        timer = threading.Timer(1.0, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("TRUNCATE orders")
        timer.join()
        assert any("waiting for approval" in n for n in notices)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert env.direct("SELECT count(*) > 0 FROM orders") == [(True,)]


def test_an_approval_covers_one_bind_with_the_parameter_values_approvers_saw(env: PgEnv) -> None:
    # psycopg sends parameters in the extended protocol: the statement is held at its Bind, approvers
    # see the values, and the approval does not stretch to further executions with other values.
    import psycopg

    env.direct(
        "CREATE OR REPLACE PROCEDURE add_order(amount int) LANGUAGE sql "
        "AS $$ INSERT INTO orders (customer_id, amount) VALUES (1, amount) $$"
    )
    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    notices: list[str] = []
    decided: list[dict[str, Any]] = []

    def decide_when_asked(verdict: str, *reason: str) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for note in list(notices):
                if "waiting for approval " in note:
                    approval = note.split("waiting for approval ", 1)[1].split(":", 1)[0]
                    shown = lictor("approvals", "show", approval, "--json", "--url", url, env=env_cli).stdout
                    decided.append(json.loads(shown))
                    lictor("approvals", verdict, approval, "--url", url, *reason, env=env_cli)
                    return
            time.sleep(0.1)

    try:
        with env.connect("writer") as conn:
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            approver = threading.Thread(target=decide_when_asked, args=("approve",))
            approver.start()
            conn.execute("CALL add_order(%s)", [4242], prepare=True)
            approver.join()
            assert decided[0]["payload"] == "CALL add_order($1)\n-- parameters: $1 = 4242"
            # The same prepared statement with another value asks again.
            notices.clear()
            denier = threading.Thread(target=decide_when_asked, args=("deny", "--reason", "one was enough"))
            denier.start()
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="one was enough"):
                conn.execute("CALL add_order(%s)", [999999], prepare=True)
            denier.join()
            assert len(decided) == 2 and decided[1]["id"] != decided[0]["id"]
            assert decided[1]["payload"].endswith("$1 = 999999")
        assert env.direct(
            "SELECT count(*) FILTER (WHERE amount = 4242), count(*) FILTER (WHERE amount = 999999) FROM orders"
        ) == [(1, 0)]
    finally:
        env.direct("DELETE FROM orders WHERE amount IN (4242, 999999)")
        env.direct("DROP PROCEDURE IF EXISTS add_order(int)")


def test_a_held_statement_cannot_show_approvers_parameter_values_of_its_own(env: PgEnv) -> None:
    # Approvers read the bound values on a "-- parameters:" line after the statement: a statement ending in
    # its own such comment showed them "$1 = 42" above the real "$1 = 999999".
    import psycopg

    env.direct(
        "CREATE OR REPLACE PROCEDURE add_order(amount int) LANGUAGE sql "
        "AS $$ INSERT INTO orders (customer_id, amount) VALUES (1, amount) $$"
    )
    notices: list[str] = []
    try:
        with env.connect("writer") as conn:
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            for fake in ("CALL add_order(%s)\n-- parameters: $1 = 42", "CALL add_order(%s) /* Params: $1 = 42 */"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="lictor:approval-display"):
                    conn.execute(fake, [999999], prepare=True)
            assert not any("waiting for approval" in n for n in notices), notices
            assert conn.execute("SELECT 1").fetchone() == (1,)  # the connection stays usable
        assert env.direct("SELECT count(*) FROM orders WHERE amount = 999999") == [(0,)]
    finally:
        env.direct("DROP PROCEDURE IF EXISTS add_order(int)")


def test_a_held_statement_is_withdrawn_when_its_agent_goes_away(env: PgEnv) -> None:
    # Reading from the agent is paused during a hold; its disconnect must still end the request, so
    # that nobody approves a statement whose agent is gone.
    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    raw = RawClient(env.port, env.tokens["writer"])
    raw.send(pg.query("DROP TABLE orders"))
    deadline = time.monotonic() + 10
    approval = None
    while approval is None and time.monotonic() < deadline:
        pending = json.loads(lictor("approvals", "list", "--json", "--url", url, env=env_cli).stdout)
        approval = next((a for a in pending if "DROP TABLE orders" in a.get("summary", "")), None)
        time.sleep(0.2)
    assert approval is not None and approval["status"] == "pending"
    raw.sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        shown = json.loads(lictor("approvals", "show", approval["id"], "--json", "--url", url, env=env_cli).stdout)
        if shown["status"] != "pending":
            break
        time.sleep(0.2)
    assert shown["status"] == "withdrawn", shown
    assert env.direct("SELECT count(*) > 0 FROM orders") == [(True,)]


def test_a_held_statement_ends_at_the_sessions_statement_timeout(env: PgEnv) -> None:
    # The server would end a statement that runs longer than statement_timeout; one the gateway holds for an
    # approval has not reached it, so the gateway ends the wait then (node-postgres's `statement_timeout` is
    # how its agents give up: it has no cancel), and withdraws the request.
    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    started = time.monotonic()
    proc = env.psql(
        "writer",
        "-c",
        "SET statement_timeout = '1500ms'",
        "-c",
        "DROP TABLE orders",
        "-c",
        "SELECT 'still usable after the statement timeout'",
        env={"PGOPTIONS": "-c statement_timeout=5min"},
        timeout=30,
    )
    assert time.monotonic() - started < 20
    assert "waiting for approval" in proc.stderr
    assert "ERROR:  lictor: canceling statement due to statement timeout" in proc.stderr, proc.stderr
    assert "statement_timeout = 1.5s" in proc.stderr
    assert "still usable" in proc.stdout
    approval = proc.stderr.split("waiting for approval ", 1)[1].split(":", 1)[0]
    shown = json.loads(lictor("approvals", "show", approval, "--json", "--url", url, env=env_cli).stdout)
    assert shown["status"] == "withdrawn", shown
    assert env.direct("SELECT count(*) > 0 FROM orders") == [(True,)]
    # The recording shows the statement as denied (it never ran), not only as held.
    recorded = _recorded_statements(env, "still usable after the statement timeout", "DROP TABLE orders")
    ended = [s for s in recorded if s["sql"] == "DROP TABLE orders"]
    assert len(ended) == 1 and ended[0]["decision"] == "deny", recorded
    assert "statement_timeout = 1.5s" in ended[0]["message"], ended
    # A timeout set with SET LOCAL in the transaction counts as well, and the server still answers the agent
    # with its own SQLSTATE: 57014, as for a statement the server cancelled itself.
    with env.connect("writer", autocommit=False) as conn:
        import psycopg

        conn.execute("SET LOCAL statement_timeout = 1000")
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            conn.execute("TRUNCATE orders")
        assert time.monotonic() - started < 20
        assert "statement_timeout = 1s" in str(info.value)
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_gateways_statement_timeout_lookup_shows_the_agent_nothing(env: PgEnv) -> None:
    # Before holding a Query the gateway asks the server for statement_timeout itself; what the server says of
    # that SHOW (the notices of a raised client_min_messages) is not the agent's: it sees its two statements.
    proc = env.psql(
        "writer",
        "-c",
        "SET client_min_messages = debug5",
        "-c",
        "SET statement_timeout = 300",
        "-c",
        "DROP TABLE orders",
        timeout=30,
    )
    assert "canceling statement due to statement timeout" in proc.stderr, proc.stderr
    assert proc.stderr.count("StartTransaction") == 2, proc.stderr


# -- memory ---------------------------------------------------------------------------------------


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not found")


def test_million_row_result_streams_with_bounded_memory(env: PgEnv) -> None:
    pid = env.gateway.pid  # type: ignore[union-attr]
    start_rss = _rss_kib(pid, "VmRSS")
    sql = "SELECT g, md5(g::text) AS h, 'row ' || g AS note FROM generate_series(1, 1000000) g"
    raw = RawClient(env.port, env.tokens["writer"])
    raw.send(pg.query(sql))
    rows = 0
    done = False
    reader = pg.BackendReader()
    while not done:
        data = raw.sock.recv(1 << 20)
        assert data
        block = reader.feed_block(data)
        rows += block.types.count(b"D")
        done = b"Z" in block.types
        time.sleep(0.0005)  # a slow reader: the gateway must apply back-pressure, not buffer
    raw.close()
    assert rows == 1_000_000
    peak = _rss_kib(pid, "VmHWM")
    assert peak - start_rss < 150 * 1024, f"gateway peak RSS grew by {(peak - start_rss) // 1024} MiB"
    # The masked path streams too (rows decoded, masked and re-encoded one by one).
    with env.connect("readonly") as conn:
        count = 0
        for row in conn.cursor().stream("SELECT 'user' || g || '@example.com' FROM generate_series(1, 100000) g"):
            assert row[0] == "[REDACTED:email]"
            count += 1
        assert count == 100000
    peak = _rss_kib(pid, "VmHWM")
    assert peak - start_rss < 150 * 1024


def test_a_masked_result_that_piled_up_is_relayed_whole_in_order_among_other_agents(env: PgEnv) -> None:
    """Once an agent's answer has piled up in the sockets (a slow agent), each read from the target holds thousands
    of rows; the relay masks them a few hundred at a time, pausing its reads from the target while the other
    connections have their turn. The rows still arrive whole, masked and in order, the other agent's statements
    are answered meanwhile, and the connection goes on."""
    rows = 100_000
    answered = 0
    connected, relaying = threading.Event(), threading.Event()
    relaying.set()

    def ping() -> None:
        nonlocal answered
        with env.connect("writer") as conn:
            connected.set()
            while relaying.is_set():
                assert conn.execute("SELECT 1").fetchone() == (1,)
                answered += 1

    pinging = threading.Thread(target=ping)
    pinging.start()
    raw = RawClient(env.port, env.tokens["readonly"])
    try:
        assert connected.wait(10)
        raw.send(pg.query(f"SELECT g, 'u' || g || '@ex.com' FROM generate_series(1, {rows}) g"))
        time.sleep(1)  # the agent does not read yet: its answer piles up in the sockets
        reader, seen, done = pg.BackendReader(), [], False
        while not done:
            for message in reader.feed(raw.sock.recv(1 << 20)):
                if isinstance(message, pg.DataRow):
                    seen.append(message.values)
                done = done or isinstance(message, pg.ReadyForQuery)
        before = answered
    finally:
        relaying.clear()
        pinging.join(timeout=30)
    try:
        assert [int(v[0]) for v in seen] == list(range(1, rows + 1))
        assert {v[1] for v in seen} == {b"[REDACTED:email]"}
        assert before > 0
        raw.send(pg.query("SELECT 2"))
        assert any(isinstance(m, pg.DataRow) and m.values == [b"2"] for m in raw.until_ready())
    finally:
        raw.close()


def test_concurrent_strict_sessions_share_their_fdatasyncs(env: PgEnv) -> None:
    """The readonly role records strictly: every decision and every statement's record is on disk before the
    statement goes on, or its answer back. One fdatasync per event, in the event loop every connection shares,
    held every agent for each of them (8 readonly pgbench clients: 533 TPS, 12 ms added at the median). The
    relay now syncs once per turn of the loop, before the turn's output leaves: concurrent sessions share it."""
    clients, statements = 8, 40
    pid = env.gateway.pid  # type: ignore[union-attr]
    tracer = attach_strace(pid, "-f", "-e", "trace=fdatasync", "-o", str(env.workdir / "syncs"))
    try:
        # not prepared: each statement's Parse is decided, so each statement is two strict events
        conns = [env.connect("readonly", prepare_threshold=None) for _ in range(clients)]
        start = threading.Barrier(clients)

        def run(conn: Any) -> None:
            start.wait(10)
            for i in range(statements):
                assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)

        threads = [threading.Thread(target=run, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for conn in conns:
            conn.close()
    finally:
        tracer.terminate()
        tracer.wait(10)
    syncs = (env.workdir / "syncs").read_text().count("fdatasync(")
    strict_events = clients * statements * 2
    assert 0 < syncs < strict_events // 2, f"{syncs} fdatasync calls for {strict_events} strict events"


# -- recording ------------------------------------------------------------------------------------


def test_statements_are_recorded_with_masked_params_and_tags(env: PgEnv) -> None:
    with env.connect("readonly") as conn:
        conn.execute("SELECT id FROM customers WHERE email = %s", ["user5@example.com"]).fetchall()
        psql_marker = secrets.token_hex(4)
        conn.execute(f"SELECT '{psql_marker}' AS marker").fetchall()
    gw = env.gateway
    assert gw is not None
    deadline = time.monotonic() + 15
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        listing = lictor("sessions", "list", "--json", "--state-dir", str(gw.state_dir), check=False)
        if listing.returncode == 0:
            for session in json.loads(listing.stdout or "[]"):
                out = lictor("sessions", "export", session["id"], "--state-dir", str(gw.state_dir), check=False)
                if psql_marker in out.stdout:
                    events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
                    break
        if events:
            break
        time.sleep(0.5)
    assert events, "the session recording did not show up"
    statements = [e["data"] for e in events if e.get("kind") == "statement"]
    lookup = next(s for s in statements if "WHERE email" in s["sql"])
    assert lookup["params"] == ["[REDACTED:email]"]
    assert lookup["tag"] == "SELECT 1" and lookup["rows"] == 1 and lookup["decision"] == "allow"
    assert "ms" in lookup
    text = json.dumps(events)
    assert "user5@example.com" not in text


def _recorded_statements(env: PgEnv, marker: str, has: str) -> list[dict[str, Any]]:
    """The statements of the one recorded session whose recording mentions ``marker`` and ``has``."""
    return [e["data"] for e in _recorded_events(env, marker, has) if e.get("kind") == "statement"]


def _recorded_events(env: PgEnv, marker: str, has: str = '"kind":"session.end"') -> list[dict[str, Any]]:
    """Every event of the one recorded session whose recording mentions ``marker`` and ``has`` (by default: its
    end, so that the recording is whole)."""
    gw = env.gateway
    assert gw is not None
    found: list[dict[str, Any]] = []

    def recorded() -> bool:
        listing = lictor("sessions", "list", "--json", "--state-dir", str(gw.state_dir), check=False)
        for session in json.loads(listing.stdout or "[]") if listing.returncode == 0 else []:
            out = lictor("sessions", "export", session["id"], "--state-dir", str(gw.state_dir), check=False).stdout
            if marker in out and has in out:
                found[:] = [json.loads(line) for line in out.splitlines() if line.strip()]
                return True
        return False

    wait_until(recorded, 20, f"a recording with {marker} and {has}")
    return found


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_a_statement_running_when_the_agent_goes_is_recorded(env: PgEnv, protocol: str) -> None:
    # Statements were recorded when the server answered: one still running when the connection ended (the
    # agent killed, the network gone) was in the audit log's decisions only, not in the session's recording.
    marker = "running-" + secrets.token_hex(4)
    sql = f"SELECT pg_sleep(3), '{marker}'"
    conn = env.connect("writer")
    if protocol == "simple":
        conn.pgconn.send_query(sql.encode())
    else:
        conn.pgconn.send_query_params(sql.replace(f"'{marker}'", "$1::text").encode(), [marker.encode()])
    conn.pgconn.flush()
    running = "pg_sleep(3)"
    wait_until(
        lambda: env.direct("SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s", [f"%{running}%"]),
        15,
        "the statement to run on the server",
    )
    conn.close()
    [statement] = [s for s in _recorded_statements(env, marker, '"unanswered"') if s.get("error") == "unanswered"]
    assert statement["decision"] == "allow" and running in statement["sql"], statement
    if protocol == "extended":
        assert statement["params"] == [marker], statement
    else:
        assert marker in statement["sql"] and statement["ended"] == "agent closed the connection", statement


def test_role_passwords_are_neither_recorded_nor_audited(env: PgEnv) -> None:
    import psycopg

    secret_dba, secret_ro = "s3cret-" + secrets.token_hex(6), "s3cret-" + secrets.token_hex(6)
    role = "lictor_pw_" + secrets.token_hex(3)
    with env.connect("dba") as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{secret_dba}' VALID UNTIL 'infinity'")
        conn.execute(f"ALTER ROLE {role} WITH PASSWORD '{secret_dba}x'")
        conn.execute(f"DROP ROLE {role}")
    with env.connect("readonly") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
        conn.execute(f"ALTER ROLE postgres PASSWORD '{secret_ro}'")
    assert secret_ro not in str(info.value)
    gw = env.gateway
    assert gw is not None
    # The two sessions, found through their decisions in the audit log; then their recordings.
    deadline = time.monotonic() + 30
    sessions: set[str] = set()
    audit = ""
    while time.monotonic() < deadline:
        audit = lictor("audit", "list", "--json", "--kind", "decision", "--state-dir", str(gw.state_dir)).stdout
        decisions = [json.loads(line) for line in audit.splitlines() if line.strip()]
        sessions = {
            str(d["session"])
            for d in decisions
            if role in d["request"]["summary"] or "ALTER ROLE postgres" in d["request"]["summary"]
        }
        if len(sessions) == 2:
            break
        time.sleep(0.3)
    assert len(sessions) == 2, sessions
    assert role in audit and "PASSWORD [REDACTED]" in audit
    recorded = ""
    while time.monotonic() < deadline:
        exports = [
            lictor("sessions", "export", sid, "--state-dir", str(gw.state_dir), check=False).stdout for sid in sessions
        ]
        recorded = "".join(exports)
        if role in recorded and "ALTER ROLE postgres" in recorded:
            break
        time.sleep(0.3)
    assert "PASSWORD [REDACTED]" in recorded and "VALID UNTIL 'infinity'" in recorded
    for secret in (secret_dba, secret_ro):
        assert secret not in recorded and secret not in audit


def test_a_dba_still_manages_other_roles(env: PgEnv) -> None:
    # Changes to the gateway's own login role are refused (tests/test_pg_e2e_upstream.py, on a throwaway
    # cluster); every other role is the dba's to manage.
    role = "lictor_other_" + secrets.token_hex(3)
    with env.connect("dba", autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"ALTER ROLE {role} SET work_mem = '1MB'")
        conn.execute(f"ALTER ROLE {role} NOLOGIN")
        conn.execute(f"DROP ROLE {role}")


def test_subscription_passwords_come_back_masked(env: PgEnv) -> None:
    # pg_dump reads every subscription's connection string (the gateway's login may be a superuser).
    name = "lictor_sub_" + secrets.token_hex(3)
    secret = "s3cret-" + secrets.token_hex(4)
    env.direct(
        f"CREATE SUBSCRIPTION {name} CONNECTION 'host=127.0.0.1 dbname=nowhere user=u password={secret}' "
        "PUBLICATION p WITH (connect = false, enabled = false, slot_name = NONE)"
    )
    try:
        with env.connect("readonly") as conn:
            (conninfo,) = conn.execute("SELECT subconninfo FROM pg_subscription WHERE subname = %s", (name,)).fetchone()
        assert secret not in conninfo and "host=127.0.0.1" in conninfo, conninfo
    finally:
        env.direct(f"DROP SUBSCRIPTION {name}")


def test_user_mapping_passwords_are_not_read_through_information_schema(env: PgEnv) -> None:
    # information_schema shows a user mapping's options, its password included, to a superuser login
    import psycopg

    secret = "s3cret-" + secrets.token_hex(4)
    env.direct(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw; CREATE SERVER lictor_remote FOREIGN DATA WRAPPER postgres_fdw "
        f"OPTIONS (host 'db.invalid'); CREATE USER MAPPING FOR postgres SERVER lictor_remote OPTIONS (password '{secret}')"
    )
    try:
        for role, sql in (
            ("readonly", "SELECT option_value FROM information_schema.user_mapping_options"),
            ("dba", "SELECT umoptions FROM information_schema._pg_user_mappings"),
            ("writer", "SET search_path = information_schema; SELECT option_value FROM user_mapping_options"),
        ):
            with env.connect(role) as conn:
                cur = psycopg.ClientCursor(conn)
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    cur.execute(sql)
                assert "pg-deny-credential-catalogs" in str(info.value.diag.message_detail), (sql, info.value)
    finally:
        env.direct("DROP EXTENSION postgres_fdw CASCADE")


def test_a_relation_named_by_a_function_argument_is_a_relation_read(env: PgEnv) -> None:
    # table_to_xml('pg_authid', ...) reads pg_authid (password hashes, the gateway login's among them) as
    # SELECT * FROM pg_authid does; a relation given as an oid or a column could be any relation
    import psycopg

    env.direct("CREATE EXTENSION IF NOT EXISTS pageinspect")
    try:
        with env.connect("dba") as conn:
            # the same statement with another constant is decided anew, not as the table it read before
            assert "<orders" in conn.execute("SELECT table_to_xml('orders', true, false, '')").fetchone()[0]
            for sql, rule in (
                ("SELECT table_to_xml('pg_authid', true, false, '')", "pg-deny-credential-catalogs"),
                (
                    "SELECT table_to_xml('pg_catalog.pg_authid'::regclass, true, false, '')",
                    "pg-deny-credential-catalogs",
                ),
                ("SELECT * FROM heap_page_items(get_raw_page('pg_authid', 0))", "pg-deny-credential-catalogs"),
                ("SELECT table_to_xml(1260, true, false, '')", "pg-deny-dynamic-sql"),  # pg_authid's oid
                ("SELECT schema_to_xml('pg_catalog', true, false, '')", "pg-deny-dynamic-sql"),
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                    conn.execute(sql).fetchall()
                assert rule in str(info.value.diag.message_detail), (sql, info.value)
    finally:
        env.direct("DROP EXTENSION IF EXISTS pageinspect")


def test_a_foreign_table_on_a_loopback_server_reads_what_it_names(env: PgEnv) -> None:
    # postgres_fdw reads the table its options name, on a server that may be this one: pg_authid under
    # another local name, or under its own name once a view made over the foreign table is in place
    import psycopg

    env.direct(
        "CREATE EXTENSION IF NOT EXISTS postgres_fdw; CREATE SERVER lictor_loop FOREIGN DATA WRAPPER postgres_fdw "
        f"OPTIONS (host '127.0.0.1', port '5432', dbname '{env.dbname}'); "
        "CREATE USER MAPPING FOR postgres SERVER lictor_loop OPTIONS (user 'postgres')"
    )
    try:
        with env.connect("dba") as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute(
                    "CREATE FOREIGN TABLE innocent (rolname name, rolpassword text) SERVER lictor_loop "
                    "OPTIONS (schema_name 'pg_catalog', table_name 'pg_authid')"
                )
            assert "pg-deny-credential-catalogs" in str(info.value.diag.message_detail), info.value
            # a remote table in pg_catalog by the foreign table's own name (postgres_fdw's default table_name)
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute(
                    "CREATE FOREIGN TABLE innocent2 (rolname name, rolpassword text) SERVER lictor_loop "
                    "OPTIONS (schema_name 'pg_catalog')"
                )
            assert "pg-no-views-over-catalogs" in str(info.value.diag.message_detail), info.value
            conn.execute("CREATE FOREIGN TABLE innocent2 (rolname name, rolpassword text) SERVER lictor_loop")
            conn.execute("CREATE VIEW innocent_view AS SELECT * FROM innocent2")
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute("ALTER FOREIGN TABLE innocent2 RENAME TO pg_authid")
            assert "pg-deny-credential-catalogs" in str(info.value.diag.message_detail), info.value
        assert env.direct("SELECT count(*) FROM pg_class WHERE relname IN ('innocent', 'pg_authid')") == [(1,)]
    finally:
        env.direct("DROP EXTENSION postgres_fdw CASCADE")


def test_bytea_values_are_masked_by_the_bytes_they_hold(env: PgEnv) -> None:
    # A bytea column printed in hex (the default bytea_output) hides a card number or an address from
    # detectors reading the text: they read the bytes the hex stands for.
    env.direct("CREATE TABLE blobs (id int, data bytea)")
    try:
        env.direct(
            "INSERT INTO blobs VALUES (1, convert_to('card 4111111111111111 of jane@example.com', 'UTF8')), "
            "(2, '\\x00ff00ff00ff00ff00ff'::bytea)"
        )
        with env.connect("readonly") as conn:
            rows = conn.execute("SELECT id, data FROM blobs ORDER BY id").fetchall()
            first = bytes(rows[0][1])
            assert b"4111111111111111" not in first and b"jane@example.com" not in first, first
            assert first.startswith(b"card ") and b"[REDACTED:email]" in first, first
            assert bytes(rows[1][1]) == b"\x00\xff" * 5  # nothing to mask: the value as it is
            for sql in ("COPY blobs TO STDOUT", "COPY blobs TO STDOUT (FORMAT csv)"):
                out = bytearray()
                with conn.cursor().copy(sql) as copy:
                    for chunk in copy:
                        out += chunk
                assert b"4111111111111111".hex().encode() not in out, (sql, out)
                assert b"jane@example.com".hex().encode() not in out, (sql, out)
                assert b"00ff00ff00ff00ff00ff" in out, (sql, out)
        proc = env.psql("readonly", "-At", "-c", "SELECT data FROM blobs WHERE id = 1")
        assert proc.returncode == 0, proc.stderr
        shown = bytes.fromhex(proc.stdout.strip()[2:])
        assert shown.startswith(b"card ") and b"4111111111111111" not in shown and b"jane@" not in shown, shown
    finally:
        env.direct("DROP TABLE IF EXISTS blobs")


def test_bytea_values_in_text_are_masked_by_the_bytes_they_hold(env: PgEnv) -> None:
    # data::text is the hex text form of the bytes, as a text; a whole row or an array prints a bytea inside
    # its own text: the detectors read the bytes wherever that form appears
    env.direct("CREATE TABLE blobs (id int, data bytea, more bytea[])")
    try:
        env.direct(
            "INSERT INTO blobs VALUES (1, convert_to('card 4111111111111111 of jane@example.com', 'UTF8'), "
            "ARRAY[convert_to('4111111111111111', 'UTF8')])"
        )
        with env.connect("readonly") as conn:
            for sql in (
                "SELECT data::text FROM blobs",
                "SELECT coalesce(data::varchar, '') FROM blobs",
                "SELECT b FROM blobs b",
                "SELECT b::text FROM blobs b",
                "SELECT more FROM blobs",
            ):
                shown = str(conn.execute(sql).fetchall())
                assert b"4111111111111111".hex() not in shown and "4111111111111111" not in shown, (sql, shown)
                assert b"jane@example.com".hex() not in shown, (sql, shown)
                assert (b"*" * 12 + b"1111").hex() in shown or "*" * 12 + "1111" in shown, (sql, shown)  # masked
    finally:
        env.direct("DROP TABLE IF EXISTS blobs")


def test_bytea_values_in_json_documents_are_masked_by_the_bytes_they_hold(env: PgEnv) -> None:
    # an audit table keeps to_jsonb(NEW) of rows with a bytea column: the bytea is a string in hex there
    env.direct("CREATE TABLE blobs (id int, data bytea); CREATE TABLE audit (id int, doc jsonb, doc_text json)")
    try:
        env.direct(
            "INSERT INTO blobs VALUES (1, convert_to('card 4111111111111111 of jane@example.com', 'UTF8')); "
            "INSERT INTO audit SELECT id, to_jsonb(b), row_to_json(b) FROM blobs b"
        )
        with env.connect("readonly") as conn:
            for binary in (False, True):
                row = conn.cursor(binary=binary).execute("SELECT doc, doc_text FROM audit").fetchone()
                assert row is not None
                for doc in row:
                    data = doc["data"]
                    assert data.startswith("\\x"), data  # still a bytea in hex
                    shown = bytes.fromhex(data[2:])
                    assert b"4111111111111111" not in shown and b"jane@example.com" not in shown, shown
                    assert shown.startswith(b"card ") and shown.endswith(b"[REDACTED:email]"), shown
    finally:
        env.direct("DROP TABLE IF EXISTS blobs, audit")


def test_bytea_values_in_notifications_are_masked_by_the_bytes_they_hold(env: PgEnv) -> None:
    # a trigger's pg_notify(..., row_to_json(NEW)::text) carries a bytea column in hex, as a row does
    env.direct("CREATE TABLE blobs (id int, data bytea)")
    try:
        env.direct("INSERT INTO blobs VALUES (1, convert_to('card 4111111111111111 of jane@example.com', 'UTF8'))")
        with env.connect("readonly") as conn:
            conn.execute("LISTEN lictor_blobs")
            gen = conn.notifies(timeout=5, stop_after=3)
            with env.connect("dba") as other:
                other.execute("SELECT pg_notify('lictor_blobs', data::text) FROM blobs")
                other.execute("SELECT pg_notify('lictor_blobs', row_to_json(b)::text) FROM blobs b")
                # with a \u escape too (chr(1) is written \u0001), the payload is read as JSON
                other.execute(
                    "SELECT pg_notify('lictor_blobs', json_build_object('n', chr(1), 'b', data)::text) FROM blobs"
                )
            payloads = [n.payload for n in gen]
        assert len(payloads) == 3, payloads
        for payload in payloads:
            assert b"4111111111111111".hex() not in payload and b"jane@example.com".hex() not in payload, payload
            assert (b"*" * 12 + b"1111").hex() in payload, payload  # masked, still in hex
        assert json.loads(payloads[1])["id"] == 1  # still JSON
    finally:
        env.direct("DROP TABLE IF EXISTS blobs")


def test_a_statement_too_big_to_analyse_is_refused_before_it_is_parsed(env: PgEnv) -> None:
    # Parsing takes memory per token (a 2 MB IN list took the gateway 700 MB): past a bound the statement
    # is refused, with what to do instead. A long string constant is one token and passes.
    import psycopg

    with env.connect("readonly") as conn:
        listed = ",".join(["1"] * 150_000)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute(f"SELECT 1 WHERE 1 IN ({listed})")
        assert "more than 100,000 tokens" in str(err.value) and "smaller parts" in str(err.value), err.value
        assert conn.execute("SELECT length('" + "x" * 5_000_000 + "')").fetchone() == (5_000_000,)
        assert conn.execute("SELECT 1 WHERE 1 IN (" + ",".join(["1"] * 20_000) + ")").fetchone() == (1,)


def test_connections_that_never_log_in_cannot_take_every_descriptor_of_the_gateway(env: PgEnv) -> None:
    # Each connection that has not logged in holds a descriptor for up to a minute: a local process opened
    # 19,900 of them and left the gateway 65 descriptors for its agents' upstream connections and its files.
    import psycopg
    from lictor_addons.postgres._listener import MAX_SETTING_UP

    def refused() -> bool:
        try:
            with env.connect("readonly"):
                return False
        except psycopg.OperationalError as exc:
            assert "too many connections are being set up at this gateway at once" in str(exc), exc
            return True

    def served() -> bool:
        try:
            with env.connect("readonly") as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            return True
        except psycopg.OperationalError:
            return False

    with idle_connections(env.port, MAX_SETTING_UP):
        # the gateway accepts the idle ones in its own time; then one more is refused
        wait_until(refused, 10, "a refusal of the connection past the limit")
        with socket.create_connection(("127.0.0.1", env.port)) as late:  # told at once, before its startup packet
            late.settimeout(10)
            answer = late.recv(65536)
        assert answer[:1] == b"E" and b"C53300\0" in answer, answer
    wait_until(served, 10, "the slots to come back as the gateway sees the idle connections close")
    gw = env.gateway
    assert gw is not None
    events = [
        json.loads(line)
        for line in lictor("audit", "list", "--json", "--state-dir", str(gw.state_dir)).stdout.splitlines()
        if line.strip()
    ]
    refused = [e for e in events if e["kind"] == "connection.refused" and "setting up at once" in e.get("reason", "")]
    assert refused and refused[0]["count"] >= 1 and refused[0]["sqlstate"] == "53300", refused


def test_a_client_that_quits_is_audited_as_the_agent_closing_the_connection(env: PgEnv) -> None:
    # psql sends Terminate and closes; the gateway forwards the Terminate, and when the server's close
    # arrived before the agent's (now and then with psql, always with a client that lingers after its
    # Terminate), `lictor audit list` said "target closed the connection".
    marker = "quit-" + secrets.token_hex(4)
    client = RawClient(env.port, env.tokens["readonly"])
    client.send(pg.query(f"SELECT '{marker}'"))
    client.until_ready()
    client.send(pg.terminate())
    assert client.sock.recv(65536) == b""  # the gateway ends the connection; the client never closed it
    client.sock.close()
    gw = env.gateway
    assert gw is not None
    deadline = time.monotonic() + 30
    reasons: list[str] = []
    while time.monotonic() < deadline and not reasons:
        lines = lictor("audit", "list", "--json", "--state-dir", str(gw.state_dir)).stdout.splitlines()
        events = [json.loads(line) for line in lines if line.strip()]
        session = next(
            (e["session"] for e in events if e["kind"] == "decision" and marker in e["request"]["summary"]), None
        )
        reasons = [e["reason"] for e in events if e["kind"] == "session.end" and e["session"] == session]
        time.sleep(0.3)
    assert reasons == ["agent closed the connection"], reasons


def test_the_end_of_a_session_is_audited_with_who_and_where(env: PgEnv) -> None:
    # `lictor audit list --where identity.sub=...` showed an agent's session.start and decisions, not the end
    # of its sessions: session.end carried the session id only (the table's WHO and PROTO were blank).
    marker = "end-" + secrets.token_hex(4)
    env.psql("readonly", "-c", f"SELECT '{marker}'", check=True)
    gw = env.gateway
    assert gw is not None
    deadline = time.monotonic() + 30
    ends: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not ends:
        lines = lictor("audit", "list", "--json", "--state-dir", str(gw.state_dir)).stdout.splitlines()
        events = [json.loads(line) for line in lines if line.strip()]
        session = next(
            (e["session"] for e in events if e["kind"] == "decision" and marker in e["request"]["summary"]), None
        )
        filtered = lictor(
            "audit",
            "list",
            "--json",
            "--kind",
            "session.end",
            "--where",
            "identity.sub=agent-readonly",
            "--state-dir",
            str(gw.state_dir),
        ).stdout.splitlines()
        ends = [e for e in map(json.loads, filtered) if e["session"] == session]
        time.sleep(0.3)
    assert len(ends) == 1, ends
    assert ends[0]["protocol"] == "postgres" and ends[0]["target"] == "app", ends
    assert ends[0]["identity"]["sub"] == "agent-readonly" and ends[0]["peer"].startswith("127.0.0.1:"), ends


def _run_as(conn: Any, how: str, sql: str) -> str:
    """Run ``sql`` with libpq as a Query ("simple") or as Parse, Bind and Execute in one pipeline segment
    ("extended"), and return the SQLSTATE it failed with ("" if none)."""
    from psycopg import pq

    pgconn = conn.pgconn
    result = pgconn.exec_(sql.encode()) if how == "simple" else pgconn.exec_params(sql.encode(), [])
    if result.status == pq.ExecStatus.FATAL_ERROR:
        return (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
    return ""


@pytest.mark.parametrize("how", ["simple", "extended", "prepared"])
def test_a_statement_in_a_failed_transaction_is_refused_as_the_server_would_without_a_hold(
    env: PgEnv, how: str
) -> None:
    # In a transaction that has already failed the server refuses every statement but ROLLBACK/COMMIT with 25P02:
    # approvers must not be asked about a statement that cannot run. The transaction ends normally after.
    import psycopg
    from psycopg import pq

    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    with env.connect("writer", autocommit=False) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("SELECT 1")
        if how == "prepared":  # prepared before the transaction failed, run after
            assert conn.pgconn.prepare(b"held_truncate", b"TRUNCATE orders").status == pq.ExecStatus.COMMAND_OK
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        timer = threading.Timer(5.0, conn.cancel)  # a hold would wait for an approver: give up then
        timer.start()
        try:
            if how == "prepared":
                result = conn.pgconn.exec_prepared(b"held_truncate", [])
                state = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
            else:
                state = _run_as(conn, how, "TRUNCATE orders")
        finally:
            timer.cancel()
        assert state == "25P02", (state, notices)
        assert not any("waiting for approval" in n for n in notices), notices
        conn.rollback()
        assert conn.execute("SELECT count(*) > 0 FROM orders").fetchone() == (True,)
    pending = json.loads(lictor("approvals", "list", "--json", "--url", url, env=env_cli).stdout)
    assert not [a for a in pending if "TRUNCATE orders" in a.get("summary", "")], pending
    # In a failed transaction, ROLLBACK TO SAVEPOINT still runs, and what follows it is decided (and held) as ever.
    with env.connect("writer", autocommit=False) as conn:
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("SAVEPOINT s")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        timer = threading.Timer(2.0, conn.cancel)
        timer.start()
        state = _run_as(conn, "simple" if how == "simple" else "extended", "TRUNCATE orders")
        timer.join()
        assert state == "57014", state
        assert any("waiting for approval" in n for n in notices), notices
        conn.rollback()
    assert env.direct("SELECT count(*) > 0 FROM orders") == [(True,)]


def test_a_statement_held_at_its_bind_ends_at_the_sessions_statement_timeout(env: PgEnv) -> None:
    # As for a Query: a statement held at its Bind (Parse, Bind, Execute in one pipeline segment, where the
    # gateway cannot send a Query of its own) waits no longer than statement_timeout, and its request is withdrawn.
    import psycopg

    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    marker = "bind-timeout-" + secrets.token_hex(4)
    with env.connect("writer", dsn_extra={"options": "'-c statement_timeout=5min'"}) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("SET statement_timeout = '1500ms'")
        timer = threading.Timer(20.0, conn.cancel)  # without a bound the wait would last until the approval expires
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled) as info:
                conn.execute("TRUNCATE orders", prepare=True)
        finally:
            timer.cancel()
        assert "canceling statement due to statement timeout" in str(info.value), info.value
        assert "statement_timeout = 1.5s" in str(info.value)
        approval = next(n for n in notices if "waiting for approval " in n).split("waiting for approval ", 1)[1]
        approval = approval.split(":", 1)[0]
        shown = json.loads(lictor("approvals", "show", approval, "--json", "--url", url, env=env_cli).stdout)
        assert shown["status"] == "withdrawn", shown
        # Set earlier in the same pipeline segment, unsynchronized: the value the statement would run with.
        notices.clear()
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            with conn.pipeline():
                conn.execute("SET statement_timeout = 1000")
                conn.execute("SELECT %s::text", [marker])
                conn.execute("TRUNCATE orders")
        assert "statement_timeout = 1s" in str(info.value), info.value
        assert any("waiting for approval" in n for n in notices), notices
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
    assert env.direct("SELECT count(*) > 0 FROM orders") == [(True,)]
    recorded = _recorded_statements(env, marker, "TRUNCATE orders")
    ended = [s for s in recorded if s["sql"] == "TRUNCATE orders"]
    assert ended and ended[-1]["decision"] == "deny" and "statement_timeout = 1s" in ended[-1]["message"], recorded


def test_a_statement_held_at_its_bind_runs_once_approved_after_the_gateway_read_statement_timeout(env: PgEnv) -> None:
    # The gateway reads statement_timeout in the middle of the agent's unsynchronized segment: the agent's
    # unnamed statement and portal are untouched, and the approved statement runs as sent.
    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    table = "approved_" + secrets.token_hex(4)
    with env.connect("writer") as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("SET statement_timeout = '30s'")

        def approve_when_asked() -> None:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                for note in list(notices):
                    if "waiting for approval " in note:
                        approval = note.split("waiting for approval ", 1)[1].split(":", 1)[0]
                        lictor("approvals", "approve", approval, "--url", url, env=env_cli)
                        return
                time.sleep(0.1)

        approver = threading.Thread(target=approve_when_asked)
        approver.start()
        assert _run_as(conn, "extended", f"CREATE TABLE {table} (id int)") == ""
        approver.join()
        assert conn.execute("SHOW statement_timeout").fetchone() == ("30s",)
    try:
        assert env.direct(f"SELECT to_regclass('{table}') IS NOT NULL") == [(True,)]
    finally:
        env.direct(f"DROP TABLE IF EXISTS {table}")


@pytest.mark.parametrize("how", ["simple", "extended"])
def test_a_held_statement_is_audited_once_as_held_and_once_as_resolved(env: PgEnv, how: str) -> None:
    # A security team reads one decision event for the hold (approve) and one for how it ended: approved,
    # denied, cancelled by the agent, or given up at statement_timeout; the recording shows the same.
    gw = env.gateway
    assert gw is not None
    env_cli = {**os.environ, "LICTOR_TOKEN": env.tokens["dba"]}
    url = f"http://127.0.0.1:{env.approvals_port}"
    tag = secrets.token_hex(4)
    table = f"audited_{tag}"
    sql = {
        "approved": f"/* approved-{tag} */ CREATE TABLE {table} (id int)",
        "denied": f"/* denied-{tag} */ TRUNCATE orders",
        "cancelled": f"/* cancelled-{tag} */ TRUNCATE orders",
        "timed-out": f"/* timed-out-{tag} */ TRUNCATE orders",
    }
    try:
        with env.connect("writer") as conn:
            notices: list[str] = []
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))

            def act_when_asked(verdict: str) -> None:
                deadline = time.monotonic() + 15
                try:
                    while time.monotonic() < deadline:
                        for note in list(notices):
                            if "waiting for approval " in note:
                                if verdict == "cancel":
                                    conn.cancel()
                                else:
                                    approval = note.split("waiting for approval ", 1)[1].split(":", 1)[0]
                                    lictor("approvals", verdict, approval, "--url", url, "--reason", "ok", env=env_cli)
                                return
                        time.sleep(0.1)
                    conn.cancel()  # no hold to act on in time: the statement fails on its SQLSTATE instead
                except BaseException:
                    conn.cancel()  # the hold must not outlive the test
                    raise

            for outcome, verdict, state in (
                ("approved", "approve", ""),
                ("denied", "deny", "42501"),
                ("cancelled", "cancel", "57014"),
            ):
                notices.clear()
                actor = threading.Thread(target=act_when_asked, args=(verdict,))
                actor.start()
                assert _run_as(conn, how, sql[outcome]) == state, outcome
                actor.join()
            conn.execute("SET statement_timeout = 1500")
            assert _run_as(conn, how, sql["timed-out"]) == "57014"
    finally:
        env.direct(f"DROP TABLE IF EXISTS {table}")

    audit = [
        json.loads(line)
        for line in lictor(
            "audit", "list", "--json", "--kind", "decision", "--state-dir", str(gw.state_dir)
        ).stdout.splitlines()
        if line.strip()
    ]
    events = _recorded_events(env, f"approved-{tag}")
    for outcome, text in sql.items():
        mine = [e for e in audit if f"{outcome}-{tag}" in e["request"]["summary"]]
        if how == "extended":  # the Parse is decided (and audited) too, before the hold at the Bind
            assert mine[0]["phase"] == "decision" and mine[0]["approval_id"] is None, mine
            mine = mine[1:]
        assert [(e["phase"], e["action"]) for e in mine] == [
            ("decision", "approve"),
            ("approval", "allow" if outcome == "approved" else "deny"),
        ], (outcome, mine)
        assert mine[0]["request"]["digest"] == mine[1]["request"]["digest"]
        assert mine[1]["approval_id"], mine
        resolution = mine[1]["message"]
        if outcome == "cancelled":
            assert "withdrawn: the agent cancelled the statement while it was held" in resolution, resolution
        if outcome == "timed-out":
            assert "withdrawn: statement_timeout = 1.5s ran out" in resolution, resolution
        recorded = [e for e in events if e.get("kind") and f"{outcome}-{tag}" in json.dumps(e["data"])]
        decisions = [(e["data"]["phase"], e["data"]["action"]) for e in recorded if e["kind"] == "decision"]
        # (allowed decisions are not copied into a session's recording: its statement event says it ran)
        expected = [("decision", "approve")] + ([] if outcome == "approved" else [("approval", "deny")])
        if how == "extended":
            expected.insert(0, ("decision", "approve"))  # the Parse's
        assert decisions == expected, (outcome, decisions)
        statements = [e["data"] for e in recorded if e["kind"] == "statement"]
        assert len(statements) == 1, (outcome, recorded)
        assert statements[0]["decision"] == ("allow" if outcome == "approved" else "deny"), (outcome, statements)


def test_statements_after_a_refused_result_in_a_pipeline_do_not_run(env: PgEnv) -> None:
    # A result refused by the gateway (a binary value of a masked column it cannot mask) ends the pipeline for the
    # agent, which reads an error and then nothing until ReadyForQuery, as after a server error. The statements
    # after it in the same pipeline were still decided and sent: the server ran them, and the INSERT was
    # committed while the agent was told the pipeline had failed.
    env.direct("DELETE FROM accounts WHERE id = 77")
    c = RawClient(env.port, env.tokens["loader"])
    try:
        c.sock.settimeout(10)
        c.send(
            pg.parse("", "SELECT to_tsvector('simple', '4111 1111 1111 1111') AS v"),
            pg.bind("", "", (), (), (1,)),
            pg.execute(""),
            pg.parse("", "INSERT INTO accounts VALUES (77, 1)"),
            pg.bind("", ""),
            pg.execute(""),
            pg.sync(),
        )
        got = c.until_ready()
        assert [e.sqlstate for e in errors(got)] == ["42501"], names(got)
        assert "CommandComplete" not in names(got), names(got)
        c.send(pg.query("SELECT 1"))
        assert "DataRow" in names(c.until_ready())
    finally:
        c.close()
    assert env.direct("SELECT count(*) FROM accounts WHERE id = 77") == [(0,)]
