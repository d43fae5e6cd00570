"""The asyncio side: one :class:`Connection` per agent, relaying RESP to the upstream Redis.

Per connection two tasks share the work, so pipelines stay pipelined and replies stay in order:

* the **reader** parses the agent's commands (:class:`~lictor_redis.resp.CommandParser`),
  authenticates the agent, asks the policy about each command (``await session.decide``),
  records it, forwards allowed commands upstream (re-encoded from the parsed arguments: upstream
  executes exactly what was decided) and queues one :class:`Slot` per command saying how its
  reply is produced;
* the **responder** takes the slots in order: a slot either carries a reply the gateway
  makes itself (a denial, ``+QUEUED``...) or says "the next upstream reply, masked with this
  plan". Upstream replies stream through as events (:class:`~lictor_redis.resp.ReplyParser`);
  only string values that must be masked are buffered (up to ``mask_max_value`` bytes each).

Transactions: the gateway tracks ``MULTI``. A command inside it is decided like any other; if
it is denied, the agent gets the denial in place of ``+QUEUED`` and the transaction is marked
aborted: ``EXEC`` then discards the upstream transaction and answers ``-EXECABORT``, as Redis
does after a queueing error. The elements of an ``EXEC`` reply are masked with the plans of
the commands they answer.

Approval: a held command waits in ``session.decide``; RESP has no way to tell the client
mid-command, so the agent simply waits (later pipelined commands wait behind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from lictor import AuthError, Decision, Gateway, Request, Session
from lictor.masking import MAX_CUSTOM_MATCH, MaskPlan

from .commands import Classified, classify, quote, secret_args
from .resp import (
    ARRAY,
    ATTRIBUTE,
    BIG_NUMBER,
    BULK_ERROR,
    BULK_STRING,
    DOUBLE,
    ERROR,
    INTEGER,
    MAP,
    PUSH,
    SET,
    SIMPLE_STRING,
    TYPE_NAMES,
    VERBATIM,
    AggregateStart,
    BulkChunk,
    BulkEnd,
    BulkStart,
    Command,
    CommandParser,
    ProtocolError,
    ReplyParser,
    Simple,
    encode_command,
    encode_error,
)
from .shapes import reply_kind, shape_for
from .vocabulary import PROTOCOL, request_for

__all__ = ["Connection", "RedisTarget", "UpstreamError"]

log = logging.getLogger("lictor.redis")

OK = b"+OK\r\n"
NOAUTH = encode_error("NOAUTH Authentication required.")
NOAUTH_HELLO = encode_error(
    "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> "
    "AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol "
    "version at the same time"
)
EXECABORT = encode_error("EXECABORT Transaction discarded because of previous errors.")
MAX_AUTH_FAILURES = 3
PREAUTH_MAX_BYTES = 64 * 1024  # a JWT fits; nothing big is parsed before the agent is known
PREAUTH_MAX_ARGS = 16
MAX_ARGS = 65536
"""Default ``limits.max_args``: arguments of one command. Every argument is decided (and each key matched by the
rules) before the command is forwarded, on the event loop all connections share: a million of them held every
other agent for seconds. Bulk loads send far fewer per command (batches of hundreds to thousands of keys or
fields; ``redis-cli --pipe`` sends what it is given, one command per line)."""
# Between two commands of a pipeline, other connections get a turn once this much was handled since the last
# one: a pipeline already buffered (behind a command held for approval, say) is otherwise decided to its end first.
TURN_COMMANDS = 64
TURN_ARGS = 4096
TURN_BYTES = 1024 * 1024
# Items of one reply relayed (and masked) between two turns of the other connections.
RELAY_SLICE = 256

_UNICODE_ESCAPE = re.compile(rb"\\u[0-9A-Fa-f]{4}")
_UNICODE_ESCAPES = re.compile(rb"\\+u([0-9A-Fa-f]{4})")  # escaped once or more (JSON in a JSON string)


def _unescape(m: re.Match[bytes]) -> bytes:
    return chr(int(m.group(1), 16)).encode("utf-8", "surrogatepass")


# Detectors applied to the argument summaries in recordings (values are recorded masked even
# for denied commands, which have no masking plan of their own).
RECORD_PLAN = MaskPlan.compile(
    [
        {
            "detectors": [
                "private_key",
                "jwt",
                "aws_access_key_id",
                "aws_secret_access_key",
                "github_token",
                "slack_token",
                "stripe_key",
                "secret_assignment",
                "card",
                "iban",
                "ssn",
                "email",
            ]
        }
    ]
)


class UpstreamError(RuntimeError):
    """The upstream Redis server is unreachable, refused our login or broke the protocol."""


def _is_port(text: str) -> bool:
    """A TCP port as written in a config: ASCII digits, 1 to 65535 (the socket layer would wrap 99999 to 34463)."""
    return text.isascii() and text.isdigit() and 1 <= int(text) <= 65535


@dataclass(frozen=True)
class RedisTarget:
    """A ``protocol: redis`` target of the gateway config."""

    name: str
    host: str
    port: int
    upstream_host: str
    upstream_port: int
    username: str | None = None
    password: str | None = None
    db: int = 0
    connect_timeout: float = 5.0
    auth_timeout: float = 30.0
    max_connections: int = 32
    max_command_bytes: int = 64 * 1024 * 1024
    mask_max_value: int = 16 * 1024 * 1024
    max_args: int = MAX_ARGS

    @classmethod
    def from_settings(cls, name: str, settings: Any) -> RedisTarget:
        listen = str(settings.get("listen", ""))
        host, sep, port = listen.rpartition(":")
        if not sep or not _is_port(port):
            raise ValueError(f"target {name!r}: listen must be HOST:PORT with a port from 1 to 65535, got {listen!r}")
        up = dict(settings.get("upstream") or {})
        upstream_port = str(up.get("port", 6379)).strip()
        if not _is_port(upstream_port):
            raise ValueError(f"target {name!r}: upstream.port must be a port from 1 to 65535, got {upstream_port!r}")
        password = up.get("password")
        limits = dict(settings.get("limits") or {})
        return cls(
            name=name,
            host=host.strip("[]") or "127.0.0.1",
            port=int(port),
            upstream_host=str(up.get("host", "127.0.0.1")),
            upstream_port=int(upstream_port),
            username=str(up["username"]) if up.get("username") else None,
            password=None if password in (None, "") else str(password),
            db=int(up.get("db", 0)),
            connect_timeout=float(up.get("connect_timeout", 5.0)),
            auth_timeout=float(settings.get("auth_timeout", 30.0)),
            max_connections=int(settings.get("max_connections", 32)),
            max_command_bytes=int(limits.get("max_command_bytes", 64 * 1024 * 1024)),
            mask_max_value=int(limits.get("mask_max_value", 16 * 1024 * 1024)),
            max_args=int(limits.get("max_args", MAX_ARGS)),
        )


@dataclass
class _Multi:
    """A transaction being queued: the plans and names of the commands upstream queued, in order."""

    plans: list[Any] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    keys: list[tuple[bytes, ...]] = field(default_factory=list)
    aborted: bool = False


@dataclass
class Slot:
    """How the reply to one command is produced (see the module docstring)."""

    local: bytes | None = None  # the gateway's own reply
    plan: Any = MaskPlan.EMPTY  # masking plan of an upstream reply
    element_plans: list[Any] | None = None  # EXEC: one plan per element of the reply array
    element_commands: list[str] | None = None  # EXEC: the reply kind of the command each element answers
    replace: bytes | None = None  # read the upstream reply, drop it, send this instead
    seq: int = 0
    command: str = ""
    kind: str = ""  # the shape of the reply (shapes.reply_kind); the command in lower case if empty
    keys: tuple[bytes, ...] = ()  # the command's keys, which some replies name back (XREAD, BLPOP)
    element_keys: list[tuple[bytes, ...]] | None = None  # EXEC: the keys of the command each element answers
    close: bool = False
    queued_in: _Multi | None = None  # inside MULTI: on "+QUEUED", ``plan`` joins this transaction
    blocking: bool = False  # may wait upstream for others' writes (BLPOP, XREAD BLOCK), or unknown


def _denial(name: str, decision: Decision) -> bytes:
    rule = decision.rule_ids[0] if decision.rule_ids else "lictor:default-deny"
    message = decision.message or "not allowed"
    return encode_error(f"NOPERM lictor: {name} denied by rule {rule}: {message} (policy {decision.policy_version})")


def _shown_arg(arg: bytes, plans: tuple[MaskPlan, ...], limit: int) -> str:
    """One argument for the recording, masked by ``plans`` before it is cut at ``limit`` bytes: cut first, a
    card number across the cut would keep its first digits, too few to be recognised (and recorded as such)."""
    window = arg[: limit + MAX_CUSTOM_MATCH]  # a match that starts before the cut ends in it
    for plan in plans:
        window, _ = plan.mask_bytes(window)
    text = quote(window[:limit])
    if len(arg) > limit:
        text += f"…(+{len(arg) - limit} bytes)"
    return text


def _args_summary(c: Classified, plans: tuple[MaskPlan, ...] = (), max_args: int = 16, limit: int = 64) -> str:
    """Arguments for the recording: masked by ``plans``, truncated, with secret-bearing ones redacted."""
    secret = secret_args(c)
    shown = ["[REDACTED]" if i in secret else _shown_arg(arg, plans, limit) for i, arg in enumerate(c.args[:max_args])]
    if len(c.args) > max_args:
        shown.append(f"…(+{len(c.args) - max_args} args)")
    return " ".join(shown)


class Connection:
    """One agent connection (see the module docstring)."""

    def __init__(
        self,
        gateway: Gateway,
        target: RedisTarget,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peers: Collection[Connection] = (),
    ) -> None:
        self.gateway = gateway
        self.target = target
        self.peers = peers  # the gateway's connections, to count an identity's
        self.identity_key: tuple[str, str, str] | None = None
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        self.parser = CommandParser(max_command_bytes=PREAUTH_MAX_BYTES, max_args=PREAUTH_MAX_ARGS)
        self.replies = ReplyParser()
        self.queue: asyncio.Queue[Slot | None] = asyncio.Queue(maxsize=1024)
        self.session: Session | None = None
        self.resp3 = False  # since a HELLO 3 succeeded
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.multi: _Multi | None = None
        self.auth_failures = 0
        self.end_reason = ""
        self.seq = 0
        self.counts: Counter[str] = Counter()
        self.stop_reading = False
        self.up_buffer = bytearray()  # commands decided but not yet written upstream
        self.out = bytearray()  # replies not yet written to the agent
        self.reading: asyncio.Task[None] | None = None
        self.agent_eof = False  # the agent closed its side
        self.relaying_blocking = False  # the responder waits for the reply to a blocking command
        # auth_timeout bounds the whole login, not each read: a connection that sends a byte, or a PING, now and
        # then would otherwise hold one of the MAX_LOGGING_IN places for good
        self.auth_deadline = time.monotonic() + target.auth_timeout

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        responder = asyncio.create_task(self._respond())
        reading = self.reading = asyncio.create_task(self._read_loop())
        try:
            done, _ = await asyncio.wait({responder, reading}, return_when=asyncio.FIRST_COMPLETED)
            if reading in done and not reading.cancelled():
                if reading.exception() is not None:
                    log.error("redis connection %s failed", self.peer, exc_info=reading.exception())
                # Let the responder deliver what is queued (the agent may have half-closed), but
                # not wait for a blocking command: Redis drops a blocked client that hangs up, and a
                # BLPOP kept waiting for nobody would pop the next value pushed, lost to everyone.
                if not responder.done() and not (self.agent_eof and self.relaying_blocking):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._drain_replies(responder), timeout=30)
            if responder.done() and not responder.cancelled() and responder.exception() is not None:
                exc = responder.exception()
                if isinstance(exc, (UpstreamError, ConnectionError, ProtocolError)):
                    log.warning("redis connection %s: %s", self.peer, exc)
                else:
                    log.error("redis connection %s failed", self.peer, exc_info=exc)
        finally:
            for task in (reading, responder):
                task.cancel()
            for task in (reading, responder):
                with contextlib.suppress(BaseException):
                    await task
            await self._close()

    async def _drain_replies(self, responder: asyncio.Task[None]) -> None:
        await self.queue.put(None)
        await responder

    async def _close(self) -> None:
        for w in (self.up_writer, self.writer):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.close()
        for w in (self.up_writer, self.writer):
            if w is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.wait_closed(), 2)
        if self.session is not None:
            with contextlib.suppress(Exception):
                why = {"reason": self.end_reason} if self.end_reason else {}
                await self.session.close(commands=self.seq, **dict(self.counts), **why)

    # -- reading commands -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        commands = handled = size = 0  # since other connections last had a turn
        while not self.stop_reading:
            if self.session is None:
                try:
                    left = self.auth_deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    data = await asyncio.wait_for(self.reader.read(65536), left)
                except TimeoutError:
                    await self._local(encode_error("ERR lictor: authentication timed out"), close=True)
                    return
            else:
                data = await self.reader.read(65536)
            if not data:
                self.agent_eof = True
                return
            self.parser.feed(data)
            while not self.stop_reading:
                try:
                    command = self.parser.next_command()
                except ProtocolError as exc:
                    self._protocol_error(str(exc))
                    await self._local(encode_error(f"ERR Protocol error: {exc}"), close=True)
                    return
                if command is None:
                    if self.parser.pending:  # a long command already buffered: read on after others' turn
                        await asyncio.sleep(0)
                        continue
                    break
                await self._handle(command)
                # reader.read() returns at once while bytes are buffered, and an allowed command awaits nothing:
                # a long pipeline would be decided to its end before any other connection's command
                commands += 1
                handled += command.too_many or len(command.args)
                size += command.size
                if commands >= TURN_COMMANDS or handled >= TURN_ARGS or size >= TURN_BYTES:
                    commands = handled = size = 0
                    await asyncio.sleep(0)
            # Pipelined commands went out in one write; now wait for the agent's next bytes.
            await self._flush_upstream()

    async def _enqueue(self, slot: Slot) -> None:
        if self.queue.full():
            # The responder may be waiting for the reply to a command still in our buffer.
            await self._flush_upstream()
        await self.queue.put(slot)

    async def _local(self, reply: bytes, *, close: bool = False, seq: int = 0, command: str = "") -> None:
        if close:
            self.stop_reading = True
            await self._flush_upstream()
        await self._enqueue(Slot(local=reply, close=close, seq=seq, command=command))

    async def _forward(self, args: tuple[bytes, ...] | list[bytes], slot: Slot) -> None:
        """Queue ``args`` for upstream; commands of one pipeline leave in one write."""
        self.up_buffer += encode_command(args)
        if len(self.up_buffer) >= 64 * 1024:
            await self._flush_upstream()
        await self._enqueue(slot)

    async def _flush_upstream(self) -> None:
        if self.up_buffer and self.up_writer is not None:
            self.up_writer.write(bytes(self.up_buffer))
            self.up_buffer.clear()
            await self.up_writer.drain()

    async def _flush_agent(self) -> None:
        if self.out:
            self.writer.write(bytes(self.out))
            self.out.clear()
        await self.writer.drain()

    def _protocol_error(self, problem: str) -> None:
        """Bytes that are not RESP end the connection: recorded in its session (which ends saying why), or
        audited as a refused connection before login."""
        if self.session is not None:
            self.end_reason = f"protocol error: {problem}"
            self._record("redis.protocol_error", {"error": problem})
            return
        with contextlib.suppress(Exception):
            self.gateway.audit_event(
                "connection.refused",
                {"protocol": PROTOCOL, "peer": self.peer, "reason": f"protocol error: {problem}"},
                fail_closed=False,
            )

    def _record(self, kind: str, data: dict[str, Any], strict: bool = False) -> bool:
        """Record an event; False when a strict recording could not be written."""
        if self.session is None:
            return True
        try:
            self.session.record(kind, data)
        except Exception:
            log.exception("recording failed for session %s", self.session.id)
            return not strict
        return True

    async def _handle(self, command: Command) -> None:
        args = command.args
        name = args[0].lower()
        if self.session is None:
            await self._before_auth(args)
            return
        if command.too_many:
            await self._too_many(command)
            return
        if name == b"quit":
            await self._answer("QUIT", OK, close=True)
            return
        if name in (b"multi", b"exec", b"discard") and len(args) != 1:
            # Not forwarded: answered with Redis' wrong-number-of-arguments error, which inside MULTI
            # aborts the transaction. Neither Redis' transaction state nor the gateway's changes, so
            # both keep agreeing on whether replies are "+QUEUED".
            await self._command(args)
            return
        if name == b"multi":
            await self._multi(args)
            return
        if name == b"exec":
            await self._exec(args)
            return
        if name == b"discard":
            self.multi = None
            await self._plain(args, "DISCARD")
            return
        if name in (b"auth", b"hello", b"select"):
            what = name.decode().upper()
            if self.multi is not None:
                self.multi.aborted = True
                await self._answer(what, encode_error(f"ERR lictor: {what} is not allowed inside MULTI"), multi=True)
                return
            if name == b"auth":
                await self._refuse_reauth("AUTH")
                return
            if name == b"hello":
                await self._hello(args)
                return
            if len(args) == 2 and args[1].strip() == str(self.target.db).encode():
                await self._answer("SELECT", OK, args=quote(args[1], 64))  # already there: the database is pinned
                return
        await self._command(args)

    async def _too_many(self, command: Command) -> None:
        """A command with more arguments than ``limits.max_args``, read but not kept: refused (and audited),
        never decided nor forwarded; inside MULTI it aborts the transaction, as a queueing error does."""
        assert self.session is not None
        c = classify(command.args)
        name = c.name
        limit = self.target.max_args
        problem = f"{name} has {command.too_many} arguments, more than this target's limit of {limit} (limits.max_args)"
        self.seq += 1
        self.counts["denied"] += 1
        if self.multi is not None:
            self.multi.aborted = True
        request = Request(
            protocol=PROTOCOL,
            action=c.command if c.known else "unknown",
            attrs={"command": c.command},
            target=self.target.name,
            summary=f"{name} ({command.too_many} args)",
            payload=f"{name} ({command.too_many} args, {command.size} bytes, not kept)",
        )
        decision = Decision.deny(problem, "redis:max-args", self.session.policy.version)
        try:
            self.session.audit(request, decision)
        except Exception:
            log.exception("redis connection %s: the refusal of %s could not be audited", self.peer, name)
        record = {"n": self.seq, "command": name, "args": f"({command.too_many} args)", "decision": decision.action}
        self._record("command", {**record, "rules": list(decision.rule_ids), "policy": decision.policy_version})
        await self._local(encode_error(f"ERR lictor: {problem}; split it into smaller commands"), seq=self.seq)

    async def _answer(self, what: str, reply: bytes, *, close: bool = False, **record: Any) -> None:
        """Answer a command the gateway handles itself (never relayed, no decision of the policy), recorded."""
        self.seq += 1
        self._record("command", {"n": self.seq, "command": what, "decision": "gateway", **record})
        await self._local(reply, close=close, seq=self.seq, command=what)

    async def _refuse_reauth(self, what: str) -> None:
        """AUTH (or HELLO ... AUTH) on a logged-in connection: the identity stays; the attempt is recorded, never
        the token it carried."""
        sub = self.session.identity.subject if self.session else "?"
        error = f"ERR lictor: already authenticated as {sub}; open a new connection to change identity"
        await self._answer(what, encode_error(error), error="already authenticated")

    async def _plain(self, args: tuple[bytes, ...] | list[bytes], what: str) -> None:
        """Forward a transaction-control command (decided by the gateway, recorded)."""
        self.seq += 1
        self._record("command", {"n": self.seq, "command": what, "decision": "gateway"})
        await self._forward(args, Slot(seq=self.seq, command=what))

    # -- authentication -------------------------------------------------------------------------

    async def _before_auth(self, args: tuple[bytes, ...]) -> None:
        name = args[0].lower()
        if name == b"auth":
            if len(args) not in (2, 3):
                await self._local(encode_error("ERR wrong number of arguments for 'auth' command"))
                return
            user = args[1] if len(args) == 3 else None
            if await self._login(args[-1], user, "AUTH"):
                await self._local(OK)
            return
        if name == b"hello":
            proto, options, error = self._parse_hello(args)
            if error is not None:
                await self._local(error)
                return
            auth = options.pop(b"auth", None)
            if auth is None:
                await self._local(NOAUTH_HELLO)
                return
            if await self._login(auth[1], auth[0], "HELLO"):
                await self._hello_upstream(proto, options)
            return
        if name == b"quit":
            await self._local(OK, close=True)
            return
        await self._local(NOAUTH)

    @staticmethod
    def _parse_hello(args: tuple[bytes, ...]) -> tuple[bytes | None, dict[bytes, list[bytes]], bytes | None]:
        """``HELLO [protover [AUTH user pass] [SETNAME name]]`` -> (protover, options, error)."""
        if len(args) == 1:
            return None, {}, None
        proto = args[1]
        if proto not in (b"2", b"3"):
            return None, {}, encode_error("NOPROTO unsupported protocol version")
        options: dict[bytes, list[bytes]] = {}
        i = 2
        while i < len(args):
            opt = args[i].lower()
            if opt == b"auth" and i + 2 < len(args):
                options[b"auth"] = [args[i + 1], args[i + 2]]
                i += 3
            elif opt == b"setname" and i + 1 < len(args):
                options[b"setname"] = [args[i + 1]]
                i += 2
            else:
                return None, {}, encode_error(f"ERR Syntax error in HELLO option '{args[i].decode(errors='replace')}'")
        return proto, options, None

    async def _login(self, token: bytes, user: bytes | None, via: str) -> bool:
        target = self.target
        try:
            # async: a token whose keys the identity provider must send first holds up no other connection
            identity = await self.gateway.authenticate_async(
                token.decode("utf-8", "replace"), protocol=PROTOCOL, target=target.name, peer=self.peer
            )
        except AuthError as exc:
            self.auth_failures += 1
            close = self.auth_failures >= MAX_AUTH_FAILURES
            await self._local(encode_error(f"WRONGPASS lictor: {exc}"), close=close)
            return False
        except Exception:
            log.exception("redis target %s: token verification failed", target.name)
            await self._local(encode_error("ERR lictor: the token could not be verified; retry later"), close=True)
            return False
        # Each connection holds a Redis connection and may buffer a command and a reply: without a limit per
        # identity, one agent looping over connections could take the gateway's memory and Redis' maxclients.
        key = (target.name, str(identity.issuer), str(identity.subject))
        if sum(1 for c in self.peers if c.identity_key == key) >= target.max_connections:
            reason = (
                f"{identity.subject} already has {target.max_connections} connections open to this target "
                "(the limit); close connections you no longer use, or share them (a smaller pool)"
            )
            self.gateway.audit_event(
                "connection.refused",
                {
                    "protocol": PROTOCOL,
                    "target": target.name,
                    "peer": self.peer,
                    "sub": identity.subject,
                    "reason": reason,
                },
                fail_closed=False,
            )
            await self._local(encode_error(f"ERR lictor: {reason}"), close=True)
            return False
        self.identity_key = key  # counted from here (no await since the count)
        try:
            await self._connect_upstream()
        except (OSError, TimeoutError, UpstreamError, ProtocolError) as exc:
            log.error(
                "redis target %s: upstream %s:%s: %s", target.name, target.upstream_host, target.upstream_port, exc
            )
            await self._local(
                encode_error("ERR lictor: the Redis server behind the gateway is unavailable"), close=True
            )
            return False
        try:
            self.session = await self.gateway.open_session(
                identity, protocol=PROTOCOL, target=target.name, peer=self.peer, method="jwt"
            )
        except Exception as exc:
            # A session_start hook refused it (HookError), or the audit log or the recording cannot
            # take it (fail closed): the gateway has audited why; the agent gets an answer, not a
            # connection that closes under its AUTH.
            log.error("redis target %s: session of %s refused: %s", target.name, identity.subject, exc)
            await self._local(
                encode_error("ERR lictor: the gateway refused the session (see its log); retry later"), close=True
            )
            return False
        self.parser.max_command_bytes = target.max_command_bytes
        self.parser.max_args = 1024 * 1024  # Redis' own limit: more is a protocol error
        self.parser.args_limit = target.max_args
        user_text = user.decode("utf-8", "replace")[:200] if user is not None else None
        self._record("auth", {"via": via, "user": user_text, "subject": identity.subject})
        return True

    async def _connect_upstream(self) -> None:
        t = self.target
        self.up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(t.upstream_host, t.upstream_port), t.connect_timeout
        )
        self.up_writer = up_writer
        steps: list[list[bytes]] = []
        if t.password is not None:
            steps.append([b"AUTH", *([t.username.encode()] if t.username else []), t.password.encode()])
        if t.db:
            steps.append([b"SELECT", str(t.db).encode()])
        for step in steps:
            up_writer.write(encode_command(step))
            await up_writer.drain()
            prefix, body = await asyncio.wait_for(self._read_small_reply(), t.connect_timeout)
            if prefix != SIMPLE_STRING:
                raise UpstreamError(f"{step[0].decode()} failed: {body.decode(errors='replace')[:200]}")

    async def _read_small_reply(self) -> tuple[int, bytes]:
        """One short upstream reply during the handshake: (type byte, text of a one-line reply)."""
        first: tuple[int, bytes] | None = None
        total = 0
        while True:
            event = self.replies.next_event()
            if event is None:
                assert self.up_reader is not None
                data = await self.up_reader.read(65536)
                if not data:
                    raise UpstreamError("connection closed during the handshake")
                total += len(data)
                if total > 1024 * 1024:
                    raise UpstreamError("handshake reply too large")
                self.replies.feed(data)
                continue
            if first is None:
                body = event.body if isinstance(event, Simple) else b""
                prefix = event.prefix if isinstance(event, (Simple, AggregateStart, BulkStart)) else 0
                first = (prefix, body)
            if event.done:
                return first

    async def _hello(self, args: tuple[bytes, ...]) -> None:
        proto, options, error = self._parse_hello(args)
        if error is not None:
            await self._answer("HELLO", error, error="invalid arguments")  # which may hold a token: not recorded
            return
        if b"auth" in options:
            await self._refuse_reauth("HELLO")
            return
        await self._hello_upstream(proto, options)

    async def _hello_upstream(self, proto: bytes | None, options: dict[bytes, list[bytes]]) -> None:
        """Switch the upstream connection to the agent's protocol version (never forwarding AUTH)."""
        args = [b"HELLO"]
        if proto is not None:
            args.append(proto)
            if b"setname" in options:
                args += [b"SETNAME", options[b"setname"][0]]
        self.seq += 1
        shown, _ = RECORD_PLAN.mask_text(" ".join(quote(a) for a in args[1:]))  # the client name is the agent's
        self._record("command", {"n": self.seq, "command": "HELLO", "args": shown})
        await self._forward(args, Slot(seq=self.seq, command="HELLO"))

    # -- transactions ---------------------------------------------------------------------------

    async def _multi(self, args: tuple[bytes, ...]) -> None:
        if self.multi is None:
            self.multi = _Multi()
        await self._plain(args, "MULTI")

    async def _exec(self, args: tuple[bytes, ...]) -> None:
        multi, self.multi = self.multi, None
        if multi is None:
            await self._plain(args, "EXEC")  # upstream answers "EXEC without MULTI"
            return
        self.seq += 1
        if self._token_expired():
            # EXEC is what runs the queued commands: after the token expired it runs nothing, as no
            # other command would run then.
            await self._refuse_expired_exec(args)
            return
        if multi.aborted:
            self._record("command", {"n": self.seq, "command": "EXEC", "decision": "gateway", "aborted": True})
            await self._forward([b"DISCARD"], Slot(replace=EXECABORT, seq=self.seq, command="EXEC"))
            return
        self._record("command", {"n": self.seq, "command": "EXEC", "decision": "gateway"})
        await self._forward(
            args,
            Slot(
                element_plans=multi.plans,
                element_commands=multi.commands,
                element_keys=multi.keys,
                seq=self.seq,
                command="EXEC",
            ),
        )

    def _token_expired(self) -> bool:
        expires = self.session.identity.expires_at if self.session is not None else None
        return expires is not None and time.time() > expires

    async def _refuse_expired_exec(self, args: tuple[bytes, ...]) -> None:
        """Discard the upstream transaction and answer EXEC with the denial of an expired token
        (audited and recorded like any other denial)."""
        assert self.session is not None
        session = self.session
        decision = Decision.deny(
            "your token has expired; reconnect with a fresh one", "lictor:token-expired", session.policy.version
        )
        try:
            session.audit(request_for(classify(args), args, target=self.target.name), decision)
        except Exception:
            log.exception("redis connection %s: the denial of EXEC could not be audited", self.peer)
        self.counts["denied"] += 1
        self._record(
            "command",
            {
                "n": self.seq,
                "command": "EXEC",
                "decision": decision.action,
                "rules": list(decision.rule_ids),
                "policy": decision.policy_version,
            },
        )
        await self._forward([b"DISCARD"], Slot(replace=_denial("EXEC", decision), seq=self.seq, command="EXEC"))

    # -- ordinary commands ----------------------------------------------------------------------

    async def _command(self, args: tuple[bytes, ...]) -> None:
        assert self.session is not None
        session = self.session
        c = classify(args)
        self.seq += 1
        seq = self.seq
        base = {"n": seq, "command": c.name, "keys": None if c.keys is None else [quote(k, 200) for k in c.keys[:32]]}
        if self.multi is not None:
            base["multi"] = True
        if not c.arity_ok:
            self.counts["errors"] += 1
            if self.multi is not None:
                self.multi.aborted = True
            self._record("command", {**base, "decision": "error", "error": "wrong number of arguments"})
            await self._local(encode_error(f"ERR wrong number of arguments for '{c.command}' command"), seq=seq)
            return
        request = request_for(c, args, target=self.target.name)

        async def notify(approval_id: str, message: str) -> None:
            # RESP cannot carry a notice in the middle of a command: the agent just waits. What
            # was decided before goes out now, so its replies do not wait for the approval.
            await self._flush_upstream()
            self._record("approval", {"n": seq, "approval_id": approval_id, "message": message})
            watchers.append(asyncio.create_task(self._watch_agent()))

        watchers: list[asyncio.Task[None]] = []
        try:
            decision = await session.decide(request, notify)
        finally:
            for watcher in watchers:
                watcher.cancel()
            if watchers:  # a watcher's read() must be over before the read loop reads again
                await asyncio.wait(watchers)
        plan = session.mask_plan(decision) if decision.allowed else MaskPlan.EMPTY
        summary, _ = RECORD_PLAN.mask_text(_args_summary(c, (RECORD_PLAN, plan)))
        if not plan.is_empty:
            summary, _ = plan.mask_text(summary)
        record = {
            **base,
            "args": summary,
            "decision": decision.action,
            "rules": list(decision.rule_ids),
            "policy": decision.policy_version,
        }
        if decision.approval_id:
            record["approval_id"] = decision.approval_id
        if decision.mask_rule_ids:
            record["mask_rules"] = list(decision.mask_rule_ids)
        # whatever the role's recording mode: a command the recording lacks is never forwarded
        recorded = self._record("command", record, strict=True)
        if decision.allowed and not recorded:
            decision = Decision.deny(
                "the session recording is unavailable, and nothing unrecorded is forwarded; retry later",
                "lictor:recording-unavailable",
                decision.policy_version,
            )
        if not decision.allowed:
            self.counts["denied"] += 1
            if self.multi is not None:
                self.multi.aborted = True
            await self._local(_denial(c.name, decision), seq=seq, command=c.name)
            return
        self.counts["allowed"] += 1
        kind = reply_kind(c.command, c.args)
        # Inside MULTI a blocking command does not block; an unknown one might (a module's).
        blocking = self.multi is None and (c.categories is None or "blocking" in c.categories)
        slot = Slot(
            plan=plan, seq=seq, command=c.name, kind=kind, keys=c.keys or (), queued_in=self.multi, blocking=blocking
        )
        await self._forward(args, slot)

    async def _watch_agent(self) -> None:
        """While a command is held: if the agent hangs up, stop waiting (the approval is withdrawn
        instead of running the command for nobody).

        The read loop is parked in ``session.decide``, so the watcher reads for it: what the agent
        pipelined behind the held command goes to the parser (handled once the hold ends), and the
        end of the stream is seen even behind such bytes (``reader.at_eof()`` alone stays False
        while unread bytes are buffered, and a full buffer pauses reading before the EOF arrives).
        More than ``max_command_bytes`` queued behind a held command ends the connection too."""
        while True:
            if self.writer.transport.is_closing():
                break
            data = await self.reader.read(65536)
            if not data:
                break
            self.parser.feed(data)
            if self.parser.buffered > self.target.max_command_bytes:
                log.warning("redis connection %s: too much pipelined behind a held command", self.peer)
                break
        if self.reading is not None:
            self.reading.cancel()

    # -- replies --------------------------------------------------------------------------------

    async def _respond(self) -> None:
        while True:
            slot = await self.queue.get()
            if slot is None:
                return
            if slot.local is not None:
                self.out += slot.local
                if slot.seq:
                    self._record(
                        "reply",
                        {
                            "n": slot.seq,
                            "direction": "out",
                            "type": TYPE_NAMES.get(slot.local[0], "?"),
                            "bytes": len(slot.local),
                            "gateway": True,
                        },
                    )
            else:
                if slot.blocking and self.agent_eof:
                    await self._flush_agent()  # the replies before it (the agent may have half-closed)
                    return  # the agent hung up: Redis would not wait for nobody either
                self.relaying_blocking = slot.blocking
                info = await self._relay(slot)
                self.relaying_blocking = False
                self._record("reply", {"n": slot.seq, "direction": "out", **info})
            if slot.close or self.queue.empty() or len(self.out) >= 64 * 1024:
                await self._flush_agent()
            if slot.close:
                return

    async def _next_event(self) -> Any:
        while True:
            event = self.replies.next_event()
            if event is not None:
                return event
            assert self.up_reader is not None
            if self.out:
                await self._flush_agent()  # do not hold finished replies while upstream works
            data = await self.up_reader.read(256 * 1024)
            if not data:
                raise UpstreamError("the upstream Redis server closed the connection")
            self.replies.feed(data)

    async def _relay(self, slot: Slot) -> dict[str, Any]:
        """Relay one upstream reply to the agent, masking strings; returns what to record."""
        out = bytearray()
        masked: Counter[str] = Counter()
        size = 0
        first: int | None = None
        element = -1
        plan = slot.plan
        shape = shape_for(slot.kind or slot.command.lower(), self.resp3)
        keys = slot.keys
        buffering: bytearray | None = None
        bulk_prefix = BULK_STRING
        bulk_path: tuple[int, ...] = ()
        path: tuple[int, ...] = ()
        # open maps and sets whose masked keys (members) must stay distinct: (path, step, masked so far)
        groups: list[tuple[tuple[int, ...], int, set[bytes]]] = []
        # XINFO: names[n] is the last name (even item) of the open aggregate whose items' paths have length n
        names: list[bytes | None] = []
        oversize = False
        drop = slot.replace is not None
        events = 0
        while True:
            event = await self._next_event()
            events += 1
            if not events % RELAY_SLICE:
                # A long reply arrives faster than it is masked, so reading it seldom waits: give the loop, which
                # every agent's commands share, a turn now and then (a reader's LRANGE of 100,000 masked items held
                # other agents' PINGs for up to 0.9 s)
                await asyncio.sleep(0)
            depth = event.depth
            if depth == 0 and isinstance(event, AggregateStart) and event.prefix == PUSH and first is None:
                await self._skip_push(event)
                continue
            if first is None and not (isinstance(event, AggregateStart) and event.prefix == ATTRIBUTE):
                first = event.prefix if isinstance(event, (Simple, AggregateStart, BulkStart)) else None
                if slot.element_plans is not None and not drop:
                    if not (isinstance(event, AggregateStart) and event.prefix == ARRAY) or event.count < 0:
                        # an error or a null (WATCH failed: "_" in RESP3, "*-1" in RESP2): nothing of the data
                        plan = MaskPlan.EMPTY
                    elif event.count != len(slot.element_plans):
                        log.error(
                            "EXEC reply has %d elements for %d queued commands", event.count, len(slot.element_plans)
                        )
                        drop = True
                        slot.replace = encode_error("ERR lictor: the transaction reply does not match; it was withheld")
            if slot.element_plans is not None and depth == 1 and first == ARRAY:
                starts_item = isinstance(event, (Simple, BulkStart)) or (
                    isinstance(event, AggregateStart) and event.prefix != ATTRIBUTE
                )
                if starts_item:
                    element += 1
                    plan = slot.element_plans[element] if 0 <= element < len(slot.element_plans) else MaskPlan.EMPTY
                    commands = slot.element_commands or []
                    shape = shape_for(commands[element] if element < len(commands) else "", self.resp3)
                    element_keys = slot.element_keys or []
                    keys = element_keys[element] if element < len(element_keys) else ()
            if isinstance(event, (Simple, AggregateStart, BulkStart)):
                # where the item sits in the reply to its own command (inside EXEC's array: in its element)
                path = event.path[1:] if slot.element_plans is not None else event.path
                while groups and not (len(path) > len(groups[-1][0]) and path[: len(groups[-1][0])] == groups[-1][0]):
                    groups.pop()  # an item outside the innermost open group: that group is over
                if shape.named and path and path[-1] % 2 == 0:
                    del names[len(path) :]
                    names += [None] * (len(path) + 1 - len(names))
                    if isinstance(event, Simple) and len(event.body) <= 64:
                        names[len(path)] = event.body
            if drop:
                if event.done:
                    break
                continue
            if isinstance(event, Simple):
                if (
                    slot.queued_in is not None
                    and depth == 0
                    and event.prefix == SIMPLE_STRING
                    and event.body == b"QUEUED"
                ):
                    # Redis queued it (WATCH inside MULTI, for one, runs at once): EXEC's reply will
                    # have an element for it, masked with its plan. Any other reply is data (a script's
                    # status reply, should Redis not be in a transaction after all) and masked below.
                    slot.queued_in.plans.append(slot.plan)
                    slot.queued_in.commands.append(slot.kind or slot.command.lower())
                    slot.queued_in.keys.append(slot.keys)
                    out += event.raw
                elif (
                    event.prefix in (SIMPLE_STRING, ERROR)
                    and not plan.is_empty
                    and not shape.is_id(path, event.body, names)
                    and not shape.is_key(path, event.body, keys)
                ):
                    body, counts = plan.mask_bytes(event.body)
                    masked.update(counts)
                    body = body.replace(b"\r", b" ").replace(b"\n", b" ")
                    if body != event.body:
                        body = self._distinct(groups, path, body)
                    out += bytes([event.prefix]) + body + b"\r\n"
                elif (
                    event.prefix in (INTEGER, DOUBLE, BIG_NUMBER)
                    and not plan.is_empty
                    and not (event.prefix == INTEGER and shape.plain_integers)
                ):
                    # RESP2 sends doubles and big numbers as bulk strings, which are masked: HELLO 3
                    # must not unmask them (a card number stored as a sorted-set score). Integers can
                    # be stored values too (INCRBY app:card 0 answers the number stored as a string).
                    # A masked number is no longer a number, so it goes out as a bulk string.
                    body, counts = plan.mask_bytes(event.body)
                    if body != event.body:
                        masked.update(counts)
                        body = self._distinct(groups, path, body)
                        out += b"$%d\r\n%b\r\n" % (len(body), body)
                    else:
                        out += event.raw
                else:
                    out += event.raw
            elif isinstance(event, AggregateStart):
                if event.count > 0 and event.prefix != ATTRIBUTE and not plan.is_empty:
                    step = 2 if event.prefix == MAP else 1 if event.prefix == SET else shape.distinct(path)
                    if step:
                        groups.append((path, step, set()))
                out += event.raw
            elif isinstance(event, BulkStart):
                if event.length >= 0 and not plan.is_empty and event.prefix in (BULK_STRING, BULK_ERROR, VERBATIM):
                    buffering = bytearray()
                    bulk_prefix = event.prefix
                    bulk_path = path
                    oversize = event.length > self.target.mask_max_value
                else:
                    out += event.raw
            elif isinstance(event, BulkChunk):
                if buffering is not None:
                    if not oversize:
                        buffering += event.data
                else:
                    out += event.data
            elif isinstance(event, BulkEnd):
                if buffering is not None:
                    if oversize:
                        masked["oversize"] += 1
                        out += encode_error(
                            f"ERR lictor: a value larger than {self.target.mask_max_value} bytes cannot be masked; "
                            "it was withheld"
                        )
                    elif bulk_prefix == BULK_STRING and (
                        shape.is_id(bulk_path, bytes(buffering), names)
                        or shape.is_key(bulk_path, bytes(buffering), keys)
                    ):
                        out += b"$%d\r\n%b\r\n" % (len(buffering), buffering)  # an entry ID or a key the agent named
                    else:
                        value = bytes(buffering)
                        if shape.named and bulk_path and bulk_path[-1] % 2 == 0 and len(value) <= 64:
                            names[len(bulk_path)] = value  # a name of XINFO's maps (set to None at its start)
                        data = self._mask_bulk(bulk_prefix, value, plan, masked)
                        if data != value:
                            data = self._distinct(groups, bulk_path, data)
                        out += b"%c%d\r\n%b\r\n" % (bulk_prefix, len(data), data)
                    buffering = None
                else:
                    out += b"\r\n"
            else:
                out += event.raw
            if len(out) >= 64 * 1024:
                size += len(out)
                self.out += out
                out.clear()
                await self._flush_agent()
            if event.done:
                break
        if drop:
            assert slot.replace is not None
            out += slot.replace
            first = slot.replace[0]
        size += len(out)
        self.out += out
        if slot.command == "HELLO" and not drop and first in (ARRAY, MAP):
            self.resp3 = first == MAP  # the protocol the replies that follow come in
        info: dict[str, Any] = {"type": TYPE_NAMES.get(first or 0, "?"), "bytes": size}
        if masked:
            info["masked"] = dict(masked)
        return info

    @staticmethod
    def _mask_bulk(prefix: int, value: bytes, plan: Any, masked: Counter[str]) -> bytes:
        head = value[:4] if prefix == VERBATIM else b""  # "txt:" of a verbatim string stays
        body, counts = plan.mask_bytes(value[len(head) :])
        if _UNICODE_ESCAPE.search(value):
            # JSON (a cached document): zo\u00eb@ex.com is an address to the agent's JSON reader, not to
            # detectors reading the bytes, so a value that parses is masked as JSON
            try:
                doc, counts = plan.mask_json(json.loads(value[len(head) :]))
                body = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
            except (ValueError, RecursionError):
                # JSON lines, or text with escaped strings in it: anyone reads jane\u0040example.com as an
                # address, so what the detectors find once the escapes are read is masked, in the text as read
                plain = _UNICODE_ESCAPES.sub(_unescape, value[len(head) :])
                found, more = plan.mask_bytes(plain)
                if more.total() > counts.total():
                    body, counts = found, more
        masked.update(counts)
        return head + body

    @staticmethod
    def _distinct(groups: list[tuple[tuple[int, ...], int, set[bytes]]], path: tuple[int, ...], value: bytes) -> bytes:
        """A masked map key or set member that repeats an earlier masked one of the same map or set
        gets a suffix (``#2``, ``#3``...): a client building a dict or a set would merge them and
        silently lose entries."""
        if not groups:
            return value
        where, step, seen = groups[-1]
        if len(path) != len(where) + 1 or path[-1] % step:
            return value
        out, n = value, 1
        while out in seen:
            n += 1
            out = b"%b#%d" % (value, n)
        seen.add(out)
        return out

    async def _skip_push(self, event: AggregateStart) -> None:
        """Out-of-band pushes are not expected (subscriptions and tracking are refused): drop them."""
        log.warning("redis connection %s: dropped an unexpected push message from upstream", self.peer)
        self._record("push", {"dropped": True})
        while not event.done:
            event = await self._next_event()
