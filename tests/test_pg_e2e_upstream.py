"""The gateway's own login to PostgreSQL (SCRAM-SHA-256, md5, TLS verified with a CA), target selection by
database name, TLS required from non-loopback agents, and credentials that never leave the gateway.

A throwaway cluster (tests/pgcluster.py) provides password authentication; a real ``lictor run`` process
sits in front of it; agents are psycopg and psql.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lictor_addons.postgres._tls import ensure_certificate

from tests.conftest import LICTOR, GatewayProcess, free_port, lictor, require, wait_until
from tests.pgcluster import DEFAULT_HBA, PgCluster, running_cluster

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
SCRAM_PASSWORD = "scr4m-Pässword-" + os.urandom(4).hex()
MD5_PASSWORD = "md5-secret-" + os.urandom(4).hex()
TLS_PASSWORD = "tls-secret-" + os.urandom(4).hex()
PACK = """
format: lictor/v1
metadata: {name: upstream-test}
identities:
  - match: {claims: {role: dba}}
    roles: [dba]
roles:
  dba:
    rules:
      - {id: all, protocol: postgres, when: {statements: "*"}, action: allow}
"""


def _non_loopback_address() -> str | None:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    for address in out:
        if ":" in address or address.startswith("127."):
            continue
        try:
            with socket.socket() as s:
                s.bind((address, 0))
            return address
        except OSError:
            continue
    return None


class Env:
    def __init__(
        self, cluster: PgCluster, gateway: GatewayProcess, ports: dict[str, int], token: str, ca: Path
    ) -> None:
        self.cluster = cluster
        self.ca = ca
        self.gateway = gateway
        self.ports = ports
        self.token = token

    def connect(
        self, port_name: str, dbname: str = "app", host: str = "127.0.0.1", password: str | None = None, **kw: Any
    ) -> Any:
        import psycopg

        return psycopg.connect(
            host=host,
            port=self.ports[port_name],
            user="agent",
            dbname=dbname,
            password=password or self.token,
            connect_timeout=5,
            autocommit=True,
            **kw,
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require(shutil.which("psql") is not None, "psql is not installed")
    work = tmp_path_factory.mktemp("pg-upstream")
    # The server runs as the postgres OS user (when the tests run as root): its key lives where it can read it.
    certs = Path(tempfile.mkdtemp(prefix="lictor-pg-tls-"))
    cert, key, ca = ensure_certificate(certs / "tls", ["localhost"])
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (certs, certs / "tls", cert, key):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    try:
        yield from _env(work, cert, key, ca)
    finally:
        shutil.rmtree(certs, ignore_errors=True)


def _env(work: Path, cert: Path, key: Path, ca: Path) -> Iterator[Env]:
    hba = (
        "hostssl all tls_app 127.0.0.1/32 scram-sha-256",
        "host all tls_app 127.0.0.1/32 reject",
        # pgcluster's "/^md5_" line is a regular expression only from PostgreSQL 16 on: name the role.
        "host all md5_app 127.0.0.1/32 md5",
        *DEFAULT_HBA,
    )
    settings = {"ssl": "on", "ssl_cert_file": f"'{cert}'", "ssl_key_file": f"'{key}'"}
    with running_cluster(hba=hba, settings=settings) as cluster:
        cluster.execute("CREATE DATABASE app")
        cluster.execute(f"CREATE ROLE app_scram LOGIN PASSWORD '{SCRAM_PASSWORD}'")
        cluster.execute(f"CREATE ROLE tls_app LOGIN PASSWORD '{TLS_PASSWORD}'")
        cluster.execute(f"SET password_encryption = 'md5'; CREATE ROLE md5_app LOGIN PASSWORD '{MD5_PASSWORD}'")
        cluster.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)", dbname="app")
        cluster.execute("GRANT SELECT ON t TO app_scram, md5_app, tls_app", dbname="app")
        ports = {name: free_port() for name in ("shared", "tls", "badpw", "remote", "socket", "limited")}
        base = {"host": cluster.host, "port": cluster.port, "database": "app", "sslmode": "disable"}
        targets: dict[str, Any] = {
            "scram": {
                "protocol": "postgres",
                "listen": f"127.0.0.1:{ports['shared']}",
                "upstream": {**base, "user": "app_scram", "password": SCRAM_PASSWORD},
            },
            "md5": {
                "protocol": "postgres",
                "listen": f"127.0.0.1:{ports['shared']}",
                "upstream": {**base, "user": "md5_app", "password": MD5_PASSWORD},
            },
            "tls": {
                "protocol": "postgres",
                "listen": f"127.0.0.1:{ports['tls']}",
                "upstream": {
                    **base,
                    "host": "localhost",
                    "user": "tls_app",
                    "password": TLS_PASSWORD,
                    "sslmode": "verify-full",
                    "sslrootcert": str(ca),
                },
            },
            "socket": {  # PGHOST=/run/postgresql: a directory names the server's Unix-domain socket, as in libpq
                "protocol": "postgres",
                "listen": f"127.0.0.1:{ports['socket']}",
                # sslmode applies to TCP only (libpq ignores it for a socket, and so does the gateway)
                "upstream": {**base, "host": str(cluster.socket_dir), "user": "app_scram", "sslmode": "require"},
            },
            "limited": {
                "protocol": "postgres",
                "listen": f"127.0.0.1:{ports['limited']}",
                "max_connections": 2,
                "upstream": {**base, "user": "app_scram", "password": SCRAM_PASSWORD},
            },
            "badpw": {
                "protocol": "postgres",
                "listen": f"127.0.0.1:{ports['badpw']}",
                "upstream": {**base, "user": "app_scram", "password": "wrong-" + SCRAM_PASSWORD},
            },
        }
        remote = _non_loopback_address()
        if remote is not None:
            targets["remote"] = {
                "protocol": "postgres",
                "listen": f"{remote}:{ports['remote']}",
                "upstream": {**base, "user": "app_scram", "password": SCRAM_PASSWORD},
            }
        (work / "packs").mkdir()
        (work / "packs" / "pack.yaml").write_text(PACK)
        config = {
            "version": 1,
            "state_dir": str(work / "state"),
            "identity": {"issuers": [{"type": "lictor"}]},
            "rulepacks": [str(work / "packs")],
            "targets": targets,
        }
        gateway = GatewayProcess(work, config).start()
        try:
            token = gateway.token("agent-dba", role="dba")
            e = Env(cluster, gateway, ports, token, ca)
            e.remote = remote  # type: ignore[attr-defined]
            yield e
        finally:
            gateway.stop()


def test_scram_and_md5_logins_and_target_selection_by_database(env: Env) -> None:
    with env.connect("shared", dbname="scram") as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("app_scram", "app")
        assert conn.execute("SELECT x FROM t").fetchone() == (1,)
    with env.connect("shared", dbname="md5") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5_app",)
    # The upstream database name selects the target too; an unknown one is refused with the choices.
    with env.connect("shared", dbname="app") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    import psycopg

    with pytest.raises(psycopg.OperationalError) as info:
        env.connect("shared", dbname="nope")
    assert "not served by this gateway" in str(info.value) and "md5, scram" in str(info.value)


def test_an_identity_has_a_bounded_number_of_connections(env: Env) -> None:
    # Each agent connection holds a server backend: an agent looping over connections took them all.
    import psycopg

    held = [env.connect("limited", dbname="limited") for _ in range(2)]
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            env.connect("limited", dbname="limited")
        assert "agent-dba already has 2 connections open to target 'limited'" in str(info.value)
        other = env.gateway.token("agent-other", role="dba")
        with env.connect("limited", dbname="limited", password=other) as conn:  # another identity is not held up
            assert conn.execute("SELECT 1").fetchone() == (1,)
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the gateway sees the close a moment later
            try:
                again = env.connect("limited", dbname="limited")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        held.append(again)
        assert again.execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in held:
            conn.close()


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER USER current_user PASSWORD 'known-to-the-agent'",  # what psql's \password sends
        "ALTER ROLE app_scram PASSWORD 'known-to-the-agent'",
        "ALTER ROLE session_user SET search_path = agent_schema, public",
        "ALTER ROLE current_role SET statement_timeout = 1",
        "ALTER ROLE ALL SET work_mem = '64kB'",
        "DO $$ BEGIN ALTER ROLE app_scram SET search_path = agent_schema; END $$",
    ],
)
def test_the_gateway_login_role_cannot_be_changed_through_the_gateway(env: Env, sql: str) -> None:
    # Every statement is allowed to this agent, but not a change to the role the gateway logs in as: a
    # password set there would give the agent the gateway's credential, and every other agent's sessions
    # run as that role.
    import psycopg

    def login_state() -> list[Any]:
        return env.cluster.execute(
            "SELECT a.rolpassword, a.rolvaliduntil, a.rolcanlogin, s.setconfig FROM pg_authid a "
            "LEFT JOIN pg_db_role_setting s ON s.setrole = a.oid WHERE a.rolname = 'app_scram'"
        )

    before = login_state()
    with env.connect("shared", dbname="scram") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
        conn.execute(sql)
    assert "lictor:gateway-login" in str(info.value.diag.message_detail), info.value.diag.message_detail
    assert "the role the gateway itself logs in as ('app_scram'" in str(info.value)
    assert login_state() == before
    with env.connect("shared", dbname="scram") as conn:  # the gateway still logs in
        assert conn.execute("SELECT current_user").fetchone() == ("app_scram",)


def test_upstream_tls_verified_with_the_configured_ca(env: Env) -> None:
    with env.connect("tls") as conn:
        row = conn.execute("SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == ("tls_app", True)


@pytest.mark.parametrize(("example", "claim"), [("postgres", "role=readonly"), ("quickstart", "access=read")])
def test_the_examples_verify_the_target_against_the_ca_pgsslrootcert_names(
    env: Env, tmp_path: Path, example: str, claim: str
) -> None:
    # The examples take their target from libpq's variables; with PGSSLMODE=verify-full they checked the server
    # against the system's CAs only, so a database with its own CA (the usual case) could not be reached at all.
    config = str(ROOT / "examples" / example / "lictor.yaml")
    port = free_port()
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LICTOR_"))}
    gateway_env = {
        **variables,
        "LICTOR_STATE_DIR": str(tmp_path / "state"),
        "LICTOR_PG_PORT": str(port),
        "LICTOR_APPROVALS_PORT": str(free_port()),
        "PGHOST": "localhost",
        "PGPORT": str(env.cluster.port),
        "PGUSER": "tls_app",
        "PGPASSWORD": TLS_PASSWORD,
        "PGDATABASE": "app",
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(env.ca),
    }
    # A file that holds no CA certificate stops the gateway at start, naming the file (not the server).
    (tmp_path / "not-a-ca.pem").write_text("not a certificate\n")
    checked = lictor(
        "check", "-c", config, env={**gateway_env, "PGSSLROOTCERT": str(tmp_path / "not-a-ca.pem")}, check=False
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert f"upstream.sslrootcert {tmp_path / 'not-a-ca.pem'}: cannot load it as CA certificates" in checked.stdout

    ready = tmp_path / "ready"
    with (tmp_path / "gateway.log").open("wb") as log:
        gateway = subprocess.Popen(
            [LICTOR, "run", "-c", config, "--ready-file", str(ready)], env=gateway_env, stdout=log, stderr=log
        )
    try:
        wait_until(ready.exists, 30, f"the {example} example's gateway to listen")
        token = lictor("token", "issue", "-c", config, "--sub", "agent-1", "--claim", claim, env=gateway_env)
        out = subprocess.run(
            ["psql", f"host=127.0.0.1 port={port} dbname=app user=agent-1 sslmode=disable", "-XAtc",
             "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
            env={**variables, "PGPASSWORD": token.stdout.strip(), "PGCONNECT_TIMEOUT": "5"},
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)
    assert (out.returncode, out.stdout.strip()) == (0, "tls_app|t"), out.stderr + (tmp_path / "gateway.log").read_text()


def test_an_upstream_host_that_is_a_directory_is_reached_through_its_unix_socket(env: Env) -> None:
    import threading

    import psycopg

    with env.connect("socket", dbname="socket") as conn:
        row = conn.execute("SELECT current_user, inet_server_addr() IS NULL FROM t").fetchone()
        assert row == ("app_scram", True)  # no server address: the gateway came in over the socket
        # A cancel goes to the same socket.
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_failed_upstream_login_tells_the_agent_nothing_secret(env: Env) -> None:
    import psycopg

    with pytest.raises(psycopg.OperationalError) as info:
        env.connect("badpw")
    text = str(info.value)
    assert "cannot connect to target 'badpw'" in text
    assert "app_scram" not in text and SCRAM_PASSWORD not in text and "password" not in text.lower()


def test_passwords_never_reach_logs_state_or_recordings(env: Env) -> None:
    import psycopg

    with env.connect("shared", dbname="scram") as conn:
        conn.execute("SELECT 1").fetchone()
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT * FROM pg_authid")  # the server's own error comes back untouched
        assert SCRAM_PASSWORD not in str(info.value)
    env.gateway.stop()  # flush everything to disk
    try:
        secrets_ = [p.encode() for p in (SCRAM_PASSWORD, MD5_PASSWORD, TLS_PASSWORD)]
        checked = 0
        for path in [env.gateway.log_path, *env.gateway.state_dir.rglob("*")]:
            if path.is_file():
                data = path.read_bytes()
                checked += 1
                for secret in secrets_:
                    assert secret not in data, f"a target password leaked into {path}"
        assert checked > 3
    finally:
        env.gateway.start()


def test_plaintext_from_a_non_loopback_peer_is_refused(env: Env) -> None:
    import psycopg

    remote = getattr(env, "remote", None)
    if remote is None:
        pytest.skip("this machine has no non-loopback IPv4 address to test from")
    with pytest.raises(psycopg.OperationalError) as info:
        env.connect("remote", host=remote, sslmode="disable")
    assert "TLS is required" in str(info.value)
    with env.connect("remote", host=remote, sslmode="require") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app_scram",)
