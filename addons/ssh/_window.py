"""Bounded receive windows for asyncssh channels.

SSH flow control: a peer may send only as many bytes as the receiver's window allows; the receiver
grants more (``CHANNEL_WINDOW_ADJUST``) as it consumes. asyncssh 2.24 grants the whole window again
whenever it delivers one buffered packet to the session, even while more packets wait in the channel's
buffer because the session paused reading. A session that reads slower than its peer writes (the
gateway masking a target's output, inspecting an agent's input) pauses and resumes again and again,
and every resume lets the peer send another full window: the buffer, and the gateway's memory, grow
without bound (a masked ``head -c 2G /dev/urandom`` grew it by 800 MiB in 10 s).

:func:`bound_receive_windows` makes the grant count what is still buffered: window plus buffered bytes
never exceed the channel's initial window, so each channel holds at most that much, however slowly it
is read. The rest of the delivery (decoding, handing data to the session) is unchanged.
"""

from __future__ import annotations

from typing import Any

from asyncssh import channel as _channel
from asyncssh.constants import MSG_CHANNEL_WINDOW_ADJUST
from asyncssh.packet import UInt32

__all__ = ["bound_receive_windows"]


def _deliver_data(self: Any, data: bytes, datatype: Any) -> None:
    initial = self._init_recv_window
    if self._recv_window < initial / 2:
        # Grant what the buffer leaves room for, once that is at least half a window (as asyncssh does
        # when nothing is buffered). The packet being delivered has already left the buffer, so the
        # grant comes at the latest when the buffer is empty again: no stall.
        room = initial - sum(len(chunk) for chunk, _ in self._recv_buf)
        if room - self._recv_window >= initial / 2:
            self.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(room - self._recv_window))
            self._recv_window = room
    if self._encoding:
        try:
            decoded: Any = self._decoder.decode(data)
        except UnicodeDecodeError as exc:
            raise _channel.ProtocolError(str(exc)) from None
    else:
        decoded = data
    if self._session is not None:
        self._session.data_received(decoded, datatype)


def bound_receive_windows() -> None:
    """Install the bounded grant on every asyncssh channel (idempotent)."""
    cls = _channel.SSHChannel
    if getattr(cls._deliver_data, "lictor_bounded", False):
        return
    _deliver_data.lictor_bounded = True  # type: ignore[attr-defined]
    cls._deliver_data = _deliver_data  # type: ignore[method-assign]
