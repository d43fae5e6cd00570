"""One side of a proxied connection as an asyncio protocol.

During the handshake (startup, TLS, authentication) a coroutine reads from the pipe with ``await
pipe.read()``. Once the session is established the pipe switches to callbacks: every received chunk goes
straight to ``on_data`` (no task switch, no queue), which is what keeps the relay cheap.

Output: the relay queues what it forwards with ``write_soon``; the queue of every pipe is written
once the loop has run all the callbacks of its current turn (one write per pipe and turn). Writing at
once would wake the peer (a PostgreSQL backend, the agent) while the gateway still has other
connections' input to handle, and on a busy machine the woken peer takes the CPU from it: under
pgbench with 8 clients on 2 cores, deferring the writes raised throughput by about a quarter. A
direct ``write``, ``close`` or ``flush`` sends what is queued first; ``abort`` drops it.

Recording: the relay appends its audit and session events deferred (``defer=True``) and registers the
writer with :func:`defer_records`; every output (the turn's flush, a direct ``write`` or ``close``)
writes the recorded events first, in one ``os.write`` per turn instead of one per event. If that write
fails, nothing queued in that turn is sent: those connections are aborted (fail closed).

Flow control: when this side's transport buffers too much outgoing data (the peer reads slower than we
write), asyncio calls ``pause_writing``; the pipe then pauses reading on the *other* side until
``resume_writing``. Several reasons may pause reading at once (back-pressure, an approval hold), so
pausing is counted by reason.
"""

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Hashable

__all__ = ["Pipe", "PipeClosed", "defer_records"]

log = logging.getLogger("lictor.postgres")


class PipeClosed(ConnectionError):
    """The peer closed the connection (or it broke) while the handshake was reading from it."""


class _Soon:
    """The pipes with output queued by :meth:`Pipe.write_soon`, flushed once per turn of the loop, and
    the writers of deferred recording events, run before any of that output is sent."""

    loop: asyncio.AbstractEventLoop | None = None
    scheduled = False
    pipes: list["Pipe"] = []
    writers: dict[Hashable, Callable[[], None]] = {}


def _schedule() -> None:
    loop = asyncio.get_running_loop()
    if _Soon.loop is not loop:
        _Soon.loop, _Soon.pipes, _Soon.writers, _Soon.scheduled = loop, [], {}, False
    if not _Soon.scheduled:
        _Soon.scheduled = True
        loop.call_soon(_flush_soon)


def defer_records(key: Hashable, write: Callable[[], None]) -> None:
    """Run ``write`` (it writes deferred recording events) before any output leaves, at the latest at
    the end of this turn of the loop. ``key`` names the writer: one call per key and turn."""
    if key not in _Soon.writers or _Soon.loop is not asyncio.get_running_loop():
        _schedule()
        _Soon.writers[key] = write


def _write_records() -> bool:
    """Run the pending record writers; on failure abort every pipe with queued output and say False."""
    writers, _Soon.writers = _Soon.writers, {}
    ok = True
    for write in writers.values():
        try:
            write()
        except Exception:
            log.exception("recorded events could not be written; aborting the connections that described them")
            ok = False
    if not ok:
        pipes, _Soon.pipes = _Soon.pipes, []
        for pipe in pipes:
            pipe.abort()
    return ok


def _flush_soon() -> None:
    _Soon.scheduled = False
    if _Soon.writers and not _write_records():
        return
    pipes, _Soon.pipes = _Soon.pipes, []
    for pipe in pipes:
        try:
            pipe.flush()
        except Exception:  # one broken connection must not leave the others' output queued
            log.exception("writing to %s failed; aborting that connection", pipe.name)
            pipe.abort()


class Pipe(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.on_data: Callable[[bytes], None] | None = None
        self.on_close: Callable[[Exception | None], None] | None = None
        self.peer: Pipe | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._pause_reasons: set[str] = set()
        self._soon: list[bytes] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        handler = self.on_data
        if handler is not None:
            handler(data)
            return
        self._buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake()
        callback = self.on_close
        if callback is not None:
            callback(exc)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading("backpressure")

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading("backpressure")

    # -- reading during the handshake ---------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """Wait for data; return everything buffered. Raises PipeClosed at end of stream."""
        while not self._buf:
            if self.closed:
                raise PipeClosed(f"{self.name} closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def take_buffered(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    # -- writing and flow control -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if _Soon.writers and not _write_records():
            self.abort()
            return
        if self._soon is not None:
            self.flush()
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def write_soon(self, data: bytes) -> None:
        """Queue ``data`` until the loop has run every callback of this turn (one write per pipe).

        The relay answers several connections per turn; writing at once wakes each peer, which then
        takes the CPU from the gateway before it has handled the other connections.
        """
        if self.transport is None or self.closed:
            return
        soon = self._soon
        if soon is not None:
            soon.append(data)
            return
        self._soon = [data]
        _schedule()
        _Soon.pipes.append(self)

    def flush(self) -> None:
        if _Soon.writers and not _write_records():
            self.abort()
            return
        soon, self._soon = self._soon, None
        if soon and self.transport is not None and not self.closed:
            self.transport.write(soon[0] if len(soon) == 1 else b"".join(soon))

    def peer_gone(self) -> bool:
        """Whether the other end closed the connection, found without reading (for a paused pipe, whose
        transport does not notice end of file until it reads again)."""
        transport = self.transport
        if transport is None or self.closed:
            return True
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            with socket.socket(fileno=os.dup(sock.fileno())) as peek:
                data = peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return data == b""

    def pause_reading(self, reason: str) -> None:
        if not self._pause_reasons and self.transport is not None and not self.closed:
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass
        self._pause_reasons.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self.closed:
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._soon = None
        if self.transport is not None:
            self.transport.abort()

    def set_transport(self, transport: asyncio.Transport) -> None:
        """After ``loop.start_tls`` the protocol is driven by the new (TLS) transport."""
        self.transport = transport
