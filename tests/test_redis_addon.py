"""The Redis addon tested the way an outsider tests an addon: with ``lictor.testing``.

The harness is a real gateway (policy engine, audit log in a temporary directory, approval broker,
in-memory recorder); with ``start=True`` the addon's listener runs in this event loop, in front
of the real Redis server on 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from lictor import testing

from tests.conftest import ROOT, free_port, lictor, require

sys.path.insert(0, str(ROOT / "examples" / "redis"))

from lictor_redis import RedisAddon, build_requests
from lictor_redis.resp import encode_command

PACK = (ROOT / "examples" / "redis" / "rulepacks" / "redis.yaml").read_text()
CARD = "4111 1111 1111 1111"


def _redis_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        return True
    except OSError:
        return False


def req(line: str):
    (request,) = build_requests({"command": line}, "cache")
    return request


# -- decisions, without a listener ------------------------------------------------------------------


async def test_decisions_use_the_vocabulary_and_the_pack():
    async with testing.harness(RedisAddon(), rulepacks=PACK) as h:
        reader = await h.session(testing.identity("r", role="reader"), protocol="redis", target="cache")
        testing.assert_decision(
            await reader.decide(req("GET app:1")), "allow", rule="redis-read-app", masked=["redis-mask-pii"]
        )
        testing.assert_decision(await reader.decide(req("SET app:1 x")), "deny", rule="lictor:default-deny")
        testing.assert_decision(await reader.decide(req("EVAL x 0")), "deny", rule="redis-no-scripts")
        assert [e["action"] for e in h.audit("decision")] == ["allow", "deny", "deny"]
        assert h.audit("decision")[0]["request"]["summary"] == "GET app:1"


async def test_the_request_hook_refuses_what_cannot_be_relayed_whatever_the_policy():
    async with testing.harness(RedisAddon(), rulepacks=PACK) as h:
        admin = await h.session(testing.identity("a", role="admin"), protocol="redis", target="cache")
        testing.assert_decision(await admin.decide(req("CONFIG GET maxmemory")), "allow", rule="redis-admin-all")
        for line in ["SUBSCRIBE ch", "MONITOR", "CLIENT TRACKING ON", "CLIENT REPLY OFF", "RESET", "PSYNC ? -1"]:
            decision = await admin.decide(req(line))
            testing.assert_decision(decision, "deny", rule="redis:unsupported")
            assert line.split()[0] in decision.message
        testing.assert_decision(await admin.decide(req("SELECT 5")), "deny", rule="redis:db-pinned")
        # a role whose rules deny them too is told they are unsupported, not to ask for a rule that cannot help
        writer = await h.session(testing.identity("w", role="writer"), protocol="redis", target="cache")
        for line in ["SUBSCRIBE ch", "MONITOR", "CLIENT TRACKING ON"]:
            decision = await writer.decide(req(line))
            testing.assert_decision(decision, "deny", rule="redis:unsupported")
            assert "ask your security team" not in decision.message
        assert [e["rule_ids"] for e in h.audit("decision")][-3:] == [["redis:unsupported"]] * 3


def test_a_plaintext_listener_off_loopback_is_refused():
    targets = {"cache": {"protocol": "redis", "listen": "0.0.0.0:6390", "upstream": {"host": "127.0.0.1"}}}

    async def start() -> None:
        async with testing.harness(RedisAddon(), rulepacks=PACK, targets=targets, start=True):
            pass

    with pytest.raises(Exception, match="not a loopback address"):
        asyncio.run(start())


# -- the listener, in process -----------------------------------------------------------------------


class Env:
    def __init__(self, h: testing.Harness, port: int, prefix: str) -> None:
        self.h = h
        self.port = port
        self.prefix = prefix

    def client(self, role: str, protocol: int = 2) -> aioredis.Redis:
        token = self.h.gateway.issuer.issue(f"agent-{role}", {"role": role})
        return aioredis.Redis(port=self.port, username="agent", password=token, protocol=protocol)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    port = free_port()
    targets = {"cache": {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": {"host": "127.0.0.1"}}}
    prefix = f"app:test-{secrets.token_hex(4)}:"
    direct = redis.Redis()
    try:
        async with testing.harness(RedisAddon(), rulepacks=PACK, targets=targets, start=True, state_dir=tmp_path) as h:
            yield Env(h, port, prefix)
    finally:
        keys = direct.keys(prefix + "*")
        if keys:
            direct.delete(*keys)
        direct.close()


async def test_listener_masks_records_and_audits(env: Env):
    key = env.prefix + "card"
    redis.Redis().set(key, f"card {CARD} of bob@example.com")
    reader = env.client("reader")
    try:
        value = await reader.get(key)
        assert value is not None and CARD not in value.decode() and value.decode().endswith("1111 of ***@******e.com")
        with pytest.raises(redis.exceptions.NoPermissionError, match="SET denied by rule lictor:default-deny"):
            await reader.set(key, "x")
    finally:
        await reader.aclose()
    commands = env.h.events(kind="command")
    get = next(e for e in commands if e["command"] == "GET")
    assert get["keys"] == [key] and get["decision"] == "allow" and get["mask_rules"] == ["redis-mask-pii"]
    replies = {e["n"]: e for e in env.h.events(kind="reply")}
    assert replies[get["n"]]["masked"] == {"card": 1, "email": 1}
    assert replies[get["n"]]["type"] == "bulk"
    denied = next(e for e in commands if e["command"] == "SET")
    assert denied["decision"] == "deny" and denied["args"] == f"{key} x"
    assert [e["via"] for e in env.h.events(kind="auth")] == ["AUTH"]
    actions = [(e["request"]["action"], e["action"]) for e in env.h.audit("decision")]
    assert ("get", "allow") in actions and ("set", "deny") in actions


async def test_recorded_arguments_are_masked_even_for_denied_commands(env: Env):
    writer = env.client("writer")
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            await writer.set("other:1", f"card {CARD}")
        await writer.set(env.prefix + "x", f"card {CARD}")
    finally:
        await writer.aclose()
    args = [e["args"] for e in env.h.events(kind="command") if e["command"] == "SET"]
    assert len(args) == 2 and all(CARD not in a and "[REDACTED:card]" in a for a in args)


async def test_a_held_command_waits_for_an_approval(env: Env):
    key = env.prefix + "doomed"
    redis.Redis().set(key, "1")
    writer = env.client("writer")
    try:
        pending = asyncio.create_task(writer.delete(key))
        for _ in range(200):
            waits = env.h.events(kind="approval")
            if waits:
                break
            await asyncio.sleep(0.02)
        assert waits, "the DEL was not held"
        assert not pending.done()
        assert redis.Redis().exists(key) == 1  # nothing forwarded while held
        approver = testing.identity("human", role="approver")
        await env.h.approve(waits[0]["approval_id"], approver)
        assert await asyncio.wait_for(pending, 10) == 1
        assert redis.Redis().exists(key) == 0
    finally:
        await writer.aclose()
    (deleted,) = [e for e in env.h.events(kind="command") if e["command"] == "DEL"]
    assert deleted["decision"] == "allow" and deleted["approval_id"] == waits[0]["approval_id"]


async def test_commands_that_write_to_another_database_are_pinned():
    async with testing.harness(RedisAddon(), rulepacks=PACK) as h:
        writer = await h.session(testing.identity("w", role="writer"), protocol="redis", target="cache")
        for line in ["MOVE app:1 1", "COPY app:1 app:2 DB 1", "COPY app:1 app:2 db 3 REPLACE"]:
            testing.assert_decision(await writer.decide(req(line)), "deny", rule="redis:db-pinned")
        admin = await h.session(testing.identity("a", role="admin"), protocol="redis", target="cache")
        testing.assert_decision(await admin.decide(req("SWAPDB 0 1")), "deny")
        testing.assert_decision(await writer.decide(req("COPY app:1 app:2")), "allow", rule="redis-write-app")
        testing.assert_decision(await writer.decide(req("COPY app:1 app:2 DB 0")), "allow", rule="redis-write-app")


async def test_resp3_doubles_are_masked_like_their_resp2_bulk_strings(env: Env):
    key = env.prefix + "scores"
    redis.Redis().zadd(key, {"m": 4111111111111111})
    token = env.h.gateway.issuer.issue("agent-r", {"role": "reader"})
    for hello in (b"", encode_command([b"HELLO", b"3"])):
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        writer.write(
            encode_command([b"AUTH", token.encode()])
            + hello
            + encode_command([b"ZSCORE", key.encode(), b"m"])
            + encode_command([b"QUIT"])
        )
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert b"4111111111111111" not in data and b"************1111" in data, (hello, data[-80:])


async def _hold_a_del_with_pings_behind(
    env: Env, key: str, pings: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """As a writer, send DEL key (held for approval) with ``pings`` PINGs pipelined behind it; return the
    connection and the approval id."""
    redis.Redis().set(key, "1")
    token = env.h.gateway.issuer.issue("agent-w", {"role": "writer"})
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(encode_command([b"AUTH", token.encode()]))
    await writer.drain()
    assert await reader.readline() == b"+OK\r\n"
    writer.write(encode_command([b"DEL", key.encode()]) + encode_command([b"PING"]) * pings)
    await writer.drain()
    for _ in range(200):
        waits = env.h.events(kind="approval")
        if waits:
            return reader, writer, str(waits[0]["approval_id"])
        await asyncio.sleep(0.02)
    raise AssertionError("the DEL was not held")


@pytest.mark.parametrize("pings", [0, 20000])
async def test_a_held_command_is_withdrawn_when_the_agent_hangs_up(env: Env, pings: int):
    key = env.prefix + f"kept{pings}"
    # with 20000 PINGs, more than one read's worth of commands is queued behind the held DEL
    _, writer, approval_id = await _hold_a_del_with_pings_behind(env, key, pings)
    writer.close()
    for _ in range(100):
        approval = await env.h.approval(approval_id)
        if approval.status != "pending":
            break
        await asyncio.sleep(0.05)
    assert approval.status == "withdrawn"
    assert redis.Redis().exists(key) == 1


async def test_commands_pipelined_behind_a_held_command_still_run_after_the_approval(env: Env):
    key = env.prefix + "held"
    reader, writer, approval_id = await _hold_a_del_with_pings_behind(env, key, 3000)
    await env.h.approve(approval_id, testing.identity("human", role="approver"))
    assert await asyncio.wait_for(reader.readline(), 10) == b":1\r\n"
    pongs = 0
    while pongs < 3000:
        assert await asyncio.wait_for(reader.readline(), 10) == b"+PONG\r\n"
        pongs += 1
    writer.close()


async def test_a_client_name_given_with_hello_is_recorded_masked(env: Env):
    token = env.h.gateway.issuer.issue("agent-named", {"role": "reader"})
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    writer.write(
        encode_command([b"AUTH", token.encode()])
        + encode_command([b"HELLO", b"3", b"SETNAME", b"4111111111111111"])
        + encode_command([b"QUIT"])
    )
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    (hello,) = [e for e in env.h.events(kind="command") if e["command"] == "HELLO"]
    assert "4111111111111111" not in hello["args"] and hello["args"].startswith("3 SETNAME ")


async def test_a_command_whose_record_cannot_be_written_is_refused_not_forwarded(
    env: Env, monkeypatch: pytest.MonkeyPatch
):
    # session.record raising AuditError is a refusal (docs/addons.md): for a role without `recording: strict`, the
    # addon logged it and forwarded the command all the same, so the target ran a command the recording lacks.
    from lictor import AuditError, Session

    real = Session.record

    def record(self: Session, kind: str, data: dict) -> None:
        if kind == "command" and data.get("command") == "SET":
            raise AuditError("the recording spool is full")
        real(self, kind, data)

    monkeypatch.setattr(Session, "record", record)
    key = env.prefix + "unrecorded"
    writer = env.client("writer")
    try:
        with pytest.raises(redis.exceptions.ResponseError, match="recording is unavailable"):
            await writer.set(key, "1")
        assert await writer.get(key) is None  # the connection goes on
    finally:
        await writer.aclose()
    assert redis.Redis().exists(key) == 0


async def test_one_identity_may_hold_only_max_connections_at_once(tmp_path: Path):
    # Each connection holds a Redis connection and buffers: an agent looping over connections took them without end.
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    port = free_port()
    target = {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": {"host": "127.0.0.1"}}
    targets = {"cache": {**target, "max_connections": 2}}
    async with testing.harness(RedisAddon(), rulepacks=PACK, targets=targets, start=True, state_dir=tmp_path) as h:

        def client(sub: str) -> aioredis.Redis:
            token = h.gateway.issuer.issue(sub, {"role": "reader"})
            return aioredis.Redis(port=port, username="agent", password=token, single_connection_client=True)

        held = [client("looper"), client("looper")]
        try:
            for c in held:
                assert await c.ping()
            third = client("looper")
            with pytest.raises(redis.exceptions.ResponseError, match="looper already has 2 connections open"):
                await third.ping()
            await third.aclose()
            other = client("someone-else")  # the limit is per identity
            assert await other.ping()
            await other.aclose()
            await held.pop().aclose()
            again = client("looper")
            for _ in range(50):  # the gateway sees the close when it reads the end of the stream
                try:
                    assert await again.ping()
                    break
                except redis.exceptions.ResponseError:
                    await again.aclose()
                    again = client("looper")
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("a connection closed still counted against the limit")
            await again.aclose()
        finally:
            for c in held:
                await c.aclose()
        refused = [e for e in h.audit("connection.refused") if e.get("sub") == "looper"]
        assert refused and "the limit" in refused[0]["reason"], h.audit("connection.refused")


def test_ports_out_of_range_are_refused_before_start():
    # LICTOR_REDIS_PORT=99999 passed `lictor check -c` and the gateway listened on 34463 (the socket layer
    # wraps a port past 65535) while logging 99999; an upstream port past it is refused the same way.
    env = {**os.environ, "LICTOR_REDIS_PORT": "99999", "REDIS_PORT": "70000"}
    out = lictor("check", "-c", str(ROOT / "examples" / "redis" / "lictor.yaml"), env=env, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "listen must be HOST:PORT with a port from 1 to 65535, got '127.0.0.1:99999'" in out.stdout + out.stderr
    env = {**os.environ, "REDIS_PORT": "70000"}
    out = lictor("check", "-c", str(ROOT / "examples" / "redis" / "lictor.yaml"), env=env, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "upstream.port must be a port from 1 to 65535, got '70000'" in out.stdout + out.stderr
