"""Environment requests: only the variables the gateway reads are kept.

asyncssh stores every ``env`` request of a session channel in a dictionary, as many and as large as
the agent sends: thousands of 30 KB variables on one channel grew the gateway by hundreds of MB.
Nothing an agent sends is forwarded to the target (docs/ssh.md), and the gateway itself reads only
``LICTOR_REASON`` and ``LICTOR_APPROVAL``; :func:`keep_gateway_variables` makes the server channel
keep those and refuse the others, so a channel holds at most two values of one packet each.
"""

from __future__ import annotations

from typing import Any

from asyncssh import channel as _channel
from asyncssh.packet import SSHPacket

__all__ = ["GATEWAY_VARIABLES", "keep_gateway_variables"]

GATEWAY_VARIABLES = frozenset({b"LICTOR_REASON", b"LICTOR_APPROVAL"})


def _process_env_request(self: Any, packet: SSHPacket) -> bool:
    name = packet.get_string()
    value = packet.get_string()
    packet.check_end()
    if name not in GATEWAY_VARIABLES:
        return False  # refused (and not stored): the target never sees it, and the gateway does not read it
    self._env[name] = value
    return True


def keep_gateway_variables() -> None:
    """Install the filter on asyncssh's server channels (idempotent)."""
    cls = _channel.SSHServerChannel
    if getattr(cls._process_env_request, "lictor_filtered", False):
        return
    _process_env_request.lictor_filtered = True  # type: ignore[attr-defined]
    cls._process_env_request = _process_env_request  # type: ignore[method-assign]
