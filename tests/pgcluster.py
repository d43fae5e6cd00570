"""Throwaway PostgreSQL clusters for tests that need their own ``pg_hba.conf`` (SCRAM, md5, ...).

The machine's PostgreSQL at 127.0.0.1:5432 trusts every local connection, so it cannot prove that a
password method works. This module runs ``initdb`` and ``pg_ctl`` on a free port in a temporary directory
and removes everything afterwards. Use the ``pg_cluster`` fixture (module scope) by importing it into a test
module::

    from tests.pgcluster import pg_cluster  # noqa: F401  (registers the fixture)

    def test_something(pg_cluster):
        pg_cluster.execute("CREATE ROLE alice LOGIN PASSWORD 'secret'")
        ... connect to pg_cluster.host, pg_cluster.port ...

or start one by hand with ``with running_cluster(hba=[...]) as cluster:``.

The default ``pg_hba.conf`` trusts the superuser ``postgres`` (over the Unix socket and TCP), asks members
of the role ``md5_users`` (created with the cluster) for md5, and every other role for scram-sha-256. If
the PostgreSQL binaries are missing the tests are skipped, except under CI (``CI`` set) where that is a
failure.

PostgreSQL refuses to run as root; when the tests run as root the server runs as the ``postgres`` OS user
(``runuser``) in a directory owned by it.
"""

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

__all__ = ["DEFAULT_HBA", "PgCluster", "WireClient", "find_bindir", "pg_cluster", "running_cluster"]

SUPERUSER = "postgres"
MD5_GROUP = "md5_users"  # members of this role are asked for md5, every other role for SCRAM
DEFAULT_HBA = (
    "local all all trust",
    f"host all {SUPERUSER} 127.0.0.1/32 trust",
    f"host all +{MD5_GROUP} 127.0.0.1/32 md5",
    "host all all 127.0.0.1/32 scram-sha-256",
)
DEFAULT_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "40",
    "password_encryption": "'scram-sha-256'",
}


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb, or the one of ``pg_config``, or None."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"throwaway PostgreSQL cluster unavailable under CI: {reason}")
    pytest.skip(f"throwaway PostgreSQL cluster unavailable: {reason}")


class PgCluster:
    """A running throwaway cluster. ``host``/``port`` for TCP, ``socket_dir`` for the Unix socket."""

    host = "127.0.0.1"

    def __init__(self, base: Path, bindir: Path, port: int, run_as: str | None) -> None:
        self.base = base
        self.bindir = bindir
        self.port = port
        self.run_as = run_as
        self.data = base / "data"
        self.socket_dir = base
        self.log = base / "server.log"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr.strip()}\n{log}")

    def start(self, hba: Sequence[str], settings: Mapping[str, str]) -> None:
        initdb = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        )
        self._check(initdb, "initdb")
        conf = {**DEFAULT_SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.socket_dir}'"}
        conf.update(settings)
        with (self.data / "postgresql.conf").open("a") as fh:
            fh.write("\n".join(f"{k} = {v}" for k, v in conf.items()) + "\n")
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        started = self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"
        )
        self._check(started, "pg_ctl start")
        self.execute(f"CREATE ROLE {MD5_GROUP} NOLOGIN")

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def standby(self) -> "PgCluster":
        """Start a streaming standby of this cluster on a free port (its ``pg_hba.conf`` must let the superuser
        connect for replication over the Unix socket). Its files are under this cluster's directory; stop it
        with :meth:`stop` before this cluster goes."""
        base = self.base / "standby"
        base.mkdir()
        if self.run_as:
            owner = pwd.getpwnam(self.run_as)
            os.chown(base, owner.pw_uid, owner.pw_gid)
        other = PgCluster(base, self.bindir, free_port(), self.run_as)
        backup = self._run(
            str(self.bindir / "pg_basebackup"),
            *("-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER),
            *("-D", str(other.data), "-R", "-X", "stream", "--no-sync", "--checkpoint=fast"),
        )
        self._check(backup, "pg_basebackup")
        with (other.data / "postgresql.conf").open("a") as fh:
            fh.write(f"port = {other.port}\nunix_socket_directories = '{other.socket_dir}'\n")
        started = other._run(
            str(self.bindir / "pg_ctl"), "-D", str(other.data), "-l", str(other.log), "-w", "-t", "60", "start"
        )
        other._check(started, "pg_ctl start (standby)")
        return other

    def execute(self, sql: str, params: Sequence[Any] | None = None, dbname: str = "postgres") -> list[Any]:
        """Run ``sql`` as the superuser over the Unix socket (trusted); return the rows, if any."""
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=dbname, autocommit=True
        ) as conn:
            cur = conn.execute(sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []


@contextlib.contextmanager
def running_cluster(hba: Sequence[str] = DEFAULT_HBA, settings: Mapping[str, str] | None = None) -> Iterator[PgCluster]:
    """Start a throwaway cluster, yield it, then stop it and delete its files."""
    bindir = find_bindir()
    if bindir is None:
        _unavailable("initdb not found (install postgresql)")
        raise AssertionError("unreachable")
    run_as = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(SUPERUSER)
        except KeyError:
            _unavailable(f"running as root and there is no {SUPERUSER!r} OS user to run the server")
            raise AssertionError("unreachable") from None
        run_as = SUPERUSER
    base = Path(tempfile.mkdtemp(prefix="lictor-pg-"))
    if run_as:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    cluster = PgCluster(base, bindir, free_port(), run_as)
    try:
        cluster.start(hba, settings or {})
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway cluster with :data:`DEFAULT_HBA`, shared by the tests of one module."""
    with running_cluster() as cluster:
        yield cluster


class WireClient:
    """A minimal blocking PostgreSQL client built on the sans-IO codec, for protocol-level tests.

    It sends exactly the bytes it is given and returns decoded backend messages, so a test can drive any
    message sequence (pipelines, errors in the middle, COPY) against a real server or the gateway.
    """

    def __init__(self, host: str, port: int, *, timeout: float = 10, chunk: int = 65536) -> None:
        from lictor_addons.postgres import _protocol

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = _protocol.BackendReader()
        self.chunk = chunk
        self.pending: list[Any] = []
        self.auth_messages: list[Any] = []
        self.parameters: dict[str, str] = {}
        self.scram_verified = False

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def receive(self) -> list[Any]:
        """Block until at least one complete message arrives; feed the reader ``chunk`` bytes at a time."""
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            for start in range(0, len(data), self.chunk):
                self.pending.extend(self.reader.feed(data[start : start + self.chunk]))
        out, self.pending = self.pending, []
        return out

    def until_ready(self) -> list[Any]:
        """Messages up to and including the next ReadyForQuery."""
        from lictor_addons.postgres import _protocol

        messages: list[Any] = []
        while True:
            batch = self.receive()
            for index, message in enumerate(batch):
                messages.append(message)
                if isinstance(message, _protocol.ReadyForQuery):
                    self.pending = batch[index + 1 :]
                    return messages

    def login(self, user: str, database: str, password: str | None = None, **params: str) -> list[Any]:
        """Startup + authentication (trust, cleartext, md5 or SCRAM-SHA-256) up to ReadyForQuery."""
        from lictor_addons.postgres import _protocol as pg
        from lictor_addons.postgres import _scram

        self.send(pg.startup_message({"user": user, "database": database, **params}))
        scram: _scram.ScramClient | None = None
        messages: list[Any] = []
        while True:
            for message in self.receive():
                messages.append(message)
                match message:
                    case pg.AuthenticationCleartextPassword():
                        self.send(pg.password_message(password or ""))
                    case pg.AuthenticationMD5Password(salt=salt):
                        self.send(pg.password_message(_scram.md5_password(user, password or "", salt)))
                    case pg.AuthenticationSASL(mechanisms=mechanisms):
                        mechanism = _scram.choose_mechanism(mechanisms)
                        scram = _scram.ScramClient(password or "")
                        self.send(pg.sasl_initial_response(mechanism, scram.client_first()))
                    case pg.AuthenticationSASLContinue(data=data):
                        assert scram is not None
                        self.send(pg.sasl_response(scram.client_final(data)))
                    case pg.AuthenticationSASLFinal(data=data):
                        assert scram is not None
                        scram.verify_server_final(data)
                        self.scram_verified = True
                    case pg.ParameterStatus(name=name, value=value):
                        self.parameters[name] = value
                    case pg.ErrorResponse():
                        self.auth_messages = messages
                        return messages
                    case pg.ReadyForQuery():
                        self.auth_messages = messages
                        return messages

    def simple(self, sql: str) -> list[Any]:
        """Send a simple Query; return everything up to ReadyForQuery."""
        from lictor_addons.postgres import _protocol as pg

        self.send(pg.query(sql))
        return self.until_ready()

    def close(self) -> None:
        from lictor_addons.postgres import _protocol as pg

        with contextlib.suppress(OSError):
            self.sock.sendall(pg.terminate())
        self.sock.close()

    def __enter__(self) -> "WireClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
