"""Connections from the gateway to the target, with the gateway-held key (or certificate).

The target's host key must be in the configured known_hosts file: an unknown or changed host key
fails the connection (asyncssh raises ``HostKeyNotVerifiable``); ``known_hosts=None`` is never used.
No agent, no ``~/.ssh/config``, no other key is consulted.

Agent sessions share a small pool of upstream connections: opening an SSH connection costs a key
exchange and an authentication, and an exec through the gateway should cost little more than an
exec straight to the target. Each connection carries at most ``max_sessions`` channels at a time
(OpenSSH's ``MaxSessions`` defaults to 10); an idle connection is closed after ``IDLE_CLOSE``
seconds. The target sees one gateway account whichever agent is behind a channel; who did what is
in Lictor's audit log and recordings.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncssh

from ._config import UpstreamConfig

__all__ = ["IDLE_CLOSE", "Lease", "UpstreamError", "UpstreamPool"]

UPSTREAM_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
"""Preference for the gateway's own connections: AES-GCM is one call into OpenSSL per packet
(ChaCha20-Poly1305 takes two), which is most of the relay's cost for bulk output."""

log = logging.getLogger("lictor.ssh")

IDLE_CLOSE = 60.0


class UpstreamError(Exception):
    """The target could not be reached; the message is safe to show to the agent."""


@dataclass(eq=False)
class _Conn:
    conn: asyncssh.SSHClientConnection
    active: int = 0
    idle_handle: asyncio.TimerHandle | None = None
    closed: bool = False


@dataclass(eq=False)
class Lease:
    """One channel slot on an upstream connection; :meth:`release` it when the channel is done."""

    pool: UpstreamPool
    entry: _Conn
    released: bool = field(default=False)

    @property
    def conn(self) -> asyncssh.SSHClientConnection:
        return self.entry.conn

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.entry)


class _Client(asyncssh.SSHClient):
    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool._lost(self)


class UpstreamPool:
    """Shared upstream connections of one target."""

    def __init__(self, config: UpstreamConfig, target: str) -> None:
        self.config = config
        self.target = target
        self._entries: list[_Conn] = []
        self._clients: dict[int, _Conn] = {}
        self._lock = asyncio.Lock()
        self._closing = False

    async def _connect(self) -> _Conn:
        cfg = self.config
        client_key: object = (cfg.key, cfg.certificate) if cfg.certificate is not None else cfg.key
        client = _Client(self)
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    cfg.host,
                    cfg.port,
                    username=cfg.user,
                    client_factory=lambda: client,
                    client_keys=[client_key],
                    known_hosts=str(cfg.known_hosts),
                    config=None,
                    agent_path=None,
                    agent_forwarding=False,
                    x11_forwarding=False,
                    password=None,
                    gss_host=None,
                    kbdint_auth=False,
                    preferred_auth="publickey",
                    encryption_algs=list(UPSTREAM_CIPHERS),
                    keepalive_interval=30,
                    keepalive_count_max=3,
                ),
                cfg.connect_timeout,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            log.error("ssh target %s: host key of %s:%s not verified: %s", self.target, cfg.host, cfg.port, exc)
            raise UpstreamError(
                "the target's host key does not match the gateway's known_hosts, so the gateway refused to "
                "connect; tell the gateway operators"
            ) from None
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            log.error("ssh target %s: cannot connect to %s:%s: %s", self.target, cfg.host, cfg.port, exc)
            raise UpstreamError(f"the gateway cannot reach the target ({type(exc).__name__}); retry later") from None
        entry = _Conn(conn)
        self._clients[id(client)] = entry
        return entry

    def _free(self) -> _Conn | None:
        for entry in self._entries:
            if not entry.closed and entry.active < self.config.max_sessions:
                return entry
        return None

    async def acquire(self) -> Lease:
        """A slot on a connection with room, opening a new connection when all are full."""
        if self._closing:
            raise UpstreamError("the gateway is stopping")
        entry = self._free()
        if entry is None:
            async with self._lock:
                entry = self._free()
                if entry is None:
                    entry = await self._connect()
                    if self._closing:
                        entry.conn.close()
                        raise UpstreamError("the gateway is stopping")
                    self._entries.append(entry)
        return self._lease(entry)

    def _lease(self, entry: _Conn) -> Lease:
        entry.active += 1
        if entry.idle_handle is not None:
            entry.idle_handle.cancel()
            entry.idle_handle = None
        return Lease(self, entry)

    def _release(self, entry: _Conn) -> None:
        entry.active -= 1
        if entry.active == 0 and not entry.closed:
            loop = asyncio.get_running_loop()
            entry.idle_handle = loop.call_later(IDLE_CLOSE, self._close_idle, entry)

    def _close_idle(self, entry: _Conn) -> None:
        entry.idle_handle = None
        if entry.active == 0:
            self._drop(entry)
            entry.conn.close()

    def _drop(self, entry: _Conn) -> None:
        entry.closed = True
        if entry in self._entries:
            self._entries.remove(entry)

    def _lost(self, client: _Client) -> None:
        entry = self._clients.pop(id(client), None)
        if entry is not None:
            self._drop(entry)

    async def close(self) -> None:
        self._closing = True
        entries, self._entries = list(self._entries), []
        for entry in entries:
            entry.closed = True
            if entry.idle_handle is not None:
                entry.idle_handle.cancel()
            entry.conn.close()
        for entry in entries:
            try:
                await asyncio.wait_for(entry.conn.wait_closed(), 5)
            except Exception as exc:
                log.debug("ssh target %s: closing an upstream connection: %s", self.target, exc)
