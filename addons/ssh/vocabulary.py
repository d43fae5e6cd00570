"""The ``when:`` vocabulary of SSH rules.

An exec request or a shell line is split (as a shell would parse it) into the programs that would
run; each program is one request, and all of them are decided together (deny wins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lictor import Request
from lictor.vocabulary import Boolean, Enum, Glob, Predicate, Vocabulary

CHANNELS = (
    "exec",
    "shell",
    "shell_line",
    "raw_shell",
    "sftp",
    "scp",
    "git",
    "rsync",
    "subsystem",
    "port_forward",
    "agent_forwarding",
    "x11",
)


@dataclass(frozen=True)
class _AbsolutePaths(Glob):
    """sftp/scp ``paths`` are absolute and normalised: a relative pattern (``etc/shadow``) never matches."""

    def compile(self, value: Any) -> Predicate:
        for pattern in [value] if isinstance(value, str) else value:
            if str(pattern)[:1] not in ("/", "*", "?", "["):
                raise ValueError(f"{pattern!r} can never match: paths are absolute (write '/{pattern}')")
        return super().compile(value)


def _build(case: Mapping[str, Any], target: str) -> Sequence[Request]:
    """``lictor test`` requests: ``command:`` (exec, or ``channel: shell_line``), or sftp/scp
    ``operation:`` with ``path:``/``paths:``, or ``channel:`` alone (shell, raw_shell, ...)."""
    from ._requests import channel_request, forward_request, requests_for_command, sftp_request

    channel = str(case.get("channel", "exec"))
    if channel not in CHANNELS:
        raise ValueError(f"unknown ssh channel {channel!r} (one of {', '.join(CHANNELS)})")
    reason = case.get("reason")
    if "command" in case:
        command = case["command"]
        if not isinstance(command, str):
            raise ValueError("`command:` must be a string")
        interactive = bool(case.get("pty", channel == "shell_line"))
        return requests_for_command(command, target=target, channel=channel, interactive=interactive, reason=reason)
    if "operation" in case:
        paths = case.get("paths") or ([case["path"]] if "path" in case else [])
        if not paths:
            raise ValueError("an sftp test request needs `path:` or `paths:`")
        return [sftp_request(str(case["operation"]), [str(p) for p in paths], target=target, channel=channel)]
    if "destination" in case:
        host, _, port = str(case["destination"]).rpartition(":")
        return [forward_request(str(case.get("direction", "local")), host, int(port), target=target)]
    return [channel_request(channel, target=target, reason=reason)]


VOCABULARY = Vocabulary(
    protocol="ssh",
    fields=(
        Enum(
            "channels",
            attr="channel",
            values=CHANNELS,
            description="exec command, interactive shell (line-inspected), raw shell, sftp, scp, git and rsync "
            "transfers, forwarding",
        ),
        Glob("programs", attr="program", description="program name (basename), e.g. ls, systemctl", basename=True),
        Glob(
            "program_paths",
            attr="program_path",
            case_sensitive=True,
            description="the program as written: cat (found through PATH), /usr/bin/cat, ./cat; a path is also "
            "given spelled plainly (/usr/bin/../../tmp/cat is /tmp/cat too)",
        ),
        Glob(
            "commands",
            attr="command",
            description="program and arguments as one string, e.g. 'systemctl status *', 'rm -rf *'",
        ),
        Glob("args", attr="argv", description="the arguments only, as one string"),
        Glob("writes", attr="writes", description="files written by redirections"),
        _AbsolutePaths("paths", attr="paths", description="sftp/scp/git/rsync paths"),
        Enum(
            "operations",
            attr="operation",
            values=(
                "read",
                "write",
                "list",
                "stat",
                "remove",
                "rename",
                "mkdir",
                "rmdir",
                "symlink",
                "link",
                "setstat",
            ),
            description="sftp, scp, git and rsync operations",
        ),
        Boolean(
            "via_wrapper",
            description="the program is started by another (sh -c, xargs, find -exec, sudo, $(...) ...)",
        ),
        Glob(
            "via",
            description="how the program is reached: pipeline, subshell, command_substitution, sh -c, eval, "
            "xargs, find -exec, sudo, env, ... (absent at top level)",
        ),
        Glob("destinations", attr="destination", description="port forwarding destination, host:port"),
    ),
    index="programs",
    description="SSH exec requests, shell lines, sftp/scp and forwarding",
    build_requests=_build,
    test_request_schema={
        "type": "object",
        "properties": {
            "channel": {},
            "reason": {},
            "command": {},
            "pty": {},
            "operation": {},
            "path": {},
            "paths": {},
            "destination": {},
            "direction": {},
        },
    },
    mask_by=("detectors",),  # output is a byte stream
)
