"""The Redis addon end to end: a real ``lictor run`` process loading examples/redis/redis_addon.py,
the real ``redis-cli`` and redis-py, in front of the real Redis server on 127.0.0.1:6379.

Every test works on its own key prefix (``app:test-<random>:``) and deletes its keys afterwards;
nothing here flushes the shared server (FLUSHALL/FLUSHDB denials are covered by the policy tests,
which never reach a server).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from lictor import AuditLog, LocalIssuer

from tests.conftest import (
    ROOT,
    GatewayProcess,
    free_port,
    idle_connections,
    lictor,
    require,
    require_binary,
    wait_until,
)
from tests.idp import HeldJwks

sys.path.insert(0, str(ROOT / "examples" / "redis"))

from lictor_redis.resp import ReplyParser, encode_command

CARD = "4111 1111 1111 1111"
ADDON = str(ROOT / "examples" / "redis" / "redis_addon.py")
RULEPACKS = str(ROOT / "examples" / "redis" / "rulepacks")


def _redis_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        return True
    except OSError:
        return False


def _config(targets: dict[str, Any]) -> dict[str, Any]:
    return {"addons": [ADDON], "rulepacks": [RULEPACKS], "approvals": {}, "targets": targets}


class Gw:
    """The running gateway with helpers to get tokens and read its audit log and recordings."""

    def __init__(self, proc: GatewayProcess, port: int, api: str = "") -> None:
        self.proc = proc
        self.port = port
        self.api = api  # the approvals API, when the gateway has one
        self.issuer = LocalIssuer(proc.state_dir)

    def token(self, role: str, sub: str | None = None) -> str:
        return self.issuer.issue(sub or f"agent-{role}-{secrets.token_hex(3)}", {"role": role}, ttl=600)

    def client(self, role: str, protocol: int = 2, sub: str | None = None) -> redis.Redis:
        return redis.Redis(port=self.port, username="agent", password=self.token(role, sub), protocol=protocol)

    def cli(
        self, token: str | None, *args: str, resp3: bool = False, user: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [require_binary("redis-cli"), "-p", str(self.port), "--no-auth-warning"]
        if resp3:
            cmd += ["-3", "--no-raw"]  # formatted output shows the RESP3 types
        if token is not None:
            cmd += ["--user", "agent", "--pass", token] if user else ["-a", token]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=20)

    def audit(self, kind: str | None = None) -> list[dict[str, Any]]:
        args = ["audit", "list", "--json", "--state-dir", str(self.proc.state_dir)]
        if kind:
            args += ["--kind", kind]
        return [json.loads(line) for line in lictor(*args).stdout.splitlines() if line.strip()]

    def decisions(self, sub: str, count: int = 0) -> list[dict[str, Any]]:
        """The audited decisions of ``sub``; waits (bounded) for ``count`` of them: the audit log is fed
        from the spool by the drain process, a batch behind."""
        deadline = time.monotonic() + 10
        while True:
            found = [e for e in self.audit("decision") if e["identity"]["sub"] == sub]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def recording(self, sub: str, index: int = -1) -> list[dict[str, Any]]:
        """The events of a recorded session of ``sub`` (the last one by default), once it has ended."""
        state = str(self.proc.state_dir)
        deadline = time.monotonic() + 10
        while True:
            sessions = [e for e in self.audit("session.start") if e["identity"]["sub"] == sub]
            if len(sessions) > (index if index >= 0 else -index - 1):
                out = lictor("sessions", "export", "--state-dir", state, "--format", "jsonl", sessions[index]["id"])
                events = [json.loads(line) for line in out.stdout.splitlines() if line.strip() and '"kind"' in line]
                if any(e["kind"] == "session.end" for e in events) or time.monotonic() > deadline:
                    return events
            elif time.monotonic() > deadline:
                raise AssertionError(f"no session {index} of {sub}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    port, api = free_port(), free_port()
    workdir = tmp_path_factory.mktemp("redis-gw")
    target = {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": {"host": "127.0.0.1", "port": 6379}}
    config = {**_config({"cache": target}), "approvals": {"listen": f"127.0.0.1:{api}"}}
    proc = GatewayProcess(workdir, config).start()
    try:
        yield Gw(proc, port, f"http://127.0.0.1:{api}")
    finally:
        proc.stop()


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"app:test-{secrets.token_hex(4)}:"
    yield p
    direct = redis.Redis()
    for db in (0, 2):
        direct.select(db)
        keys = direct.keys(p + "*")
        if keys:
            direct.delete(*keys)
    direct.close()


def _raw(port: int, payload: bytes, replies: int) -> list[bytes]:
    """Send ``payload`` in one write; return ``replies`` top-level replies as raw bytes (fewer if it closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        return _replies(s, replies, closed_ok=True)


def _replies(s: socket.socket, count: int, closed_ok: bool = False) -> list[bytes]:
    """``count`` top-level replies read from ``s``, raw (fewer if the gateway closes and ``closed_ok``)."""
    parser = ReplyParser()
    out: list[bytes] = []
    current = bytearray()
    while len(out) < count:
        data = s.recv(65536)
        if not data and closed_ok:
            break
        assert data, f"the gateway closed the connection after {len(out)} of {count} replies: {out[-3:]}"
        parser.feed(data)
        for event in parser.events():
            current += (
                event.data if hasattr(event, "data") else (b"\r\n" if not hasattr(event, "prefix") else event.raw)
            )
            if event.done:
                out.append(bytes(current))
                current.clear()
    return out


def cmd(*args: str | bytes) -> bytes:
    return encode_command([a.encode() if isinstance(a, str) else a for a in args])


# -- redis-cli --------------------------------------------------------------------------------------


def test_redis_cli_allowed_and_denied(gw: Gw, prefix: str):
    writer, reader, admin = gw.token("writer"), gw.token("reader"), gw.token("admin")
    assert gw.cli(None, "GET", prefix + "k").stdout.strip() == "NOAUTH Authentication required."
    assert gw.cli(writer, "SET", prefix + "k", "hello").stdout.strip() == "OK"
    assert gw.cli(reader, "GET", prefix + "k", user=False).stdout.strip() == "hello"  # AUTH <token>
    denied = gw.cli(reader, "SET", prefix + "k", "x").stdout.strip()
    assert denied.startswith("NOPERM lictor: SET denied by rule lictor:default-deny: ")
    version = gw.audit("decision")[-1]["policy_version"]
    assert denied.endswith(f"(policy {version})")
    eval_denied = gw.cli(writer, "EVAL", "return redis.call('get', KEYS[1])", "1", prefix + "k").stdout
    assert "NOPERM lictor: EVAL denied by rule redis-no-scripts: scripts run code" in eval_denied
    assert "denied by rule redis-no-dangerous" in gw.cli(writer, "KEYS", prefix + "*").stdout
    assert "denied by rule redis-admin-no-destroy" in gw.cli(admin, "DEBUG", "SLEEP", "0").stdout
    assert gw.cli(admin, "GET", prefix + "k").stdout.strip() == "hello"
    assert redis.Redis().get(prefix + "k") == b"hello"


def test_a_repeated_store_option_cannot_write_outside_the_allowed_keys(gw: Gw, prefix: str):
    direct = redis.Redis()
    direct.geoadd(prefix + "g", (13.36, 38.11, "a"))
    other = "other:" + prefix
    writer = gw.token("writer")
    for command in ("GEORADIUS", "GEORADIUSBYMEMBER"):
        where = ["13.36", "38.11"] if command == "GEORADIUS" else ["a"]
        for option in ("STORE", "STOREDIST"):
            out = gw.cli(writer, command, prefix + "g", *where, "10", "km", option, prefix + "x", option, other)
            assert out.stdout.startswith(f"NOPERM lictor: {command} denied by rule lictor:default-deny: "), out
    assert direct.exists(other) == 0
    assert (
        gw.cli(writer, "GEORADIUS", prefix + "g", "13.36", "38.11", "10", "km", "STORE", prefix + "x").stdout == "1\n"
    )
    direct.delete(other)
    direct.close()


def test_a_command_with_more_arguments_than_max_args_is_refused_in_step(gw: Gw, prefix: str):
    """A command of more than ``limits.max_args`` (65536) arguments is read to its end, not kept nor decided, and
    refused with an error naming the limit; the commands after it (a transaction too) go on in step."""
    sub = f"bulk-{secrets.token_hex(3)}"
    over = cmd("EXISTS", *[f"{prefix}{i}" for i in range(65536)])  # with its name: 65537 arguments
    at_limit = cmd("EXISTS", *[f"{prefix}{i}" for i in range(65535)])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
        s.sendall(cmd("AUTH", gw.token("reader", sub=sub)) + over + cmd("PING") + at_limit)
        s.sendall(cmd("MULTI") + over + cmd("GET", prefix + "k") + cmd("EXEC") + cmd("PING"))
        replies = _replies(s, 9)
    limit = (
        b"-ERR lictor: EXISTS has 65537 arguments, more than this target's limit of 65536 (limits.max_args); "
        b"split it into smaller commands\r\n"
    )
    abort = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    assert replies == [
        b"+OK\r\n",
        limit,
        b"+PONG\r\n",
        b":0\r\n",
        b"+OK\r\n",
        limit,
        b"+QUEUED\r\n",
        abort,
        b"+PONG\r\n",
    ]
    refused = [d for d in gw.decisions(sub, 4) if d["rule_ids"] == ["redis:max-args"]]
    assert [(d["action"], d["request"]["summary"]) for d in refused] == [("deny", "EXISTS (65537 args)")] * 2


def test_a_pipeline_released_at_once_leaves_other_agents_their_turn(gw: Gw, prefix: str):
    """Commands pipelined behind a held DEL wait in the gateway, all read; once the approver decides, they are
    decided one after the other on the event loop every agent shares. Another agent, PINGing meanwhile, gets its
    turns among them: its PINGs are decided between the pipeline's first and last commands, not after them, and
    while a command of 100001 arguments is read (to be refused: more than limits.max_args), not after it."""
    sub, other = f"burst-{secrets.token_hex(3)}", f"pinger-{secrets.token_hex(3)}"
    exists = cmd("EXISTS", *[f"{prefix}{i}" for i in range(2000)])
    count = 100
    done = threading.Event()
    pongs: list[bytes] = []

    def ping(s: socket.socket) -> None:
        while not done.is_set():
            s.sendall(cmd("PING"))
            pongs.append(s.recv(100))

    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=20) as burst,
        socket.create_connection(("127.0.0.1", gw.port), timeout=20) as pinger,
    ):
        pinger.sendall(cmd("AUTH", gw.token("reader", sub=other)))
        assert pinger.recv(100) == b"+OK\r\n"
        big = cmd("EXISTS", *[f"{prefix}{i}" for i in range(100000)])
        burst.sendall(cmd("AUTH", gw.token("writer", sub=sub)) + cmd("DEL", prefix + "gone") + exists + big)
        burst.sendall(exists * count)
        assert [d["action"] for d in gw.decisions(sub, 1)] == ["approve"]
        approver = {"Authorization": f"Bearer {gw.token('approver', sub='human-1')}"}
        listed = httpx.get(f"{gw.api}/api/approvals?status=pending", headers=approver).json()["approvals"]
        (held,) = [a["id"] for a in listed if a["requester"]["sub"] == sub]
        pinging = threading.Thread(target=ping, args=(pinger,))
        pinging.start()
        try:
            denied = httpx.post(f"{gw.api}/api/approvals/{held}/deny", json={"reason": "not now"}, headers=approver)
            assert denied.status_code == 200, denied.text
            replies = _replies(burst, 4 + count)
        finally:
            done.set()
            pinging.join(timeout=20)
    assert replies[2] == b":0\r\n" and replies[3].startswith(b"-ERR lictor: EXISTS has 100001 arguments, more ")
    assert replies[4:] == [b":0\r\n"] * count and set(pongs) == {b"+PONG\r\n"}
    decisions = [d for d in gw.audit("decision") if d["identity"]["sub"] in (sub, other) and d["phase"] == "decision"]
    order = [(d["identity"]["sub"], d["request"]["action"], d["rule_ids"][0]) for d in decisions]
    pipeline = [i for i, step in enumerate(order) if step[:2] == (sub, "exists")]
    assert len(pipeline) == 2 + count and order[pipeline[1]][2] == "redis:max-args"
    assert any(step[0] == other for step in order[pipeline[0] : pipeline[1]]), "PINGs waited for the long command"
    assert any(step[0] == other for step in order[pipeline[2] : pipeline[-1]]), "PINGs waited for the pipeline"


def test_a_long_masked_reply_leaves_other_agents_their_turn(gw: Gw, prefix: str):
    """A reply arrives faster than the gateway masks it, so relaying it seldom waits for the socket: another
    agent's PINGs were answered about once per 10,000 masked items of a reader's LRANGE (each waiting up to a
    second). The relay now gives the shared event loop a turn every few hundred items."""
    items = 100_000
    direct = redis.Redis()
    for start in range(0, items, 10_000):
        direct.rpush(prefix + "mails", *[f"u{i}@example.com" for i in range(start, start + 10_000)])
    reader, pinger = gw.client("reader"), gw.client("reader")
    pinger.ping()
    relaying = threading.Event()
    pongs = 0

    def ping() -> None:
        nonlocal pongs
        while relaying.is_set():
            assert pinger.ping() is True
            pongs += 1

    relaying.set()
    pinging = threading.Thread(target=ping)
    pinging.start()
    try:
        values = reader.lrange(prefix + "mails", 0, -1)
    finally:
        relaying.clear()
        pinging.join(timeout=20)
    assert len(values) == items and values[0] == b"**@******e.com" and b"@example.com" not in b"".join(values)
    assert pongs >= items // 1000, f"{pongs} PINGs answered while {items} items were relayed"


def test_getdel_waits_for_an_approval_like_del(gw: Gw, prefix: str):
    direct = redis.Redis()
    direct.set(prefix + "k", "v")
    sub = f"getdel-{secrets.token_hex(3)}"
    token = gw.token("writer", sub=sub)
    other = gw.cli(token, "GETDEL", "other:" + prefix).stdout
    assert other.startswith("NOPERM lictor: GETDEL denied by rule redis-delete-only-app-keys: ")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(cmd("AUTH", token) + cmd("GETDEL", prefix + "k"))
        held = gw.decisions(sub, 2)
        assert [d["action"] for d in held] == ["deny", "approve"]
        assert s.recv(100) == b"+OK\r\n"  # and nothing more: the GETDEL waits
    assert direct.get(prefix + "k") == b"v"
    direct.close()


def test_redis_py_as_the_readme_builds_it_waits_for_an_approver(tmp_path: Path, prefix: str):
    """redis-py gives up on a reply after 5 seconds by default and sends the command again: a held DEL
    would become a series of withdrawn requests. The client the README shows waits for the approver."""
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    readme = (ROOT / "examples" / "redis" / "README.md").read_text()
    shown = re.search(r"redis-py: `(redis\.Redis\(port=6380, [^`]*\))`", readme)
    assert shown, "the README shows how to build a redis-py client"
    port, api = free_port(), free_port()
    target = {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": {"host": "127.0.0.1", "port": 6379}}
    config = {**_config({"cache": target}), "approvals": {"listen": f"127.0.0.1:{api}"}}
    proc = GatewayProcess(tmp_path, config).start()
    try:
        gw = Gw(proc, port)
        redis.Redis().set(prefix + "old", "v")
        code = shown.group(1).replace("port=6380", f"port={port}")
        client = eval(code, {"redis": redis, "token": gw.token("writer", sub="py-writer")})
        approver = gw.token("approver", sub="human-1")
        url = f"http://127.0.0.1:{api}"
        result: list[Any] = []
        deleting = threading.Thread(target=lambda: result.append(client.delete(prefix + "old")))
        deleting.start()
        assert gw.decisions("py-writer", 1)
        time.sleep(6)  # longer than redis-py's default socket timeout
        listed = lictor("approvals", "list", "--all", "--json", "--url", url, "--token", approver).stdout
        asked = [a for a in json.loads(listed) if a["requester"]["sub"] == "py-writer"]
        assert [a["status"] for a in asked] == ["pending"]  # one request, not one withdrawn per retry
        lictor("approvals", "approve", asked[0]["id"], "--url", url, "--token", approver)
        deleting.join(timeout=20)
        assert result == [1] and redis.Redis().get(prefix + "old") is None
        client.close()
    finally:
        proc.stop()


OPS_PACK = """
format: lictor/v1
metadata: {name: redis-ops}
identities:
  - {match: {claims: {role: ops}}, roles: [ops]}
  - {match: {claims: {role: approver}}, roles: [ops-approver]}
roles:
  ops:
    rules:
      - {id: ops-settings, protocol: redis, when: {commands: [CONFIG SET, MIGRATE, ACL SETUSER]}, action: approve,
         approval: {approvers: [ops-approver]}}
  ops-approver: {rules: []}
"""


def test_approvers_read_no_password_an_agent_sends_on_to_redis(tmp_path: Path, prefix: str):
    """A held CONFIG SET requirepass, MIGRATE ... AUTH2 or ACL SETUSER >password would show the password to
    approvers (the approval page, `lictor approvals show`) and keep it in the approvals store. They read
    [REDACTED] and a digest, and the approval still runs the command the agent sent."""
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    (tmp_path / "packs").mkdir()
    (tmp_path / "packs" / "ops.yaml").write_text(OPS_PACK)
    port, api = free_port(), free_port()
    target = {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": {"host": "127.0.0.1", "port": 6379}}
    config = {
        **_config({"cache": target}),
        "rulepacks": [str(tmp_path / "packs")],
        "approvals": {"listen": f"127.0.0.1:{api}"},
    }
    proc = GatewayProcess(tmp_path, config).start()
    try:
        gw = Gw(proc, port)
        ops, approver = gw.token("ops", sub="ops-1"), gw.token("approver", sub="human-1")
        url = f"http://127.0.0.1:{api}"
        held = {
            "config": ["CONFIG", "SET", "masterauth", "Config-Secret-1"],
            "migrate": [
                "MIGRATE",
                "127.0.0.1",
                "1",
                "",
                "0",
                "100",
                *"AUTH2 bob Migrate-Secret-2 KEYS".split(),
                prefix,
            ],
            "acl": ["ACL", "SETUSER", "somebody", ">Acl-Secret-3"],
        }
        clients = {name: redis.Redis(port=port, username="agent", password=ops, socket_timeout=None) for name in held}
        results: dict[str, Any] = {}

        def send(name: str) -> None:
            try:
                results[name] = clients[name].execute_command(*held[name])
            except redis.exceptions.RedisError as exc:
                results[name] = exc

        threads = [threading.Thread(target=send, args=(name,)) for name in held]
        for thread in threads:
            thread.start()
        assert gw.decisions("ops-1", 3)
        listed = json.loads(lictor("approvals", "list", "--json", "--url", url, "--token", approver).stdout)
        assert len(listed) == 3
        shown = [lictor("approvals", "show", a["id"], "--url", url, "--token", approver).stdout for a in listed]
        shown += [
            lictor("approvals", "show", a["id"], "--json", "--url", url, "--token", approver).stdout for a in listed
        ]
        text = "\n".join(shown) + json.dumps(listed)
        assert "CONFIG SET masterauth [REDACTED] (passwords: sha256:" in text, text
        assert "AUTH2 [REDACTED] [REDACTED] KEYS" in text
        for secret in ("Config-Secret-1", "Migrate-Secret-2", "Acl-Secret-3"):
            assert secret not in text
        # the approval is bound to the real arguments and runs them (no such key: MIGRATE connects nowhere)
        migrate = next(a["id"] for a in listed if a["summary"].startswith("MIGRATE"))
        lictor("approvals", "approve", migrate, "--url", url, "--token", approver)
        threads[1].join(timeout=20)
        assert results["migrate"] == b"NOKEY"
    finally:
        proc.stop()  # the other two were never approved: they end withdrawn, nothing changed on the server
    for thread in threads:
        thread.join(timeout=20)
    for client in clients.values():
        client.close()
    stored = b"".join(f.read_bytes() for f in proc.state_dir.rglob("*") if f.is_file())
    for secret in (b"Config-Secret-1", b"Migrate-Secret-2", b"Acl-Secret-3"):
        assert secret not in stored


def test_redis_cli_resp3_and_masking(gw: Gw, prefix: str):
    redis.Redis().hset(prefix + "customer", mapping={"email": "bob@example.com", "card": CARD, "plan": "gold"})
    out = gw.cli(gw.token("reader"), "HGETALL", prefix + "customer", resp3=True).stdout
    assert '"plan" => "gold"' in out  # a RESP3 map, as redis-cli prints maps
    assert "bob@example.com" not in out and CARD not in out
    assert "**** **** **** 1111" in out and "***@******e.com" in out
    hello = gw.cli(gw.token("reader"), "HELLO", "3", resp3=True).stdout
    assert '"proto" => (integer) 3' in hello


def test_authentication_failures(gw: Gw):
    other = LocalIssuer(gw.proc.workdir / "other-issuer").issue("mallory", {"role": "admin"})
    res = gw.cli(other, "GET", "app:1")
    assert "WRONGPASS lictor:" in res.stderr + res.stdout
    good = gw.token("reader")
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    replies = _raw(
        gw.port,
        cmd("HELLO", "3")
        + cmd("HELLO", "4", "AUTH", "agent", good)
        + cmd("AUTH", "a", "b", "c")
        + cmd("AUTH", "agent", tampered)
        + cmd("AUTH", "garbage")
        + cmd("AUTH", "agent", "x.y.z")
        + cmd("PING"),
        7,
    )
    assert replies[0].startswith(b"-NOAUTH HELLO must be called with the client already authenticated")
    assert replies[1] == b"-NOPROTO unsupported protocol version\r\n"
    assert replies[2] == b"-ERR wrong number of arguments for 'auth' command\r\n"
    assert all(r.startswith(b"-WRONGPASS lictor: ") for r in replies[3:6])
    assert len(replies) == 6  # the third failure closes the connection; PING never gets a reply
    deadline = time.monotonic() + 10  # the audit log is a batch behind the spool
    while len(failed := [e for e in gw.audit("auth.failed") if e["protocol"] == "redis"]) < 4:
        assert time.monotonic() < deadline, failed
        time.sleep(0.1)
    assert all(e["target"] == "cache" for e in failed)


def test_a_slow_identity_provider_holds_up_no_other_connection(tmp_path: Path):
    """A login whose token needs the identity provider's keys waits for them; the gateway's other
    connections go on meanwhile."""
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    port = free_port()
    target = {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": {"host": "127.0.0.1", "port": 6379}}
    with HeldJwks() as idp:
        config = _config({"cache": target})
        config["identity"] = {"issuers": [{"type": "lictor"}, idp.issuer]}
        proc = GatewayProcess(tmp_path, config).start()
        try:
            local = Gw(proc, port).client("reader")
            assert local.ping()
            logins: list[Any] = []

            def login() -> None:
                try:
                    client = redis.Redis(port=port, username="agent", password=idp.token("idp-agent", role="reader"))
                    logins.append(client.ping())
                    client.close()
                except Exception as exc:
                    logins.append(exc)

            answered_while_held = idp.others_go_on(login, local.ping)
            local.close()
        finally:
            proc.stop()
    assert answered_while_held, "commands waited for another connection's login"
    assert logins == [True], logins


# -- redis-py: RESP2 and RESP3, masking ---------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_masks_a_stored_card_number(gw: Gw, prefix: str, protocol: int):
    direct = redis.Redis()
    direct.set(prefix + "card", f"paid with {CARD}")
    direct.hset(prefix + "h", mapping={"card": CARD, "n": "1"})
    reader = gw.client("reader", protocol=protocol)
    assert reader.get(prefix + "card") == b"paid with **** **** **** 1111"
    assert reader.hgetall(prefix + "h") == {b"card": b"**** **** **** 1111", b"n": b"1"}
    assert reader.mget(prefix + "card", prefix + "missing") == [b"paid with **** **** **** 1111", None]
    admin = gw.client("admin", protocol=protocol)
    assert admin.get(prefix + "card") == f"paid with {CARD}".encode()  # admins see values unmasked
    if protocol == 3:
        assert reader.connection_pool.get_connection().protocol == 3
    reader.close()
    admin.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_json_value_with_unicode_escapes_is_masked_as_json(gw: Gw, prefix: str, protocol: int):
    # json.dumps writes zoë@exämple.com as zo\\u00eb@ex\\u00e4mple.com: an address to the agent's JSON reader,
    # not to detectors reading the bytes
    direct = redis.Redis()
    direct.set(prefix + "j", json.dumps({"email": "zo\u00eb@ex\u00e4mple.com"}).replace("@", "\\u0040"))
    direct.hset(prefix + "h", "doc", json.dumps(["zo\u00eb@ex\u00e4mple.com"]))
    reader = gw.client("reader", protocol=protocol)
    got = json.loads(reader.get(prefix + "j"))
    assert "zo" not in got["email"] and got["email"].endswith(".com"), got
    assert "zo" not in reader.hget(prefix + "h", "doc").decode()
    reader.close()


def test_a_value_with_unicode_escapes_that_is_not_json_is_masked_as_read(gw: Gw, prefix: str):
    # JSON lines, or a line of text with JSON-escaped strings in it: no JSON document, but anyone reads the
    # addresses in them
    lines = [json.dumps({"email": "zo\u00eb@ex\u00e4mple.com"}), json.dumps({"email": "jane@example.com"})]
    direct = redis.Redis()
    direct.set(prefix + "lines", "\n".join(lines))
    direct.set(prefix + "text", "contact: jane\\u0040example.com")
    reader = gw.client("reader")
    got = reader.mget(prefix + "lines", prefix + "text")
    assert all(b"@" in v and b"jane" not in v and b"zo" not in v and b"u0040" not in v for v in got), got
    reader.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_number_stored_as_a_string_is_masked_in_integer_replies(gw: Gw, prefix: str, protocol: int):
    direct = redis.Redis()
    direct.set(prefix + "n", CARD.replace(" ", ""))
    direct.hset(prefix + "h", "card", CARD.replace(" ", ""))
    writer = gw.client("writer", protocol=protocol)
    assert writer.incrby(prefix + "n", 0) == b"************1111"
    assert writer.hincrby(prefix + "h", "card", 0) == b"************1111"
    assert writer.pipeline().incr(prefix + "c").decrby(prefix + "n", 0).execute() == [1, b"************1111"]
    assert writer.incr(prefix + "c") == 2  # numbers that are nothing to mask stay integers
    writer.close()
    out = gw.cli(gw.token("writer"), "INCRBY", prefix + "n", "0").stdout
    assert out == "************1111\n"
    direct.close()


def test_a_masked_member_is_not_read_a_few_characters_at_a_time(gw: Gw, prefix: str):
    redis.Redis().zadd(prefix + "z", {CARD.replace(" ", ""): 0})
    token = gw.token("reader")
    assert gw.cli(token, "ZRANGE", prefix + "z", "0", "-1").stdout == "************1111\n"
    # is the member between 4111 and 4112? then between 41111 and 41112?... about fifty questions read it whole
    for command in (("ZLEXCOUNT", "[4111", "(4112"), ("ZRANGE", "[4111", "(4112", "BYLEX")):
        out = gw.cli(token, command[0], prefix + "z", *command[1:]).stdout
        assert out.startswith(f"NOPERM lictor: {command[0]} denied by rule redis-no-lex-ranges"), out
    # or does a member match 4*? 41*?... a few questions per character, ? standing for any one
    redis.Redis().sadd(prefix + "s", CARD.replace(" ", ""))
    for command in (("SSCAN", prefix + "s", "0", "MATCH", "4*"), ("ZSCAN", prefix + "z", "0", "match", "4???*")):
        out = gw.cli(token, *command).stdout
        assert out.startswith(f"NOPERM lictor: {command[0]} denied by rule redis-no-member-patterns"), out
    assert gw.cli(token, "SSCAN", prefix + "s", "0").stdout == "0\n************1111\n"


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_score_masked_by_zscore_is_not_read_back_as_coordinates(gw: Gw, prefix: str, protocol: int):
    """GEOPOS decodes any sorted-set score into the coordinates it stands for, and they give the score back
    whole (so do distances from points the agent chooses): a card number stored as a score (masked by
    ZSCORE) would be read through them."""
    direct = redis.Redis()
    direct.zadd(prefix + "z", {"m": 4111111111111111})
    direct.geoadd(prefix + "geo", (13.361389, 38.115556, "alice@example.com"))
    reader = gw.client("reader", protocol=protocol)
    assert gw.cli(gw.token("reader"), "ZSCORE", prefix + "z", "m").stdout == "************1111\n"
    for command in (
        ("GEOPOS", prefix + "z", "m"),
        ("GEOHASH", prefix + "z", "m"),
        ("GEOSEARCH", prefix + "z", "FROMLONLAT", "0", "0", "BYRADIUS", "20000", "km", "WITHCOORD"),
        ("GEORADIUS_RO", prefix + "z", "0", "0", "20000", "km", "withcoord"),
        ("GEORADIUSBYMEMBER_RO", prefix + "z", "m", "1", "km", "WITHCOORD"),
        # three distances from points of the agent's choosing pin the place down as exactly
        ("GEOSEARCH", prefix + "z", "FROMLONLAT", "0", "0", "BYRADIUS", "20000", "km", "WITHDIST"),
        ("GEODIST", prefix + "geo", "alice@example.com", "alice@example.com"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError, match="by rule redis-no-decoded-scores"):
            reader.execute_command(*command)
    # searching by area still works, members masked
    found = reader.execute_command("GEOSEARCH", prefix + "geo", "FROMLONLAT", "13", "38", "BYRADIUS", "200", "km")
    assert found == [b"*****@******e.com"]
    assert reader.ping()
    reader.close()
    direct.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_masked_score_is_not_read_back_through_a_computed_one(gw: Gw, prefix: str, protocol: int):
    """ZUNION and ZINTER WITHSCORES answer scores the server computed: halved by WEIGHTS 0.5 or doubled by a
    key named twice, a card number stored as a score no longer looks like one, and is one multiplication
    away from the stored value that ZSCORE masks."""
    direct = redis.Redis()
    direct.zadd(prefix + "z", {"m": 4111111111111111})
    reader = gw.client("reader", protocol=protocol)
    for command in (
        ("ZUNION", "1", prefix + "z", "WEIGHTS", "0.5", "WITHSCORES"),
        ("ZUNION", "2", prefix + "z", prefix + "z", "WITHSCORES"),
        ("zinter", "1", prefix + "z", "weights", "0.001", "withscores"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError, match="by rule redis-no-computed-scores"):
            reader.execute_command(*command)
    out = gw.cli(gw.token("reader"), "ZUNION", "1", prefix + "z", "WEIGHTS", "0.5", "WITHSCORES")
    assert "denied by rule redis-no-computed-scores" in out.stdout and "2055555555555555" not in out.stdout
    # the members of a union, and the stored scores, still come back (masked)
    assert reader.execute_command("ZUNION", "2", prefix + "z", prefix + "z") == [b"m"]
    assert gw.cli(gw.token("reader"), "ZRANGE", prefix + "z", "0", "-1", "WITHSCORES").stdout == "m\n************1111\n"
    reader.close()
    direct.close()


def test_a_writer_cannot_transform_a_masked_value_server_side(gw: Gw, prefix: str):
    """A value changed in place (inverted, one character or bit altered, something appended) no longer
    looks like a card number, so it would come back unmasked, and the agent could undo the change."""
    direct = redis.Redis()
    direct.set(prefix + "card", f"paid with {CARD}")
    writer = gw.client("writer")
    transforms = [
        ("BITOP", "NOT", prefix + "copy", prefix + "card"),
        ("BITOP", "XOR", prefix + "copy", prefix + "card", prefix + "other"),
        ("SETRANGE", prefix + "card", "10", "5"),
        ("SETBIT", prefix + "card", "80", "1"),
        ("APPEND", prefix + "card", "0"),
    ]
    for command in transforms:
        with pytest.raises(redis.exceptions.ResponseError, match="denied by rule redis-no-transforming-writes"):
            writer.execute_command(*command)
    assert writer.get(prefix + "card") == b"paid with **** **** **** 1111"
    writer.close()
    assert direct.get(prefix + "card") == f"paid with {CARD}".encode()  # nothing changed
    assert direct.exists(prefix + "copy") == 0
    direct.close()


def test_hello_3_auth_authenticates(gw: Gw, prefix: str):
    sub = f"hello-{secrets.token_hex(3)}"
    client = gw.client("writer", protocol=3, sub=sub)  # redis-py sends HELLO 3 AUTH <user> <token>
    assert client.set(prefix + "x", "1") is True
    client.close()
    auth = [e for e in gw.recording(sub) if e["kind"] == "auth"]
    assert auth and auth[0]["data"]["via"] == "HELLO" and auth[0]["data"]["user"] == "agent"


# -- pipelines and transactions ---------------------------------------------------------------------


def test_a_pipeline_in_one_write_is_decided_command_by_command(gw: Gw, prefix: str):
    sub = f"pipe-{secrets.token_hex(3)}"
    token = gw.token("writer", sub=sub)
    payload = cmd("AUTH", "agent", token)
    for i in range(100):
        payload += cmd("GET", "other:secret") if i == 50 else cmd("SET", f"{prefix}{i}", str(i))
    replies = _raw(gw.port, payload, 101)
    assert replies[0] == b"+OK\r\n"
    assert replies[1:51] == [b"+OK\r\n"] * 50 and replies[52:] == [b"+OK\r\n"] * 49
    assert replies[51].startswith(b"-NOPERM lictor: GET denied by rule lictor:default-deny")
    direct = redis.Redis()
    assert direct.get(f"{prefix}99") == b"99" and direct.exists(f"{prefix}50") == 0
    # the audit sink drains the spool in the background: wait for it (bounded), do not sleep blindly
    decisions = gw.decisions(sub, count=100)
    assert len(decisions) == 100
    assert [d["action"] for d in decisions].count("deny") == 1


def test_an_agent_that_hangs_up_during_a_blocking_pop_pops_nothing(gw: Gw, prefix: str):
    """Redis drops a blocked client that hangs up. A BLPOP the gateway kept waiting upstream for an agent
    that is gone would pop the next value pushed and lose it; replies before it still reach an agent that
    only half-closed, as from Redis."""
    direct = redis.Redis()
    admin = gw.token("admin")
    agent = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    agent.sendall(
        encode_command([b"AUTH", b"agent", admin.encode()]) + encode_command([b"BLPOP", prefix.encode() + b"q", b"0"])
    )
    assert agent.recv(100) == b"+OK\r\n"
    time.sleep(0.5)  # the BLPOP waits upstream
    agent.close()
    time.sleep(0.5)
    direct.rpush(prefix + "q", "job-1")
    time.sleep(0.3)
    assert direct.lrange(prefix + "q", 0, -1) == [b"job-1"]
    # half-closed after GET and BLPOP: the GET is answered, the BLPOP is dropped
    direct.set(prefix + "k", "v")
    agent = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    agent.sendall(
        encode_command([b"AUTH", b"agent", admin.encode()])
        + encode_command([b"GET", prefix.encode() + b"k"])
        + encode_command([b"BLPOP", prefix.encode() + b"q2", b"0"])
    )
    agent.shutdown(socket.SHUT_WR)
    received = b""
    while chunk := agent.recv(1000):
        received += chunk
    assert received == b"+OK\r\n$1\r\nv\r\n"
    agent.close()
    direct.close()


def test_redis_py_pipeline_without_transaction_continues_after_a_denial(gw: Gw, prefix: str):
    client = gw.client("writer")
    pipe = client.pipeline(transaction=False)
    pipe.set(prefix + "a", "1").get("other:1").incr(prefix + "a").get(prefix + "a")
    results = pipe.execute(raise_on_error=False)
    assert results[0] is True and results[2] == 2 and results[3] == b"2"
    assert isinstance(results[1], redis.exceptions.NoPermissionError)
    client.close()


def test_transaction_with_a_denied_command_is_aborted(gw: Gw, prefix: str):
    redis.Redis().set(prefix + "n", "10")
    token = gw.token("writer")
    replies = _raw(
        gw.port,
        cmd("AUTH", token)
        + cmd("MULTI")
        + cmd("INCR", prefix + "n")
        + cmd("GET", "other:1")
        + cmd("INCR", prefix + "n")
        + cmd("EXEC")
        + cmd("GET", prefix + "n"),
        7,
    )
    assert replies[:3] == [b"+OK\r\n", b"+OK\r\n", b"+QUEUED\r\n"]
    assert replies[3].startswith(b"-NOPERM lictor: GET denied by rule")
    assert replies[4] == b"+QUEUED\r\n"
    assert replies[5] == b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    assert replies[6] == b"$2\r\n10\r\n"  # nothing of the transaction ran; the connection goes on
    client = gw.client("writer")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.pipeline(transaction=True).incr(prefix + "n").get("other:1").execute()
    assert redis.Redis().get(prefix + "n") == b"10"
    client.close()


def test_commands_redis_runs_at_once_inside_multi_get_no_element_in_exec(gw: Gw, prefix: str):
    redis.Redis().set(prefix + "c", f"card {CARD}")
    replies = _raw(
        gw.port,
        cmd("AUTH", gw.token("writer"))
        + cmd("MULTI")
        + cmd("WATCH", prefix + "c")  # Redis answers at once with an error and queues nothing
        + cmd("GET", prefix + "c")
        + cmd("EXEC"),
        5,
    )
    assert replies[2] == b"-ERR WATCH inside MULTI is not allowed\r\n"
    assert replies[3] == b"+QUEUED\r\n"
    assert replies[4] == b"*1\r\n$24\r\ncard **** **** **** 1111\r\n"


def test_a_transaction_queued_before_the_token_expired_does_not_run_after_it(gw: Gw, prefix: str):
    """A connection does not outlive its token: EXEC is what runs the queued writes, so it is refused."""
    sub = f"agent-short-{secrets.token_hex(3)}"
    token = gw.issuer.issue(sub, {"role": "writer"}, ttl=2)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(cmd("AUTH", token) + cmd("MULTI") + cmd("SET", prefix + "late", "1"))
        parser = ReplyParser()
        replies: list[bytes] = []
        current = bytearray()

        def read(count: int) -> None:
            while len(replies) < count:
                parser.feed(s.recv(65536))
                for event in parser.events():
                    current.extend(getattr(event, "raw", b""))
                    if event.done:
                        replies.append(bytes(current))
                        current.clear()

        read(3)
        assert replies == [b"+OK\r\n", b"+OK\r\n", b"+QUEUED\r\n"]
        time.sleep(3)  # the token expires with the transaction queued
        s.sendall(cmd("EXEC") + cmd("PING"))
        read(5)
    assert replies[3].startswith(b"-NOPERM lictor: EXEC denied by rule lictor:token-expired: your token has expired")
    assert replies[4].startswith(b"-NOPERM lictor: PING denied by rule lictor:token-expired")
    assert redis.Redis().get(prefix + "late") is None  # the queued SET never ran
    (exec_denial,) = [e for e in gw.decisions(sub, 3) if e["request"]["action"] == "exec"]
    assert exec_denial["action"] == "deny" and exec_denial["rule_ids"] == ["lictor:token-expired"]
    recorded = [e["data"] for e in gw.recording(sub) if e["kind"] == "command"]
    assert {"command": "EXEC", "decision": "deny", "rules": ["lictor:token-expired"]}.items() <= recorded[-2].items()


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_transaction_whose_watched_key_changed_answers_null(gw: Gw, prefix: str, protocol: int):
    # EXEC answers a null (*-1 in RESP2) when a watched key changed: clients raise WatchError and retry
    writer = gw.client("writer", protocol=protocol)
    writer.set(prefix + "balance", "1")
    with writer.pipeline(transaction=True) as pipe:
        pipe.watch(prefix + "balance")
        redis.Redis().set(prefix + "balance", "2")  # another client changes it
        pipe.multi()
        pipe.set(prefix + "balance", "3")
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert writer.get(prefix + "balance") == b"2"
    writer.close()


def test_transaction_results_are_masked_per_command(gw: Gw, prefix: str):
    client = gw.client("writer", protocol=3)
    pipe = client.pipeline(transaction=True)
    pipe.set(prefix + "c", f"card {CARD}").get(prefix + "c").hset(prefix + "h", "email", "bob@example.com")
    pipe.hgetall(prefix + "h")
    assert pipe.execute() == [True, b"card **** **** **** 1111", 1, {b"email": b"***@******e.com"}]
    assert redis.Redis().get(prefix + "c") == f"card {CARD}".encode()  # stored as sent
    client.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_map_keys_and_set_members_that_mask_alike_stay_distinct(gw: Gw, prefix: str, protocol: int):
    # both addresses mask to *****@******e.com: a client building a dict or a set would keep one
    alice, carol = "alice@example.com", "carol@example.com"
    direct = redis.Redis()
    direct.hset(prefix + "h", mapping={alice: "1", carol: "2", "n": "3"})
    direct.sadd(prefix + "s", alice, carol)
    direct.xadd(prefix + "events", {alice: "1", carol: "2"}, id="1-1")
    reader = gw.client("reader", protocol=protocol)
    got = reader.hgetall(prefix + "h")
    assert sorted(got.values()) == [b"1", b"2", b"3"]
    assert sorted(got) == [b"*****@******e.com", b"*****@******e.com#2", b"n"]
    assert reader.smembers(prefix + "s") == {b"*****@******e.com", b"*****@******e.com#2"}
    assert len(reader.hscan(prefix + "h")[1]) == 3
    assert len(set(reader.sscan(prefix + "s")[1])) == 2
    assert sorted(reader.xrange(prefix + "events")[0][1].values()) == [b"1", b"2"]
    assert reader.hkeys(prefix + "h").count(b"*****@******e.com") == 2  # a list may repeat itself
    reader.close()
    writer = gw.client("writer", protocol=protocol)
    pipe = writer.pipeline(transaction=True)
    pipe.hgetall(prefix + "h").hgetall(prefix + "h")
    assert [len(h) for h in pipe.execute()] == [3, 3]
    writer.close()
    out = gw.cli(gw.token("reader"), "HGETALL", prefix + "h", resp3=True).stdout
    assert '"*****@******e.com" =>' in out and '"*****@******e.com#2" =>' in out, out


CONSUMER_PACK = """
format: lictor/v1
metadata: {name: redis-stream-consumer}
identities: [{match: {claims: {role: consumer}}, roles: [consumer]}]
roles:
  consumer:
    rules:
      - {id: consumer-streams, protocol: redis, when: {categories: [read, write, blocking, transaction], keys: "app:*"},
         action: allow}
      - {id: consumer-mask, protocol: redis, action: mask, mask: {detectors: [card, email], style: partial, keep: 4}}
"""

# 1796022979316-0 reads as a Luhn-valid card number to the card detector: one stream ID in ten does
STREAM_IDS = [b"1796022979316-0", b"1796022979324-0", b"1796022979332-0"]
ENTRY_0 = (STREAM_IDS[0], {b"card": b"**** **** **** 1111"})
ENTRY_1 = (STREAM_IDS[1], {b"email": b"***@******e.com"})


@pytest.fixture(scope="module")
def consumer_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    """A gateway whose ``consumer`` role may read streams with XREAD and XREADGROUP (``blocking``),
    values masked, and whose agents have 2 seconds to authenticate."""
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    workdir = tmp_path_factory.mktemp("redis-consumer-gw")
    (workdir / "packs").mkdir()
    (workdir / "packs" / "consumer.yaml").write_text(CONSUMER_PACK)
    port = free_port()
    upstream = {"host": "127.0.0.1", "port": 6379}
    target = {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": upstream, "auth_timeout": 2}
    proc = GatewayProcess(workdir, {**_config({"cache": target}), "rulepacks": [str(workdir / "packs")]}).start()
    try:
        yield Gw(proc, port)
    finally:
        proc.stop()


def _stream(prefix: str) -> str:
    stream = prefix + "events"
    direct = redis.Redis()
    direct.xadd(stream, {"card": CARD}, id=STREAM_IDS[0])
    direct.xadd(stream, {"email": "bob@example.com"}, id=STREAM_IDS[1])
    direct.xgroup_create(stream, "g", id="0")
    direct.close()
    return stream


@pytest.mark.parametrize("protocol", [2, 3])
def test_stream_entry_ids_are_not_masked_and_reading_continues_from_them(gw: Gw, prefix: str, protocol: int):
    stream = _stream(prefix)
    reader = gw.client("reader", protocol=protocol)
    entries = reader.xrange(stream)
    assert entries == [ENTRY_0, ENTRY_1]  # values masked, IDs as stored
    assert [i for i, _ in reader.xrevrange(stream)] == STREAM_IDS[1::-1]
    # continuing after the last ID read
    assert reader.xrange(stream, min=b"(" + entries[0][0]) == [ENTRY_1]
    assert reader.xrange(stream, min=b"(" + entries[1][0]) == []
    got = reader.xread({stream: entries[0][0]})
    assert (got[stream.encode()][0] if protocol == 3 else got[0][1]) == [ENTRY_1]
    assert reader.xread({stream: entries[1][0]}) in ([], {})
    reader.close()
    writer = gw.client("writer", protocol=protocol)
    assert writer.xadd(stream, {"note": "x"}, id=STREAM_IDS[2]) == STREAM_IDS[2]
    # inside a transaction, each element keeps the shape of its command's reply
    pipe = writer.pipeline(transaction=True)
    pipe.get(prefix + "missing").xrange(stream, count=1)
    assert pipe.execute() == [None, [ENTRY_0]]
    writer.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_replies_name_back_the_keys_the_agent_sent_unmasked(consumer_gw: Gw, prefix: str, protocol: int):
    # the reply says which key each result comes from; a client matches it with the keys it asked for
    stream, queue = prefix + "alice@example.com:events", prefix + "alice@example.com:queue"
    direct = redis.Redis()
    direct.xadd(stream, {"card": CARD}, id=STREAM_IDS[0])
    direct.rpush(queue, "bob@example.com", "x", "y")
    direct.close()
    client = consumer_gw.client("consumer", protocol=protocol)
    got = client.xread({stream: "0"})
    assert (got[stream.encode()][0] if protocol == 3 else got[0][1]) == [ENTRY_0]
    if protocol == 2:
        assert got[0][0] == stream.encode()
    assert list(client.blpop([queue], timeout=1)) == [queue.encode(), b"***@******e.com"]
    assert client.lmpop(1, queue, direction="LEFT") == [queue.encode(), [b"x"]]
    pipe = client.pipeline(transaction=True)
    pipe.lpop(queue).xread({stream: "0"})
    assert pipe.execute()[1] == ({stream.encode(): [[ENTRY_0]]} if protocol == 3 else [[stream.encode(), [ENTRY_0]]])
    client.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_expiry_times_are_integers_not_masked_values(gw: Gw, prefix: str, protocol: int):
    # 1896022979314 (ms) is Luhn-valid: to the card detector, thirteen digits of a card number
    at = 1896022979314
    direct = redis.Redis()
    direct.set(prefix + "k", "v")
    direct.pexpireat(prefix + "k", at)
    reader = gw.client("reader", protocol=protocol)
    assert reader.pexpiretime(prefix + "k") == at
    assert reader.expiretime(prefix + "k") == at // 1000
    assert 0 < reader.pttl(prefix + "k") <= at
    reader.close()
    writer = gw.client("writer", protocol=protocol)
    writer.set(prefix + "n", CARD.replace(" ", ""))
    pipe = writer.pipeline(transaction=True)
    pipe.pexpiretime(prefix + "k").incrby(prefix + "n", 0)
    assert pipe.execute() == [at, b"************1111"]  # a stored number is still masked
    writer.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_stream_ids_in_xinfo_replies_are_not_masked(consumer_gw: Gw, prefix: str, protocol: int):
    stream = _stream(prefix)
    client = consumer_gw.client("consumer", protocol=protocol)
    assert client.xreadgroup("g", "c1", {stream: ">"}, count=1)
    info = client.xinfo_stream(stream)
    assert (info["last-generated-id"], info["recorded-first-entry-id"]) == (STREAM_IDS[1], STREAM_IDS[0])
    assert (info["first-entry"], info["last-entry"]) == (ENTRY_0, ENTRY_1)
    assert client.xinfo_groups(stream)[0]["last-delivered-id"] == STREAM_IDS[0]
    full = client.xinfo_stream(stream, full=True)
    assert full["entries"] == dict([ENTRY_0, ENTRY_1])  # redis-py: {id: fields}
    (group,) = full["groups"]
    assert group["last-delivered-id"] == STREAM_IDS[0]
    assert [p[0] for p in group["pending"]] == [STREAM_IDS[0]]
    consumer = {k.decode() if isinstance(k, bytes) else k: v for k, v in group["consumers"][0].items()}
    assert [p[0] for p in consumer["pending"]] == [STREAM_IDS[0]]
    client.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_stream_consumers_continue_from_the_ids_they_read(consumer_gw: Gw, prefix: str, protocol: int):
    stream = _stream(prefix)
    client = consumer_gw.client("consumer", protocol=protocol)
    got = client.xread({stream: "0"}, count=1)
    first = got[stream.encode()][0] if protocol == 3 else got[0][1]
    assert first == [ENTRY_0]
    got = client.xread({stream: first[0][0]})
    assert (got[stream.encode()][0] if protocol == 3 else got[0][1]) == [ENTRY_1]
    got = client.xreadgroup("g", "c1", {stream: ">"}, count=1)
    assert (got[stream.encode()][0] if protocol == 3 else got[0][1]) == [ENTRY_0]
    pending = client.xpending(stream, "g")
    assert (pending["min"], pending["max"]) == (STREAM_IDS[0], STREAM_IDS[0])
    assert [p["message_id"] for p in client.xpending_range(stream, "g", "-", "+", 10)] == [STREAM_IDS[0]]
    assert client.xautoclaim(stream, "g", "c2", 0, justid=True) == [STREAM_IDS[0]]
    assert client.xautoclaim(stream, "g", "c3", 0) == [b"0-0", [ENTRY_0], []]
    assert client.xclaim(stream, "g", "c1", 0, [STREAM_IDS[0]]) == [ENTRY_0]
    assert client.xack(stream, "g", STREAM_IDS[0]) == 1
    client.close()


# -- protocol details -------------------------------------------------------------------------------


def test_inline_commands_and_what_is_never_relayed(gw: Gw):
    token = gw.token("admin")
    replies = _raw(
        gw.port,
        b"PING\r\n"
        + f"AUTH {token}\r\n".encode()
        + b"PING\r\n"
        + b"SELECT 0\r\n"
        + b"SELECT 1\r\n"
        + b"SUBSCRIBE news\r\n"
        + b"CLIENT REPLY OFF\r\n"
        + b'ECHO "two words"\r\n'
        + b"QUIT\r\n",
        9,
    )
    assert replies[0] == b"-NOAUTH Authentication required.\r\n"
    assert replies[1:4] == [b"+OK\r\n", b"+PONG\r\n", b"+OK\r\n"]
    assert replies[4].startswith(b"-NOPERM lictor: SELECT denied by rule redis:db-pinned: ")
    assert replies[5].startswith(b"-NOPERM lictor: SUBSCRIBE denied by rule redis:unsupported: ")
    assert replies[6].startswith(b"-NOPERM lictor: CLIENT REPLY denied by rule redis:unsupported: ")
    assert replies[7] == b"$9\r\ntwo words\r\n"
    assert replies[8] == b"+OK\r\n"


def test_protocol_errors_close_the_connection(gw: Gw):
    sub = f"garbage-{secrets.token_hex(3)}"
    replies = _raw(gw.port, cmd("AUTH", gw.token("reader", sub)) + b"*1\r\n+PING\r\n", 3)
    assert replies == [b"+OK\r\n", b"-ERR Protocol error: expected '$', got '+'\r\n"]
    # ... and the session says so: recorded, and ended with the reason
    events = gw.recording(sub)
    assert [e["data"]["error"] for e in events if e["kind"] == "redis.protocol_error"] == ["expected '$', got '+'"]
    [end] = [e for e in gw.audit("session.end") if e.get("session") == events[0]["s"]]
    assert end["reason"] == "protocol error: expected '$', got '+'", end
    # before login, a refused connection is audited
    before = len(gw.audit("connection.refused"))
    assert _raw(gw.port, b"*1\r\n+PING\r\n", 1) == [b"-ERR Protocol error: expected '$', got '+'\r\n"]
    deadline = time.monotonic() + 10
    while len(gw.audit("connection.refused")) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "protocol error" in gw.audit("connection.refused")[-1]["reason"]


# -- recording --------------------------------------------------------------------------------------


def test_commands_and_replies_are_recorded_masked(gw: Gw, prefix: str):
    redis.Redis().set(prefix + "card", CARD)
    sub = f"rec-{secrets.token_hex(3)}"
    token = gw.token("reader", sub=sub)
    assert gw.cli(token, "GET", prefix + "card").stdout.strip() == "**** **** **** 1111"
    assert "NOPERM" in gw.cli(token, "SET", prefix + "card", CARD).stdout
    decisions = gw.decisions(sub, count=2)
    assert [(d["request"]["action"], d["action"], d["rule_ids"][0]) for d in decisions] == [
        ("get", "allow", "redis-read-app"),
        ("set", "deny", "lictor:default-deny"),
    ]
    assert decisions[0]["request"]["summary"] == f"GET {prefix}card"
    assert len([e for e in gw.audit("session.start") if e["identity"]["sub"] == sub]) == 2  # one per redis-cli call
    get = gw.recording(sub, 0)
    assert [e["kind"] for e in get] == ["session.start", "auth", "command", "reply", "session.end"]
    command, reply = get[2], get[3]
    assert command["dir"] == "in" and reply["dir"] == "out"
    assert command["data"]["command"] == "GET" and command["data"]["keys"] == [prefix + "card"]
    assert command["data"]["decision"] == "allow" and command["data"]["mask_rules"] == ["redis-mask-pii"]
    assert reply["data"]["type"] == "bulk" and reply["data"]["masked"] == {"card": 1}
    denied = gw.recording(sub, 1)
    command = next(e["data"] for e in denied if e["kind"] == "command")
    assert command["command"] == "SET" and command["decision"] == "deny" and "[REDACTED:card]" in command["args"]
    assert CARD not in json.dumps(get + denied) and token not in json.dumps(get + denied)


def test_commands_the_gateway_answers_itself_are_recorded(gw: Gw):
    sub = f"self-{secrets.token_hex(3)}"
    other = gw.token("admin")
    payload = b"".join(
        [
            *(cmd("AUTH", "agent", gw.token("reader", sub=sub)), cmd("AUTH", "agent", other), cmd("SELECT", "0")),
            *(cmd("HELLO", "3", "AUTH", "agent", other), cmd("MULTI"), cmd("HELLO", "3"), cmd("EXEC"), cmd("QUIT")),
        ]
    )
    replies = _raw(gw.port, payload, 8)
    assert replies[1].startswith(b"-ERR lictor: already authenticated") and replies[2] == b"+OK\r\n", replies
    events = gw.recording(sub)
    commands = [(e["data"]["command"], e["data"]["decision"]) for e in events if e["kind"] == "command"]
    assert commands == [
        ("AUTH", "gateway"),  # another identity's token: refused, and recorded (the token never is)
        ("SELECT", "gateway"),
        ("HELLO", "gateway"),
        ("MULTI", "gateway"),
        ("HELLO", "gateway"),  # inside MULTI: refused, which aborts the transaction
        ("EXEC", "gateway"),
        ("QUIT", "gateway"),
    ], commands
    replies_recorded = [e["data"]["type"] for e in events if e["kind"] == "reply"]
    assert replies_recorded == ["error", "simple", "error", "simple", "error", "error", "simple"], replies_recorded
    assert other not in json.dumps(events)


def test_an_argument_cut_short_in_the_recording_is_masked_before_the_cut(gw: Gw, prefix: str):
    sub = f"cut-{secrets.token_hex(3)}"
    value = "x" * 54 + CARD.replace(" ", "")  # the recording keeps 64 bytes of it: 10 digits of the card
    assert "NOPERM" in gw.cli(gw.token("reader", sub=sub), "SET", prefix + "k", value).stdout
    command = next(e["data"] for e in gw.recording(sub) if e["kind"] == "command")
    assert "4111111111" not in command["args"] and "[REDACTED" in command["args"], command["args"]


def test_raw_card_numbers_and_tokens_stay_out_of_audit_and_recordings(gw: Gw, prefix: str):
    redis.Redis().set(prefix + "card", CARD)
    token = gw.token("reader")
    gw.cli(token, "GET", prefix + "card")
    gw.cli(token, "SET", prefix + "x", f"card {CARD}")
    for path in Path(gw.proc.state_dir).rglob("*"):
        if path.is_file() and "approvals" not in path.name:
            data = path.read_bytes()
            assert CARD.encode() not in data, path
            assert token.encode() not in data, path


# -- upstream credentials ---------------------------------------------------------------------------


def test_upstream_credentials_and_database_stay_in_the_gateway(
    gateway_factory: Callable[..., GatewayProcess], prefix: str
):
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    direct = redis.Redis()
    user, password = f"lictor-test-{secrets.token_hex(4)}", secrets.token_hex(16)
    direct.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["app:*"], commands=["+@all"])
    try:
        good, bad = free_port(), free_port()
        upstream = {"host": "127.0.0.1", "port": 6379, "username": user, "password": password, "db": 2}
        proc = gateway_factory(
            _config(
                {
                    "cache": {"protocol": "redis", "listen": f"127.0.0.1:{good}", "upstream": upstream},
                    "broken": {
                        "protocol": "redis",
                        "listen": f"127.0.0.1:{bad}",
                        "upstream": {**upstream, "password": "wrong"},
                    },
                }
            )
        )
        issuer = LocalIssuer(proc.state_dir)
        writer = redis.Redis(port=good, username="agent", password=issuer.issue("w", {"role": "writer"}))
        assert writer.set(prefix + "k", "v") is True
        assert writer.get(prefix + "k") == b"v"
        direct.select(2)
        assert direct.get(prefix + "k") == b"v"  # in the target's database
        direct.select(0)
        assert direct.get(prefix + "k") is None
        admin = redis.Redis(port=good, username="agent", password=issuer.issue("a", {"role": "admin"}))
        assert admin.acl_whoami() == user  # the upstream login is the gateway's, not the agent's
        with pytest.raises(redis.exceptions.ResponseError, match="unavailable"):
            redis.Redis(port=bad, username="agent", password=issuer.issue("w", {"role": "writer"})).ping()
        writer.close()
        admin.close()
        proc.stop()
        for path in Path(proc.state_dir).rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path
        assert password not in proc.log()
    finally:
        direct.acl_deluser(user)
        direct.close()


# -- reloading the addon file -----------------------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_editing_the_addon_file_reloads_it_and_a_broken_edit_fails_closed(
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path, prefix: str
):
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    copy = tmp_path / "redis"
    shutil.copytree(ROOT / "examples" / "redis", copy, ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    target = {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": {"host": "127.0.0.1"}}
    config = _config({"cache": target}) | {"addons": [str(copy / "redis_addon.py")]}
    proc = gateway_factory(config)
    token = LocalIssuer(proc.state_dir).issue("w", {"role": "writer"})

    def works() -> bool:
        try:
            return redis.Redis(port=port, username="a", password=token, socket_timeout=2).set(prefix + "k", "1") is True
        except redis.exceptions.ConnectionError:
            return False

    audit = AuditLog(proc.state_dir / "audit.db")

    def audited(kind: str, count: int) -> Callable[[], bool]:
        return lambda: len(list(audit.events(kind=kind))) >= count

    assert works()
    addon = copy / "redis_addon.py"
    source = addon.read_text()
    addon.write_text(source + "\n# edited\n")
    _wait_for(audited("addon.reloaded", 1))
    _wait_for(works)  # the new listener is up on the same port
    addon.write_text(source + "\nthis is not python\n")
    _wait_for(audited("addon.reload_failed", 1))
    assert not works()  # the listener is gone: nothing is relayed unchecked
    addon.write_text(source)
    _wait_for(audited("addon.reloaded", 2))
    _wait_for(works)
    audit.close()


SCRIPTER_PACK = """
format: lictor/v1
metadata: {name: redis-scripter}
identities: [{match: {claims: {role: scripter}}, roles: [scripter]}]
roles:
  scripter:
    rules:
      - {id: scripter-all, protocol: redis, when: {commands: "*"}, action: allow}
      - {id: scripter-mask, protocol: redis, action: mask, mask: {detectors: [card]}}
"""


def test_a_malformed_multi_does_not_unmask_status_replies(tmp_path: Path, prefix: str):
    """``MULTI x`` is refused by Redis, which then runs the next commands at once: their replies are
    masked like any other (a script's status reply is a simple string, not ``+QUEUED``)."""
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    redis.Redis().set(prefix + "card", CARD)
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "scripter.yaml").write_text(SCRIPTER_PACK)
    port = free_port()
    target = {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": {"host": "127.0.0.1", "port": 6379}}
    config = {**_config({"cache": target}), "rulepacks": [str(packs)]}
    (tmp_path / "gw").mkdir()
    proc = GatewayProcess(tmp_path / "gw", config).start()
    try:
        token = Gw(proc, port).token("scripter")
        status = "return {ok=redis.call('GET', KEYS[1])}"
        replies = _raw(
            port,
            cmd("AUTH", token)
            + cmd("MULTI", "x")
            + cmd("EVAL", status, "1", prefix + "card")
            + cmd("MULTI")
            + cmd("EVAL", status, "1", prefix + "card")
            + cmd("EXEC")
            + cmd("EVAL", status, "1", prefix + "card"),
            7,
        )
    finally:
        proc.stop()
    assert replies[1] == b"-ERR wrong number of arguments for 'multi' command\r\n"
    assert replies[2] == b"+[REDACTED:card]\r\n"
    assert replies[3:5] == [b"+OK\r\n", b"+QUEUED\r\n"]
    assert replies[5] == b"*1\r\n+[REDACTED:card]\r\n"
    assert replies[6] == b"+[REDACTED:card]\r\n"


REFUSING_ADDON = """
class RefuseSessions:
    name = "refuse-sessions"

    def session_start(self, session):
        raise RuntimeError("no sessions today")


addons = [RefuseSessions()]
"""


def test_a_refused_session_is_answered_with_a_resp_error(tmp_path: Path):
    """A session that the gateway refuses (a session_start hook fails) gets an error reply to its AUTH,
    and the connection closes; the session is audited as refused."""
    require(_redis_up(), "redis-server on 127.0.0.1:6379")
    refuse = tmp_path / "refuse.py"
    refuse.write_text(REFUSING_ADDON)
    port = free_port()
    target = {"protocol": "redis", "listen": f"127.0.0.1:{port}", "upstream": {"host": "127.0.0.1", "port": 6379}}
    config = _config({"cache": target})
    config["addons"] = [ADDON, str(refuse)]
    (tmp_path / "gw").mkdir()
    proc = GatewayProcess(tmp_path / "gw", config).start()
    try:
        gw = Gw(proc, port)
        token = gw.token("reader", sub="refused-agent")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(cmd("AUTH", token) + cmd("PING"))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data == b"-ERR lictor: the gateway refused the session (see its log); retry later\r\n"
        deadline = time.monotonic() + 10  # the audit log is fed from the spool, a batch behind
        while not (ends := [e for e in gw.audit("session.end") if e["identity"]["sub"] == "refused-agent"]):
            assert time.monotonic() < deadline, "the refused session was not audited"
            time.sleep(0.1)
        assert "no sessions today" in ends[0]["reason"]
    finally:
        proc.stop()


def test_auth_timeout_bounds_the_whole_login_not_each_read(consumer_gw: Gw) -> None:
    # a PING now and then reset the timer: MAX_LOGGING_IN such connections kept every agent out for good
    with socket.create_connection(("127.0.0.1", consumer_gw.port), timeout=10) as sock:
        start, replies = time.monotonic(), b""
        while not replies.endswith(b"authentication timed out\r\n") and time.monotonic() - start < 6:
            sock.sendall(b"PING\r\n")
            replies += sock.recv(200)
            time.sleep(0.5)
        assert replies.endswith(b"-ERR lictor: authentication timed out\r\n"), replies
        assert 1.5 < time.monotonic() - start < 4
        assert sock.recv(200) == b""  # closed


def test_connections_that_never_authenticate_are_bounded(gw: Gw) -> None:
    # Each connection may wait auth_timeout to authenticate, holding a descriptor: enough of them took every
    # descriptor of the gateway. One past the limit is told so and closed.
    from lictor_redis.addon import MAX_LOGGING_IN

    def answer() -> bytes:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(200)

    busy = b"-ERR lictor: too many connections are logging in at once"
    with idle_connections(gw.port, MAX_LOGGING_IN):
        wait_until(lambda: answer().startswith(busy), 10, "a refusal of the connection past the limit")
    # served again (and asked to authenticate)
    wait_until(lambda: answer().startswith(b"-NOAUTH"), 10, "connections to be served again")
    assert gw.client("reader").ping()
    refused = [e for e in gw.audit("connection.refused") if "waiting to authenticate" in e.get("reason", "")]
    assert refused and refused[0]["count"] == 1 and refused[0]["protocol"] == "redis", refused
