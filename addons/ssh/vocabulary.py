"""The ``when:`` vocabulary of SSH rules.

An exec request or a shell line is split (as a shell would parse it) into the programs that would
run; each program is one request, and all of them are decided together (deny wins).
"""

from __future__ import annotations

from lictor.vocabulary import Boolean, Enum, Glob, Vocabulary

CHANNELS = (
    "exec",
    "shell",
    "shell_line",
    "raw_shell",
    "sftp",
    "scp",
    "subsystem",
    "port_forward",
    "agent_forwarding",
    "x11",
)

VOCABULARY = Vocabulary(
    protocol="ssh",
    fields=(
        Enum(
            "channels",
            attr="channel",
            values=CHANNELS,
            description="exec command, interactive shell (line-inspected), raw shell, sftp, scp, forwarding",
        ),
        Glob("programs", attr="program", description="program name (basename), e.g. ls, systemctl"),
        Glob(
            "commands",
            attr="command",
            description="program and arguments as one string, e.g. 'systemctl status *', 'rm -rf *'",
        ),
        Glob("args", attr="argv", description="the arguments only, as one string"),
        Glob("writes", attr="writes", description="files written by redirections"),
        Glob("paths", attr="paths", description="sftp/scp paths"),
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
                "setstat",
            ),
            description="sftp operations",
        ),
        Boolean(
            "via_wrapper",
            description="the program is started by another (sh -c, xargs, find -exec, sudo ...)",
        ),
    ),
    index="programs",
    description="SSH exec requests, shell lines, sftp/scp and forwarding",
)
