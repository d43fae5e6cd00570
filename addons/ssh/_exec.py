"""Exec and subsystem requests that are not text: decided (denied) and audited, never dropped unseen.

asyncssh answers an exec request whose command bytes do not decode as UTF-8 with a channel request
failure before any handler runs: OpenSSH's ``ssh`` then prints only ``exec request failed on channel 0``
(exit status 255), and nothing of it reached the session's recording or the audit log.
:func:`accept_undecodable_commands` makes the server channel take such a command with its undecodable
bytes kept as surrogates (``surrogateescape``); :func:`undecodable` finds them and :func:`shown` is the
command as it may be written to a terminal or a log (those bytes as ``\\xNN``). The command line is then
denied as unparsable with that text (see ``requests_for_command``): the shell analysis reads text, and
bytes it cannot read are a command it cannot know. A subsystem name that is not ASCII (which asyncssh refused
the same way) is kept and denied likewise.
"""

from __future__ import annotations

from typing import Any

from asyncssh import channel as _channel
from asyncssh.packet import SSHPacket

__all__ = ["accept_undecodable_commands", "shown", "undecodable"]


def undecodable(command: str) -> int | None:
    """The offset (in bytes) of the first byte of ``command`` that was not valid UTF-8, or None."""
    try:
        command.encode("utf-8")
    except UnicodeEncodeError as exc:
        return len(command[: exc.start].encode("utf-8", "surrogateescape"))
    return None


def shown(command: str) -> str:
    """``command`` with the bytes that were not valid UTF-8 written as ``\\xNN``."""
    return command.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _process_exec_request(self: Any, packet: SSHPacket) -> bool:
    command = packet.get_string()
    packet.check_end()
    return bool(self._start_session(command=command.decode("utf-8", "surrogateescape")))


def _process_subsystem_request(self: Any, packet: SSHPacket) -> bool:
    name = packet.get_string()
    packet.check_end()
    return bool(self._start_session(subsystem=name.decode("ascii", "surrogateescape")))


def accept_undecodable_commands() -> None:
    """Install the exec and subsystem request handlers on asyncssh's server channels (idempotent)."""
    cls = _channel.SSHServerChannel
    if getattr(cls._process_exec_request, "lictor_undecodable", False):
        return
    _process_exec_request.lictor_undecodable = True  # type: ignore[attr-defined]
    cls._process_exec_request = _process_exec_request  # type: ignore[method-assign]
    cls._process_subsystem_request = _process_subsystem_request  # type: ignore[method-assign]
