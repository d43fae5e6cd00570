"""Session recording through a real Gateway: chains, manifests, listing, replay, export, verify."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from lictor import (
    AddonManager,
    AuditLog,
    ConfigError,
    Decision,
    Gateway,
    GatewayConfig,
    Glob,
    Identity,
    Loader,
    Request,
)
from lictor import Vocabulary as _Vocabulary
from lictor.recorder import (
    LocalSink,
    Offset,
    RecordingError,
    RecordingsConfig,
    Retention,
    SessionRecorder,
    asciicast_lines,
    current_recorder,
    list_sessions,
    load_session,
    replay,
    verify_sessions,
)

from tests.conftest import LICTOR, wait_until

PACK = """
format: lictor/v1
metadata: {name: recording-tests, owner: sec}
identities:
  - match: {claims: {role: ops}}
    roles: [ops]
  - match: {claims: {role: careful}}
    roles: [careful]
roles:
  ops:
    rules:
      - {id: ok, protocol: line, when: {verbs: [echo, select, ls]}, action: allow}
      - {id: no-rm, protocol: line, when: {verbs: [rm]}, action: deny, message: no deleting here}
  careful:
    recording: strict
    rules:
      - {id: careful-ok, protocol: line, when: {verbs: [echo]}, action: allow}
"""


class LineVocabulary:
    """Just the rule vocabulary of the ``line`` test protocol."""

    name = "line-vocabulary"

    def load(self, loader: Loader) -> None:
        loader.add_vocabulary(
            _Vocabulary(
                protocol="line",
                fields=(Glob("commands", attr="command"), Glob("verbs", attr="verb")),
                index="verbs",
            )
        )


def make_gateway(tmp: Path, recordings: Mapping[str, Any] | None = None) -> Gateway:
    pack = tmp / "packs" / "pack.yaml"
    pack.parent.mkdir(parents=True, exist_ok=True)
    pack.write_text(PACK)
    config = GatewayConfig.default(tmp / "state", [str(pack.parent)])
    if recordings is not None:
        config.raw = {**config.raw, "recordings": dict(recordings)}
    manager = AddonManager()
    manager.add(LineVocabulary())
    return Gateway(config, manager)


def request(command: str) -> Request:
    verb = command.split()[0]
    return Request("line", verb, {"command": command, "verb": verb}, target="db", summary=command, payload=command)


def who(sub: str, role: str = "ops") -> Identity:
    return Identity(sub, {"role": role}, issuer="lictor")


async def run_session(gw: Gateway, sub: str, commands: list[str], *, target: str = "db", role: str = "ops") -> str:
    session = await gw.open_session(who(sub, role), protocol="line", target=target, peer="127.0.0.1:5555")
    for command in commands:
        decision = await session.decide(request(command))
        if decision.allowed:
            session.record("command", {"command": command})
    await session.close()
    return session.id


def _one_session(tmp_path: Path, commands: list[str]) -> str:
    """The id of a session of agent-1 that ran ``commands`` through a gateway started and stopped for it."""

    async def main() -> str:
        gw = make_gateway(tmp_path)
        await gw.start()
        sid = await run_session(gw, "agent-1", commands)
        await gw.stop()
        return sid

    return asyncio.run(main())


def lictor_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LICTOR, *args], capture_output=True, text=True, timeout=60)


def test_session_is_recorded_chained_and_signed(tmp_path: Path) -> None:
    sid = _one_session(tmp_path, ["echo hello", "rm -rf /data", "ls /tmp"])
    recordings = tmp_path / "state" / "recordings"
    manifest, events = load_session(sid, source=recordings)
    assert [e["kind"] for e in events] == ["session.start", "command", "decision", "command", "session.end"]
    assert [e["n"] for e in events] == list(range(5))
    assert events[1]["data"] == {"command": "echo hello"} and events[1]["dir"] == "in"
    denied = events[2]["data"]
    assert denied["action"] == "deny" and denied["rule_ids"] == ["no-rm"] and denied["summary"] == "rm -rf /data"
    assert manifest is not None and manifest["events"] == 5 and manifest["interrupted"] is False
    assert manifest["decisions"] == {"allow": 2, "deny": 1}
    assert manifest["identity"]["sub"] == "agent-1"
    [verdict] = verify_sessions(source=recordings)
    assert verdict.ok and verdict.signed, verdict
    # every decision reached the audit chain exactly once, through the spool
    from lictor import AuditLog

    audit = AuditLog(tmp_path / "state" / "audit.db")
    decisions = [e for e in audit.events(kind="decision") if e.get("session") == sid]
    assert [d["request"]["summary"] for d in decisions] == ["echo hello", "rm -rf /data", "ls /tmp"]
    assert audit.verify().ok
    audit.close()


def test_cli_verify_strict_does_not_call_an_open_session_altered(tmp_path: Path) -> None:
    # `sessions verify --all --strict` while an agent was still connected summed up as "1 failed — recordings
    # were altered": a false tampering alarm for a session that was merely not signed yet.
    async def main() -> tuple[str, subprocess.CompletedProcess[str]]:
        gw = make_gateway(tmp_path)
        await gw.start()
        await run_session(gw, "agent-1", ["echo done"])
        session = await gw.open_session(who("agent-2", "ops"), protocol="line", target="db", peer="127.0.0.1:5555")
        await session.decide(request("echo open"))
        state = str(tmp_path / "state")
        result = await asyncio.to_thread(lictor_cli, "sessions", "verify", "--all", "--strict", "--state-dir", state)
        await session.close()
        await gw.stop()
        return session.id, result

    sid, result = asyncio.run(main())
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{sid}: chain OK" in result.stdout and "UNSIGNED" in result.stdout, result.stdout
    assert "2 session(s) checked, 1 failed — 1 not signed yet (--strict)" in result.stdout, result.stdout
    assert "altered" not in result.stdout, result.stdout


def test_cli_verify_names_the_first_altered_event(tmp_path: Path) -> None:
    async def main() -> str:
        gw = make_gateway(tmp_path)
        await gw.start()
        sid = await run_session(gw, "agent-1", [f"echo {i}" for i in range(6)])
        await run_session(gw, "agent-2", ["echo other"])
        await gw.stop()
        return sid

    sid = asyncio.run(main())
    state = str(tmp_path / "state")
    ok = lictor_cli("sessions", "verify", "--all", "--state-dir", state)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2 session(s) checked, 0 failed" in ok.stdout
    [path] = (tmp_path / "state" / "recordings" / "sessions").glob(f"*/{sid}.jsonl")
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    lines[3] = lines[3].replace(b"echo 2", b"echo 9")  # event 3 is the third command
    path.write_bytes(b"".join(lines))
    bad = lictor_cli("sessions", "verify", "--all", "--state-dir", state)
    assert bad.returncode == 1
    assert f"{sid}: BROKEN at event 3" in bad.stdout, bad.stdout
    assert "1 failed" in bad.stdout
    # a deleted event
    path.write_bytes(b"".join(original.splitlines(keepends=True)[:2] + original.splitlines(keepends=True)[3:]))
    gone = lictor_cli("sessions", "verify", sid[:10], "--state-dir", state)
    assert gone.returncode == 1 and "at event 2" in gone.stdout and "deleted" in gone.stdout
    # a last line cut in the middle (a write that did not finish on a full disk) is said to be cut short
    path.write_bytes(original[: len(original) - 40])
    half = lictor_cli("sessions", "verify", sid, "--state-dir", state)
    assert half.returncode == 1 and "the last event is cut short" in half.stdout, half.stdout
    # a truncated tail is caught by the signed manifest
    path.write_bytes(b"".join(original.splitlines(keepends=True)[:-2]))
    cut = lictor_cli("sessions", "verify", sid, "--state-dir", state)
    assert cut.returncode == 1 and "truncated" in cut.stdout
    # an edited manifest fails its signature
    path.write_bytes(original)
    manifest_path = path.with_name(f"{sid}.manifest.json")
    doc = json.loads(manifest_path.read_text())
    doc["manifest"]["identity"]["sub"] = "someone-else"
    manifest_path.write_text(json.dumps(doc))
    forged = lictor_cli("sessions", "verify", sid, "--state-dir", state)
    assert forged.returncode == 1 and "signature does not verify" in forged.stdout
    # the manifest deleted and the tail cut: the chain alone looks fine, the index knows it ended
    manifest_path.unlink()
    path.write_bytes(b"".join(original.splitlines(keepends=True)[:3]))
    unsigned = lictor_cli("sessions", "verify", sid, "--state-dir", state)
    assert unsigned.returncode == 1 and "manifest is missing" in unsigned.stdout, unsigned.stdout
    # ... and the index edited to call the session open: the audit log still records its end
    index = sqlite3.connect(tmp_path / "state" / "recordings" / "index.db")
    with index:
        index.execute("UPDATE sessions SET ended_at = NULL, signed = 0, events = 3 WHERE id = ?", (sid,))
    index.close()
    reopened = lictor_cli("sessions", "verify", "--all", "--state-dir", state)
    assert reopened.returncode == 1, reopened.stdout
    assert f"{sid}: BROKEN: the manifest is missing, but the audit log records the end" in reopened.stdout
    # ... also when the audit row's kind column (which its MAC does not cover) is edited to hide it
    audit = sqlite3.connect(tmp_path / "state" / "audit.db")
    with audit:
        audit.execute("UPDATE events SET kind = 'note' WHERE kind = 'session.end' AND body LIKE ?", (f"%{sid}%",))
    audit.close()
    relabelled = lictor_cli("sessions", "verify", "--all", "--state-dir", state)
    assert f"{sid}: BROKEN: the manifest is missing, but the audit log records the end" in relabelled.stdout


def test_verify_all_reports_a_session_deleted_with_its_index_row(tmp_path: Path) -> None:
    async def main() -> tuple[str, str]:
        gw = make_gateway(tmp_path)
        await gw.start()
        gone = await run_session(gw, "agent-1", ["echo secret work"])
        kept = await run_session(gw, "agent-2", ["echo other"])
        await gw.stop()
        return gone, kept

    gone, kept = asyncio.run(main())
    state = tmp_path / "state"
    for path in (state / "recordings" / "sessions").glob(f"*/{gone}.*"):
        path.unlink()
    index = sqlite3.connect(state / "recordings" / "index.db")
    with index:
        index.execute("DELETE FROM sessions WHERE id = ?", (gone,))
    index.close()
    result = lictor_cli("sessions", "verify", "--all", "--state-dir", str(state))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{gone}: BROKEN: the audit log records this session, but the store holds no recording" in result.stdout
    assert f"{kept}: OK" in result.stdout and "2 session(s) checked, 1 failed" in result.stdout
    verdicts = {v.session: v for v in verify_sessions(source=state / "recordings")}
    assert not verdicts[gone].ok and verdicts[kept].ok


def test_verify_reports_sessions_an_audit_log_rolled_back_does_not_know(tmp_path: Path) -> None:
    async def run(sub: str) -> str:
        gw = make_gateway(tmp_path)
        await gw.start()
        sid = await run_session(gw, sub, ["echo hello"])
        await gw.stop()
        return sid

    state = tmp_path / "state"
    first = asyncio.run(run("agent-1"))
    saved = (state / "audit.db").read_bytes()
    second = asyncio.run(run("agent-2"))
    ok = lictor_cli("sessions", "verify", "--all", "--state-dir", str(state))
    assert ok.returncode == 0 and "2 session(s) checked, 0 failed" in ok.stdout, ok.stdout + ok.stderr
    (state / "audit.db").write_bytes(saved)  # the audit log put back as it was before the second session
    for suffix in ("-wal", "-shm"):
        (state / f"audit.db{suffix}").unlink(missing_ok=True)
    rolled = lictor_cli("sessions", "verify", "--all", "--state-dir", str(state))
    assert rolled.returncode == 1, rolled.stdout + rolled.stderr
    assert f"{first}: OK" in rolled.stdout
    assert f"{second}: BROKEN: the audit log does not record the start of this session" in rolled.stdout


def test_verify_all_does_not_pass_when_the_audit_log_is_gone_or_unreadable(tmp_path: Path) -> None:
    # Deleting a session's files and index row, then the audit log that would name it, made verify --all
    # skip the check and say "1 session(s) checked, 0 failed".
    async def main() -> tuple[str, str]:
        gw = make_gateway(tmp_path)
        await gw.start()
        gone = await run_session(gw, "agent-1", ["echo secret work"])
        kept = await run_session(gw, "agent-2", ["echo other"])
        await gw.stop()
        return gone, kept

    gone, kept = asyncio.run(main())
    state = tmp_path / "state"
    for path in (state / "recordings" / "sessions").glob(f"*/{gone}.*"):
        path.unlink()
    index = sqlite3.connect(state / "recordings" / "index.db")
    with index:
        index.execute("DELETE FROM sessions WHERE id = ?", (gone,))
    index.close()
    audit = state / "audit.db"
    saved = audit.read_bytes()
    audit.write_bytes(b"not a database " * 512)
    damaged = lictor_cli("sessions", "verify", "--all", "--state-dir", str(state))
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert f"{kept}: BROKEN: the audit log {audit} cannot be read" in damaged.stdout, damaged.stdout
    audit.unlink()
    missing = lictor_cli("sessions", "verify", "--all", "--state-dir", str(state))
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert f"{kept}: BROKEN: the audit log {audit} is missing (deleted?)" in missing.stdout, missing.stdout
    assert not audit.exists()  # verifying created no empty one
    audit.write_bytes(saved)
    whole = lictor_cli("sessions", "verify", "--all", "--state-dir", str(state))
    assert f"{gone}: BROKEN: the audit log records this session" in whole.stdout and f"{kept}: OK" in whole.stdout


def test_a_session_refused_because_its_recording_cannot_start_is_not_reported_missing(tmp_path: Path) -> None:
    async def main() -> None:
        gw = make_gateway(tmp_path)
        await gw.start()
        session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="127.0.0.1:5555")
        original = gw.recorder.open

        def refuse(session: Any) -> None:
            raise RecordingError("spool full")

        gw.recorder.open = refuse  # type: ignore[method-assign]
        with pytest.raises(RecordingError):
            await gw.open_session(who("agent-2"), protocol="line", target="db", peer="127.0.0.1:5556")
        gw.recorder.open = original  # type: ignore[method-assign]
        await session.close()
        await gw.stop()

    asyncio.run(main())
    state = tmp_path / "state"
    result = lictor_cli("sessions", "verify", "--all", "--state-dir", str(state))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 session(s) checked, 0 failed" in result.stdout
    from lictor import AuditLog

    audit = AuditLog(state / "audit.db")
    [refused] = [e for e in audit.events(kind="session.end") if e.get("recorded") is False]
    assert "its recording could not start (spool full)" in refused["reason"]
    audit.close()


def test_asciicast_export_of_a_terminal_session(tmp_path: Path) -> None:
    async def main() -> str:
        gw = make_gateway(tmp_path)
        await gw.start()
        session = await gw.open_session(who("agent-ssh"), protocol="ssh", target="host", peer="127.0.0.1:2222")
        session.record("resize", {"width": 100, "height": 30})
        session.record("output", {"data": "$ "})
        await asyncio.sleep(0.02)
        session.record("input", {"data": "ls\r"})
        session.record("output", {"data": "ls\r\nfile-a  file-b  caf\u00e9\r\n$ "})
        session.record("resize", {"width": 120, "height": 40})
        await session.close()
        await gw.stop()
        return session.id

    sid = asyncio.run(main())
    out = lictor_cli("sessions", "export", sid, "--format", "asciicast", "--state-dir", str(tmp_path / "state"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and header["width"] == 100 and header["height"] == 30
    assert isinstance(header["timestamp"], int) and abs(header["timestamp"] - time.time()) < 60
    frames = [json.loads(line) for line in lines[1:]]
    for frame in frames:
        assert isinstance(frame, list) and len(frame) == 3
        assert isinstance(frame[0], float | int) and frame[1] in ("o", "i", "r") and isinstance(frame[2], str)
    assert [f[0] for f in frames] == sorted(f[0] for f in frames)
    assert [f[1:] for f in frames] == [
        ["r", "100x30"],
        ["o", "$ "],
        ["i", "ls\r"],
        ["o", "ls\r\nfile-a  file-b  caf\u00e9\r\n$ "],
        ["r", "120x40"],
    ]
    assert frames[2][0] >= 0.02
    # JSON lines: the stored events, byte for byte, then the signed manifest
    jsonl = lictor_cli("sessions", "export", sid, "--format", "jsonl", "--state-dir", str(tmp_path / "state"))
    [path] = (tmp_path / "state" / "recordings" / "sessions").glob(f"*/{sid}.jsonl")
    exported = jsonl.stdout.splitlines()
    assert exported[:-1] == path.read_text().splitlines()
    assert json.loads(exported[-1])["manifest"]["session"] == sid


def test_replay_pretty_prints_sql_and_keeps_the_timing(tmp_path: Path) -> None:
    async def main() -> str:
        gw = make_gateway(tmp_path)
        await gw.start()
        session = await gw.open_session(who("agent-pg"), protocol="postgres", target="db", peer="127.0.0.1:1")
        session.record(
            "statement",
            {"sql": "select id, email from accounts where id = $1", "params": ["***"], "tag": "SELECT 1", "rows": 1},
        )
        await asyncio.sleep(0.05)
        session.record("http", {"method": "GET", "url": "https://api/x", "status": 200, "response_size": 12})
        await session.close()
        await gw.stop()
        return session.id

    sid = asyncio.run(main())
    out = lictor_cli("replay", sid, "--no-wait", "--state-dir", str(tmp_path / "state"))
    assert out.returncode == 0, out.stderr
    assert "sql> SELECT id,\n            email\n     FROM accounts\n     WHERE id = $1" in out.stdout, out.stdout
    assert '["***"]' in out.stdout and "SELECT 1 · 1 rows" in out.stdout
    assert "→ GET https://api/x\n← 200 (response size 12 bytes)" in out.stdout
    _, events = load_session(sid, source=tmp_path / "state" / "recordings")
    pauses: list[float] = []
    sink = _Text()
    replay(events, sink, speed=2.0, sleep=pauses.append)
    gap = events[2]["t"] - events[1]["t"]
    assert gap >= 0.05 and any(abs(p - gap / 2) < 1e-6 for p in pauses), (gap, pauses)
    capped: list[float] = []
    replay(events, _Text(), speed=1.0, max_idle=0.01, sleep=capped.append)
    assert capped and max(capped) <= 0.01 + 1e-9
    none: list[float] = []
    replay(events, _Text(), wait=False, sleep=none.append)
    assert none == []


class _Text:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_list_filters_table_and_json(tmp_path: Path) -> None:
    async def main() -> tuple[str, str]:
        gw = make_gateway(tmp_path)
        await gw.start()
        a = await run_session(gw, "agent-a", ["echo 1", "rm x"], target="orders")
        b = await run_session(gw, "agent-b", ["echo 2"], target="billing")
        # the in-process API reads the running gateway's store, caught up with the spool
        assert {r["id"] for r in list_sessions()} == {a, b}
        await gw.stop()
        return a, b

    a, b = asyncio.run(main())
    src = tmp_path / "state" / "recordings"
    assert [r["id"] for r in list_sessions({"sub": "agent-a"}, source=src)] == [a]
    assert [r["id"] for r in list_sessions({"decision": "deny"}, source=src)] == [a]
    assert [r["id"] for r in list_sessions({"target": "bill*"}, source=src)] == [b]
    assert [r["id"] for r in list_sessions({"protocol": "line", "since": "1h"}, source=src)] == [b, a]
    assert list_sessions({"until": time.time() - 3600}, source=src) == []
    assert [r["id"] for r in list_sessions({"limit": 1}, source=src)] == [b]
    with pytest.raises(ValueError, match="unknown session filter"):
        list_sessions({"color": "red"}, source=src)
    row = list_sessions({"sub": "agent-a"}, source=src)[0]
    assert row["decisions"] == {"allow": 1, "deny": 1, "approve": 0} and row["events"] == 4 and not row["open"]
    state = str(tmp_path / "state")
    out = lictor_cli("sessions", "list", "--json", "--decision", "deny", "--state-dir", state)
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)] == [a]
    table = lictor_cli("sessions", "list", "--state-dir", state).stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "STARTED", "DURATION", "SUB"]
    assert any(line.startswith(a[:12]) and "agent-a" in line and "orders" in line for line in table[1:])


def test_strict_role_is_fsynced_before_returning(tmp_path: Path) -> None:
    async def main() -> None:
        # a group commit that never comes within the test: only strict calls fsync
        gw = make_gateway(tmp_path, {"spool": {"fsync_interval": "1h"}})
        await gw.start()
        spool = gw.recordings.spool
        relaxed = await gw.open_session(who("agent-x"), protocol="line", target="db", peer="p")
        assert (await relaxed.decide(request("echo relaxed"))).allowed
        relaxed.record("command", {"command": "echo relaxed"})
        assert spool.synced_seq < spool.written_seq  # best_effort: in the page cache, fsync later
        careful = await gw.open_session(who("agent-y", "careful"), protocol="line", target="db", peer="p")
        assert spool.synced_seq == spool.written_seq
        decision = await careful.decide(request("echo careful"))
        assert decision.allowed and decision.recording == "strict"
        assert spool.synced_seq == spool.written_seq
        careful.record("output", {"data": "careful"})
        assert spool.synced_seq == spool.written_seq
        await relaxed.close()
        await careful.close()
        await gw.stop()

    asyncio.run(main())


def test_strict_syncs_deferred_on_one_thread_are_owed_until_synced_once(tmp_path: Path) -> None:
    # An addon that writes its output once per turn of the event loop defers the fdatasync of each strict event to
    # one sync_owed() before that output; what other threads write is synced as before.
    async def main() -> None:
        gw = make_gateway(tmp_path, {"spool": {"fsync_interval": "1h"}})
        await gw.start()
        spool = gw.recordings.spool
        careful = await gw.open_session(who("agent-y", "careful"), protocol="line", target="db", peer="p")
        assert spool.synced_seq == spool.written_seq and not gw.owes_sync()
        deferred = gw.defer_strict_sync()
        with deferred:
            assert careful.decide_now(request("echo careful")).allowed
            with deferred:  # re-entrant
                careful.record("output", {"data": "careful"})
            careful.record("output", {"data": "more"})
            assert spool.synced_seq < spool.written_seq and gw.owes_sync()
            # another thread's strict event is synced before it returns, and so it covers the owed ones too
            await asyncio.to_thread(careful.record, "output", {"data": "from a thread"})
            assert spool.synced_seq == spool.written_seq and not gw.owes_sync()
            careful.record("output", {"data": "again"})
        assert gw.owes_sync()  # leaving the block does not sync: sync_owed() does, once
        written = spool.written_seq
        gw.sync_owed()
        assert spool.synced_seq == written and not gw.owes_sync()
        careful.record("output", {"data": "not deferred"})
        assert spool.synced_seq == spool.written_seq
        await careful.close()
        await gw.stop()

    asyncio.run(main())


def test_replayed_batches_after_a_lost_offset_commit_add_nothing(tmp_path: Path) -> None:
    async def record(first: int) -> str:
        gw = make_gateway(tmp_path)
        await gw.start()
        sid = await run_session(gw, "agent-1", [f"echo {i}" for i in range(first, first + 50)])
        await gw.stop()
        return sid

    sid = asyncio.run(record(0))
    state = tmp_path / "state"
    [path] = (state / "recordings" / "sessions").glob(f"*/{sid}.jsonl")
    lines_before = path.read_bytes()
    from lictor import AuditLog

    audit = AuditLog(state / "audit.db")
    count_before = len(list(audit.events()))
    audit.close()
    # a crash after the local sink wrote but before it committed its offset: it starts over
    offset = Offset(state / "spool" / "offsets" / "local.off")
    assert offset.position > 100
    offset.commit(0)
    offset.close()
    sid2 = asyncio.run(record(50))
    assert path.read_bytes() == lines_before  # nothing appended twice to the first session
    audit = AuditLog(state / "audit.db")
    summaries = [e["request"]["summary"] for e in audit.events(kind="decision")]
    assert summaries == [f"echo {i}" for i in range(100)]  # each decision exactly once, in order
    assert audit.verify().ok
    audit.close()
    verdicts = verify_sessions(source=state / "recordings")
    assert {v.session for v in verdicts} == {sid, sid2} and all(v.ok and v.signed for v in verdicts)
    assert len(list_sessions(source=state / "recordings")) == 2
    assert count_before > 50


@pytest.mark.parametrize("drain", ["process", "thread"])
def test_sessions_a_crash_left_open_are_signed_as_interrupted(tmp_path: Path, drain: str) -> None:
    async def crash() -> str:
        gw = make_gateway(tmp_path, {"drain": drain})
        await gw.start()
        session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
        for i in range(5):
            assert (await session.decide(request(f"echo {i}"))).allowed
            session.record("command", {"command": f"echo {i}"})
        return session.id  # no close, no stop: the process "dies" here (its drainers keep running)

    sid = asyncio.run(crash())
    previous = current_recorder()
    assert previous is not None
    if drain == "process":
        # the child is spawned by a supervisor thread: under load it may not exist yet
        proc = previous._proc
        assert proc is not None
        wait_until(lambda: proc.pid is not None, 10, "the drain process to be spawned")
    child = previous._proc.pid if previous._proc is not None else None
    if drain == "process":
        assert child is not None and all(d._thread is None for d in previous.drainers)
    else:
        assert all(d._thread is not None for d in previous.drainers)

    def caught_up() -> bool:
        status = previous.status()
        return all(sink["committed"] >= status["spool"]["written"] for sink in status["sinks"])

    # A dead gateway writes nothing more: its drainers, left running here, must be done before the restarted
    # gateway's audit log is opened, or a batch they commit after it puts that log's head behind the file's.
    wait_until(caught_up, 10, "the crashed gateway's drainers to catch up")
    audit = AuditLog(tmp_path / "state" / "audit.db")  # as the restarted gateway's recorder has it
    recorder = SessionRecorder(RecordingsConfig.from_section({"drain": drain}, tmp_path / "state"), audit=audit)
    assert all(d._thread is None for d in previous.drainers)  # the old drainers let go of the spool
    if child is not None:
        assert not pid_alive(child)  # and so did the old drain process
    assert recorder.interrupted == [sid]
    recorder.start()
    assert recorder.flush(10)
    recorder.stop()
    audit.close()
    manifest, events = load_session(sid, source=tmp_path / "state" / "recordings")
    assert manifest is not None and manifest["interrupted"] is True and manifest["events"] == len(events) == 7
    assert [e["data"].get("command") for e in events[1:6]] == [f"echo {i}" for i in range(5)]
    assert events[-1]["kind"] == "session.end" and "interrupted" in events[-1]["data"]["reason"]
    [verdict] = verify_sessions(source=tmp_path / "state" / "recordings")
    assert verdict.ok and verdict.signed and verdict.interrupted


def audit_events(tmp: Path, kind: str) -> list[dict[str, Any]]:
    audit = AuditLog(tmp / "state" / "audit.db")
    try:
        return list(audit.events(kind=kind))
    finally:
        audit.close()


def test_numbering_goes_on_after_records_cut_from_the_spool(tmp_path: Path) -> None:
    async def first_run() -> None:
        gw = make_gateway(tmp_path, {"drain": "thread"})
        await gw.start()
        await run_session(gw, "agent-1", ["echo 1", "echo 2", "echo 3"])
        await gw.stop()

    asyncio.run(first_run())
    spool_dir = tmp_path / "state" / "spool"
    [segment] = spool_dir.glob("*.seg")  # the active one stays after a clean stop, drained
    data = bytearray(segment.read_bytes())
    data[data.index(b"echo 2") + 5] ^= 0x01  # a damaged record: it and those after it are cut at restart
    segment.write_bytes(bytes(data))

    async def second_run() -> str:
        gw = make_gateway(tmp_path, {"drain": "thread"})
        await gw.start()
        sid = await run_session(gw, "agent-2", ["echo 4"])
        await gw.stop()
        return sid

    sid = asyncio.run(second_run())
    summaries = [e["request"]["summary"] for e in audit_events(tmp_path, "decision") if e.get("session") == sid]
    assert summaries == ["echo 4"]  # not taken for a record the audit log already had, and skipped
    [cut] = audit_events(tmp_path, "spool.recovered")  # what was cut is in the audit chain, not only the log
    assert "checksum mismatch" in cut["problem"] and segment.name in cut["problem"]
    manifest, events = load_session(sid, source=tmp_path / "state" / "recordings")
    assert manifest is not None and [e["kind"] for e in events][-1] == "session.end"


def test_record_after_close_and_unknown_sessions_fail_closed(tmp_path: Path) -> None:
    async def main() -> None:
        gw = make_gateway(tmp_path)
        await gw.start()
        session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
        await session.close()
        with pytest.raises(RecordingError, match="not being recorded"):
            session.record("command", {"command": "late"})
        await gw.stop()
        with pytest.raises(RecordingError):
            gw.recordings.audit("decision", {"session": "x"})

    asyncio.run(main())


def test_retention_by_size_and_age(tmp_path: Path) -> None:
    async def main() -> list[str]:
        gw = make_gateway(tmp_path)
        await gw.start()
        ids = [await run_session(gw, f"agent-{i}", [f"echo {j}" for j in range(20)]) for i in range(3)]
        await gw.stop()
        return ids

    ids = asyncio.run(main())
    directory = tmp_path / "state" / "recordings"
    rows = {r["id"]: r for r in list_sessions(source=directory)}
    one = rows[ids[0]]["bytes"]
    sink = LocalSink("local", directory, None, "gw", Retention(max_bytes=int(one * 2.5)))
    assert sink.apply_retention(time.time()) == 1
    assert {r["id"] for r in list_sessions(source=directory)} == set(ids[1:])  # the oldest went
    assert not list(directory.glob(f"sessions/*/{ids[0]}*"))
    sink.retention = Retention(max_age=3600)
    assert sink.apply_retention(time.time()) == 0
    assert sink.apply_retention(time.time() + 7200) == 2
    assert list_sessions(source=directory) == []
    sink.close()


@pytest.mark.parametrize("drain", ["process", "thread"])
def test_sessions_retention_removed_are_audited_and_pass_verify(tmp_path: Path, drain: str) -> None:
    recordings = {"drain": drain, "retention": {"max_age": "1s"}, "retention_interval": "1s"}
    directory = tmp_path / "state" / "recordings"

    async def main() -> tuple[str, str]:
        gw = make_gateway(tmp_path, recordings)
        await gw.start()
        old = await run_session(gw, "agent-1", ["echo old"])
        assert gw.recorder.flush()
        assert any(r["id"] == old for r in list_sessions(source=directory))
        deadline = time.monotonic() + 30
        while any(r["id"] == old for r in list_sessions(source=directory)) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        new = await run_session(gw, "agent-2", ["echo new"])
        await gw.stop()
        return old, new

    old, new = asyncio.run(main())
    assert {r["id"] for r in list_sessions(source=directory)} <= {new}  # `old` went (`new` may have too)
    from lictor import AuditLog

    audit = AuditLog(tmp_path / "state" / "audit.db")
    removed = [sid for e in audit.events(kind="recording.retention") for sid in e["sessions"]]
    audit.close()
    assert old in removed
    result = lictor_cli("sessions", "verify", "--all", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 0 and "0 failed" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"sinks": [{"type": "ftp"}]}, "recordings.sinks.0"),
        ({"spool": {"max_bytes": "lots"}}, "recordings.spool.max_bytes"),
        ({"spool": {"fsync_interval": "soon"}}, "fsync_interval"),
        ({"sinks": [{"type": "postgres"}]}, "'dsn' is a required property"),
        ({"sinks": [{"type": "s3", "bucket": "b", "name": "x"}, {"type": "s3", "bucket": "c", "name": "x"}]}, "two"),
        ({"mode": "sometimes"}, "recordings.mode"),
        ({"retention": {"max_age": "forever"}}, "max_age"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_recordings_config_is_refused(tmp_path: Path, section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", ".")):
        RecordingsConfig.from_section(section, tmp_path)


def test_config_defaults_and_sizes(tmp_path: Path) -> None:
    cfg = RecordingsConfig.from_section(
        {
            "spool": {"max_bytes": "64MiB", "fsync_interval": "2ms"},
            "retention": {"max_age": "30d", "max_bytes": "10GB"},
            "sinks": [{"type": "s3", "bucket": "rec", "retention": {"max_age": "1d"}}],
        },
        tmp_path,
    )
    assert cfg.max_bytes == 64 << 20 and cfg.fsync_interval == 0.002
    assert [s.type for s in cfg.sinks] == ["local", "s3"]  # the local store (and audit chain) is always there
    assert cfg.sinks[0].retention == Retention(30 * 86400, 10 * 1000**3)
    assert cfg.sinks[1].retention == Retention(86400, 0)
    assert cfg.local_dir == tmp_path / "recordings" and cfg.spool_dir == tmp_path / "spool"


def test_denied_when_recording_cannot_be_made_durable(tmp_path: Path) -> None:
    async def main() -> None:
        gw = make_gateway(
            tmp_path,
            {"drain": "thread", "spool": {"max_bytes": 60_000, "segment_bytes": 8192, "reserve_bytes": 8192}},
        )
        await gw.start()
        for drainer in gw.recordings.drainers:
            drainer.stop()  # the only sink stops taking events: the spool fills up
        session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
        acknowledged = []
        refused: Decision | None = None
        for i in range(1000):
            decision = await session.decide(request(f"echo {i}"))
            if not decision.allowed:
                refused = decision
                break
            try:
                session.record("command", {"command": f"echo {i}"})
            except RecordingError as exc:
                assert "full" in str(exc)
                continue  # not acknowledged: the addon must not answer OK
            acknowledged.append(f"echo {i}")
        assert refused is not None and refused.rule_ids == ("lictor:audit-unavailable",)
        with pytest.raises(RecordingError, match=r"spool .* is full"):
            await gw.open_session(who("agent-2"), protocol="line", target="db", peer="p")
        gw.sessions.clear()
        for drainer in gw.recordings.drainers:
            drainer.start()
        assert gw.recordings.flush(10)
        assert (await session.decide(request("echo again"))).allowed  # room again once drained
        session.record("command", {"command": "echo again"})
        acknowledged.append("echo again")
        await session.close()
        await gw.stop()
        _, events = load_session(session.id, source=tmp_path / "state" / "recordings")
        assert [e["data"]["command"] for e in events if e["kind"] == "command"] == acknowledged
        assert all(v.ok and v.signed for v in verify_sessions(source=tmp_path / "state" / "recordings"))

    asyncio.run(main())


def test_asciicast_of_a_non_terminal_session_renders_the_dialogue() -> None:
    events = [
        {"s": "x", "n": 0, "t": 100.0, "kind": "session.start", "data": {"identity": {"sub": "a"}}},
        {"s": "x", "n": 1, "t": 101.5, "kind": "command", "data": {"command": "echo hi"}},
    ]
    lines = list(asciicast_lines(None, events))
    assert json.loads(lines[0])["version"] == 2 and json.loads(lines[0])["timestamp"] == 100
    assert json.loads(lines[2]) == [1.5, "o", "$ echo hi\r\n"]


def pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped yet) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_drain_process_killed_is_restarted_and_delivers_exactly_once(tmp_path: Path) -> None:
    import os
    import signal

    async def main() -> str:
        gw = make_gateway(tmp_path, {"spool": {"segment_bytes": 8192}})
        await gw.start()
        proc = gw.recordings._proc
        assert proc is not None
        wait_until(lambda: proc.pid is not None, 10, "the drain process")
        session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
        for i in range(300):
            assert (await session.decide(request(f"echo {i}"))).allowed
            session.record("command", {"command": f"echo {i}"})
            if i == 150:
                first = proc.pid
                assert first is not None
                os.kill(first, signal.SIGKILL)  # mid-stream: the gateway notices and starts another one
        wait_until(lambda: proc.restarts >= 1 and proc.pid not in (None, first), 10, "a new drain process")
        assert gw.recordings.flush(10), gw.recordings.status()
        assert gw.recordings.status()["drain"]["restarts"] >= 1
        segments = len(list((tmp_path / "state" / "spool").glob("*.seg")))
        assert segments == 1  # every drained segment was deleted (the gateway owns deletion)
        assert len(list(gw.audit.events(kind="decision"))) == 300  # in-process reads see everything
        await session.close()
        await gw.stop()
        assert proc.pid is None or not pid_alive(proc.pid)
        return session.id

    sid = asyncio.run(main())
    manifest, events = load_session(sid, source=tmp_path / "state" / "recordings")
    assert [e["data"]["command"] for e in events if e["kind"] == "command"] == [f"echo {i}" for i in range(300)]
    assert manifest is not None and manifest["events"] == len(events)
    [verdict] = verify_sessions(source=tmp_path / "state" / "recordings")
    assert verdict.ok and verdict.signed
    audit = AuditLog(tmp_path / "state" / "audit.db")
    assert audit.verify().ok and len(list(audit.events(kind="decision"))) == 300


def test_flush_returns_once_the_drained_segments_are_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # flush() wakes on its own every 50 ms: it saw the drain process's new position before the segments it frees
    # were deleted (a busy machine, a slow disk), and returned with them still in the spool.
    from lictor.recorder import _spool

    release = _spool.Spool.release

    def slow_release(self: _spool.Spool, upto: int) -> int:
        time.sleep(0.2)
        return release(self, upto)

    monkeypatch.setattr(_spool.Spool, "release", slow_release)

    async def main() -> None:
        gw = make_gateway(tmp_path, {"spool": {"segment_bytes": 8192}})
        await gw.start()
        session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
        for i in range(100):
            assert (await session.decide(request(f"echo {i}"))).allowed
            session.record("command", {"command": f"echo {i}"})
        assert gw.recordings.flush(20), gw.recordings.status()
        assert len(list((tmp_path / "state" / "spool").glob("*.seg"))) == 1
        await session.close()
        await gw.stop()

    asyncio.run(main())


def test_an_idle_drain_process_sleeps_and_wakes_for_the_next_event(tmp_path: Path) -> None:
    import os

    def switches(pid: int) -> int:  # voluntary context switches of all its threads: its wake-ups
        total = 0
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            with contextlib.suppress(FileNotFoundError):
                for line in status.read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        return total

    async def main() -> None:
        gw = make_gateway(tmp_path, {})
        await gw.start()
        proc = gw.recordings._proc
        assert proc is not None
        wait_until(lambda: proc.pid is not None, 10, "the drain process")
        session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="p")
        session.record("command", {"command": "echo 1"})
        assert gw.recordings.flush(10)
        pid = proc.pid
        assert pid is not None and pid != os.getpid()
        await asyncio.sleep(1.0)
        before = switches(pid)
        await asyncio.sleep(2.0)
        woken = switches(pid) - before
        # Polling the spool (a group commit every 5 ms, drainers every 20 ms) woke it about 500 times.
        assert woken < 60, woken
        # Not asleep for good: an event the gateway does not flush reaches the sink by itself.
        session.record("command", {"command": "echo 2"})
        spool = gw.recordings.spool
        wait_until(lambda: all(d.committed >= spool.written_seq for d in gw.recordings.drainers), 10, "the drain")
        await session.close()
        await gw.stop()

    asyncio.run(main())


_ORPHAN = """
import sys, time
from pathlib import Path
from lictor.recorder import RecordingsConfig, SessionRecorder
recorder = SessionRecorder(RecordingsConfig.from_section({"drain": sys.argv[2]}, Path(sys.argv[1])))
recorder.start()
for i in range(200):
    recorder.audit("test", {"i": i})
while recorder._proc is not None and recorder._proc.pid is None:
    time.sleep(0.01)
print(recorder._proc.pid if recorder._proc is not None else 0, flush=True)
time.sleep(60)
"""


def test_drain_process_exits_with_a_killed_gateway_and_leftovers_drain_on_restart(tmp_path: Path) -> None:
    import os
    import signal
    import sys

    state = tmp_path / "state"
    gateway = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN, str(state), "process"], stdout=subprocess.PIPE, text=True
    )
    assert gateway.stdout is not None
    child = int(gateway.stdout.readline())
    assert child > 0 and pid_alive(child)
    os.kill(gateway.pid, signal.SIGKILL)
    gateway.wait(10)
    wait_until(lambda: not pid_alive(child), 10, "the drain process to follow its gateway")
    recorder = SessionRecorder(RecordingsConfig.from_section({}, state), audit=AuditLog(state / "audit.db"))
    recorder.start()
    assert recorder.flush(10)
    assert [e["i"] for e in recorder.audit_log.events(kind="test")] == list(range(200))  # type: ignore[union-attr]
    recorder.stop()


def test_drain_mode_is_validated(tmp_path: Path) -> None:
    assert RecordingsConfig.from_section({}, tmp_path).drain == "process"
    assert RecordingsConfig.from_section({"drain": "thread"}, tmp_path).drain == "thread"
    with pytest.raises(ConfigError, match=r"recordings\.drain"):
        RecordingsConfig.from_section({"drain": "fork"}, tmp_path)
    cfg = RecordingsConfig.from_section(
        {"sinks": [{"type": "s3", "bucket": "b", "retention": {"max_age": "1d"}}]}, tmp_path
    )
    assert RecordingsConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_replay_and_audit_list_show_an_agents_control_characters_escaped() -> None:
    # An agent's statement is text it controls: ESC/CR/BEL must not reach the auditor's terminal raw.
    from lictor._text import printable
    from lictor.recorder._replay import render

    evil = "select 1 /* \r\x1b[2K\x1b]0;PWNED\x07 */"
    shown = render({"kind": "statement", "t": 0, "data": {"sql": evil, "decision": "allow"}})
    assert shown is not None and "\x1b" not in shown and "\r" not in shown and "\x07" not in shown
    assert "\\x1b[2K" in shown
    terminal = render({"kind": "output", "t": 0, "data": {"data": "\x1b[1mbold\x1b[0m"}})
    assert terminal == "\x1b[1mbold\x1b[0m"  # a terminal session replays as it was sent
    assert printable("a\x1bb\nc", keep="") == "a\\x1bb\\x0ac"


def test_replay_keeps_an_agents_terminal_output_from_rewriting_what_the_auditor_sees(tmp_path: Path) -> None:
    # Terminal output is the agent's: replayed raw, "\x1b[1A\x1b[2K" moved up and erased the line naming the
    # denied command, and OSC 52 wrote the auditor's clipboard. Colours and same-line edits still show.
    async def main() -> str:
        gw = make_gateway(tmp_path)
        await gw.start()
        session = await gw.open_session(who("agent-tty"), protocol="ssh", target="db", peer="127.0.0.1:1")
        session.record("command", {"command": "rm -rf /srv"})
        session.record("output", {"data": "\x1b[1A\x1b[2Kok\r\nx\x1b]52;c;cm0gLXJmIH4K\x07\x1b[?1049h"})
        session.record("output", {"data": "\x1b[01;34mdir\x1b[0m\x1b[K\r\n", "channel": 1})
        session.record("input", {"data": "ls\x1b[A\r"})
        await session.close()
        await gw.stop()
        return session.id

    sid = asyncio.run(main())
    where = ("--state-dir", str(tmp_path / "state"))
    shown = lictor_cli("replay", sid, "--no-wait", "--input", *where)
    assert shown.returncode == 0, shown.stderr
    # (the command line reads its output as text: "\r\n" arrives as "\n")
    assert "$ rm -rf /srv\n\\x1b[1A\x1b[2Kok\nx\\x1b]52;c;cm0gLXJmIH4K\\x07\\x1b[?1049h" in shown.stdout, shown.stdout
    assert "\x1b[01;34mdir\x1b[0m\x1b[K\n" in shown.stdout
    assert "\x1b[2mls\\x1b[A\\x0d\x1b[0m" in shown.stdout
    raw = lictor_cli("replay", sid, "--no-wait", "--raw", *where)
    assert "\x1b[1A\x1b[2Kok\nx\x1b]52;c;cm0gLXJmIH4K\x07\x1b[?1049h" in raw.stdout


def test_replay_marks_allowed_decisions_as_allowed() -> None:
    from lictor.recorder._replay import render

    allowed = render({"kind": "decision", "t": 0, "data": {"action": "allow", "rule_ids": ["r1"]}})
    denied = render({"kind": "decision", "t": 0, "data": {"action": "deny", "rule_ids": ["r2"], "summary": "rm x"}})
    assert allowed is not None and allowed.startswith("✓ ALLOW [r1]")
    assert denied is not None and denied.startswith("✗ DENY [r2] rm x")


def test_listing_into_a_reader_that_stops_early_ends_quietly(tmp_path: Path) -> None:
    async def main() -> None:
        gw = make_gateway(tmp_path)
        await gw.start()
        for i in range(3):
            await run_session(gw, f"agent-{i}", ["echo x"])
        await gw.stop()

    asyncio.run(main())
    state = str(tmp_path / "state")
    for command in (["sessions", "list"], ["audit", "list"]):
        proc = subprocess.Popen(
            [LICTOR, *command, "--state-dir", state], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # like `| head -0`: the reader is gone before anything is written
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=30) == 0 and err == "", (command, err)


def test_verify_reports_a_non_object_manifest_and_checks_the_other_sessions(tmp_path: Path) -> None:
    async def main() -> tuple[str, str]:
        gw = make_gateway(tmp_path)
        await gw.start()
        first = await run_session(gw, "agent-1", ["echo 1"])
        second = await run_session(gw, "agent-2", ["echo 2"])
        await gw.stop()
        return first, second

    first, second = asyncio.run(main())
    recordings = tmp_path / "state" / "recordings"
    [manifest_path] = (recordings / "sessions").glob(f"*/{first}.manifest.json")
    for text in ("[]", "null", "42"):
        manifest_path.write_text(text + "\n")
        verdicts = {v.session: v for v in verify_sessions(source=recordings)}
        assert not verdicts[first].ok and "manifest" in verdicts[first].problem, (text, verdicts[first])
        assert verdicts[second].ok and verdicts[second].signed


def _roll_back_the_audit_log(tmp_path: Path, *, copied_after_the_denial: bool) -> tuple[Path, str, str]:
    """A session with an allowed and a denied request whose audit log is copied while the session is open
    (before or after the denial), then put back once the gateway stopped: (state dir, session id, what
    ``sessions verify --all`` says of it then, which must fail). Both verifications passed before the copy was
    put back, and the audit log's own chain still verifies after."""
    state = tmp_path / "state"
    saved = tmp_path / "audit-copy.db"

    async def main() -> str:
        gw = make_gateway(tmp_path)
        await gw.start()
        session = await gw.open_session(who("agent-1"), protocol="line", target="db", peer="127.0.0.1:5555")
        assert (await session.decide(request("echo before"))).allowed
        if copied_after_the_denial:
            assert not (await session.decide(request("rm -rf /data"))).allowed
        assert gw.recordings.flush(5)
        copy = sqlite3.connect(saved)
        with contextlib.closing(sqlite3.connect(state / "audit.db")) as live:
            live.backup(copy)
        copy.close()
        if not copied_after_the_denial:
            assert not (await session.decide(request("rm -rf /data"))).allowed
        await session.close()
        await gw.stop()
        return session.id

    sid = asyncio.run(main())
    ok = lictor_cli("sessions", "verify", "--all", "--state-dir", str(state))
    assert ok.returncode == 0 and f"{sid}: OK" in ok.stdout, ok.stdout + ok.stderr
    for suffix in ("-wal", "-shm"):
        (state / f"audit.db{suffix}").unlink(missing_ok=True)
    (state / "audit.db").write_bytes(saved.read_bytes())
    assert lictor_cli("audit", "verify", "--state-dir", str(state)).returncode == 0  # its own chain is intact
    rolled = lictor_cli("sessions", "verify", "--all", "--state-dir", str(state))
    assert rolled.returncode == 1, rolled.stdout + rolled.stderr
    return state, sid, rolled.stdout


def test_verify_reports_a_signed_session_whose_decisions_an_audit_log_rolled_back_lost(tmp_path: Path) -> None:
    # An audit log put back as it was while a session was open still held that session's start, so verify
    # --all passed although the decisions the signed manifest counts were gone from it.
    state, sid, said = _roll_back_the_audit_log(tmp_path, copied_after_the_denial=False)
    assert f"{sid}: BROKEN: the audit log holds 0 of the 1 'deny' decisions the signed manifest counts" in said, said
    [verdict] = verify_sessions([sid], source=state / "recordings")
    assert not verdict.ok


def test_verify_reports_a_signed_session_whose_end_an_audit_log_rolled_back_lost(tmp_path: Path) -> None:
    # An audit log put back as it was after a session's last decision (it lost only the session's end and
    # the gateway's stop) passed both its own verify and sessions verify: nothing signed vouched for the end.
    state, sid, said = _roll_back_the_audit_log(tmp_path, copied_after_the_denial=True)
    assert f"{sid}: BROKEN: the audit log does not record the end of this session" in said, said
    manifest, _ = load_session(sid, source=state / "recordings")
    assert manifest is not None and manifest["audited_end"] is True  # what the signed manifest vouches for


def test_replay_and_export_say_when_the_recording_does_not_verify(tmp_path: Path) -> None:
    # A recording edited after the fact replayed and exported as if it were what the agent did, exit 0: only
    # `sessions verify`, which the auditor may not run first, said it was altered.
    sid = _one_session(tmp_path, ["echo hello", "rm -rf /data"])
    state = str(tmp_path / "state")
    for args in (
        ("replay", sid, "--no-wait"),
        ("sessions", "export", sid),
        ("sessions", "export", sid, "--format", "asciicast"),
    ):
        clean = lictor_cli(*args, "--state-dir", state)
        assert clean.returncode == 0 and "does not verify" not in clean.stderr, clean
    [path] = (tmp_path / "state" / "recordings" / "sessions").glob(f"*/{sid}.jsonl")
    path.write_text(path.read_text().replace("rm -rf /data", "ls -la /data"))
    for args in (
        ("replay", sid, "--no-wait"),
        ("sessions", "export", sid),
        ("sessions", "export", sid, "--format", "asciicast"),
    ):
        out = lictor_cli(*args, "--state-dir", state)
        assert out.returncode == 1, out
        assert "ls -la /data" in out.stdout  # still shown: it is what the store holds
        assert (
            f"lictor: WARNING: session {sid} does not verify (BROKEN at event 2: " in out.stderr
            and "what is shown may have been altered" in out.stderr
        ), out.stderr


def test_verify_shows_what_an_edited_file_says_with_its_control_characters_escaped(tmp_path: Path) -> None:
    # The key id of a manifest is text from the file: an edited manifest printed "\r\x1b[2K... OK ..." and
    # "\x1b[8m" raw in `sessions verify` (and in the warning of `replay`), so a terminal showed the session as
    # verified and hid the BROKEN verdict.
    sid = _one_session(tmp_path, ["echo hello", "rm -rf /data"])
    state = str(tmp_path / "state")
    [path] = (tmp_path / "state" / "recordings" / "sessions").glob(f"*/{sid}.manifest.json")
    doc = json.loads(path.read_text())
    doc["manifest"]["decisions"] = {"allow": 2}
    doc["key"] = f"\r\x1b[2K{sid}: OK, 7 events, chain intact, manifest signed\n\x1b[8m"
    path.write_text(json.dumps(doc))
    verified = lictor_cli("sessions", "verify", sid, "--state-dir", state)
    replayed = lictor_cli("replay", sid, "--no-wait", "--state-dir", state)
    assert verified.returncode == 1 and replayed.returncode == 1
    for shown in (verified.stdout, replayed.stderr):
        assert "BROKEN: the manifest is signed by key \\x0d\\x1b[2K" in shown, shown
        assert "\x1b" not in shown and "\r" not in shown and "\\x0a\\x1b[8m, not by" in shown, shown


def test_verify_tells_an_edited_event_from_a_last_event_cut_short(tmp_path: Path) -> None:
    # The store hands lines over without their newline, so every line that did not parse was reported as "the
    # last event is cut short (a write that did not finish, as on a full disk...)", an edit in the middle too.
    async def main() -> list[str]:
        gw = make_gateway(tmp_path)
        await gw.start()
        sids = [await run_session(gw, f"agent-{i}", ["echo hello", "rm -rf /data"]) for i in range(2)]
        await gw.stop()
        return sids

    edited, cut = asyncio.run(main())
    state = str(tmp_path / "state")
    [path] = (tmp_path / "state" / "recordings" / "sessions").glob(f"*/{edited}.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = b"[" + lines[1][1:]
    path.write_bytes(b"".join(lines))
    [path] = (tmp_path / "state" / "recordings" / "sessions").glob(f"*/{cut}.jsonl")
    path.write_bytes(path.read_bytes()[:-10])
    shown = lictor_cli("sessions", "verify", "--all", "--state-dir", state).stdout
    assert f"{edited}: BROKEN at event 1: the event is not valid JSON (edited)" in shown, shown
    assert f"{cut}: BROKEN at event " in shown and "the last event is cut short" in shown.split(cut)[1], shown


def test_replay_and_export_show_what_follows_an_edited_event(tmp_path: Path) -> None:
    # A recording that does not verify is shown as the store holds it, after a warning: but an event whose time
    # was not a number, or a line that was not a JSON object, stopped the replay there ("could not convert string
    # to float", a traceback for asciicast), so the denial after it was not shown.
    sid = _one_session(tmp_path, ["echo hello", "echo again", "rm -rf /data"])
    [path] = (tmp_path / "state" / "recordings" / "sessions").glob(f"*/{sid}.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = re.sub(rb'"t":[0-9.]+', b'"t":"later"', lines[1])
    lines[2] = b"[1,2]\n"
    path.write_bytes(b"".join(lines))
    state = str(tmp_path / "state")
    for args in (("replay", sid, "--no-wait"), ("sessions", "export", sid, "--format", "asciicast")):
        shown = lictor_cli(*args, "--state-dir", state)
        assert shown.returncode == 1 and "does not verify" in shown.stderr and "Traceback" not in shown.stderr, shown
        assert "rm -rf /data" in shown.stdout and "[unreadable]" in shown.stdout, shown.stdout
