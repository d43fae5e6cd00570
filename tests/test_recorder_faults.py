"""Recording under faults, with real servers and processes: a sink that goes away during 1,000
commands (a throwaway PostgreSQL cluster, an S3 server), a gateway killed with SIGKILL mid-session,
and a full disk under the spool in strict mode. Each ends with every acknowledged event stored
exactly once, in order, and every chain verifying."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lictor import AuditLog
from lictor.recorder import (
    PostgresSink,
    RecordingError,
    RemoteStore,
    Retention,
    S3Sink,
    list_sessions,
    load_session,
    verify_sessions,
)
from lictor.recorder._spool import SESSION, encode_record

from tests.conftest import ROOT, GatewayProcess, free_port, lictor, require, wait_port, wait_until
from tests.pgcluster import PgCluster, running_cluster
from tests.test_recorder import PACK, make_gateway, request, run_session, who
from tests.test_spool import tiny_tmpfs

MAIN_PG = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=2"


class MotoS3:
    """An S3 server (moto's server mode) that can be stopped and started again on its port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self._factory = ThreadedMotoServer
        self._server: Any = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = self._factory("127.0.0.1", self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()
        self._server._server.server_close()  # stop() alone leaves the port listening

    def sink(self, bucket: str) -> dict[str, Any]:
        return {
            "type": "s3",
            "name": "s3",
            "bucket": bucket,
            "prefix": "recordings",
            "endpoint_url": self.url,
            "region": "us-east-1",
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "create_bucket": True,
            "timeout": 2,
        }


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[MotoS3]:
    try:
        server = MotoS3()
    except ImportError:
        require(False, "moto[server] is not installed")
        raise
    yield server
    with contextlib.suppress(Exception):
        server.stop()


def s3_reader(moto: MotoS3, bucket: str) -> S3Sink:
    cfg = moto.sink(bucket)
    return S3Sink(
        "read",
        "",
        Retention(),
        bucket=bucket,
        prefix=cfg["prefix"],
        endpoint_url=cfg["endpoint_url"],
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )


def pg_ctl(cluster: PgCluster, *args: str) -> None:
    result = cluster._run(str(cluster.bindir / "pg_ctl"), "-D", str(cluster.data), "-l", str(cluster.log), "-w", *args)
    assert result.returncode == 0, result.stderr


def assert_exactly_once_in_order(sid: str, bodies: list[bytes], local_lines: list[bytes], commands: list[str]) -> None:
    """The remote copy is byte-identical to the local one, numbered without gaps, with ``commands``."""
    events = [json.loads(b) for b in bodies]
    assert [e["n"] for e in events] == list(range(len(events)))
    assert all(e["s"] == sid for e in events)
    assert bodies == local_lines
    assert [e["data"]["command"] for e in events if e["kind"] == "command"] == commands


def test_postgres_sink_outage_during_1000_commands(tmp_path: Path) -> None:
    with running_cluster() as cluster:
        dsn = f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres connect_timeout=1"
        commands = [f"echo {i}" for i in range(1010)]

        async def main() -> str:
            gw = make_gateway(tmp_path, {"sinks": [{"type": "postgres", "name": "pg", "dsn": dsn}]})
            await gw.start()
            session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
            for command in commands[:10]:
                assert (await session.decide(request(command))).allowed
                session.record("command", {"command": command})
            assert gw.recordings.flush(10)
            pg_ctl(cluster, "-m", "fast", "stop")
            started = time.monotonic()
            for command in commands[10:]:
                assert (await session.decide(request(command))).allowed  # agents are not held up
                session.record("command", {"command": command})
            took = time.monotonic() - started
            pg = next(d for d in gw.recordings.drainers if d.name == "pg")
            wait_until(lambda: not pg.healthy, 10, "the sink to notice the outage")
            assert pg.committed < gw.recordings.spool.written_seq
            assert gw.recordings.spool.total_bytes > 100_000  # held in the spool meanwhile
            assert took < 10, f"1000 commands took {took:.1f}s while the sink was down"
            pg_ctl(cluster, "start")
            assert gw.recordings.flush(30), gw.recordings.status()
            assert pg.healthy
            await session.close()
            await gw.stop()
            return session.id

        sid = asyncio.run(main())
        sink = PostgresSink("pg", dsn, "", Retention())
        records = sink.records()
        assert len({(r[0], r[1]) for r in records}) == len(records)
        assert [r[1] for r in records] == sorted(r[1] for r in records)
        manifest_raw, bodies = sink.load(sid)
        _, local = RemoteStore(sink).load_raw(sid)
        local_lines = (
            next((tmp_path / "state" / "recordings" / "sessions").glob(f"*/{sid}.jsonl")).read_bytes().splitlines()
        )
        assert_exactly_once_in_order(sid, bodies, local_lines, commands)
        decisions = [json.loads(r[3]) for r in records if r[2] == "audit" and json.loads(r[3])["kind"] == "decision"]
        assert [d["request"]["summary"] for d in decisions] == commands
        [verdict] = verify_sessions([sid], source=RemoteStore(sink, tmp_path / "state"))
        assert verdict.ok and verdict.signed, verdict
        assert json.loads(manifest_raw or b"{}")["manifest"]["events"] == len(bodies)
        sink.close()


def test_s3_sink_outage_during_1000_commands(tmp_path: Path, moto_s3: MotoS3) -> None:
    bucket = f"rec-{uuid.uuid4().hex[:8]}"
    commands = [f"echo {i}" for i in range(1000)]

    async def main() -> str:
        gw = make_gateway(tmp_path, {"sinks": [moto_s3.sink(bucket)]})
        await gw.start()
        session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
        assert gw.recordings.flush(10)
        moto_s3.stop()
        try:
            for command in commands:
                assert (await session.decide(request(command))).allowed
                session.record("command", {"command": command})
            s3 = next(d for d in gw.recordings.drainers if d.name == "s3")
            wait_until(lambda: not s3.healthy, 10, "the sink to notice the outage")
        finally:
            moto_s3.start()
        assert gw.recordings.flush(30), gw.recordings.status()
        await session.close()
        await gw.stop()
        return session.id

    sid = asyncio.run(main())
    reader = s3_reader(moto_s3, bucket)
    [gid] = reader.gateways()
    records = list(reader.records(gid))
    seqs = [r[0] for r in records]
    assert seqs == sorted(set(seqs))  # no record twice, in spool order
    manifest_raw, bodies = reader.load(sid)
    local_lines = (
        next((tmp_path / "state" / "recordings" / "sessions").glob(f"*/{sid}.jsonl")).read_bytes().splitlines()
    )
    assert_exactly_once_in_order(sid, bodies, local_lines, commands)
    decisions = [json.loads(b) for _, t, b in records if t == "audit"]
    assert [d["request"]["summary"] for d in decisions if d["kind"] == "decision"] == commands
    [verdict] = verify_sessions([sid], source=RemoteStore(reader, tmp_path / "state"))
    assert verdict.ok and verdict.signed, verdict
    assert [r["id"] for r in RemoteStore(reader).rows()] == [sid]


def _fresh_s3_sink(moto_s3: MotoS3) -> tuple[S3Sink, dict[str, Any]]:
    """An S3 sink of gateway gw1 on a new bucket, prepared, and the arguments that make it again."""
    cfg = moto_s3.sink(f"rec-{uuid.uuid4().hex[:8]}")
    args: dict[str, Any] = {
        k: cfg[k] for k in ("bucket", "prefix", "endpoint_url", "region", "access_key_id", "secret_access_key")
    }
    sink = S3Sink("s3", "gw1", Retention(), create_bucket=True, **args)
    assert sink.prepare(0) == 0
    return sink, args


def test_s3_adopts_a_batch_whose_offset_commit_was_lost(tmp_path: Path, moto_s3: MotoS3) -> None:
    from lictor.recorder import Record

    sink, args = _fresh_s3_sink(moto_s3)
    batch = [Record(seq, 2, b'{"kind":"x","ts":1,"i":%d}' % seq) for seq in range(1, 41)]
    sink.write(batch[:25])  # written, then the gateway died before committing offset 25
    restarted = S3Sink("s3", "gw1", Retention(), **args)
    committed = restarted.prepare(0)
    assert committed == 25  # the object is adopted instead of written again with other boundaries
    restarted.write(batch[25:])
    assert [r[0] for r in restarted.records("gw1")] == list(range(1, 41))


def test_s3_manifest_survives_a_failure_after_its_batch_was_written(tmp_path: Path, moto_s3: MotoS3) -> None:
    from lictor.recorder import Record

    sink, args = _fresh_s3_sink(moto_s3)
    event = b'{"s":"s1","n":0,"t":1,"kind":"session.start","dir":"gw","data":{},"prev":"' + b"0" * 64 + b'"}'
    manifest = b'{"manifest":{"session":"s1","events":1,"spool":{"gateway":"gw1","first":1,"last":1}},"sig":"x"}'
    batch = [Record(1, 1, event), Record(2, 3, manifest)]
    put = sink.client.put_object
    calls: list[str] = []

    def second_put_times_out(**kwargs: Any) -> Any:
        calls.append(kwargs["Key"])
        if len(calls) == 2:
            raise ConnectionError("read timeout")  # the other object of the batch may or may not be there
        return put(**kwargs)

    sink.client.put_object = second_put_times_out
    with pytest.raises(ConnectionError):
        sink.write(batch)
    sink.client.put_object = put
    committed = sink.prepare(0)  # the drainer retries: whatever was adopted is not written again
    if committed < 2:
        sink.write(batch)
    reader = s3_reader(moto_s3, args["bucket"])
    manifest_raw, lines = reader.load("s1")
    assert manifest_raw == manifest and lines == [event]
    assert [r["id"] for r in RemoteStore(reader).rows()] == ["s1"]


def line_client(port: int, token: str) -> tuple[socket.socket, Any]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    reader = sock.makefile("rb")
    sock.sendall(f"AUTH {token}\n".encode())
    assert reader.readline() == b"READY\n"
    return sock, reader


def test_gateway_killed_mid_session_drains_leftover_spool_on_restart(tmp_path: Path) -> None:
    import psycopg

    try:
        psycopg.connect(MAIN_PG).close()
    except psycopg.OperationalError as exc:
        require(False, f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    prefix = f"rec_{uuid.uuid4().hex[:8]}_"
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "pack.yaml").write_text(PACK)
    port = free_port()
    dead = free_port()  # nothing listens there: the PostgreSQL sink is unreachable in the first run
    config: dict[str, Any] = {
        "rulepacks": [str(packs)],
        "addons": [str(ROOT / "tests" / "addons" / "lineproto.py")],
        "targets": {"db": {"protocol": "line", "listen": f"127.0.0.1:{port}"}},
        "recordings": {
            "sinks": [
                {
                    "type": "postgres",
                    "name": "pg",
                    "dsn": f"host=127.0.0.1 port={dead} user=postgres dbname=test connect_timeout=1",
                    "table_prefix": prefix,
                }
            ]
        },
    }
    workdir = tmp_path / "gw"
    workdir.mkdir()
    gateway = GatewayProcess(workdir, config).start()
    try:
        wait_port(port)
        token = gateway.token("agent-1", role="ops")
        sock, reader = line_client(port, token)
        acked: list[str] = []
        for i in range(300):
            sock.sendall(f"echo {i}\n".encode())
            assert reader.readline().startswith(b"OK ")
            acked.append(f"echo {i}")
        drain_lock = gateway.state_dir / "spool" / "drain.lock"
        wait_until(lambda: drain_lock.exists() and drain_lock.read_text().strip() != "", 10, "the drain process")
        drain_pid = int(drain_lock.read_text())
        sock.sendall(b"".join(f"echo {i}\n".encode() for i in range(300, 3000)))
        time.sleep(0.05)
        os.kill(gateway.pid, signal.SIGKILL)  # mid-stream: commands in flight, nothing flushed
        assert gateway.proc is not None and gateway.proc.wait(10) == -signal.SIGKILL
        wait_until(lambda: not _running(drain_pid), 10, "the drain process to exit with its gateway")
        with contextlib.suppress(OSError):
            for line in iter(reader.readline, b""):
                assert line.startswith(b"OK ")
                acked.append(f"echo {len(acked)}")
        sock.close()
        assert 300 < len(acked) < 3000, len(acked)

        with psycopg.connect(MAIN_PG) as conn:  # the first run never reached PostgreSQL
            exists = conn.execute("SELECT to_regclass(%s)", (f"{prefix}events",)).fetchone()
            assert exists == (None,)
        # restart with PostgreSQL reachable: the leftover spool goes out, the session gets signed
        config["recordings"]["sinks"][0]["dsn"] = MAIN_PG
        gateway.start()
        recordings = gateway.state_dir / "recordings"

        def signed_everywhere() -> bool:
            rows = list_sessions(source=recordings)
            if not rows or not all(r["signed"] for r in rows):
                return False
            try:
                with psycopg.connect(MAIN_PG) as conn:
                    row = conn.execute(f"SELECT count(*) FROM {prefix}sessions WHERE manifest IS NOT NULL").fetchone()
            except psycopg.errors.UndefinedTable:
                return False  # the sink has not connected yet
            return row == (1,)

        wait_until(signed_everywhere, 30, "the restarted gateway to drain and sign the interrupted session")
        [row] = list_sessions(source=recordings)
        sid = row["id"]
        assert row["interrupted"]
        manifest, events = load_session(sid, source=recordings)
        recorded = [e["data"]["command"] for e in events if e["kind"] == "command"]
        assert recorded == [f"echo {i}" for i in range(len(recorded))]  # no gap, no duplicate
        assert recorded[: len(acked)] == acked  # every acknowledged command is there
        assert manifest is not None and manifest["interrupted"] and events[-1]["kind"] == "session.end"

        pg = PostgresSink("pg", MAIN_PG, "", Retention(), prefix=prefix)
        _, bodies = pg.load(sid)
        local_lines = next(recordings.glob(f"sessions/*/{sid}.jsonl")).read_bytes().splitlines()
        assert_exactly_once_in_order(sid, bodies, local_lines, recorded)
        keys = [(r[0], r[1]) for r in pg.records()]
        assert len(keys) == len(set(keys))

        gateway.stop()
        audit = AuditLog(gateway.state_dir / "audit.db")
        summaries = [e["request"]["summary"] for e in audit.events(kind="decision") if e.get("session") == sid]
        audit.close()
        assert summaries == [f"echo {i}" for i in range(len(summaries))] and len(summaries) >= len(recorded)

        state = str(gateway.state_dir)
        verified = lictor("sessions", "verify", "--all", "--state-dir", state)
        assert "1 session(s) checked, 0 failed" in verified.stdout and "interrupted" in verified.stdout
        from_pg = lictor("sessions", "verify", "--all", "-c", str(gateway.config_path), "--source", "pg")
        assert "0 failed" in from_pg.stdout
        assert "chain intact" in lictor("audit", "verify", "--state-dir", state).stdout
        pg.close()
    finally:
        gateway.stop()
        with psycopg.connect(MAIN_PG, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {prefix}events, {prefix}sessions")


def test_strict_mode_on_a_full_disk_refuses_and_loses_nothing(tmp_path: Path, moto_s3: MotoS3) -> None:
    bucket = f"rec-{uuid.uuid4().hex[:8]}"
    with tiny_tmpfs(tmp_path / "disk", "1m") as disk:

        async def main() -> tuple[str, list[str]]:
            gw = make_gateway(
                tmp_path,
                {
                    "spool": {
                        "path": str(disk / "spool"),
                        "max_bytes": "64MiB",  # the disk fills long before the spool limit
                        "segment_bytes": "32KiB",
                        "fsync_interval": "1h",  # only strict fsyncs happen in this test
                    },
                    "sinks": [moto_s3.sink(bucket)],
                },
            )
            await gw.start()
            spool = gw.recordings.spool
            assert gw.recordings.flush(10)
            moto_s3.stop()  # the S3 sink goes away: the spool keeps everything for it
            acked: list[str] = []
            refused = 0
            try:
                session = await gw.open_session(who("agent-1", "careful"), protocol="line", target="db", peer="p")
                for i in range(20_000):
                    command = f"echo {i}"
                    decision = await session.decide(request(command))
                    if not decision.allowed:
                        assert decision.rule_ids == ("lictor:audit-unavailable",)
                        refused += 1
                    else:
                        try:
                            session.record("command", {"command": command})
                        except RecordingError as exc:
                            assert "No space" in str(exc) or "disk full" in str(exc)
                            refused += 1
                        else:
                            assert spool.synced_seq == spool.written_seq  # strict: fsync'd before returning
                            acked.append(command)
                    if refused >= 20:
                        break
                assert refused >= 20 and len(acked) > 100, (refused, len(acked))
                assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize < 8192
            finally:
                moto_s3.start()
            assert gw.recordings.flush(30), gw.recordings.status()  # the sink catches up, segments go
            for i in range(3):
                command = f"echo after {i}"
                assert (await session.decide(request(command))).allowed
                session.record("command", {"command": command})
                acked.append(command)
            await session.close()
            await gw.stop()
            return session.id, acked

        sid, acked = asyncio.run(main())
    recordings = tmp_path / "state" / "recordings"
    manifest, events = load_session(sid, source=recordings)
    recorded = [e["data"]["command"] for e in events if e["kind"] == "command"]
    assert recorded == acked  # every acknowledged command, once, in order; nothing refused sneaked in
    [verdict] = verify_sessions(source=recordings)
    assert verdict.ok and verdict.signed, verdict
    reader = s3_reader(moto_s3, bucket)
    _, bodies = reader.load(sid)
    assert_exactly_once_in_order(
        sid, bodies, next(recordings.glob(f"sessions/*/{sid}.jsonl")).read_bytes().splitlines(), acked
    )
    assert manifest is not None and manifest["events"] == len(events)


def test_retention_in_postgres_and_s3(tmp_path: Path, moto_s3: MotoS3) -> None:
    import psycopg

    try:
        psycopg.connect(MAIN_PG).close()
    except psycopg.OperationalError as exc:
        require(False, f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    prefix = f"ret_{uuid.uuid4().hex[:8]}_"
    bucket = f"ret-{uuid.uuid4().hex[:8]}"

    async def main() -> list[str]:
        gw = make_gateway(
            tmp_path,
            {
                "sinks": [
                    {"type": "postgres", "name": "pg", "dsn": MAIN_PG, "table_prefix": prefix},
                    moto_s3.sink(bucket),
                ]
            },
        )
        await gw.start()
        ids = []
        for n in range(3):
            session = await gw.open_session(who(f"agent-{n}"), protocol="line", target="db", peer="p")
            for i in range(10):
                assert (await session.decide(request(f"echo {i}"))).allowed
                session.record("command", {"command": f"echo {i}"})
            await session.close()
            assert gw.recordings.flush(10)  # one batch (one S3 object) per session
            ids.append(session.id)
        await gw.stop()
        return ids

    ids = asyncio.run(main())
    try:
        pg = PostgresSink("pg", MAIN_PG, "", Retention(max_age=3600), prefix=prefix)
        assert pg.apply_retention(time.time()) == 0
        assert {r["id"] for r in pg.list_rows()} == set(ids)
        pg.retention = Retention(max_bytes=1)
        assert pg.apply_retention(time.time()) == 3  # oldest first, until under the limit
        pg.retention = Retention(max_age=60)
        pg.apply_retention(time.time() + 3600)
        assert pg.list_rows() == [] and pg.records() == []  # sessions and old audit events are gone
        pg.close()
    finally:
        with psycopg.connect(MAIN_PG, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {prefix}events, {prefix}sessions")
    s3 = s3_reader(moto_s3, bucket)
    [gid] = s3.gateways()
    objects = sorted(o["Key"] for o in s3._objects(s3.prefix))
    total = sum(int(o["Size"]) for o in s3._objects(s3.prefix))
    s3.retention = Retention(max_bytes=total // 2)
    removed = s3.apply_retention(time.time())
    left = sorted(o["Key"] for o in s3._objects(s3.prefix))
    assert removed > 0 and len(left) == len(objects) - removed
    assert sum(int(o["Size"]) for o in s3._objects(s3.prefix)) <= total // 2
    s3.retention = Retention(max_age=60)
    assert s3.apply_retention(time.time()) == 0
    assert s3.apply_retention(time.time() + 3600) == len(left)
    assert list(s3._objects(s3.prefix)) == []


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped yet, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_after_the_fact_audit_events_wait_out_a_full_disk(tmp_path: Path) -> None:
    # auth.failed, session.end, approvals' outcomes: nothing is left to refuse, so while the spool's
    # disk is full they wait in memory and reach the audit log, in order, once it takes writes again.
    with tiny_tmpfs(tmp_path / "disk", "1m") as disk:

        async def main() -> None:
            gw = make_gateway(
                tmp_path, {"spool": {"path": str(disk / "spool"), "max_bytes": "64MiB", "segment_bytes": "32KiB"}}
            )
            await gw.start()
            filler = disk / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
            try:
                for i in range(40):  # 40 x 300 bytes: more than the page the segment's end still has
                    reason = "bad token " + "x" * 300
                    gw.audit_event("auth.failed", {"peer": f"10.0.0.{i}", "reason": reason}, fail_closed=False)
                session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
            except RecordingError:
                session = None  # refused while the disk is full: nothing acknowledged
            assert session is None
            filler.unlink()
            await gw.open_session(who("agent-2"), protocol="line", target="db", peer="p")  # writes the backlog first
            assert gw.recordings.flush(30)
            await gw.stop()

        asyncio.run(main())
    log = AuditLog(tmp_path / "state" / "audit.db")
    try:
        failed = list(log.events(kind="auth.failed"))
        assert [e["peer"] for e in failed] == [f"10.0.0.{i}" for i in range(40)]
        assert any(e.get("delayed") is True for e in failed)  # the disk was full for some of them
        assert log.verify().ok
    finally:
        log.close()


def _line_gateway(tmp_path: Path) -> tuple[GatewayProcess, int]:
    packs = tmp_path / "packs"
    packs.mkdir(exist_ok=True)
    (packs / "pack.yaml").write_text(PACK)
    port = free_port()
    config: dict[str, Any] = {
        "rulepacks": [str(packs)],
        "addons": [str(ROOT / "tests" / "addons" / "lineproto.py")],
        "targets": {"db": {"protocol": "line", "listen": f"127.0.0.1:{port}"}},
        "recordings": {"stop_timeout": "1s"},
    }
    workdir = tmp_path / "gw"
    workdir.mkdir(exist_ok=True)
    return GatewayProcess(workdir, config), port


def _commands(port: int, token: str, commands: list[str]) -> None:
    sock, reader = line_client(port, token)
    with sock, reader:
        for command in commands:
            sock.sendall(f"{command}\n".encode())
            assert reader.readline().startswith(b"OK "), command


def test_an_audit_log_deleted_under_a_running_gateway_loses_no_event(tmp_path: Path) -> None:
    # SQLite goes on writing to a database file that was deleted: the drain process committed the audit
    # events of every later command into a file nobody can open, and the spool then let them go.
    gateway, port = _line_gateway(tmp_path)
    gateway.start()
    try:
        wait_port(port)
        token = gateway.token("agent-1", role="ops")
        _commands(port, token, ["echo before"])
        audit_db = gateway.state_dir / "audit.db"

        def audited_before() -> bool:
            with contextlib.closing(sqlite3.connect(f"file:{audit_db}?mode=ro", uri=True)) as db:
                return bool(db.execute("SELECT count(*) FROM events WHERE body LIKE '%echo before%'").fetchone()[0])

        wait_until(audited_before, 10, "the drain process to write the audit log")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{audit_db}{suffix}").unlink(missing_ok=True)
        _commands(port, token, [f"echo after {i}" for i in range(5)])
    finally:
        gateway.stop()
    gateway.start()  # a new audit log: what the spool still holds goes into it
    gateway.stop()
    log = AuditLog(gateway.state_dir / "audit.db")
    try:
        summaries = [e["request"]["summary"] for e in log.events(kind="decision")]
        assert summaries == [f"echo after {i}" for i in range(5)], summaries
    finally:
        log.close()
    verified = lictor("sessions", "verify", "--all", "--state-dir", str(gateway.state_dir), check=False)
    assert verified.returncode == 1 and "1 failed" in verified.stdout, (
        verified.stdout
    )  # the first session's start is gone


def test_recordings_deleted_under_a_running_gateway_lose_no_later_event(tmp_path: Path) -> None:
    # The local sink kept its index and the open session files: after `rm -rf recordings` (or of one session's
    # file) it went on writing into deleted files, so what was done afterwards was in no recording.
    gateway, port = _line_gateway(tmp_path)
    gateway.start()
    try:
        wait_port(port)
        token = gateway.token("agent-1", role="ops")
        recordings = gateway.state_dir / "recordings"

        def ask(reader: Any, sock: socket.socket, command: str) -> None:
            sock.sendall(f"{command}\n".encode())
            assert reader.readline().startswith(b"OK ")

        def stored(command: str) -> list[Path]:
            return [p for p in recordings.glob("sessions/*/*.jsonl") if command.encode() in p.read_bytes()]

        def committed(command: str) -> bool:
            files = stored(command)
            if not files:
                return False
            lines = len(files[0].read_bytes().splitlines())
            return any(r["events"] >= lines for r in list_sessions(source=recordings) if r["open"])

        sock, reader = line_client(port, token)
        with sock, reader:  # one session's file deleted while it runs
            ask(reader, sock, "echo one")
            wait_until(lambda: bool(stored("echo one")), 10, "the local sink")
            stored("echo one")[0].unlink()
            ask(reader, sock, "echo two")
        wait_until(lambda: bool(stored("echo two")), 10, "what followed in a new file")
        sock, reader = line_client(port, token)
        with sock, reader:  # the whole store deleted while a session runs
            ask(reader, sock, "echo before")
            # The line shows in the session file before the index and the drain position are written: a
            # deletion in between leaves the batch in the spool, and the restart rightly replays it.
            wait_until(lambda: committed("echo before"), 10, "the local sink to commit the batch")
            shutil.rmtree(recordings)
            ask(reader, sock, "echo during")
        _commands(port, token, [f"echo after {i}" for i in range(3)])
    finally:
        gateway.stop()
    gateway.start()  # what the spool still holds goes into a new store
    gateway.stop()
    rows = sorted(list_sessions(source=recordings), key=lambda r: r["started_at"])
    assert len(rows) == 2, rows  # the first session's row went with the old index
    commands = {
        r["id"]: [e["data"]["command"] for e in load_session(r["id"], source=recordings)[1] if e["kind"] == "command"]
        for r in rows
    }
    assert list(commands.values()) == [["echo during"], [f"echo after {i}" for i in range(3)]], commands
    verdicts = {v.session: v for v in verify_sessions(source=recordings)}
    assert not verdicts[rows[0]["id"]].ok and verdicts[rows[1]["id"]].ok  # the deleted start shows


def test_a_session_that_ends_on_a_full_disk_is_closed_once_the_disk_has_room(tmp_path: Path) -> None:
    # Its close could not be written, so its recording stayed open until the gateway stopped, while its
    # session.end reached the audit log: verify --all called it BROKEN ("the manifest is missing") meanwhile.
    with tiny_tmpfs(tmp_path / "disk", "1m") as disk:

        async def main() -> tuple[str, str]:
            gw = make_gateway(
                tmp_path, {"spool": {"path": str(disk / "spool"), "max_bytes": "64MiB", "segment_bytes": "32KiB"}}
            )
            await gw.start()
            session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
            assert (await session.decide(request("echo 1"))).allowed
            session.record("command", {"command": "echo 1"})
            filler = disk / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
            for _ in range(100):  # until the page the segment's end still has is full too
                if not (await session.decide(request("echo " + "x" * 300))).allowed:
                    break
            else:
                raise AssertionError("the disk never filled up")
            await session.close()  # the disk is full: neither its end nor its manifest can be written
            filler.unlink()
            other = await run_session(gw, "agent-2", ["echo 2"])
            assert gw.recordings.flush(30)
            state = str(tmp_path / "state")
            verified = await asyncio.to_thread(lictor, "sessions", "verify", "--all", "--state-dir", state, check=False)
            rows = {r["id"]: r for r in list_sessions()}
            await gw.stop()
            assert "2 session(s) checked, 0 failed" in verified.stdout, verified.stdout
            assert rows[session.id]["signed"] and not rows[session.id]["open"], rows
            return session.id, other

        first, _ = asyncio.run(main())
    _, events = load_session(first, source=tmp_path / "state" / "recordings")
    assert [e["kind"] for e in events][:2] == ["session.start", "command"] and events[-1]["kind"] == "session.end"
    assert events[-1]["data"]["reason"] == "closed"


def test_status_shows_a_recordings_sink_that_is_down(tmp_path: Path) -> None:
    # A sink that could not be written (database down) showed only in the gateway's log: `lictor status` gave the
    # spool's size, so nothing said that records were piling up for it.
    gateway, port = _line_gateway(tmp_path)
    dead = free_port()
    gateway.config["recordings"]["sinks"] = [
        {"type": "local"},
        {"type": "postgres", "name": "pg", "dsn": f"host=127.0.0.1 port={dead} dbname=x user=x connect_timeout=1"},
    ]
    gateway.start()
    try:
        wait_port(port)
        _commands(port, gateway.token("agent-1", role="ops"), ["echo one"])
        deadline = time.monotonic() + 30
        status = lictor("status", "--state-dir", str(gateway.state_dir), check=False)
        while "pg: unavailable" not in status.stdout and time.monotonic() < deadline:
            time.sleep(0.5)
            status = lictor("status", "--state-dir", str(gateway.state_dir), check=False)
        assert status.returncode == 0, status
        assert "sink      local: ok, " in status.stdout, status.stdout
        line = next(x for x in status.stdout.splitlines() if "pg: unavailable" in x)
        assert "records behind" in line and "connection failed" in line, line
    finally:
        gateway.stop()


def test_a_record_damaged_in_the_spool_loses_only_itself(tmp_path: Path, moto_s3: MotoS3) -> None:
    # A flipped bit in a record with whole records after it is damage in place, not a torn write: recovery
    # used to cut the segment there, and every later record a sink had not yet received was gone.
    bucket = f"rec-{uuid.uuid4().hex[:8]}"
    gateway, port = _line_gateway(tmp_path)
    gateway.config["recordings"]["sinks"] = [moto_s3.sink(bucket)]
    moto_s3.stop()  # the sink is down: everything stays in the spool
    try:
        gateway.start()
        wait_port(port)
        _commands(port, gateway.token("agent-1", role="ops"), [f"echo {i}" for i in range(10)])
        gateway.stop()
    finally:
        moto_s3.start()
    [segment] = (gateway.state_dir / "spool").glob("*.seg")
    data = bytearray(segment.read_bytes())
    damaged_at = data.index(b'"command":"echo 4"')
    data[damaged_at + 12] ^= 0x01
    segment.write_bytes(bytes(data))
    gateway.start()
    try:
        reader = s3_reader(moto_s3, bucket)

        def signed() -> bool:
            try:
                return any(True for _ in reader.manifests())
            except Exception:
                return False

        wait_until(signed, 30, "the restarted gateway to send the spool to S3")
    finally:
        gateway.stop()
    [gid] = reader.gateways()
    bodies = [json.loads(b) for _, t, b in reader.records(gid) if t == "session"]
    commands = [e["data"]["command"] for e in bodies if e["kind"] == "command"]
    assert commands == [f"echo {i}" for i in range(10) if i != 4]  # only the damaged record is lost
    assert bodies[-1]["kind"] == "session.end" and "interrupted" not in json.dumps(bodies[-1])
    [problem] = [e["problem"] for e in AuditLog(gateway.state_dir / "audit.db").events(kind="spool.recovered")]
    assert "checksum mismatch" in problem and "damaged and lost" in problem, problem
    assert len(list((gateway.state_dir / "spool" / "damaged").iterdir())) == 1  # kept for a look
    # the loss is not silent: the audit log's verification names it, and the session's chain in the sink
    # shows the missing event
    audit_verified = lictor("audit", "verify", "--state-dir", str(gateway.state_dir))
    assert "chain intact" in audit_verified.stdout and "WARNING: event" in audit_verified.stdout
    assert "spool.recovered" in audit_verified.stdout and "damaged and lost" in audit_verified.stdout
    verified = lictor("sessions", "verify", "--all", "-c", str(gateway.config_path), "--source", "s3", check=False)
    assert verified.returncode == 1 and "BROKEN" in verified.stdout, verified.stdout


def test_a_spool_recovery_the_full_spool_could_not_audit_is_audited_at_the_next_start(
    tmp_path: Path, moto_s3: MotoS3
) -> None:
    # A restart that cut a torn write from a full spool (the S3 sink down) could not audit spool.recovered and
    # only logged it; the next start found nothing to recover, so the audit log never said anything was cut.
    bucket = f"rec-{uuid.uuid4().hex[:8]}"
    gateway, port = _line_gateway(tmp_path)
    gateway.config["recordings"]["sinks"] = [moto_s3.sink(bucket)]
    gateway.config["recordings"]["spool"] = {"max_bytes": "32KiB"}
    moto_s3.stop()  # the sink is down: everything stays in the spool, until it is full
    try:
        gateway.start()
        wait_port(port)
        sock, reader = line_client(port, gateway.token("agent-1", role="ops"))
        with sock, reader:
            for i in range(1000):
                sock.sendall(f"echo {i} {'x' * 200}\n".encode())
                if not reader.readline().startswith(b"OK "):
                    break  # refused: the spool is full
            else:
                raise AssertionError("the spool never filled up")
        gateway.stop()
        segment = max((gateway.state_dir / "spool").glob("*.seg"))
        with open(segment, "ab") as fh:
            fh.write(encode_record(10**6, SESSION, b'{"never":"finished"}')[:30])  # a write the machine did not finish
        gateway.start()  # the spool is still full: the recovery cannot be audited now
        wait_port(port)
        gateway.stop()
    finally:
        moto_s3.start()
    audit = AuditLog(gateway.state_dir / "audit.db")
    assert not list(audit.events(kind="spool.recovered"))
    gateway.start()  # the sink is back: it drains the spool, which then takes writes again
    try:
        wait_port(port)
        token = gateway.token("agent-1", role="ops")

        def audited() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=15) as sock, sock.makefile("rb") as reader:
                sock.sendall(f"AUTH {token}\necho again\n".encode())
                reader.readline()  # the session is refused while the spool is still full
            return bool(list(audit.events(kind="spool.recovered")))

        wait_until(audited, 30, "the recovery to be audited once the spool takes writes")
    finally:
        gateway.stop()
    [problem] = [e["problem"] for e in audit.events(kind="spool.recovered")]
    assert "incomplete record" in problem and "cut 30 bytes" in problem, problem
    verified = lictor("audit", "verify", "--state-dir", str(gateway.state_dir))
    assert "chain intact" in verified.stdout and "cut 30 bytes" in verified.stdout, verified.stdout


def test_a_session_a_crash_left_open_has_its_end_audited_so_its_manifest_cannot_go_unseen(tmp_path: Path) -> None:
    # A session the killed gateway left open was signed at the restart, but its end reached no audit log: its
    # manifest deleted and its last events cut, with its index row marked open again, it verified as a session
    # still open ("UNSIGNED", 0 failed) and its end and the denial before it were gone.
    gateway, port = _line_gateway(tmp_path)
    gateway.start()
    try:
        wait_port(port)
        sock, reader = line_client(port, gateway.token("agent-1", role="ops"))
        for command in ("echo one", "rm -rf /data"):
            sock.sendall(f"{command}\n".encode())
            reader.readline()
        os.kill(gateway.pid, signal.SIGKILL)
        assert gateway.proc is not None and gateway.proc.wait(10) == -signal.SIGKILL
        sock.close()
        gateway.start()  # signs the session as interrupted
        wait_port(port)
    finally:
        gateway.stop()
    state = gateway.state_dir
    [row] = list_sessions(source=state / "recordings")
    assert row["interrupted"] and row["signed"]
    log = AuditLog(state / "audit.db")
    try:
        [end] = [e for e in log.events(kind="session.end") if e["session"] == row["id"]]
    finally:
        log.close()
    assert end["interrupted"] is True and end["identity"]["sub"] == "agent-1" and end["protocol"] == "line"
    verified = lictor("sessions", "verify", "--all", "--state-dir", str(state), check=False)
    assert verified.returncode == 0 and "interrupted" in verified.stdout, verified.stdout
    manifest = json.loads(next((state / "recordings").glob(f"sessions/*/{row['id']}.manifest.json")).read_text())
    assert manifest["manifest"]["audited_end"] is True

    [path] = (state / "recordings").glob(f"sessions/*/{row['id']}.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(line for line in lines if b'"kind":"session.end"' not in line))
    next(path.parent.glob(f"{row['id']}.manifest.json")).unlink()
    with contextlib.closing(sqlite3.connect(state / "recordings" / "index.db")) as db, db:
        db.execute("UPDATE sessions SET ended_at = NULL, signed = 0, interrupted = 0 WHERE id = ?", (row["id"],))
    verified = lictor("sessions", "verify", "--all", "--state-dir", str(state), check=False)
    assert verified.returncode == 1 and "the manifest is missing, but the audit log records the end" in verified.stdout


def test_http_agents_are_told_the_gateway_cannot_record_when_the_spool_is_full(tmp_path: Path) -> None:
    # A full spool (here: the local sink held up by a lock on the audit log) refuses new sessions: the HTTP target
    # answered "500 internal error in the gateway" (rule lictor:addon-error) and logged a traceback per request.
    # It is no fault of the gateway: 503, lictor:audit-unavailable, retry later, one line in the log.
    import urllib.error
    import urllib.request

    port = free_port()
    target = {"protocol": "http", "listen": f"127.0.0.1:{port}", "upstream": "http://127.0.0.1:9"}
    config = {
        "rulepacks": [],
        "targets": {"api": {**target, "tls": {"enabled": False}}},
        "recordings": {"stop_timeout": "1s", "spool": {"max_bytes": "24KiB", "segment_bytes": "8KiB"}},
    }
    gateway = GatewayProcess(tmp_path, config).start()
    statuses: list[int] = []
    answers: list[dict[str, Any]] = []
    try:
        wait_port(port)
        token = gateway.token("agent-1")
        with contextlib.closing(sqlite3.connect(gateway.state_dir / "audit.db", isolation_level=None)) as lock:
            lock.execute("BEGIN EXCLUSIVE")  # the drain process cannot commit: the spool only grows
            for _ in range(60):
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/x", headers={"Authorization": f"Bearer {token}"}
                )
                try:
                    urllib.request.urlopen(request, timeout=10)
                except urllib.error.HTTPError as refused:
                    statuses.append(refused.code)
                    answers.append(json.loads(refused.read()))
                if statuses[-1] == 503:
                    break
            lock.execute("COMMIT")
    finally:
        gateway.stop()
    assert statuses[0] == 403 and statuses[-1] == 503, statuses  # denied by default, then not recordable
    assert set(statuses) <= {403, 503}, statuses
    assert answers[-1]["rule"] == "lictor:audit-unavailable" and "retry later" in answers[-1]["hint"], answers[-1]
    log = gateway.log_path.read_text()
    assert "request not forwarded: it cannot be recorded" in log and "Traceback" not in log, log[-3000:]


def test_the_command_line_says_what_a_dead_gateway_left_in_its_spool(tmp_path: Path) -> None:
    # Killed while its local sink was behind, a gateway leaves records in its spool that reach the audit log and
    # the recordings only when it starts again: meanwhile `audit verify` said "audit log OK" and `sessions list`
    # showed the store as if it were everything, with no word of the denials still waiting in the spool.
    gateway, port = _line_gateway(tmp_path)
    gateway.start()
    state = str(gateway.state_dir)
    try:
        wait_port(port)
        token = gateway.token("agent-1", role="ops")
        _commands(port, token, ["echo stored"])
        assert "left" not in lictor("audit", "verify", "--state-dir", state).stderr
        with contextlib.closing(sqlite3.connect(gateway.state_dir / "audit.db", isolation_level=None)) as lock:
            lock.execute("BEGIN EXCLUSIVE")  # the drain process cannot store anything more
            _commands(port, token, ["echo waiting", "echo more"])
            os.kill(gateway.pid, signal.SIGKILL)
            assert gateway.proc is not None and gateway.proc.wait(10) == -signal.SIGKILL
            lock.execute("COMMIT")
        for args in (("audit", "verify"), ("sessions", "list")):
            shown = lictor(*args, "--state-dir", state, check=False)
            assert "audit and session record(s) that are not stored yet" in shown.stderr, (args, shown.stderr)
            assert "echo waiting" not in shown.stdout, (args, shown.stdout)
        gateway.start()  # stores what the spool held
    finally:
        gateway.stop()
    shown = lictor("audit", "list", "--state-dir", state)
    assert "echo waiting" in shown.stdout and "not stored yet" not in shown.stderr, shown.stderr
