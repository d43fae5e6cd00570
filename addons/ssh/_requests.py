"""Turn what an SSH agent asks for into policy requests, and decisions into messages it can act on.

Shared by the listener and by ``lictor test`` (``request: {protocol: ssh, command: "..."}``).

A command line (an exec request or one line typed into a shell) becomes one request per program it
would run (see ``lictor.shell``); they are decided together and deny wins. A command line that cannot be
analysed becomes a single request carrying ``parse_error``: the addon's ``request`` hook denies it
before the policy sees it, under the rule id ``lictor:ssh-unparsable``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lictor import Decision, Request, combine
from lictor.shell import MAX_COMMAND_BYTES, Invocation, Redirect, ShellParseError, ShellState, analyse

from ._exec import shown, undecodable

__all__ = [
    "NOT_WRAPPED",
    "TRANSFER_CHANNELS",
    "UNPARSABLE_RULE",
    "UNSUPPORTED_RULE",
    "Transfer",
    "channel_request",
    "denial_text",
    "first_denied",
    "forward_request",
    "home_paths",
    "invocation_attrs",
    "requests_for_command",
    "sftp_request",
    "socket_forward_request",
    "transfer_of",
    "transfer_request",
]

UNPARSABLE_RULE = "lictor:ssh-unparsable"
UNSUPPORTED_RULE = "lictor:ssh-unsupported"
"""The rule id of what the policy allows but the gateway does not do (remote port forwarding)."""
TRANSFER_CHANNELS = ("git", "rsync")
"""Channels of the file transfer programs an exec request may start (see :func:`transfer_of`)."""

NOT_WRAPPED = frozenset({"pipeline", "subshell"})
"""``via`` values that do not count as "started by another program" for ``via_wrapper``: a program in
a pipeline or a ``( ... )`` subshell is started by the agent's own shell, like a top-level one.
Command and process substitutions, ``sh -c``, ``eval``, ``xargs``, ``find -exec``, ``sudo``, ``env``...
do count."""

HARMLESS_WRITES = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty"})
"""Redirection targets left out of ``writes``: they change no file (the terminal or the channel)."""

_RUN_TIME_NAME = re.compile(r"[$`]")


def _connects(redirect: Redirect) -> bool:
    """Whether a redirection that reads may open a network connection: bash takes ``/dev/tcp/HOST/PORT`` and
    ``/dev/udp/HOST/PORT`` for one whichever way it redirects, and a name only known at run time may be one
    (``"$HOME/x"`` is the home)."""
    if redirect.writes or redirect.body is not None or not redirect.op.endswith("<"):
        return False
    target = redirect.target
    return target.startswith(("/dev/tcp/", "/dev/udp/")) or bool(_RUN_TIME_NAME.search(target.removeprefix("$HOME/")))


_SLASHES = re.compile(r"/{2,}")
_PROC_LINKS = ("root", "cwd")
"""``/proc/PID/root`` is the root directory; ``/proc/PID/cwd`` is a process's working directory, which for
init (``/proc/1/cwd``) and most daemons is the root too: both read as ``/``, so that a deny on ``/*`` sees
them (an allow on paths then does not cover them, which fails closed)."""


def lexical_path(arg: str) -> str:
    """``arg`` with its path spelled plainly: repeated slashes, ``.`` and ``..`` resolved as text
    (``//dev/./sda`` -> ``/dev/sda``, ``/etc/../*`` -> ``/*``), and ``/proc/PID/root`` (``self``,
    ``thread-self``, a task's), the kernel's link to the root directory, read as ``/``
    (``/proc/self/root/dev/sda`` -> ``/dev/sda``), as is ``/proc/PID/cwd``; for ``of=PATH`` /
    ``--opt=PATH``, the part after ``=``. Text without a slash is returned as it is."""
    if "/" not in arg:
        return arg
    if "=" in arg and not arg.startswith(("/", ".")):
        key, _, value = arg.partition("=")
        return f"{key}={lexical_path(value)}" if "/" in value else arg
    if not arg.startswith("/"):
        return posixpath.normpath(_SLASHES.sub("/", arg))
    parts: list[str] = []
    for part in arg.split("/"):
        if part == "..":
            del parts[-1:]
        elif part not in ("", "."):
            parts.append(part)
            if (
                part in _PROC_LINKS
                and parts[0] == "proc"
                and (len(parts) == 3 or (len(parts) == 5 and parts[2] == "task"))
            ):
                parts = []  # /proc/PID/root/.. is / too: the link is followed before '..'
    return "/" + "/".join(parts)


def _with_plain(text: str, plain: str) -> str | list[str]:
    """One value, or both spellings when they differ: deny rules match either, allow rules need both."""
    return text if plain == text else [text, plain]


def invocation_attrs(inv: Invocation, channel: str) -> dict[str, object]:
    """The rule attributes of one program a command line would run. Arguments, commands and written
    files are also given with their paths spelled plainly (:func:`lexical_path`), so that a rule on
    ``/dev/sd*`` or ``/`` is not walked past by ``//dev/./sda`` or ``/.//``."""
    writes = [r.target for r in inv.redirects if (r.writes and r.target not in HARMLESS_WRITES) or _connects(r)]
    writes += [p for p in (lexical_path(w) for w in writes) if p not in writes]
    plain_argv = " ".join(lexical_path(a) for a in inv.args)
    return {
        "channel": channel,
        "program": inv.name,
        "program_path": _with_plain(inv.program, lexical_path(inv.program)),
        "command": _with_plain(f"{inv.name} {inv.argv_text}".strip(), f"{inv.name} {plain_argv}".strip()),
        "argv": _with_plain(inv.argv_text, plain_argv),
        "writes": writes,
        "via_wrapper": inv.via is not None and inv.via not in NOT_WRAPPED,
        "via": inv.via,
        "paths": [],
    }


_TERMINAL_SPECIAL = re.compile("[\x03\x04\x1a\x1c]")


def requests_for_command(
    command: str,
    *,
    target: str,
    channel: str = "exec",
    interactive: bool = False,
    line: bool = False,
    max_bytes: int | None = None,
    reason: str | None = None,
    state: ShellState | None = None,
) -> list[Request]:
    """One request per program ``command`` would run; one ``parse_error`` request if it cannot be
    analysed; one ``empty`` request (no program) for a blank line.

    ``line``: ``command`` is one line of a line-inspected shell, sent with a newline (see
    :func:`analyse`). ``max_bytes``: longest line the target will read whole (a terminal in
    canonical mode silently cuts longer lines, which would run something else than was decided; it
    would also take ^D in the line as an end of input, so that is refused, and ^C, ^Z and ^\\ with it,
    which must never be signals to the shell there).
    ``state``: the :class:`~lictor.shell.ShellState` of the shell this line is sent to."""
    try:
        offset = undecodable(command)
        if offset is not None:  # bytes the analysis cannot read: shown escaped, never as they came
            command = shown(command)
            raise ShellParseError(f"the command is not valid UTF-8 (byte {offset}; such bytes are shown as \\xNN)")
        if max_bytes is not None and len(command.encode("utf-8", "surrogatepass")) > max_bytes:
            raise ShellParseError(f"{_LONG_LINE} {max_bytes} bytes, which the target's terminal would cut short")
        if max_bytes is not None and _TERMINAL_SPECIAL.search(command):
            raise ShellParseError(
                "the line holds ^C, ^D, ^Z or ^\\, which the target's terminal would take as a signal or an end "
                "of input inside the line"
            )
        analysis = analyse(command, interactive=interactive, line=line, state=state)
        transfer = transfer_of(analysis.invocations) if channel == "exec" else None
    except ShellParseError as exc:
        return [
            Request(
                protocol="ssh",
                action="unparsable",
                attrs={"channel": channel, "parse_error": str(exc)},
                target=target,
                summary=f"{channel}: unparsable command ({exc}): {command[:300]}",
                payload=command,
                reason=reason,
            )
        ]
    if transfer is not None:
        paths = [home_paths([p], "/")[0] if p.startswith("/") else p for p in transfer.paths]
        return [transfer_request(transfer, paths, command, target=target, reason=reason)]
    invocations = analysis.invocations
    if not invocations:
        return [
            Request(
                protocol="ssh",
                action="empty",
                attrs={"channel": channel, "writes": [], "paths": []},
                target=target,
                summary=f"{channel}: (no program) {command[:300]}",
                payload=command,
                reason=reason,
            )
        ]
    out: list[Request] = []
    for i, inv in enumerate(invocations):
        attrs = invocation_attrs(inv, channel)
        written = _as_written(attrs["command"])
        whole = _cut(command)
        out.append(
            Request(
                protocol="ssh",
                action=inv.name,
                attrs=attrs,
                target=target,
                summary=f"{written}" + ("" if len(invocations) == 1 else f" (part of: {whole})"),
                payload=f"{command}\n[{i}] {written}",
                reason=reason,
            )
        )
    return out


def channel_request(channel: str, *, target: str, summary: str = "", reason: str | None = None) -> Request:
    """A request for a kind of channel: ``shell``, ``raw_shell``, ``agent_forwarding``, ``x11``..."""
    return Request(
        protocol="ssh",
        action=channel,
        attrs={"channel": channel},
        target=target,
        summary=summary or channel.replace("_", " "),
        payload=channel,
        reason=reason,
    )


def forward_request(direction: str, host: str, port: int, *, target: str) -> Request:
    """A port forwarding request (``direction`` is ``local`` for ``-L``/``-D``, ``remote`` for ``-R``)."""
    destination = f"{host}:{port}"
    return Request(
        protocol="ssh",
        action="port_forward",
        attrs={"channel": "port_forward", "destination": destination, "direction": direction},
        target=target,
        summary=f"port forwarding ({direction}) to {destination}",
        payload=f"port_forward {direction} {destination}",
    )


def socket_forward_request(direction: str, path: str, *, target: str) -> Request:
    """A Unix socket forwarding request (``ssh -L LOCAL:/path`` is ``local``, ``ssh -R /path:...`` is ``remote``):
    ``destination`` is the socket's path on the target."""
    return Request(
        protocol="ssh",
        action="port_forward",
        attrs={"channel": "port_forward", "destination": path, "direction": direction, "socket": True},
        target=target,
        summary=f"socket forwarding ({direction}) to {path}",
        payload=f"port_forward {direction} unix {path}",
    )


def sftp_request(
    operation: str, paths: Sequence[str], *, target: str, channel: str = "sftp", reason: str | None = None
) -> Request:
    """One SFTP (or legacy scp) operation on ``paths`` (already absolute and normalised)."""
    shown = " -> ".join(paths)
    return Request(
        protocol="ssh",
        action=operation,
        attrs={"channel": channel, "operation": operation, "paths": list(paths)},
        target=target,
        summary=f"{channel} {operation} {shown}",
        payload=f"{channel} {operation} " + "\x00".join(paths),
        reason=reason,
    )


# -- file transfer programs run over exec ------------------------------------------------------

GIT_TRANSFERS = {"upload-pack": "read", "upload-archive": "read", "receive-pack": "write"}
"""The far ends of ``git clone``/``fetch``/``archive --remote`` and ``git push`` over ssh, and what they do
to the repository named."""

SFTP_SERVERS = frozenset({"sftp-server", "gesftpserver"})
"""SFTP servers (OpenSSH's, Green End's): run over exec, they would serve file operations no rule decides."""

_RSYNC_LETTERS = frozenset("vqbunlWHdrRxSOJUNmpEAXogDtczIyiC")
"""Letters of the option bundle an rsync client sends its server (``-logDtpre.iLsfxCIvu``) that change
neither which files are touched nor where: the rest of the bundle after ``e`` is the client's capabilities."""
_RSYNC_LINK_LETTERS = {"L": "--copy-links", "k": "--copy-dirlinks", "K": "--keep-dirlinks"}
_RSYNC_FLAGS = frozenset(
    {
        "--server", "--sender", "--force", "--ignore-errors", "--delay-updates", "--numeric-ids", "--inplace",
        "--append", "--append-verify", "--size-only", "--no-implied-dirs", "--safe-links", "--munge-links",
        "--fake-super", "--mkpath", "--ignore-missing-args", "--existing", "--ignore-existing",
        "--ignore-non-existing", "--fsync", "--open-noatime", "--preallocate", "--super", "--no-super", "--qsort",
        "--old-args", "--delete", "--delete-before", "--delete-during", "--delete-delay", "--delete-after",
        "--delete-excluded", "--delete-missing-args", "--remove-source-files", "--partial", "--stats",
    }
)  # fmt: skip
"""Long options an rsync client sends its server that take no value and touch no other file."""
_RSYNC_VALUES = frozenset(
    {
        "--bwlimit", "--max-delete", "--min-size", "--max-size", "--timeout", "--suffix", "--usermap", "--groupmap",
        "--chmod", "--checksum-choice", "--compress-choice", "--compress-level", "--info", "--debug", "--max-alloc",
        "--modify-window", "--stop-at", "--stop-after", "--checksum-seed", "--iconv", "--block-size", "--log-format",
        "--out-format",
    }
)  # fmt: skip
"""Long options with a value (``--name=value``) that names no file."""
_RSYNC_DIRS = frozenset({"--backup-dir", "--partial-dir", "--temp-dir", "--link-dest", "--copy-dest", "--compare-dest"})
"""Long options naming a directory the server reads or writes (``--name DIR`` or ``--name=DIR``); a relative one is
inside the destination."""
_UNKNOWN_AT_RUN_TIME = re.compile(r"[$`*?\[{]")


@dataclass(frozen=True)
class Transfer:
    """A file transfer program run as the whole command line: ``git-upload-pack 'repo'`` or ``rsync --server``."""

    channel: str
    """``git`` or ``rsync``."""
    operations: tuple[str, ...]
    """``read`` (the agent gets files), ``write`` (it sends them), and ``remove`` for rsync's deletes."""
    paths: tuple[str, ...]
    """As written: absolute, relative to the account's home, or ``~/...``."""


def transfer_of(invocations: Sequence[Invocation]) -> Transfer | None:
    """The file transfer an exec request starts, or None for an ordinary command line.

    Such a program speaks a binary protocol to the agent, whose output cannot be masked or inspected: it is
    decided as the file transfer it is (channel ``git`` or ``rsync``, ``operation``, ``paths``), like sftp and
    scp. Raises :class:`ShellParseError` when it is not the whole command line, or names what it touches in a
    way the gateway cannot see (a wildcard or an expansion, rsync's ``-s``, ``--files-from``, ``--log-file``,
    an option it does not know)."""
    for inv in invocations:
        if inv.name in SFTP_SERVERS:
            # `sftp -s /usr/lib/openssh/sftp-server` runs it as a command: the agent then reads and writes any file
            # through it, operation by operation, where the gateway sees only the bytes of a protocol
            raise ShellParseError(
                f"{inv.name} speaks SFTP to the agent, and its file operations are decided only through the sftp "
                "subsystem; use sftp or scp without -s or -S"
            )
    found = [inv for inv in invocations if _transfer_program(inv) is not None]
    if not found:
        return None
    inv = found[0]
    program = _transfer_program(inv)
    if inv.name == "rsync" and "--daemon" in inv.args:
        raise ShellParseError(
            "rsync --server --daemon serves the modules of a configuration file, whose paths the gateway cannot "
            "see; copy with `rsync -e ssh HOST:PATH` instead"
        )
    if len(invocations) > 1 or inv.via is not None or inv.redirects or inv.assignments:
        raise ShellParseError(
            f"{program} speaks a file transfer protocol to the agent, and is only run as the whole command line "
            "(as git and rsync send it)"
        )
    if inv.program != inv.name:  # a transfer rule allows the transfer, not whatever program bears its name
        raise ShellParseError(
            f"{program} is run by its name (found through the target's PATH), not as {_cut(inv.program, 100)!r}"
        )
    if inv.name == "rsync":
        return _rsync_transfer(inv.args)
    args = list(inv.args[1:] if inv.name == "git" else inv.args)
    sub = inv.args[0] if inv.name == "git" else inv.name.removeprefix("git-")
    options = [a for a in args if a.startswith("-")]
    paths = [a for a in args if not a.startswith("-")]
    if len(paths) != 1 or any(o not in ("--strict", "--stateless-rpc", "--advertise-refs") for o in options):
        raise ShellParseError(f"{program} takes the repository's path and no other argument through the gateway")
    return Transfer("git", (GIT_TRANSFERS[sub],), _tilde_readings([_transfer_path(program, paths[0])]))


def _transfer_program(inv: Invocation) -> str | None:
    if inv.name in ("git-upload-pack", "git-upload-archive", "git-receive-pack"):
        return inv.name
    if inv.name == "git" and inv.args and inv.args[0] in GIT_TRANSFERS:
        return f"git {inv.args[0]}"
    if inv.name == "rsync" and "--server" in inv.args:
        return "rsync --server"
    return None


def _transfer_path(program: str, path: str) -> str:
    if _UNKNOWN_AT_RUN_TIME.search(path) or (path.startswith("~") and not re.match(r"~(/|$)", path)):
        raise ShellParseError(
            f"{program} would be given {_cut(path, 100)!r}, whose files are only known at run time; name them "
            "plainly (no wildcards, variables or ~user)"
        )
    return path


def _rsync_transfer(args: Sequence[str]) -> Transfer:
    program = "rsync --server"
    refused = "makes rsync touch files other than the ones named, or hides them from the gateway"
    sender, removes = False, False
    dirs: list[str] = []
    rest = list(args)
    while rest and rest[0] != ".":
        arg = rest.pop(0)
        name, has_value, value = arg.partition("=")
        if arg == "--sender":
            sender = True
        elif arg in _RSYNC_FLAGS:
            removes = removes or arg.startswith(("--delete", "--remove"))
        elif name in _RSYNC_VALUES and has_value and "/" not in value:
            pass
        elif name in _RSYNC_DIRS:
            if not has_value:
                if not rest or rest[0] == ".":
                    raise ShellParseError(f"{program}: {arg} without its directory")
                value = rest.pop(0)
            dirs.append(_transfer_path(program, value))
        elif re.fullmatch(r"-B[0-9]+", arg):  # --block-size, as the client sends it
            pass
        elif re.fullmatch(r"-[A-Za-z][.A-Za-z]*", arg):
            letters, has_e, info = arg[1:].partition("e")
            if has_e and not info:  # -e takes a value: without one attached, rsync takes the next word (the `.`)
                raise ShellParseError(
                    f"{program}: {arg} would take the next word as its value, and the word after it as the "
                    "directory the files are named from; give -e its value in the same word (-e.LsfxC)"
                )
            for letter in letters:
                if letter in _RSYNC_LINK_LETTERS:
                    raise ShellParseError(
                        f"{program}: {_RSYNC_LINK_LETTERS[letter]} (-{letter}) follows links out of the files "
                        "named; copy without it"
                    )
                if letter == "s":
                    raise ShellParseError(
                        f"{program}: -s (--secluded-args) sends the file names inside the transfer, where the "
                        "gateway cannot see them; copy without it"
                    )
                if letter not in _RSYNC_LETTERS:
                    raise ShellParseError(f"{program}: the option -{letter} {refused}, or is unknown to the gateway")
        else:
            raise ShellParseError(f"{program}: the option {_cut(arg, 100)} {refused}, or is unknown to the gateway")
    if not rest:
        raise ShellParseError(f"{program} without the `.` that comes before the files it is given")
    late = [p for p in rest[1:] if p.startswith("-")]
    if late:  # rsync reads options wherever they are, also after the files (`. /srv/app --log-file=/etc/x`)
        raise ShellParseError(
            f"{program}: {_cut(late[0], 100)} after the `.` is an option rsync would read, not a file; options go "
            "before the `.`, and a file whose name starts with - is named ./-name"
        )
    paths = [_transfer_path(program, p) for p in rest[1:]]
    if not paths:
        raise ShellParseError(f"{program} names no file")
    if dirs:  # relative: inside the destination directory, the receiver's first path or, if that is a file, its parent
        dest = paths[0]
        bases = [dest] if dest.endswith("/") else [dest, posixpath.dirname(dest) or "."]
        for d in dirs:  # a ~ the shell does not expand (quoted, or after `=`) is a directory named ~ in there
            paths += [d] if d.startswith("/") else [posixpath.join(base, d) for base in bases]
            paths += [d] if d == "~" or d.startswith("~/") else []
    operations = ("read",) if sender else ("write",)
    return Transfer("rsync", operations + (("remove",) if removes else ()), _tilde_readings(paths))


def _tilde_readings(paths: Sequence[str]) -> tuple[str, ...]:
    """``paths``, and for one starting with ``~`` also the file of that name in the home directory: the analysis
    reads ``'~/x'`` and ``~/x`` alike, but quoted the ``~`` is not expanded, and rsync (git with ``--strict``)
    opens ``./~/x``, which a link named ``~`` may take anywhere."""
    out: list[str] = []
    for path in paths:
        out += [path, f"./{path}"] if path == "~" or path.startswith("~/") else [path]
    return tuple(dict.fromkeys(out))


def transfer_request(
    transfer: Transfer, paths: Sequence[str], command: str, *, target: str, reason: str | None = None
) -> Request:
    """The request of a file transfer run over exec, with its ``paths`` absolute and normalised."""
    operation: str | list[str] = transfer.operations[0] if len(transfer.operations) == 1 else list(transfer.operations)
    what = "+".join(transfer.operations)
    shown_paths = ", ".join(paths)
    return Request(
        protocol="ssh",
        action=transfer.channel,
        attrs={"channel": transfer.channel, "operation": operation, "paths": list(paths)},
        target=target,
        summary=f"{transfer.channel} {what} {_cut(shown_paths)}",
        payload=f"{command}\n{transfer.channel} {what} " + "\x00".join(paths),
        reason=reason,
    )


def home_paths(paths: Sequence[str], home: str) -> list[str]:
    """``paths`` as written by an agent, made absolute against the account's ``home`` and normalised."""
    out = []
    for path in paths:
        path = home + path[1:] if path == "~" or path.startswith("~/") else path
        joined = posixpath.normpath(posixpath.join(home, path))
        out.append("/" + joined.lstrip("/"))
    return out


def first_denied(requests: Sequence[Request], decisions: Sequence[Decision]) -> tuple[Request, Decision]:
    """The request that decided a combined decision (the first deny by a rule, else the first deny,
    else the first approve), as :func:`lictor.combine` chooses it."""
    combined = combine(decisions)
    for request, decision in zip(requests, decisions, strict=True):
        if decision.action == combined.action and decision.rule_ids == combined.rule_ids:
            return request, decision
    return requests[0], decisions[0]


_UNFINISHED_LINE = ("incomplete command:", "the line ends with a line continuation")
"""How the analysis says a shell line stops in the middle of a command (which the next line would go on)."""
_LONG_LINE = "the line is longer than"
"""How the analysis refuses a shell line longer than the target's terminal reads whole."""
_SHELL_ON_INPUT = re.compile(r"(?:ba|da|k|mk|z|a)?sh would read its program from the session's input")
"""How the analysis refuses a shell run on the session's input (`ssh HOST bash -s < script.sh`)."""


def _cut(text: str, limit: int = 300) -> str:
    """The first ``limit`` characters of the agent's ``text``, and ``...`` when there are more."""
    return text if len(text) <= limit else text[:limit] + "..."


def _what(request: Request) -> str:
    attrs = request.attrs
    if "parse_error" in attrs:
        if attrs.get("channel") in ("sftp", "scp"):
            return f"this {attrs['channel']} operation"
        return "this subsystem" if attrs.get("channel") == "subsystem" else "this command line"
    if attrs.get("command"):
        return f"`{_as_written(attrs['command'])}`"
    if attrs.get("destination"):
        kind = "socket" if attrs.get("socket") else "port"
        # the agent's text: shown cut, the message must fit a packet
        return f"{kind} forwarding ({attrs.get('direction', 'local')}) to {_cut(str(attrs['destination']))}"
    if attrs.get("operation"):
        operation = attrs["operation"]
        operation = "+".join(map(str, operation)) if isinstance(operation, list) else operation
        return f"{attrs.get('channel', 'sftp')} {operation} of {', '.join(map(str, attrs.get('paths') or []))}"
    return str(attrs.get("channel", request.action)).replace("_", " ")


def _next_step(request: Request, decision: Decision) -> str:
    rule = decision.rule_ids[0] if decision.rule_ids else ""
    error = str(request.attrs.get("parse_error", ""))
    if request.attrs.get("channel") == "shell_line" and error.startswith(_UNFINISHED_LINE):
        return (
            "Each line is decided and run alone, so a command cannot go on over several lines; write all of "
            "it on one line (the text of a here-document as `<<< 'text'` or from printf, `if ...; then ...; fi`)."
        )
    if request.attrs.get("channel") == "shell_line" and error.startswith(_LONG_LINE):
        return (
            f"Run a longer command as an exec request (`ssh HOST 'COMMAND'`), which takes up to "
            f"{MAX_COMMAND_BYTES} bytes."
        )
    if request.attrs.get("channel") == "exec" and _SHELL_ON_INPUT.match(error):
        return (
            "To run a shell script, send it as the input of a session without a command (`ssh -T HOST < "
            "script.sh`), if your roles have a shell there: each of its lines is decided as a typed line would be."
        )
    if request.attrs.get("channel") in ("sftp", "scp") and error:
        return "The gateway decides file operations on UTF-8 path names only; give the file such a name."
    if "parse_error" in request.attrs or rule == UNPARSABLE_RULE:
        return (
            "The gateway only forwards command lines it can fully analyse; rewrite it as plain "
            "programs with literal arguments (no expansions in program names, no code built at run time)."
        )
    if rule == "lictor:default-deny":
        return ""  # the policy's default-deny message already says what to do
    if decision.approval_id or (decision.approval is not None):
        return "The approval was not granted; ask an approver, or run something else."
    if rule == UNSUPPORTED_RULE:
        return (
            "The gateway opens no listening port on the target; forward from your side instead (ssh -L or -D), "
            "if a rule allows it."
        )
    if rule == "lictor:token-expired":
        return "Retrying on this connection cannot help; connect again with a fresh token."
    if rule.startswith("lictor:"):
        return "Retry later or contact the gateway operators."
    return "This is a deliberate restriction; do it another way or ask the rule pack owners."


def denial_text(request: Request, decision: Decision) -> str:
    """``lictor: denied <what> by rule <id>: <message> (policy <version>). <next step>``"""
    rule = ", ".join(decision.rule_ids) or "lictor:default-deny"
    message = decision.message.rstrip(".") or "denied"
    error = request.attrs.get("parse_error")
    if error is not None and request.attrs.get("channel") in ("sftp", "scp"):  # the error names the path
        rule, message = UNPARSABLE_RULE, str(error).rstrip(".")
    elif error is not None:  # denied whatever the policy says; name the real reason
        what = "subsystem request" if request.attrs.get("channel") == "subsystem" else "command line"
        rule, message = UNPARSABLE_RULE, f"the {what} cannot be analysed: {error}".rstrip(".")
    text = f"lictor: denied {_what(request)} by rule {rule}: {message} (policy {decision.policy_version})."
    step = _next_step(request, decision)
    return f"{text} {step}" if step else text


def describe(requests: Iterable[Request]) -> list[str]:
    return [str(_as_written(r.attrs.get("command")) or r.action) for r in requests]


def _as_written(value: object) -> object:
    """The spelling the agent wrote, of an attribute that may also carry its plain spelling."""
    return value[0] if isinstance(value, list) and value else value
