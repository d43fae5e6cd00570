"""The relay's pipes: output queued with write_soon leaves once per turn of the loop, in order."""

from __future__ import annotations

import asyncio
import socket

from lictor.recorder import RecordingError
from lictor_addons.postgres._pipe import Pipe, defer_records


class CountingTransport:
    def __init__(self, transport: asyncio.Transport) -> None:
        self.inner = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.inner.write(data)

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


async def _connected_pipe() -> tuple[Pipe, CountingTransport, socket.socket]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    pipe = Pipe("test")
    await loop.create_connection(lambda: pipe, sock=ours)
    counting = CountingTransport(pipe.transport)  # type: ignore[arg-type]
    pipe.transport = counting  # type: ignore[assignment]
    theirs.setblocking(False)
    return pipe, counting, theirs


async def _read_all(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        data += await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
    return data


async def test_write_soon_coalesces_per_turn_and_keeps_order() -> None:
    pipe, transport, peer = await _connected_pipe()
    pipe.write_soon(b"a")
    pipe.write_soon(b"b")
    assert transport.writes == []  # nothing until the loop has finished this turn
    await asyncio.sleep(0)
    assert transport.writes == [b"ab"]  # one write for the turn
    pipe.write_soon(b"c")
    pipe.write(b"d")  # a direct write sends what is queued first
    assert transport.writes == [b"ab", b"c", b"d"]
    pipe.write_soon(b"e")
    pipe.close()  # closing flushes
    assert transport.writes[-1] == b"e"
    assert await _read_all(peer, 5) == b"abcde"
    peer.close()


async def test_abort_drops_what_is_queued() -> None:
    pipe, transport, peer = await _connected_pipe()
    pipe.write_soon(b"never")
    pipe.abort()
    await asyncio.sleep(0)
    assert transport.writes == []
    peer.close()


async def test_deferred_records_are_written_before_the_output_of_their_turn() -> None:
    pipe, transport, peer = await _connected_pipe()
    order: list[str] = []

    class Spy(CountingTransport):
        def write(self, data: bytes) -> None:
            order.append(f"send {data.decode()}")
            super().write(data)

    pipe.transport = Spy(transport.inner)  # type: ignore[assignment]
    defer_records("gw", lambda: order.append("records"))
    pipe.write_soon(b"result")
    await asyncio.sleep(0)
    assert order == ["records", "send result"]
    # A direct write (an error sent at once) writes them first too; one run per key and turn.
    defer_records("gw", lambda: order.append("records again"))
    defer_records("gw", lambda: order.append("not twice"))
    pipe.write(b"error")
    assert order[2:] == ["records again", "send error"]
    await asyncio.sleep(0)
    assert order[4:] == []  # nothing left to write
    assert await _read_all(peer, 11) == b"resulterror"
    peer.close()


async def test_when_recorded_events_cannot_be_written_nothing_of_that_turn_is_sent() -> None:
    first, first_transport, first_peer = await _connected_pipe()
    second, second_transport, second_peer = await _connected_pipe()

    def broken() -> None:
        raise RecordingError("spool write failed (No space left on device)")

    first.write_soon(b"row data")
    defer_records("gw", broken)
    second.write_soon(b"more row data")
    await asyncio.sleep(0)
    assert first_transport.writes == [] and second_transport.writes == []
    assert first.transport is None or first_transport.inner.is_closing()
    assert second_transport.inner.is_closing()
    loop = asyncio.get_running_loop()
    for peer in (first_peer, second_peer):
        try:  # the peer sees the connection end (reset or EOF), never the data
            assert await asyncio.wait_for(loop.sock_recv(peer, 100), 5) == b""
        except ConnectionResetError:
            pass
        peer.close()
