"""Local port forwarding (``ssh -L``/``-D``) through the target, when a rule allows it.

A ``direct-tcpip`` channel from the agent becomes a request (channel ``port_forward``, ``destination``
``host:port``, ``direction`` ``local``); when allowed, the gateway opens the same ``direct-tcpip``
channel on its upstream connection, so the connection leaves from the target, and joins the two
channels byte for byte with flow control in both directions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import asyncssh

from ._upstream import Lease

__all__ = ["Bridge"]


class Bridge:
    """Joins an agent channel and an upstream channel."""

    def __init__(self, lease: Lease, released: Callable[[], None]) -> None:
        self.lease = lease
        self._released = released
        self.ended: Callable[[Bridge], None] | None = None
        """Called once the bridge has closed (set once both channels are open)."""
        self.agent_chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.up_chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self._closed = False
        self.sent = 0
        self.received = 0

    def agent_session(self) -> asyncssh.SSHTCPSession[bytes]:
        return _AgentSide(self)

    def upstream_session(self) -> asyncssh.SSHTCPSession[bytes]:
        return _UpSide(self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for chan in (self.agent_chan, self.up_chan):
            if chan is not None:
                with contextlib.suppress(Exception):
                    chan.close()
        self.lease.release()
        self._released()
        if self.ended is not None:
            self.ended(self)


class _AgentSide(asyncssh.SSHTCPSession[bytes]):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        b = self.bridge
        b.agent_chan = chan
        for data in b._early:
            chan.write(data)
        b._early.clear()
        if b._early_eof:
            chan.write_eof()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        b = self.bridge
        b.sent += len(data)
        if b.up_chan is not None:
            b.up_chan.write(data)

    def eof_received(self) -> bool:
        if self.bridge.up_chan is not None:
            with contextlib.suppress(Exception):
                self.bridge.up_chan.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.bridge.up_chan is not None:
            self.bridge.up_chan.pause_reading()

    def resume_writing(self) -> None:
        if self.bridge.up_chan is not None:
            self.bridge.up_chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.close()


class _UpSide(asyncssh.SSHTCPSession[bytes]):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.bridge.up_chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        b = self.bridge
        b.received += len(data)
        if b.agent_chan is not None:
            b.agent_chan.write(data)
        else:
            b._early.append(data)

    def eof_received(self) -> bool:
        b = self.bridge
        if b.agent_chan is not None:
            with contextlib.suppress(Exception):
                b.agent_chan.write_eof()
        else:
            b._early_eof = True
        return True

    def pause_writing(self) -> None:
        if self.bridge.agent_chan is not None:
            self.bridge.agent_chan.pause_reading()

    def resume_writing(self) -> None:
        if self.bridge.agent_chan is not None:
            self.bridge.agent_chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.close()
