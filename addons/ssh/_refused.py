"""Agent and X11 forwarding requests: refused, and the agent told so.

asyncssh refuses both (they are switched off in the listener), but OpenSSH asks for agent forwarding
without wanting a reply, and reports a refused X11 request without a reason: the agent's command ran
with neither and nothing said why. :func:`note_refused_forwarding` makes the server channel remember
such a request; the channel handler then writes ``lictor: ... forwarding is not allowed`` to stderr
and records a ``forward`` event, before the command runs.
"""

from __future__ import annotations

from typing import Any

from asyncssh import channel as _channel
from asyncssh.packet import SSHPacket

__all__ = ["note_refused_forwarding", "refused_forwarding"]

_ATTR = "_lictor_refused_forwarding"


def _note(chan: Any, kind: str) -> None:
    refused: list[str] = getattr(chan, _ATTR, [])
    if kind not in refused:
        setattr(chan, _ATTR, [*refused, kind])


def _process_x11_req_request(self: Any, packet: SSHPacket) -> bool:
    packet.get_boolean()  # single connection
    packet.get_string()  # auth protocol
    packet.get_string()  # auth cookie
    packet.get_uint32()  # screen
    packet.check_end()
    _note(self, "x11")
    return False


def _process_auth_agent_req_at_openssh_dot_com_request(self: Any, packet: SSHPacket) -> bool:
    packet.check_end()
    _note(self, "agent")
    return False


def refused_forwarding(chan: Any) -> list[str]:
    """The forwarding requests refused on ``chan`` so far (``agent``, ``x11``)."""
    return list(getattr(chan, _ATTR, []))


def note_refused_forwarding() -> None:
    """Install the refusals on asyncssh's server channels (idempotent)."""
    cls = _channel.SSHServerChannel
    if getattr(cls._process_x11_req_request, "lictor_noted", False):
        return
    for name, func in (
        ("_process_x11_req_request", _process_x11_req_request),
        ("_process_auth_agent_req_at_openssh_dot_com_request", _process_auth_agent_req_at_openssh_dot_com_request),
    ):
        func.lictor_noted = True  # type: ignore[attr-defined]
        setattr(cls, name, func)
