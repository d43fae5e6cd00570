"""The relay's pipes: output queued with write_soon leaves once per turn of the loop, in order."""

from __future__ import annotations

import asyncio
import socket

from lictor_addons.postgres._pipe import Pipe


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
