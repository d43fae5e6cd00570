"""SFTP (and legacy scp) through the gateway: every operation decided, then replayed on the target.

asyncssh runs the agent's SFTP subsystem, and the ``scp -t``/``scp -f`` exec requests of legacy
scp (``scp -O``), against :class:`ProxySFTPServer`. Each operation becomes a request with channel
``sftp`` (or ``scp``), an ``operation`` and the ``paths`` it touches, and is forwarded to an SFTP
client session on the target only when allowed; a denial is an SFTP "permission denied" status whose
text is the usual ``lictor: denied ...`` message, also written to the channel's stderr (which OpenSSH's
clients show, unlike a status text). OpenSSH 9's ``scp`` speaks SFTP, so rules for
channel ``sftp`` govern it.

Paths. Rules see absolute, normalised paths: a relative path is joined to the target account's home
directory and ``..`` is resolved lexically; the target's ``realpath`` (which follows symlinks) is
then asked for the real location (for a path that does not exist yet, the real location of its
parent). When they differ, both are in ``paths``, so an allow rule must cover both (a symlink in an
allowed directory does not reach outside it) and a deny rule fires on either. The operation is then
run on the real path.

Operations: ``read`` (open for reading; also create, append or truncate without write, which the
target opens read-only), ``write`` (open with write, append, create or truncate flags), ``list``,
``stat`` (stat, lstat, readlink, statvfs), ``setstat`` (with a size also ``write``; also an open that
sets an owner or a setuid, setgid or sticky bit), ``remove``, ``rename`` (both paths),
``mkdir``, ``rmdir``, ``symlink`` and ``link`` (the new link and what it points to).
``realpath`` itself is answered without a decision: SFTP clients canonicalise their working
directory before anything else, and it reveals only a path name. What it and a directory listing
returned is recorded (``sftp.names``; at most ``LISTED_NAMES_MAX`` names of a listing).

Transfers are recorded when the file is closed: path, operation, bytes (read and written), and the
SHA-256 of the data when it was transferred in one direction, in order from offset 0 (what sftp and
scp do). Content whose decision
carries masks is not transferred (reads are denied): masking changes lengths, which file transfer
protocols cannot express; read such files with ``cat`` over exec, where output is masked.

Every method of asyncssh's ``SFTPServer`` that would touch the gateway's own file system is
overridden here; a test checks that no new one appears unnoticed.

asyncssh lets an SFTP session that ends before its handshake (the agent's stdin closed at once), or
whose server could not be made (the target unreachable), raise into its connection, which then closes
the agent's whole connection (every channel multiplexed over it) and never releases the upstream
session. :func:`guard_sftp_sessions` ends such a session alone, with a message and status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import posixpath
import shlex
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import asyncssh
from asyncssh import SFTPAttrs, SFTPName, SFTPServer
from asyncssh import stream as _stream
from asyncssh.sftp import MAX_SFTP_READ_LEN
from lictor import Decision, Request, Session, agent_reason

from ._exec import shown, undecodable
from ._requests import _cut, denial_text, sftp_request
from ._upstream import Lease, UpstreamError

if TYPE_CHECKING:
    from ._server import AgentConnection

__all__ = [
    "OVERRIDDEN",
    "ProxySFTPServer",
    "guard_sftp_sessions",
    "is_scp_server",
    "make_sftp_server",
    "real_path",
    "run_scp_server",
    "transfer_paths",
]

log = logging.getLogger("lictor.ssh")

_WRITE_FLAGS = asyncssh.FXF_WRITE | asyncssh.FXF_APPEND | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC

OVERRIDDEN = frozenset(
    {
        "open",
        "open56",
        "close",
        "read",
        "write",
        "lstat",
        "fstat",
        "setstat",
        "lsetstat",
        "fsetstat",
        "scandir",
        "remove",
        "mkdir",
        "rmdir",
        "realpath",
        "stat",
        "rename",
        "readlink",
        "symlink",
        "link",
        "lock",
        "unlock",
        "posix_rename",
        "statvfs",
        "fstatvfs",
        "fsync",
        "exit",
        "map_path",
        "reverse_map_path",
        "format_user",
        "format_group",
    }
)
"""The ``SFTPServer`` methods this proxy replaces (the rest only format or convert values)."""


LISTED_NAMES_MAX = 1000
"""Names of one directory listing kept in its ``sftp.names`` event (``count`` says how many the agent got,
``truncated`` that there were more): a directory of a million files must not make one event of them all."""


async def _same(real: bytes) -> bytes:
    return real


def _name(name: bytes | str) -> str:
    """A name the target returned, as text for the recording (bytes that are not UTF-8 as ``\\xNN``)."""
    return shown(name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name)


def _setstat_writes(attrs: SFTPAttrs) -> tuple[str, ...]:
    """A setstat with a size truncates or extends the file: it changes what the file holds, a write."""
    return ("write",) if attrs.size is not None else ()


def _special_mode(attrs: SFTPAttrs) -> bool:
    """Attributes of a file being opened that are more than its permission bits: an owner, or the setuid,
    setgid or sticky bit (a setuid program owned by the target's user). Clients send the permission bits
    alone (OpenSSH masks them with 0777), which open decides as the write it is."""
    mode = attrs.permissions
    return attrs.uid is not None or attrs.gid is not None or (mode is not None and mode & 0o7000 != 0)


class _Handle:
    """An open file on the target, and what has flowed through it."""

    __slots__ = ("file", "hash", "next", "operation", "path", "read_bytes", "readable", "sequential", "written_bytes")

    def __init__(self, file: Any, path: str, operation: str, readable: bool) -> None:
        self.file = file
        self.path = path
        self.operation = operation
        self.readable = readable
        self.hash = hashlib.sha256()
        self.next = 0
        self.sequential = True
        self.read_bytes = 0
        self.written_bytes = 0

    def transfer(self, channel: int) -> dict[str, Any]:
        """The ``transfer`` event of this handle: a handle opened for reading and writing may do both, so the
        recording says how much went each way, and a hash of the two interleaved would describe no file."""
        both = bool(self.read_bytes and self.written_bytes)
        sequential = self.sequential and not both
        return {
            "channel": channel,
            "operation": "read+write" if both else self.operation,
            "path": self.path,
            "bytes": self.read_bytes + self.written_bytes,
            "bytes_read": self.read_bytes,
            "bytes_written": self.written_bytes,
            "sha256": self.hash.hexdigest() if sequential else None,
            "sequential": sequential,
        }

    def account(self, offset: int, data: bytes) -> None:
        if offset != self.next:
            self.sequential = False
        elif self.sequential:
            self.hash.update(data)
        self.next = offset + len(data)

    def seek(self, *args: Any) -> int:
        raise asyncssh.SFTPOpUnsupported("sparse ranges are not supported through the gateway")


_SCP_SERVER_FLAGS = frozenset("dfprtv")


def is_scp_server(command: str) -> bool:
    """Whether an exec request is the far end of legacy scp (``scp -O``): ``scp [-dprv] -f|-t PATH``.

    Any other command line starting with ``scp`` (a copy the target itself makes: ``scp f other:``)
    is an ordinary exec request, analysed and run on the target like every other.
    """
    try:
        argv = shlex.split(command)
    except ValueError:
        return False
    if not argv or argv[0] != "scp":
        return False
    server = False
    for arg in argv[1:]:
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        letters = set(arg[1:])
        if not letters <= _SCP_SERVER_FLAGS:
            return False  # an option of the scp client
        server = server or bool(letters & {"f", "t"})
    return server


async def run_scp_server(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Serve legacy scp on ``process``'s channel against :class:`ProxySFTPServer`."""
    from asyncssh.scp import run_scp_server as serve

    command = process.command or ""
    handler = serve(make_sftp_server(process.channel), command, process.stdin, process.stdout, process.stderr)
    if handler is None:
        return
    try:
        await handler
    except (EOFError, ConnectionError, OSError, asyncssh.Error) as exc:  # no session on the target: say why
        message = str(exc) if str(exc).startswith("lictor:") else f"lictor: scp session not started: {exc}"
        with contextlib.suppress(Exception):
            process.stderr.write(f"{message}\n".encode())
            process.exit(1)


def guard_sftp_sessions() -> None:
    """Run asyncssh's SFTP subsystem sessions through :func:`_guarded` (idempotent)."""
    original = _stream.run_sftp_server
    if getattr(original, "lictor_guarded", False):
        return

    def run_sftp_server(server: Any, reader: Any, writer: Any, version: int) -> Any:
        return _guarded(original, server, reader, writer, version)

    run_sftp_server.lictor_guarded = True  # type: ignore[attr-defined]
    _stream.run_sftp_server = run_sftp_server


async def _guarded(original: Any, server: Any, reader: Any, writer: Any, version: int) -> None:
    made: Any = None
    agent = writer.channel.get_connection().get_owner()
    refused = agent.take_channel()
    if refused is not None:
        if inspect.iscoroutine(server):
            server.close()  # never started: no upstream session to end
        with contextlib.suppress(Exception):
            writer.channel.write_stderr(f"{refused}\n".encode())
            writer.channel.exit(1)
        return
    try:
        made = await server if inspect.isawaitable(server) else server
        if isinstance(made, ProxySFTPServer):
            made.replies = writer
        await original(made, reader, writer, version)
    except (EOFError, ConnectionError, OSError, asyncssh.Error) as exc:
        channel = writer.channel
        if made is None:  # no session on the target: say why
            message = str(exc) if str(exc).startswith("lictor:") else f"lictor: sftp session not started: {exc}"
            with contextlib.suppress(Exception):
                channel.write_stderr(f"{message}\n".encode())
        else:
            log.info("sftp session ended before or during its handshake: %s", exc or type(exc).__name__)
        with contextlib.suppress(Exception):
            channel.exit(1)
    finally:
        agent.release_channel()
        if isinstance(made, ProxySFTPServer):
            made.exit()  # idempotent: releases the upstream session


async def make_sftp_server(chan: asyncssh.SSHServerChannel[bytes]) -> ProxySFTPServer:
    """asyncssh's ``sftp_factory``: open the upstream SFTP session once the agent's session is ready."""
    agent: AgentConnection = chan.get_connection().get_owner()  # type: ignore[assignment]
    session = await agent.ready()
    command = chan.get_command() or ""
    channel = "scp" if command.startswith("scp ") else "sftp"
    number = agent.next_channel()
    session.record("command", {"channel": number, "kind": channel, "command": command or "sftp"})
    try:
        lease = await agent.pool.acquire()
    except UpstreamError as exc:
        raise asyncssh.SFTPConnectionLost(f"lictor: {exc}") from None
    try:
        client = await lease.conn.start_sftp_client()
        home = await client.realpath(b".")
    except Exception:
        lease.release()
        raise
    reason = agent_reason(chan.get_environment().get("LICTOR_REASON"))
    return ProxySFTPServer(chan, agent, session, client, lease, bytes(home), channel, number, reason)


async def real_path(client: asyncssh.SFTPClient, lexical: str) -> str:
    """Where ``lexical`` (absolute, normalised) really is on the target, links followed; for a path that does
    not exist yet, the real location of its parent joined with its name."""
    try:
        real = await client.realpath(lexical.encode())
        return bytes(real).decode("utf-8", "surrogateescape")
    except asyncssh.SFTPError:
        parent, name = posixpath.split(lexical)
        if not name or parent == lexical:
            return lexical
        try:
            real_parent = bytes(await client.realpath(parent.encode())).decode("utf-8", "surrogateescape")
        except asyncssh.SFTPError:
            return lexical
        return posixpath.join(real_parent, name)


async def _kernel_path(client: asyncssh.SFTPClient, path: str) -> str:
    """Where the program given ``path`` (absolute, as written) reaches: each ``..`` taken after the links before
    it are followed, as the kernel does (``/srv/l/../x`` with ``l`` a link to ``/etc/ssh`` is ``/etc/x``); for a
    path that does not exist yet, its nearest existing ancestor's real location joined with the rest."""
    path = "/" + path.strip("/")
    try:
        real = await client.realpath(path.encode())
        return posixpath.normpath(bytes(real).decode("utf-8", "surrogateescape"))
    except asyncssh.SFTPError:
        parent, name = posixpath.split(path)
        if parent == path:
            return path
        return posixpath.normpath(posixpath.join(await _kernel_path(client, parent), name))


GIT_SUFFIXES = ("/.git", ".git/.git", ".git")
"""What git's far end also tries when the path it is given is not a repository (``enter_repo``)."""


async def transfer_paths(lease: Lease, written: Sequence[str], *, git: bool = False) -> list[str]:
    """The ``paths`` of a file transfer run over exec (git, rsync) as sftp gives them to rules: each path the
    agent wrote, made absolute against the account's home and normalised, and where it really is when a link
    makes that differ (for ``git``, also where a link leads at the names git tries after it, ``PATH.git`` and
    ``PATH/.git``). Unlike sftp's, the program opens the path as written, not the gateway's reading of it: its
    ``..`` are taken after the links before them (:func:`_kernel_path`), not resolved as text first."""
    from ._requests import home_paths

    client = await lease.conn.start_sftp_client()
    try:
        home = bytes(await client.realpath(b".")).decode("utf-8", "surrogateescape")
        out: list[str] = []
        for path, lexical in zip(written, home_paths(written, home), strict=True):
            path = home + path[1:] if path == "~" or path.startswith("~/") else path
            joined = posixpath.join(home, path)
            real = await _kernel_path(client, joined)
            out += [lexical] if real == lexical else [lexical, real]
            for suffix in GIT_SUFFIXES if git else ():  # `app` opens `app.git`: where a link there leads, too
                real = await _kernel_path(client, "/" + (joined.strip("/") + suffix).lstrip("/"))
                if real != posixpath.normpath("/" + (lexical.strip("/") + suffix).lstrip("/")):
                    out.append(real)
        return list(dict.fromkeys(out))
    finally:
        client.exit()


_FS_LOCKS: dict[str, asyncio.Lock] = {}


def _fs_lock(target: str) -> asyncio.Lock:
    """One lock per target: an operation's final path check and the operation itself run under it, so
    no rename or symlink made through the gateway lands between the two."""
    lock = _FS_LOCKS.get(target)
    if lock is None:
        lock = _FS_LOCKS[target] = asyncio.Lock()
    return lock


class ProxySFTPServer(SFTPServer):
    """An SFTP server whose file system is the target's, seen through the policy."""

    def __init__(
        self,
        chan: asyncssh.SSHServerChannel[bytes],
        agent: AgentConnection,
        session: Session,
        client: asyncssh.SFTPClient,
        lease: Lease,
        home: bytes,
        channel: str,
        number: int,
        reason: str | None,
    ) -> None:
        super().__init__(chan)
        self.agent = agent
        self.session = session
        self.client = client
        self.lease = lease
        self.home = home.decode("utf-8", "surrogateescape")
        self.kind = channel
        self.number = number
        self.reason = reason
        self._closed = False
        self._fs = _fs_lock(agent.config.name)
        self.replies: asyncssh.SSHWriter[bytes] | None = None
        """Where asyncssh writes the SFTP replies (it never waits for the agent to take them)."""
        self.handles: set[_Handle] = set()
        """The open files whose transfer is not recorded yet."""
        agent.sftp_servers.add(self)

    # -- deciding -----------------------------------------------------------------------------

    def _text(self, path: bytes) -> str:
        text = path.decode("utf-8", "surrogateescape")
        offset = undecodable(text)
        if offset is not None:
            self._unreadable(shown(text), f"it is not valid UTF-8 (byte {offset}; such bytes are shown as \\xNN)")
        if "\x00" in text:
            self._unreadable(text.replace("\x00", "\\x00"), "it holds a NUL byte")
        return text

    def _unreadable(self, path: str, why: str) -> NoReturn:
        """Deny (and audit and record, with ``path`` as it may be shown) an operation on a path name the rules
        cannot read. The agent was told only "Permission denied", and nothing of it was audited."""
        request = Request(
            protocol="ssh",
            action="unparsable",
            attrs={"channel": self.kind, "parse_error": f"the path name {_cut(path)} cannot be read: {why}"},
            target=self.agent.config.name,
            summary=f"{self.kind}: unreadable path name ({why}): {_cut(path)}",
            payload=f"{self.kind} unparsable {path}",
            reason=self.reason,
        )
        decision = self.session.decide_now(request)  # denied whatever the policy says (the addon's request hook)
        self._record(
            "sftp",
            {
                "channel": self.number,
                "operation": "unparsable",
                "paths": [path],
                "action": decision.action,
                "rule_ids": list(decision.rule_ids),
            },
        )
        raise self._denied(denial_text(request, decision))

    def _lexical(self, path: bytes) -> str:
        text = self._text(path)
        joined = posixpath.normpath(posixpath.join(self.home, text))
        if joined.startswith("//"):
            joined = "/" + joined.lstrip("/")
        return joined

    async def _real(self, lexical: str) -> str:
        return await real_path(self.client, lexical)

    async def _paths(self, path: bytes) -> tuple[list[str], str]:
        """(paths for the rules, the real path to operate on)."""
        lexical = self._lexical(path)
        real = await self._real(lexical)
        return ([lexical] if real == lexical else [lexical, real]), real

    async def _decide(self, operation: str, paths: Sequence[str], *, content: bool = False) -> None:
        request = sftp_request(operation, paths, target=self.agent.config.name, channel=self.kind, reason=self.reason)
        decision = self.session.decide_now(request)
        if decision.action == "approve":
            decision = await self._held(request)
        self.session.record(
            "sftp",
            {
                "channel": self.number,
                "operation": operation,
                "paths": list(paths),
                "action": decision.action,
                "rule_ids": list(decision.rule_ids),
            },
        )
        if decision.action != "allow":
            raise self._denied(denial_text(request, decision))
        if content and decision.masks:
            message = (
                f"lictor: denied {self.kind} {operation} of {paths[-1]}: its content would be masked "
                f"(rule {', '.join(decision.mask_rule_ids)}) and file transfers cannot be masked; "
                "read it with `cat` over an exec request instead, where output is masked"
            )
            self.session.record("sftp.masked_refused", {"channel": self.number, "paths": list(paths)})
            raise self._denied(message)

    async def _held(self, request: Request) -> Decision:
        """Wait for an approver; an agent that goes away meanwhile withdraws the request, as for exec (an approver
        would otherwise still be asked, and the operation carried out for nobody once approved)."""
        decide = asyncio.ensure_future(self.session.decide(request, self._notify))
        closed = asyncio.ensure_future(self.channel.wait_closed())
        try:
            done, _ = await asyncio.wait({decide, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if decide not in done:
            decide.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await decide
            raise asyncssh.SFTPConnectionLost("lictor: the agent went away while the operation waited for an approver")
        return decide.result()

    async def _notify(self, approval_id: str, message: str) -> None:
        """An operation held for an approver: the agent is told on the channel's stderr, which OpenSSH's sftp and
        scp show (without it, the transfer just stood still, with no approval id to give an approver)."""
        self._record("approval.waiting", {"channel": self.number, "approval_id": approval_id})
        with contextlib.suppress(Exception):
            self.channel.write_stderr(f"lictor: {message}\n".encode("utf-8", "replace"))

    def _record(self, kind: str, data: dict[str, Any]) -> None:
        """Record an event of the ending session: when the agent's connection dropped, asyncssh closes the
        open files and ends the SFTP session after the gateway session may have ended (nothing to record
        into); the upstream files and session must be ended all the same."""
        if not self.session.closed:
            self.session.record(kind, data)

    def _denied(self, message: str) -> asyncssh.SFTPPermissionDenied:
        """The denial as an SFTP status, and as a line on the channel's stderr: OpenSSH's sftp and
        scp show only their own text for a status ("Permission denied", "not found" after a refused
        stat), but copy the channel's stderr to the user's terminal."""
        with contextlib.suppress(Exception):
            self.channel.write_stderr((message + "\n").encode("utf-8", "replace"))
        return asyncssh.SFTPPermissionDenied(message)

    async def _checked(self, path: bytes, decided: list[str]) -> str:
        """``path`` resolved again, right before it is used (with the target's lock held): the real path,
        or a denial when it no longer resolves as when it was decided (a link swapped in meanwhile, by
        this agent or anyone else: the decision, perhaps a human's approval, was about the other)."""
        paths, real = await self._paths(path)
        if paths != decided:
            self.session.record("sftp.changed", {"channel": self.number, "decided": decided, "now": paths})
            raise self._denied(
                f"lictor: denied {self.kind} of {decided[0]}: the path changed while it was being decided "
                f"(it now resolves to {paths[-1]}); nothing was done"
            )
        return real

    async def _one(self, operation: str, path: bytes, act: Any, also: Sequence[str] = ()) -> Any:
        """Decide ``operation`` (and ``also``) on ``path``, then ``act(real path)`` with the path checked again."""
        paths, _ = await self._paths(path)
        for op in (operation, *also):
            await self._decide(op, paths)
        async with self._fs:
            real = await self._checked(path, paths)
            return await act(real.encode("utf-8", "surrogateescape"))

    # -- files --------------------------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> _Handle:
        paths, real = await self._paths(path)
        writes = bool(pflags & _WRITE_FLAGS)
        # The target opens the file read-only unless WRITE is asked for: CREAT, APPEND or TRUNC alone
        # give a readable handle there, so they are decided as a read too.
        reads = bool(pflags & asyncssh.FXF_READ) or not pflags & asyncssh.FXF_WRITE
        if writes:
            await self._decide("write", paths)
        if reads:
            await self._decide("read", paths, content=True)
        if _special_mode(attrs):
            await self._decide("setstat", paths)
        async with self._fs:
            real = await self._checked(path, paths)
            file = await self.client.open(real.encode("utf-8", "surrogateescape"), pflags, attrs, encoding=None)
        handle = _Handle(file, real, "write" if writes else "read", reads)
        self.handles.add(handle)
        return handle

    def open56(self, *args: Any, **kwargs: Any) -> Any:
        raise asyncssh.SFTPOpUnsupported("only SFTP version 3 is supported through the gateway")

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        handle = self._handle(file_obj)
        if not handle.readable:
            raise asyncssh.SFTPPermissionDenied("lictor: the file was not opened for reading")
        # The agent names the length (up to 4 GiB) and may send reads without taking the replies: read at
        # most what the gateway advertises (a shorter reply is valid SFTP), and only once the agent has
        # taken the previous replies, so what the gateway holds stays bounded.
        if self.replies is not None:
            await self.replies.drain()
        data = bytes(await handle.file.read(min(size, MAX_SFTP_READ_LEN), offset))
        handle.read_bytes += len(data)
        handle.account(offset, data)
        return data

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        handle = self._handle(file_obj)
        if handle.operation != "write":
            raise asyncssh.SFTPPermissionDenied("lictor: the file was not opened for writing")
        await handle.file.write(data, offset)
        handle.written_bytes += len(data)
        handle.account(offset, data)
        return len(data)

    async def close(self, file_obj: object) -> None:
        handle = self._handle(file_obj)
        # Recorded before the target's file is closed: while that is awaited, a dropped connection ends the session
        # (record_open_transfers no longer sees this handle), and nothing could be recorded after it.
        if handle in self.handles:
            self.handles.discard(handle)
            # asyncssh closes the files the agent left open when the SFTP channel ends: a close on a closing
            # channel is no request of the agent's (its connection dropped, or it went without closing them).
            self._record_transfer(handle, interrupted=self._chan.is_closing())
        await handle.file.close()

    def record_open_transfers(self) -> None:
        """The agent's connection dropped: record what went through the files still open now, while the session
        can still be recorded into (asyncssh closes them only after the session has ended)."""
        handles, self.handles = self.handles, set()
        for handle in handles:
            self._record_transfer(handle, interrupted=True)

    def _record_names(self, operation: str, path: str, names: list[str], **extra: Any) -> None:
        """What a ``realpath`` or a listing returned to the agent (an ``sftp.names`` event)."""
        self._record(
            "sftp.names",
            {"channel": self.number, "operation": operation, "path": path, "names": names, **extra, "direction": "out"},
        )

    def _record_transfer(self, handle: _Handle, interrupted: bool) -> None:
        transfer = handle.transfer(self.number)
        self._record("transfer", {**transfer, "interrupted": True} if interrupted else transfer)

    async def fstat(self, file_obj: object) -> SFTPAttrs:
        attrs: SFTPAttrs = await self._handle(file_obj).file.stat()
        return attrs

    async def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        handle = self._handle(file_obj)
        for op in ("setstat", *_setstat_writes(attrs)):
            await self._decide(op, [handle.path])
        await handle.file.setstat(attrs)

    async def fsync(self, file_obj: object) -> None:
        await self._handle(file_obj).file.fsync()

    async def fstatvfs(self, file_obj: object) -> Any:
        return await self._handle(file_obj).file.statvfs()

    def lock(self, *args: Any, **kwargs: Any) -> Any:
        raise asyncssh.SFTPOpUnsupported("byte-range locks are not supported through the gateway")

    def unlock(self, *args: Any, **kwargs: Any) -> Any:
        raise asyncssh.SFTPOpUnsupported("byte-range locks are not supported through the gateway")

    @staticmethod
    def _handle(file_obj: object) -> _Handle:
        if not isinstance(file_obj, _Handle):
            raise asyncssh.SFTPInvalidHandle("invalid handle")
        return file_obj

    # -- names --------------------------------------------------------------------------------

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        real = await self._one("list", path, _same)
        names: list[str] = []
        count = 0
        complete = False
        try:
            async for name in self.client.scandir(real):
                count += 1
                if len(names) < LISTED_NAMES_MAX:
                    names.append(_name(name.filename))
                yield name
            complete = True
        finally:  # also when the agent closes the listing before its end: what it got so far
            self._record_names("list", _name(real), names, count=count, truncated=count > len(names), complete=complete)

    async def stat(self, path: bytes) -> SFTPAttrs:
        attrs: SFTPAttrs = await self._one("stat", path, self.client.stat)
        return attrs

    async def _lexical_op(self, operation: str, path: bytes, act: Any, also: Sequence[str] = ()) -> Any:
        """Like :meth:`_one`, for operations on the name itself (not what a link points to)."""
        paths, _ = await self._paths(path)
        for op in (operation, *also):
            await self._decide(op, paths)
        async with self._fs:
            await self._checked(path, paths)
            return await act(paths[0].encode("utf-8", "surrogateescape"))

    async def lstat(self, path: bytes) -> SFTPAttrs:
        attrs: SFTPAttrs = await self._lexical_op("stat", path, self.client.lstat)
        return attrs

    async def readlink(self, path: bytes) -> bytes:
        return bytes(await self._lexical_op("stat", path, self.client.readlink))

    async def statvfs(self, path: bytes) -> Any:
        return await self._one("stat", path, self.client.statvfs)

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._one("setstat", path, lambda real: self.client.setstat(real, attrs), also=_setstat_writes(attrs))

    async def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._lexical_op(
            "setstat",
            path,
            lambda name: self.client.setstat(name, attrs, follow_symlinks=False),
            also=_setstat_writes(attrs),
        )

    async def remove(self, path: bytes) -> None:
        await self._lexical_op("remove", path, self.client.remove)  # removes the link, not its target

    async def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._one("mkdir", path, lambda real: self.client.mkdir(real, attrs))

    async def rmdir(self, path: bytes) -> None:
        await self._one("rmdir", path, self.client.rmdir)

    async def _two(self, operation: str, old: bytes, new: bytes, act: Any) -> None:
        old_paths, _ = await self._paths(old)
        new_paths, _ = await self._paths(new)
        await self._decide(operation, [*old_paths, *new_paths])
        async with self._fs:
            await self._checked(old, old_paths)
            new_real = await self._checked(new, new_paths)
            await act(old_paths[0].encode("utf-8", "surrogateescape"), new_real.encode("utf-8", "surrogateescape"))

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._two("rename", oldpath, newpath, self.client.rename)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._two("rename", oldpath, newpath, self.client.posix_rename)

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        # ``oldpath`` is what the link will point to, stored verbatim; rules see where it resolves
        # from the link's directory, and the link itself. The target resolves it from the directory
        # the link really lands in (``D/esc`` with ``D -> .`` lands one level up), through links.
        link_paths, link_real = await self._paths(newpath)
        target_text = self._text(oldpath)
        pointed = posixpath.normpath(posixpath.join(posixpath.dirname(link_paths[0]), target_text))
        resolved = posixpath.normpath(await self._real(posixpath.join(posixpath.dirname(link_real), target_text)))
        await self._decide("symlink", [*link_paths, pointed, *([resolved] if resolved != pointed else [])])
        async with self._fs:
            link_real = await self._checked(newpath, link_paths)
            await self.client.symlink(oldpath, link_real.encode("utf-8", "surrogateescape"))

    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        await self._two("link", oldpath, newpath, self.client.link)

    def realpath(self, path: bytes) -> Any:
        return self._realpath(path)

    async def _realpath(self, path: bytes) -> bytes:
        lexical = self._lexical(path)
        real = bytes(await self.client.realpath(lexical.encode("utf-8", "surrogateescape")))
        self._record_names("realpath", lexical, [_name(real)])
        return real

    def map_path(self, path: bytes) -> bytes:
        raise asyncssh.SFTPOpUnsupported("local paths are never used by the gateway")

    def reverse_map_path(self, path: bytes) -> bytes:
        raise asyncssh.SFTPOpUnsupported("local paths are never used by the gateway")

    def format_user(self, uid: int | None) -> str:
        return str(uid) if uid is not None else ""

    def format_group(self, gid: int | None) -> str:
        return str(gid) if gid is not None else ""

    def exit(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.agent.sftp_servers.discard(self)
        try:
            self.client.exit()
        finally:
            self.lease.release()
            # asyncssh would close the channel without an exit status, which OpenSSH's scp reports
            # as a failure; the SFTP session itself ended normally.
            with contextlib.suppress(Exception):
                self.channel.exit(0)
        self._record("sftp.end", {"channel": self.number})
