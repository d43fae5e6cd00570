"""The Redis addon: vocabulary, target schema, listeners, and the commands it never relays."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from lictor import Flow, Gateway, Loader

from .proxy import Connection, RedisTarget
from .resp import encode_error
from .vocabulary import PROTOCOL, VOCABULARY

__all__ = ["TARGET_SCHEMA", "UNSUPPORTED", "RedisAddon"]

log = logging.getLogger("lictor.redis")

MAX_LOGGING_IN = 128
"""Connections that may be waiting to authenticate at once (each may wait ``auth_timeout``); one more is told so
and closed, so that connections that never log in cannot take every descriptor of the gateway."""

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["protocol", "listen", "upstream"],
    "properties": {
        "protocol": {"const": PROTOCOL},
        "description": {"type": "string"},
        "listen": {"type": "string", "pattern": "^.+:[0-9]+$", "description": "HOST:PORT the agents connect to"},
        "allow_plaintext": {
            "type": "boolean",
            "description": "listen on a non-loopback address although tokens then cross the network in clear",
        },
        "auth_timeout": {"type": "number", "exclusiveMinimum": 0, "description": "seconds to authenticate"},
        "max_connections": {
            "type": "integer",
            "minimum": 1,
            "maximum": 100000,
            "description": "connections one identity may have open to this target at a time (default 32)",
        },
        "limits": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_command_bytes": {"type": "integer", "minimum": 1024},
                "mask_max_value": {"type": "integer", "minimum": 1024},
                "max_args": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 1024 * 1024,
                    "description": "arguments of one command (default 65536); more are refused, unread",
                },
            },
        },
        "upstream": {
            "type": "object",
            "additionalProperties": False,
            "required": ["host"],
            "description": "the Redis server; its credentials stay in the gateway",
            "properties": {
                "host": {"type": "string"},
                "port": {"type": ["integer", "string"]},
                "username": {"type": "string"},
                "password": {"type": "string"},
                "db": {"type": "integer", "minimum": 0},
                "connect_timeout": {"type": "number", "exclusiveMinimum": 0},
            },
        },
    },
}

# Commands that change how the connection's replies flow (subscriptions, MONITOR, replication,
# CLIENT REPLY/TRACKING) or undo the gateway's upstream login (RESET): the gateway could not
# keep replies matched to commands, or the agent would escape its identity. They are denied
# whatever the rule packs say.
_STREAMING = "is not supported through the gateway: it turns the connection into a stream of pushed messages"
UNSUPPORTED: dict[str, str] = {
    "subscribe": _STREAMING,
    "psubscribe": _STREAMING,
    "ssubscribe": _STREAMING,
    "unsubscribe": _STREAMING,
    "punsubscribe": _STREAMING,
    "sunsubscribe": _STREAMING,
    "monitor": _STREAMING,
    "sync": "is the replication protocol, not supported through the gateway",
    "psync": "is the replication protocol, not supported through the gateway",
    "replconf": "is the replication protocol, not supported through the gateway",
    "client tracking": _STREAMING + " (invalidations)",
    "client caching": "is only meaningful with CLIENT TRACKING, which is not supported through the gateway",
    "client reply": "is not supported through the gateway: every command gets a reply",
    "reset": "is not supported through the gateway: it would log the connection out of the server",
}


def _copy_db(attrs: Any) -> str | None:
    """The DB option of ``COPY source destination [DB n] [REPLACE]`` (the last one wins, as in
    Redis), or None when there is none."""
    args = list(attrs.get("args") or ())
    db = None
    i = 2
    while i < len(args):
        if args[i].lower() == "db":
            db = args[i + 1].strip() if i + 1 < len(args) else ""
            i += 2
        else:
            i += 1
    return db


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RedisAddon:
    """The ``redis`` protocol: a RESP2/RESP3 listener per ``protocol: redis`` target."""

    name = "redis"
    # The request hook guards redis requests only: other protocols do not run it, and should an edit
    # break this file, its stand-in denies redis requests, not every request of the gateway.
    protocols = (PROTOCOL,)

    def __init__(self) -> None:
        self.targets: dict[str, RedisTarget] = {}
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()
        self.live: set[Connection] = set()

    def load(self, loader: Loader) -> None:
        loader.add_vocabulary(VOCABULARY)
        loader.add_target_schema(PROTOCOL, TARGET_SCHEMA)

    def configure(self, gateway: Gateway) -> None:
        """Read the redis targets; refuse a plaintext listener off loopback unless allowed."""
        targets: dict[str, RedisTarget] = {}
        for t in gateway.targets(PROTOCOL):
            target = RedisTarget.from_settings(t.name, t.settings)
            if not _is_loopback(target.host) and not t.get("allow_plaintext", False):
                raise ValueError(
                    f"target {t.name!r} listens on {target.host}, which is not a loopback address: agents would "
                    "send their tokens in clear. Put it behind a TLS terminator on the same host, or set "
                    "allow_plaintext: true"
                )
            targets[t.name] = target
        self.targets = targets

    def request(self, flow: Flow) -> None:
        """Deny, whatever the policy says, what the gateway cannot relay safely."""
        request = flow.request
        command = str(request.attrs.get("command", ""))
        reason = UNSUPPORTED.get(command)
        if reason is not None:
            flow.deny(f"{command.upper()} {reason}", "redis:unsupported")
        elif command in ("select", "move", "swapdb", "copy"):
            # SELECT switches the connection; MOVE, SWAPDB and COPY ... DB n write to another
            # database than the target's (whatever their keys are called there).
            copy_db = _copy_db(request.attrs) if command == "copy" else None
            if command == "copy" and copy_db is None:
                return  # a COPY within the connection's database
            target = self.targets.get(request.target or flow.session.target)
            db = target.db if target is not None else 0
            if copy_db == str(db):
                return
            flow.deny(
                f"this target is pinned to database {db}; connect to a target configured for another database",
                "redis:db-pinned",
            )

    def decision(self, flow: Flow) -> None:
        """A policy denial takes the place of the ``request`` hook's: a role without a rule for ``SUBSCRIBE`` was
        told to ask for one, which could not help. What the gateway cannot relay is said so, in the audit too."""
        self.request(flow)

    async def running(self, gateway: Gateway) -> None:
        if not self.targets:
            self.configure(gateway)
        for target in self.targets.values():

            async def handle(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: RedisTarget = target
            ) -> None:
                if sum(1 for c in self.live if c.session is None) >= MAX_LOGGING_IN:
                    await self._refuse_busy(gateway, target, writer)
                    return
                task = asyncio.current_task()
                assert task is not None
                self.connections.add(task)
                connection = Connection(gateway, target, reader, writer, self.live)
                self.live.add(connection)
                try:
                    await connection.run()
                except asyncio.CancelledError:
                    pass  # the addon is stopping; run() has closed the connection and its session
                finally:
                    self.connections.discard(task)
                    self.live.discard(connection)

            server = await asyncio.start_server(handle, target.host, target.port)
            self.servers.append(server)
            log.info("redis target %s listening on %s:%s", target.name, target.host, target.port)

    @staticmethod
    async def _refuse_busy(gateway: Gateway, target: RedisTarget, writer: asyncio.StreamWriter) -> None:
        """Tell a connection that too many are logging in, and close it; audited in bursts (``audit_burst``)."""
        reason = f"{MAX_LOGGING_IN} connections were waiting to authenticate at once"
        event = {"protocol": PROTOCOL, "target": target.name, "reason": reason}
        if gateway.audit_burst(f"redis:{target.name}:logging-in", "connection.refused", event):
            log.warning("redis target %s: refusing connections: %s", target.name, reason)
        with contextlib.suppress(Exception):
            writer.write(encode_error("ERR lictor: too many connections are logging in at once; retry in a moment"))
            await asyncio.wait_for(writer.drain(), 2)
        writer.close()

    async def done(self, gateway: Gateway) -> None:
        """Stop accepting, then end open connections (their sessions close and are audited)."""
        for server in self.servers:
            server.close()
        for task in list(self.connections):
            task.cancel()
        for task in list(self.connections):
            with contextlib.suppress(BaseException):
                await task
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self.servers = []
