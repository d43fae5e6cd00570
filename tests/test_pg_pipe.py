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


async def test_output_waits_for_what_it_depends_on_and_is_dropped_when_that_fails() -> None:
    # The relay's hook makes the strict recording's events durable before any output leaves; when it cannot, the
    # output must not leave at all.
    pipe, transport, peer = await _connected_pipe()
    asked: list[bool] = []
    durable = True

    def ready() -> bool:
        asked.append(durable)
        if not durable:
            pipe.drop_queued()
        return durable

    pipe.before_output = ready
    pipe.write_soon(b"a")
    pipe.write_soon(b"b")
    await asyncio.sleep(0)
    assert transport.writes == [b"ab"] and asked == [True]  # asked once for the turn's output
    durable = False
    pipe.write_soon(b"c")
    await asyncio.sleep(0)
    pipe.write(b"d")
    assert transport.writes == [b"ab"] and asked == [True, False, False]
    pipe.before_output = None  # (the relay clears it to say why, in a last message)
    pipe.write(b"e")
    pipe.close()
    assert await _read_all(peer, 3) == b"abe"
    peer.close()
