"""One agent session channel: an exec request or a shell, decided and relayed to the target.

Theory of operation
===================

asyncssh hands each session channel to :func:`handle_process` as an ``SSHServerProcess`` created
with ``encoding=None`` (bytes in both directions: a channel's encoding is fixed when it is created,
and a text channel would mangle binary output). SFTP never comes here, and the ``scp -t/-f`` exec
requests of legacy scp are handed to asyncssh's scp server, against :mod:`._sftp`.

Exec. The command line is analysed (``lictor.shell``) into the programs it would run; each is a request
and all are decided together (deny wins). A denial writes ``lictor: denied ...`` to stderr and exits
with status 126; an ``approve`` decision holds the channel (the approval id goes to stderr) until a
human decides. When allowed, the exact same command line is run on the target through a pooled
upstream connection, and the two processes are joined: stdin, stdout and stderr as bytes, window
size changes, signals and breaks, and the exit status or exit signal at the end. Output goes
through the decision's masking plan (a streaming masker with bounded hold-back; nothing is copied
when nothing is masked) and is recorded as the agent saw it.

Shells. A shell request needs channel ``shell``. If the identity also holds ``raw_shell``, the
target's login shell is joined raw (full-screen programs work; input and output are recorded).
Otherwise the shell runs in line mode: the gateway is the line editor (:mod:`._lineedit`), and a
line reaches the target only after it has been analysed and allowed (channel ``shell_line``). The
target runs ``line_shell`` (bash) with the terminal's echo off, no rc files and no readline, so what
it reads is exactly what was decided. A denied line is never sent; the denial is printed and the
prompt shown again. Without a terminal (a script piped into ``ssh``), lines are decided the same way
but the first denied line ends the session with 126: a script must not go on after a step of it
was refused.

What bash reads as a command must be a decided line, whole. A program bash runs shares its input, and
one that reads part of a line (``head -c 5``) would leave the rest for bash. So an allowed line waits
in the gateway until bash is about to read a command: before each prompt bash discards what is left
on its terminal (:data:`READY_DRAIN`), then prints a prompt that ends with a mark (:data:`READY_MARK`);
the gateway takes the mark out of the output and sends one line. bash always reads from a terminal
on the target, also for scripts (there without a prompt, and with each line followed by ^D so that a
program reading its input gets the end of it): a terminal in canonical mode hands out one line per
read, where a pipe would give a reader the next bytes of later lines.

Nor may bash be interrupted while it reads a line: it drops what it has taken in and runs the rest of what
it has read as a command. So no character is a signal on its terminal, ^C at the prompt is the gateway's
own business, and while a line runs a signal goes, through a command of the gateway's in a channel of its
own, to the program in the terminal's foreground, never to bash (:meth:`ChannelHandler._interrupt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import shlex
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import asyncssh
from lictor import AuditError, Decision, Request, Session, agent_reason, combine
from lictor.shell import ShellState, analyse

from ._exec import shown, undecodable
from ._lineedit import Echo, Eof, Line, LineEditor, Signal
from ._record import StreamRecord
from ._refused import refused_forwarding
from ._requests import (
    TRANSFER_CHANNELS,
    Transfer,
    channel_request,
    denial_text,
    first_denied,
    requests_for_command,
    transfer_of,
    transfer_request,
)
from ._sftp import is_scp_server, run_scp_server, transfer_paths
from ._upstream import Lease, UpstreamError

if TYPE_CHECKING:
    from ._server import AgentConnection

__all__ = ["decide_all", "handle_process"]

log = logging.getLogger("lictor.ssh")

CHUNK = 256 * 1024
FLUSH_IDLE = 0.05
"""Seconds of upstream silence after which a masker's held-back tail is released (interactive)."""
ANSWER_IDLE = 0.5
"""Seconds of more silence, without a terminal and with the agent's input open, after which the line being
written is released too: the target may be waiting for the agent's answer to it."""
DENIED_STATUS = 126
UNREACHABLE_STATUS = 255
PTY_ECHO = 53  # RFC 4254 terminal mode opcode
_DISABLED = 255  # RFC 4254: "255 if none"
LINE_MODE_TERM_MODES: dict[int, int] = {
    # Special characters (opcodes 1-18): the end-of-file the gateway itself sends...
    5: 0x04,  # VEOF ^D
    # ...and nothing else: erase, kill, word-erase, literal-next, reprint and the extra end-of-line
    # characters would let the target's terminal edit or split a line after the gateway checked it, and
    # no character is a signal there (^C would interrupt bash as it reads a line: see _interrupt).
    **{op: _DISABLED for op in (1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)},
    # Input: no case folding, bit stripping or CR/NL games that would change the checked text.
    30: 0, 31: 0, 32: 0, 33: 0, 34: 0, 35: 0, 36: 1, 37: 0, 38: 0, 39: 0, 40: 0, 41: 0, 42: 1,
    # Local: canonical input with signals, no echo (the gateway echoes), no extended editing.
    50: 1, 51: 1, 52: 0, 53: 0, 54: 0, 55: 0, 56: 0, 57: 0, 58: 0, 59: 0, 60: 0, 61: 0, 62: 0,
    # Output and character size: the usual.
    70: 1, 71: 0, 72: 1, 73: 0, 74: 0, 75: 0, 91: 1, 92: 0,
}  # fmt: skip
"""The terminal modes of a line-mode shell on the target. Never the agent's own: with ``stty kill @`` or
``stty iuclc`` passed through, the target's line discipline would turn the checked ``echo @rm -rf /``
into ``rm -rf /``, or ``RM`` into ``rm``."""
SCRIPT_TERM_MODES: dict[int, int] = {**LINE_MODE_TERM_MODES, 36: 0, 70: 0}
"""The target's terminal under a script (an agent without a terminal): no CR-to-NL on input (a script line
``echo a\rrm x`` stays one line) and no output processing (the agent gets the bytes the programs wrote)."""
READY_DRAIN = "while read -t 0; do read -r; done"
"""Run by the target's bash before each prompt (``PROMPT_COMMAND``): whatever is still waiting on its
terminal (the rest of a line that a program read only part of) is discarded, never read as a command."""
OUTBOX_MAX = 64 * 1024
"""Bytes of decided lines held for the target's shell while a command runs (then input waits)."""
PROMPT_KEEP = 512
TTY_LINE_MAX = 4000
"""Longest line (UTF-8 bytes, without its newline) sent to a line-mode shell on a terminal. The
target's terminal is in canonical mode, whose line buffer holds 4095 bytes: Linux silently drops what
goes past it, so a longer line would reach the shell cut short (an allowed ``echo '...'`` losing its
closing quote would join the next line into a different command)."""
LINE_SHELL_ENV = {
    "PAGER": "cat",
    "MANPAGER": "cat",
    "GIT_PAGER": "cat",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
    "LESSSECURE": "1",
}
"""Environment of line-mode shells: no pager that would read keystrokes (a pager's ``!command`` would run
something no rule saw). The prompt variables are added per shell (see :meth:`ChannelHandler._shell`)."""
HELLO = "\x1b]7374;{};"
"""What the gateway's command prints on the target before it starts a line shell: this, the shell's process id
and BEL. The gateway reads it before the shell's first prompt, when nothing the agent typed has run yet."""
FOREGROUND_SIGNALS = frozenset({"INT", "QUIT", "TSTP", "TERM", "HUP", "KILL"})
"""Signals a line shell's agent may send to the program it runs (^C, ^\\, ^Z, or an SSH signal request)."""
KEY_SIGNALS = {b"\x03": "INT", b"\x1c": "QUIT", b"\x1a": "TSTP"}
SIGNALS_QUEUED = 8
SIGNAL_NAME_MAX = 64
"""Longest signal name relayed to the target (SSH's are ``INT``, ``TERM``..., extensions ``NAME@domain``). A
request with a longer one is dropped: the gateway reads packets of up to 4 MiB from agents, and a signal
request past the 256 KiB the target's sshd reads would end the pooled upstream connection."""
DROPPED_SHOWN = 5
"""Lines typed ahead and dropped by ^C, ^\\ or ^Z that the agent's notice lists (the recording has them all)."""
SIGNAL_STOP_WAIT = 10.0
"""Seconds the gateway waits for a signal's helper on the target to end once its line has ended."""
SIGNAL_SCRIPT = r"""p=$1 sig=$2 own=$3
read -r s < "/proc/$p/stat" || exit 3
s=${s##*) }; set -- $s
g=$3
(( $4 == p && g == p )) || exit 3
for (( n = 0; n < 600; n++ )); do
  read -r s < "/proc/$p/stat" || exit 3
  s=${s##*) }; set -- $s
  t=$6
  if (( t > 0 && t != g )); then kill -s "$sig" -- "-$t" 2>/dev/null; exit 0; fi
  if (( own )); then
    hit=0
    for f in /proc/[0-9]*/stat; do
      q=${f#/proc/}; q=${q%/stat}
      (( q == p )) && continue
      read -r s < "$f" 2>/dev/null || continue
      s=${s##*) }; set -- $s
      (( $3 == g )) && kill -s "$sig" "$q" 2>/dev/null && hit=1
    done
    (( hit )) && exit 0
  fi
  read -t 0.05 -r _; (( $? > 128 )) || exit 1
done
exit 2"""
"""Run on the target (by the line shell's bash, in a channel of its own) to deliver a signal to what a line
shell runs, never to the shell itself: bash interrupted while it reads a line drops what it has read so far
and runs the rest of it as a command, a rest the gateway never decided. ``$1`` is the shell's process id (a
session leader, its own process group), ``$2`` the signal. Every 50 ms, until the gateway closes its input
(the shell's next prompt) or 30 s have passed: if another process group is in the foreground of the shell's
terminal (a program the line started), that group gets the signal; if ``$3`` is 1, so do the processes other
than the shell in the shell's own group (a command substitution's program). The shell itself never does."""
READY_MARK = "\x1b]7373;{}\x07"
"""What the target's bash prints at the end of each prompt (an OSC sequence with a nonce of the channel):
the gateway takes it out of the output and only then sends the next decided line."""

TERM_TYPE = re.compile(r"[!-~]{0,255}")
"""A terminal type the target is given: printable ASCII, as long as a file name (terminfo looks it up as one).
OpenSSH's sshd takes anything else (a NUL, or a request past its 256 KiB packets) as a broken packet and drops
the whole connection, with every other agent's channel on it."""
SUBSYSTEM_NAME_MAX = 255
"""Longest subsystem name decided and forwarded (a longer request would end the pooled upstream connection
as a long terminal type would); a longer one is denied as unparsable."""

Notify = Callable[[str, str], Awaitable[None]]


class ReadyMarks:
    """Finds and removes the ready mark in a line-mode shell's output, also when a read splits it.

    A program can print the mark too (the nonce is no secret from the agent: ``echo "$PS1"``). That only
    makes the gateway send the next decided line early, to a terminal that hands it out whole, and bash
    discards whatever a program left of it before reading a command (:data:`READY_DRAIN`).
    """

    def __init__(self, mark: bytes, trailer: bytes = b"") -> None:
        self.mark = mark
        self.trailer = trailer
        self.held = b""

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """The output without marks, and how many marks it held; a tail that may begin a mark is kept,
        and so is a final ``trailer``, which is dropped if the output ends there (see :meth:`end`)."""
        parts = (self.held + data).split(self.mark)
        data = b"".join(parts)
        self.held = b""
        for n in range(min(len(self.mark) - 1, len(data)), 0, -1):
            if data.endswith(self.mark[:n]):
                data, self.held = data[:-n], data[-n:]
                break
        if not self.held and self.trailer and data.endswith(self.trailer):
            data, self.held = data[: -len(self.trailer)], self.trailer
        return data, len(parts) - 1

    def release(self) -> bytes:
        """What is held back, when the output pauses."""
        held, self.held = self.held, b""
        return held

    def end(self) -> bytes:
        """What is held back, at the end of the output: a trailer there is dropped."""
        held = self.release()
        return b"" if held == self.trailer else held


class ShellHello:
    """Finds the line shell's process id, which the gateway's command prints (:data:`HELLO`) before bash
    starts, in the output before the shell's first ready mark (later output may come from the agent's lines)."""

    def __init__(self, nonce: str, mark: bytes) -> None:
        self.prefix = HELLO.format(nonce).encode()
        self.pattern = re.compile(re.escape(self.prefix) + rb"([0-9]{1,10})\x07")
        self.mark = mark
        self.held = b""
        self.pid: int | None = None
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The output without the hello; a tail that may begin it is held back."""
        if self.done:
            return data
        data, self.held = self.held + data, b""
        found = self.pattern.search(data)
        mark = data.find(self.mark)
        if found is not None and (mark < 0 or found.start() < mark):
            self.done = True
            pid = int(found.group(1))
            self.pid = pid if pid > 1 else None
            return data[: found.start()] + data[found.end() :]
        if mark >= 0:  # the first prompt came without a hello: no process id, ever
            self.done = True
            return data
        start = data.rfind(b"\x1b")
        if start >= 0 and len(data) - start <= len(self.prefix) + 11:
            tail = data[start:]
            if self.prefix.startswith(tail[: len(self.prefix)]):
                self.held = tail
                return data[:start]
        return data

    def release(self) -> bytes:
        held, self.held = self.held, b""
        return held


async def decide_all(session: Session, requests: Sequence[Request], notify: Notify | None) -> tuple[Decision, Request]:
    """Decide the requests of one command line together; hold approvals one by one.

    Every request is decided first without holding; if any is denied, that is the answer (no human
    is asked to approve part of a command line whose other part is refused). Then each request that
    needs an approval is held in turn. Returns the combined decision and the request it names.
    """
    first = [session.decide_now(r) for r in requests]
    combined = combine(first)
    if combined.action == "deny":
        req, dec = first_denied(requests, first)
        return combined if dec is combined else _with(dec, combined), req
    if combined.action == "allow":
        return combined, requests[0]
    finals: list[Decision] = []
    for request, decision in zip(requests, first, strict=True):
        if decision.action != "approve":
            finals.append(decision)
            continue
        held = await session.hold(request, decision, notify)
        if held.action != "allow":
            return held, request
        finals.append(held)
    return combine(finals), requests[0]


def _with(deciding: Decision, combined: Decision) -> Decision:
    """The deciding request's decision, carrying the combined masks and shadow results."""
    from dataclasses import replace

    return replace(
        deciding,
        masks=combined.masks,
        mask_rule_ids=combined.mask_rule_ids,
        shadow_rule_ids=combined.shadow_rule_ids,
    )


def _decision_event(channel: int, decision: Decision) -> dict[str, Any]:
    return {
        "channel": channel,
        "action": decision.action,
        "rule_ids": list(decision.rule_ids),
        "message": decision.message,
        "policy_version": decision.policy_version,
        "approval_id": decision.approval_id,
        "mask_rule_ids": list(decision.mask_rule_ids),
    }


async def handle_process(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """asyncssh's ``process_factory``: route the channel to its agent connection."""
    conn = process.get_extra_info("connection")
    agent = conn.get_owner() if conn is not None else None
    if agent is None:
        process.exit(UNREACHABLE_STATUS)
        return
    refused = agent.take_channel()
    if refused is not None:
        with contextlib.suppress(Exception):
            process.stderr.write(f"{refused}\n".encode())
            process.exit(UNREACHABLE_STATUS)
        return
    try:
        if process.command is not None and shown(process.command) == process.command and is_scp_server(process.command):
            await run_scp_server(process)
            return
        await ChannelHandler(agent, process).run()
    except AuditError as exc:
        # The spool is full or broken: what the channel does next cannot be recorded, so it ends (fail closed).
        log.error(
            "ssh target %s: a channel can no longer be recorded, closing it (fail closed): %s", agent.config.name, exc
        )
        with contextlib.suppress(Exception):
            process.stderr.write(
                b"lictor: this session can no longer be recorded (the gateway's audit and recording store is "
                b"unavailable); the channel was closed (fail closed); retry later\n"
            )
            process.exit(UNREACHABLE_STATUS)
    except Exception:
        log.exception("ssh channel failed")
        with contextlib.suppress(Exception):
            process.stderr.write(b"lictor: internal error in the gateway; the channel was closed\n")
            process.exit(UNREACHABLE_STATUS)
    finally:
        agent.release_channel()


class ChannelHandler:
    """Decides and relays one session channel of one agent connection."""

    def __init__(self, agent: AgentConnection, process: asyncssh.SSHServerProcess[bytes]) -> None:
        self.agent = agent
        self.process = process
        self.number = agent.next_channel()
        self.session: Session | None = None
        env = process.env
        self.reason = agent_reason(env.get("LICTOR_REASON")) if env else None
        self.approval_id: str | None = (env.get("LICTOR_APPROVAL") or None) if env else None
        self.pty = process.term_type is not None
        self.cooked = False
        self.shell_state = ShellState()  # what the lines sent to the shell so far may have set
        """The agent has a terminal but the target does not: translate newlines and control keys."""
        self.upstream: asyncssh.SSHClientProcess[bytes] | None = None
        self.lease: Lease | None = None
        self._prompt = b""
        self._final_status: int | None = None
        self._plan: Any = None
        self._mask_source: Decision | None = None
        self._maskers: dict[str, Any] = {}
        self._input_ended = False  # the agent sent the end of its input: nothing on the target waits for it
        self._records: dict[str, StreamRecord] = {}
        # Line mode: decided lines wait here until the target's shell is ready to read a command.
        self._marks: ReadyMarks | None = None
        self._hello: ShellHello | None = None
        self._ready = False
        self._in_flight = False  # a line was sent and the shell has not been ready since
        self._line_done = asyncio.Event()  # set when the shell is ready again after a line
        self._signals: deque[str] = deque()  # for what the line in flight runs
        self._signaller: asyncio.Future[None] | None = None
        self._outbox: deque[bytes | None] = deque()  # None: the end of input
        self._outbox_size = 0
        self._space = asyncio.Event()

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def target(self) -> str:
        return self.agent.config.name

    def record(self, kind: str, data: dict[str, Any]) -> None:
        """Record a session event (a recording failure raises: the command is not run or stops)."""
        session = self.session
        assert session is not None
        if session.closed:  # the connection ended while this channel was finishing
            return
        session.record(kind, data)

    async def _write_err(self, text: str) -> None:
        data = (text.replace("\n", "\r\n") if self.pty else text).encode("utf-8", "replace")
        with contextlib.suppress(Exception):
            self.process.stderr.write(data)
            self._record_out("stderr", data)
            await self.process.stderr.drain()

    def _terminal_size(self) -> dict[str, int]:
        """The agent's terminal size at the start (a recording's replay needs it; later changes are
        ``resize`` events)."""
        width, height = self.process.term_size[:2] if self.pty else (0, 0)
        return {"width": width, "height": height} if width > 0 and height > 0 else {}

    def _record_decision(self, decision: Decision) -> None:
        # The gateway already puts every decision other than allow into the session's recording.
        if decision.action == "allow":
            self.record("decision", _decision_event(self.number, decision))

    async def _notify_stderr(self, approval_id: str, message: str) -> None:
        self.record("approval.waiting", {"channel": self.number, "approval_id": approval_id})
        await self._write_err(f"lictor: {message}\n")

    def _exit(self, status: int) -> None:
        with contextlib.suppress(Exception):
            self.process.exit(status)

    async def _decide(self, requests: Sequence[Request]) -> tuple[Decision, Request]:
        assert self.session is not None
        if self.approval_id:
            broker = self.agent.gateway.approvals
            redeem = getattr(broker, "redeem", None)
            if redeem is not None:
                for request in requests:
                    with contextlib.suppress(Exception):
                        redeem(self.session.identity, request, self.approval_id)
        decide = asyncio.ensure_future(decide_all(self.session, requests, self._notify_stderr))
        closed = asyncio.ensure_future(self.process.channel.wait_closed())
        try:
            done, _ = await asyncio.wait({decide, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if decide not in done:  # the agent went away while a human was being asked: withdraw
            decide.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await decide
            raise ConnectionError("the agent closed the channel while waiting for a decision")
        return decide.result()

    async def _allowed(self, requests: Sequence[Request]) -> Decision | None:
        """Decide ``requests`` and record the decision; when it is not an allow, tell the agent why and end the
        channel (None)."""
        decision, deciding = await self._decide(requests)
        self._record_decision(decision)
        if decision.action != "allow":
            await self._write_err(denial_text(deciding, decision) + "\n")
            self._exit(DENIED_STATUS)
            return None
        return decision

    # -- entry --------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            self.session = await self.agent.ready()
        except Exception as exc:
            self.process.stderr.write(f"lictor: the session could not be opened: {exc}\n".encode())
            self._exit(UNREACHABLE_STATUS)
            return
        command = self.process.command
        subsystem = self.process.subsystem
        for kind in refused_forwarding(self.process.channel):
            what = "agent" if kind == "agent" else "X11"
            self.record(
                "forward",
                {"channel": self.number, "direction": kind, "action": "deny", "rule_ids": [], "result": "denied"},
            )
            await self._write_err(f"lictor: {what} forwarding is not allowed through the gateway; running without it\n")
        for text in await self.agent.remote_forward_refusals():  # ssh -R: its refusal carries no text
            await self._write_err(text + "\n")
        try:
            if subsystem is not None:
                await self._subsystem(subsystem)
            elif command is not None:
                await self._exec(command)
            else:
                await self._shell()
        except ConnectionError as exc:
            log.info("ssh channel %s: %s", self.number, exc)
        finally:
            self._close_upstream()  # whatever happened, nothing keeps running on the target
            for name in list(self._records):
                self._records.pop(name).close()
            if self.lease is not None:
                self.lease.release()

    # -- exec ---------------------------------------------------------------------------------

    async def _exec(self, command: str) -> None:
        assert self.session is not None
        self.record(
            "command",
            {
                "channel": self.number,
                "kind": "exec",
                "command": shown(command),
                "pty": self.pty,
                "reason": self.reason,
                **self._terminal_size(),
            },
        )
        if self.pty:
            # Keystrokes to a program on a terminal are commands the gateway cannot inspect (a
            # pager's `!cmd`, an editor's `:!cmd`): only roles granted raw_shell get a real terminal
            # on the target; the others run without one and the gateway plays the terminal.
            self.cooked = not self._raw_terminal(f"terminal for: {shown(command)[:200]}")
        requests = requests_for_command(
            command, target=self.target, channel="exec", interactive=self.pty and not self.cooked, reason=self.reason
        )
        if requests[0].attrs.get("channel") in TRANSFER_CHANNELS:
            await self._transfer(command)
            return
        decision = await self._allowed(requests)
        if decision is None:
            return
        self._plan = self.agent.session_mask_plan(decision)
        if not await self._open_upstream(command, raw=True):
            return
        await self._join(line_mode=False)

    async def _transfer(self, command: str) -> None:
        """git's and rsync's far ends: decided as the file transfers they are (their paths resolved as sftp
        resolves them), then relayed as they are. Their binary protocols cannot be masked: masking changes
        lengths (a git pack or an rsync stream breaks or hangs), so a decision that would mask is refused."""
        transfer = transfer_of(analyse(command).invocations)
        assert transfer is not None
        paths = await self._transfer_paths(transfer)
        if paths is None:
            return
        request = transfer_request(transfer, paths, command, target=self.target, reason=self.reason)
        decision = await self._allowed([request])
        if decision is None:
            return
        if decision.masks:
            self.record("transfer.masked_refused", {"channel": self.number, "paths": paths})
            await self._write_err(
                f"lictor: denied {transfer.channel} {'+'.join(transfer.operations)} of {', '.join(paths)[:300]}: its "
                f"content would be masked (rule {', '.join(decision.mask_rule_ids)}) and file transfers cannot be "
                "masked; read such files with `cat` over an exec request instead, where output is masked\n"
            )
            self._exit(DENIED_STATUS)
            return
        if decision.approval_id:  # held for a human: links may have been changed meanwhile, and git and rsync
            again = await self._transfer_paths(transfer)  # open the paths as written, not what was approved
            if again is None:
                return
            if again != paths:
                self.record("transfer.paths_changed", {"channel": self.number, "paths": paths, "now": again})
                await self._write_err(
                    f"lictor: denied {transfer.channel} {'+'.join(transfer.operations)} of {', '.join(paths)[:300]}: "
                    f"while it was being approved, where its paths lead changed (now {', '.join(again)[:300]}); "
                    "run it again to have that decided\n"
                )
                self._exit(DENIED_STATUS)
                return
        self._plan = None  # relayed as is, recorded by size and hash
        if not await self._open_upstream(command, raw=True):
            return
        await self._join(line_mode=False)

    async def _transfer_paths(self, transfer: Transfer) -> list[str] | None:
        """The transfer's paths as rules see them (:func:`transfer_paths`), or None once the agent was told why
        they could not be found."""
        try:
            lease = await self.agent.pool.acquire()
            try:
                return await transfer_paths(lease, transfer.paths, git=transfer.channel == "git")
            finally:
                lease.release()
        except (UpstreamError, OSError, asyncssh.Error) as exc:
            await self._upstream_failed(exc, "resolving the paths of a transfer")
            return None

    async def _upstream_failed(self, exc: Exception, doing: str) -> None:
        """Tell the agent the target could not be reached (:class:`UpstreamError` says why) or refused what the
        gateway asked of it while ``doing`` (logged), and end the channel."""
        if isinstance(exc, UpstreamError):
            await self._write_err(f"lictor: {exc}\n")
        else:
            log.error("ssh target %s: %s failed: %s", self.target, doing, exc)
            await self._write_err("lictor: the target refused the channel; retry later\n")
        self._exit(UNREACHABLE_STATUS)

    # -- other subsystems (sftp never comes here) ---------------------------------------------

    async def _subsystem(self, name: str) -> None:
        attrs: dict[str, Any] = {"channel": "subsystem", "program": name, "command": name, "argv": ""}
        if undecodable(name) is not None:  # bytes no rule can name: denied, and shown escaped
            name = shown(name)
            attrs = {"channel": "subsystem", "parse_error": "the subsystem name is not ASCII"}
        elif len(name) > SUBSYSTEM_NAME_MAX:  # denied; its audit event and recording keep the start of it
            error = f"the subsystem name is {len(name)} bytes, longer than {SUBSYSTEM_NAME_MAX}"
            name = name[:SUBSYSTEM_NAME_MAX] + "..."
            attrs = {"channel": "subsystem", "parse_error": error}
        request = Request(
            protocol="ssh",
            action=name,
            attrs=attrs,
            target=self.target,
            summary=f"subsystem {name}",
            payload=f"subsystem {name}",
            reason=self.reason,
        )
        self.record("command", {"channel": self.number, "kind": "subsystem", "command": name})
        if await self._allowed([request]) is None:
            return
        self._plan = None  # an uninspected protocol: relayed as is, recorded by size and hash
        if not await self._open_upstream(None, raw=True, subsystem=name):
            return
        await self._join(line_mode=False)

    # -- shells -------------------------------------------------------------------------------

    async def _shell(self) -> None:
        assert self.session is not None
        shell_req = channel_request("shell", target=self.target, summary="interactive shell", reason=self.reason)
        self.record("command", {"channel": self.number, "kind": "shell", "pty": self.pty, **self._terminal_size()})
        decision = await self._allowed([shell_req])
        if decision is None:
            return
        raw = self.pty and self._raw_terminal("raw interactive shell")
        self.record("shell", {"channel": self.number, "mode": "raw" if raw else "line", "pty": self.pty})
        self._plan = self.agent.session_mask_plan(decision)
        self._mask_source = decision
        if raw:
            if not await self._open_upstream(None, raw=True):
                return
            await self._join(line_mode=False)
            return
        # Both with and without the agent's terminal, bash runs interactive on a terminal of the target
        # (in canonical mode a read returns at most one line) and tells when it is about to read a command:
        # PROMPT_COMMAND discards what is left on the terminal, then the prompt ends with the ready mark.
        # Only then does the gateway send the next decided line, so a program never gets a typed line
        # and never leaves part of one behind for bash to run. Without a terminal there is no visible
        # prompt and no history expansion (a script's lines are analysed as a non-interactive shell's).
        nonce = secrets.token_hex(8)
        # Without a terminal, the "exit" that bash prints as it ends is no output of the script.
        self._marks = ReadyMarks(READY_MARK.format(nonce).encode(), b"" if self.pty else b"exit\n")
        self._hello = ShellHello(nonce, self._marks.mark)
        prompt = ("\\u@\\h:\\w\\$ " if self.pty else "") + f"\\e]7373;{nonce}\\a"
        env = {
            **LINE_SHELL_ENV,
            "PS1": prompt,
            "PS2": "> " if self.pty else "",
            "PROMPT_COMMAND": READY_DRAIN,
        }
        assigns = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
        options = "--noprofile --norc --noediting -i" if self.pty else "--noprofile --norc --noediting +H -i"
        # First the shell's process id (for signals, see _interrupt), then bash in place of this process.
        hello = shlex.quote(HELLO.format(nonce).replace("\x1b", "\\033") + "%s\\007")
        shell = shlex.quote(self.agent.config.line_shell)
        command = f'printf {hello} "$$"; exec env {assigns} {shell} {options}'
        if not await self._open_upstream(command, raw=False, line_shell=True):
            return
        await self._join(line_mode=True)

    def _raw_terminal(self, summary: str) -> bool:
        """Whether the agent's terminal is joined raw to one on the target (channel ``raw_shell``).

        Not granting it is no denial: the channel goes on with the gateway as the terminal. So the
        policy is asked first without an audit record (a "deny" for every terminal of a role without
        ``raw_shell`` would drown the real denials); a grant is then decided in full (hooks, audit).
        """
        assert self.session is not None
        request = channel_request("raw_shell", target=self.target, summary=summary, reason=self.reason)
        if self.session.policy_decision(request).action != "allow":
            return False
        return self.session.decide_now(request).action == "allow"

    # -- upstream -----------------------------------------------------------------------------

    async def _open_upstream(
        self, command: str | None, *, raw: bool, subsystem: str | None = None, line_shell: bool = False
    ) -> bool:
        if self.pty and not self.cooked and not TERM_TYPE.fullmatch(self.process.term_type or ""):
            await self._write_err(
                f"lictor: the terminal type {(self.process.term_type or '')[:300]!r} is not a terminal name; "
                "set TERM to one\n"
            )
            self._exit(UNREACHABLE_STATUS)
            return False
        try:
            self.lease = await self.agent.pool.acquire()
            kwargs: dict[str, Any] = {"encoding": None}
            if self.pty and not self.cooked:
                # raw: nothing is checked line by line, the agent's terminal settings apply as they are
                modes = dict(self.process.term_modes) if raw else dict(LINE_MODE_TERM_MODES)
                kwargs.update(
                    term_type=self.process.term_type,
                    term_size=self.process.term_size,
                    term_modes=modes,
                    request_pty="force",
                )
            elif line_shell:  # a script: the line shell still gets a terminal, set for bytes in and out
                kwargs.update(term_type="dumb", term_modes=dict(SCRIPT_TERM_MODES), request_pty="force")
            else:
                kwargs["request_pty"] = False
            if subsystem is not None:
                self.upstream = await self.lease.conn.create_process(subsystem=subsystem, **kwargs)
            elif command is None:
                self.upstream = await self.lease.conn.create_process(**kwargs)
            else:
                self.upstream = await self.lease.conn.create_process(command, **kwargs)
        except (UpstreamError, OSError, asyncssh.Error) as exc:
            await self._upstream_failed(exc, "opening a channel")
            return False
        return True

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                self.upstream.close()

    async def _join(self, *, line_mode: bool) -> None:
        up = self.upstream
        assert up is not None
        out = asyncio.ensure_future(self._pump_out(up.stdout, self.process.stdout, "stdout"))
        err = asyncio.ensure_future(self._pump_out(up.stderr, self.process.stderr, "stderr"))
        feed = asyncio.ensure_future(self._line_input() if line_mode else self._raw_input())
        closed = asyncio.ensure_future(self.process.channel.wait_closed())
        try:
            pending: set[asyncio.Future[Any]] = {out, err, closed, feed}
            while out in pending or err in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:  # the agent went away: stop the command
                    self._close_upstream()
                    break
                failed = feed.exception() if feed in done and not feed.cancelled() else None
                if isinstance(failed, AuditError):
                    # The agent's input can no longer be recorded: nothing more is read, so nothing more may
                    # run; unnoticed, the channel waited for ever for output, even once the spool had room.
                    self._close_upstream()
                    raise failed
            for task in (out, err):
                if task.done() and not task.cancelled() and not self.process.channel.is_closing():
                    exc = task.exception()
                    if exc is not None:
                        raise exc
        finally:
            feed.cancel()
            closed.cancel()
            if self._signaller is not None:
                self._signaller.cancel()
            for task in (out, err, feed):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feed
        if self.process.channel.is_closing():
            return
        # Output is done; the exit status follows (a command may also close its output and run on).
        up_closed = asyncio.ensure_future(up.wait_closed())
        agent_closed = asyncio.ensure_future(self.process.channel.wait_closed())
        try:
            await asyncio.wait({up_closed, agent_closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up_closed.cancel()
            agent_closed.cancel()
        if self.process.channel.is_closing():
            return
        signal = up.exit_signal
        status = up.exit_status
        self.record("exit", {"channel": self.number, "status": status, "signal": signal[0] if signal else None})
        if signal is not None and self._final_status is None:
            name, core, message, lang = signal
            with contextlib.suppress(Exception):
                self.process.exit_with_signal(name, core, message, lang)
            return
        if self._final_status is not None:
            status = self._final_status
        elif status is None:
            await self._write_err("lictor: the connection to the target was lost\n")
            status = UNREACHABLE_STATUS
        self._exit(status)

    # -- output -------------------------------------------------------------------------------

    def _record_out(self, stream: str, data: bytes) -> None:
        rec = self._records.get(stream)
        if rec is None:
            assert self.session is not None
            rec = StreamRecord(self.record, self.number, stream, self.agent.config.record_output_limit)
            self._records[stream] = rec
        rec.feed(data)

    def _emit(self, writer: asyncssh.SSHWriter[bytes], stream: str, data: bytes) -> None:
        if not data:
            return
        if self.cooked:  # what a terminal's ONLCR would do
            data = data.replace(b"\n", b"\r\n")
        self._record_out(stream, data)  # first: what cannot be recorded (a full spool) is not sent (it raises)
        writer.write(data)
        if stream == "stdout" and self.pty:
            cut = data.rfind(b"\n")
            self._prompt = (data[cut + 1 :] if cut >= 0 else self._prompt + data)[-PROMPT_KEEP:]

    def _masker(self, stream: str) -> Any:
        masker = self._maskers.get(stream)
        if masker is None and self._plan is not None and not self._plan.is_empty:
            masker = self._plan.stream()
            self._maskers[stream] = masker
        return masker

    async def _pump_out(
        self, reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes], stream: str
    ) -> None:
        pending_read: asyncio.Future[bytes] | None = None
        idle = False  # the tail was released as far as it may be since the last output
        answer = False  # without a terminal, the rest of the line was released too (see ANSWER_IDLE)
        marks = self._marks if stream == "stdout" else None  # a line shell's terminal: one stream
        try:
            while True:
                masker = self._masker(stream)
                if ((masker is not None and masker.pending) or (marks is not None and marks.held)) and not idle:
                    if pending_read is None:
                        pending_read = asyncio.ensure_future(reader.read(CHUNK))
                    done, _ = await asyncio.wait({pending_read}, timeout=FLUSH_IDLE)
                    if not done:
                        # The target is quiet: release what the masker holds back. Without a terminal nobody
                        # waits for a prompt, so only whole lines: a pause inside a value does not split it.
                        idle = True
                        if marks is not None and marks.held:  # no mark after all
                            held = marks.release()
                            self._emit(writer, stream, masker.feed(held) if masker is not None else held)
                        if masker is not None:
                            self._emit(writer, stream, masker.flush() if self.pty else masker.flush_lines())
                        await writer.drain()
                        continue
                if idle and not answer and masker is not None and masker.pending and not self._input_ended:
                    # Still quiet, with the agent's input open: the target may be waiting for the agent's
                    # answer to the line it wrote (a prompt; a protocol turn of rsync or git-upload-pack, which
                    # never ends in a newline). Holding it, both sides waited for ever.
                    if pending_read is None:
                        pending_read = asyncio.ensure_future(reader.read(CHUNK))
                    done, _ = await asyncio.wait({pending_read}, timeout=ANSWER_IDLE)
                    if not done:
                        answer = True
                        self._emit(writer, stream, masker.flush())
                        await writer.drain()
                        continue
                answer = False
                idle = False
                if pending_read is not None:
                    data = await pending_read
                    pending_read = None
                else:
                    data = await reader.read(CHUNK)
                if not data:
                    if marks is not None:
                        data = marks.feed(self._hello.release())[0] if self._hello is not None else b""
                        data += marks.end()
                        masker = self._masker(stream)
                        self._emit(writer, stream, masker.feed(data) if masker is not None else data)
                    break
                if marks is not None:
                    if self._hello is not None and not self._hello.done:
                        data = self._hello.feed(data)
                    data, ready = marks.feed(data)
                    if ready:
                        self._shell_ready()
                masker = self._masker(stream)  # a shell line may have added masks meanwhile
                self._emit(writer, stream, masker.feed(data) if masker is not None else data)
                await writer.drain()
            masker = self._maskers.pop(stream, None)
            if masker is not None:
                self._emit(writer, stream, masker.close())
                await writer.drain()
        finally:
            if pending_read is not None and not pending_read.done():
                pending_read.cancel()

    def _set_plan(self, decision: Decision) -> None:
        """Line mode: the masks of a shell only grow (the union over the shell and its allowed lines)."""
        source = combine([self._mask_source, decision]) if self._mask_source is not None else decision
        if self._mask_source is not None and set(source.mask_rule_ids) == set(self._mask_source.mask_rule_ids):
            return
        self._mask_source = source
        for stream, masker in list(self._maskers.items()):
            writer = self.process.stdout if stream == "stdout" else self.process.stderr
            self._emit(writer, stream, masker.close())
        self._maskers.clear()
        self._plan = self.agent.session_mask_plan(source)

    # -- input --------------------------------------------------------------------------------

    async def _read_input(self) -> bytes:
        """Read the agent's input, applying window changes, signals and breaks as they come."""
        up = self.upstream
        assert up is not None
        while True:
            try:
                data = await self.process.stdin.read(CHUNK)
                if not data:
                    self._input_ended = True
                return data
            except asyncssh.TerminalSizeChanged as exc:
                with contextlib.suppress(Exception):
                    up.change_terminal_size(exc.width, exc.height, exc.pixwidth, exc.pixheight)
                self.record("resize", {"channel": self.number, "width": exc.width, "height": exc.height})
            except asyncssh.SignalReceived as exc:
                if len(exc.signal) > SIGNAL_NAME_MAX:  # see SIGNAL_NAME_MAX: neither relayed nor kept whole
                    cut = exc.signal[:SIGNAL_NAME_MAX] + "..."
                    self.record("signal", {"channel": self.number, "signal": cut, "delivered": False})
                    continue
                if self._marks is not None:  # a line shell: never to bash itself (see _interrupt)
                    self._interrupt(str(exc.signal), key=False)
                    continue
                self.record("signal", {"channel": self.number, "signal": exc.signal})
                with contextlib.suppress(Exception):
                    up.send_signal(exc.signal)
            except asyncssh.BreakReceived as exc:
                if self._marks is not None:  # a break on a line shell's terminal could interrupt bash
                    self.record("signal", {"channel": self.number, "signal": "break", "delivered": False})
                    continue
                self.record("signal", {"channel": self.number, "signal": "break", "msec": exc.msec})
                with contextlib.suppress(Exception):
                    up.send_break(exc.msec)

    async def _raw_input(self) -> None:
        up = self.upstream
        assert up is not None
        editor = LineEditor() if self.cooked else None
        # Without a terminal the input is data for the program (or commands for it: `ssh host psql < q.sql`),
        # recorded as its output is: text up to the limit, then its size and SHA-256.
        piped = (
            None
            if self.pty
            else StreamRecord(self.record, self.number, "stdin", self.agent.config.record_output_limit, "input")
        )
        try:
            while True:
                data = await self._read_input()
                if not data:
                    up.stdin.write_eof()
                    return
                if piped is not None:
                    piped.feed(data)
                else:
                    self.record("input", {"channel": self.number, "data": data.decode("utf-8", "replace")})
                if editor is not None:
                    if not self._cooked_input(editor, data):
                        return
                else:
                    up.stdin.write(data)
                await up.stdin.drain()
        finally:
            if piped is not None and piped.total:
                summary = piped.close()
                self.record("input.bytes", {"channel": self.number, "bytes": piped.total, "sha256": summary["sha256"]})

    def _cooked_input(self, editor: LineEditor, data: bytes) -> bool:
        """The agent's terminal keys for a program that has no terminal on the target: the gateway is
        the line discipline (echo, editing, Enter sends the line, ^C/^\\ are signals, ^D is the end
        of input: returns False). The lines are data for the allowed program, not commands."""
        up = self.upstream
        assert up is not None
        for event in editor.feed(data):
            if isinstance(event, Echo):
                self._record_out("stdout", event.data)
                self.process.stdout.write(event.data)
            elif isinstance(event, Line):
                up.stdin.write(event.text.encode("utf-8") + b"\n")
            elif isinstance(event, Signal):
                if event.char in (b"\x03", b"\x1c"):
                    with contextlib.suppress(Exception):
                        up.send_signal("INT" if event.char == b"\x03" else "QUIT")
            elif isinstance(event, Eof):
                if editor.text:
                    up.stdin.write(editor.text.encode("utf-8"))
                up.stdin.write_eof()
                return False
        return True

    async def _line_input(self) -> None:
        up = self.upstream
        assert up is not None
        if not self.pty:
            await self._script_input()
            return
        editor = LineEditor(max_line=TTY_LINE_MAX)
        while True:
            data = await self._read_input()
            if not data:
                await self._send(None)
                return
            self.record("input", {"channel": self.number, "data": data.decode("utf-8", "replace")})
            for event in editor.feed(data):
                if isinstance(event, Echo):
                    self._record_out("stdout", event.data)
                    self.process.stdout.write(event.data)
                elif isinstance(event, Signal):
                    self._interrupt(KEY_SIGNALS[event.char], key=True)
                elif isinstance(event, Eof):
                    if self._ready:
                        await self._send(b"\x04")  # at the prompt: ends the shell
                    else:
                        up.stdin.write(b"\x04")  # the end of input for the running program
                elif isinstance(event, Line):
                    await self._shell_line(event.text)
            await self.process.stdout.drain()

    async def _script_input(self) -> None:
        up = self.upstream
        assert up is not None
        buffer = b""
        while True:
            data = await self._read_input()
            if not data:
                if buffer.strip() and not await self._shell_line(buffer.decode("utf-8", "replace")):
                    return
                await self._send(None)
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not await self._shell_line(line.decode("utf-8", "replace")):
                    return
            if len(buffer) > 64 * 1024:
                await self._shell_line(buffer.decode("utf-8", "replace"))  # too long: denied
                return

    async def _shell_line(self, text: str) -> bool:
        """Decide one line; send it to the target only if allowed. False ends a script session."""
        if not text.strip():
            await self._send(b"\n")
            return True
        self.record("command", {"channel": self.number, "kind": "shell_line", "command": text, "reason": self.reason})
        requests = requests_for_command(
            text,
            target=self.target,
            channel="shell_line",
            interactive=self.pty,
            line=True,
            max_bytes=TTY_LINE_MAX,
            reason=self.reason,
            state=self.shell_state,
        )
        if len(requests) == 1 and requests[0].action == "empty" and text.lstrip(" \t").startswith("#"):
            # only a comment (a script's `#!/bin/sh`, `# step 2`): the shell runs nothing, as for a blank
            # line. Other lines without a program (`PATH=/tmp`, a bare redirection) are still decided.
            await self._send(text.encode("utf-8") + b"\n")
            return True
        decision, deciding = await self._decide(requests)
        self._record_decision(decision)
        if decision.action == "allow":
            self._set_plan(decision)
            await self._send(text.encode("utf-8") + b"\n")
            return True
        message = denial_text(deciding, decision)
        if self.pty:
            prompt = self._prompt  # _emit would replace it with what follows the message's newline
            self._emit(self.process.stdout, "stdout", f"{message}\r\n".encode())
            if prompt:
                self._prompt = prompt
                self.process.stdout.write(prompt)
            return True
        # A script: what was already sent finishes on the target, nothing after the denied line is
        # sent, and the session ends with 126 once the target's shell has exited.
        await self._write_err(message + "\n")
        self._final_status = DENIED_STATUS
        await self._send(None)
        return False

    async def _send(self, data: bytes | None) -> None:
        """Queue a decided line (None: the end of input) for the target's shell; wait while too much is queued."""
        while self._outbox_size >= OUTBOX_MAX:
            self._space.clear()
            await self._space.wait()
        if data is not None and not self.pty:
            data += b"\x04"  # a script's program that reads its input gets the end of it, not the next lines
        self._outbox.append(data)
        self._outbox_size += len(data or b"")
        self._dispatch()

    def _dispatch(self) -> None:
        """Send the next queued line if the target's shell is ready for a command and no signal for the line
        before is still on its way. Called, without awaiting, when a line is queued, when the ready mark
        comes and when a signal's helper has ended."""
        up = self.upstream
        if not (self._ready and self._outbox) or up is None or self._signaller is not None:
            return
        data = self._outbox.popleft()
        self._outbox_size -= len(data or b"")
        self._space.set()
        self._ready = False
        self._in_flight = True
        self._line_done.clear()
        with contextlib.suppress(Exception):  # a target that went away ends the channel elsewhere
            if data is None:
                up.stdin.write(b"\x04")
                up.stdin.write_eof()
            else:
                up.stdin.write(data)

    # -- signals in line shells ----------------------------------------------------------------

    def _shell_ready(self) -> None:
        """The ready mark came: the line sent last has ended and bash is about to read a command."""
        self._ready = True
        self._in_flight = False
        self._signals.clear()  # for a line that has ended
        self._line_done.set()
        if self._hello is not None:
            self._hello.done = True  # later output may come from the agent's lines
        self._dispatch()

    def _interrupt(self, signal: str, *, key: bool) -> None:
        """^C, ^\\ or ^Z (``key``), or an SSH signal request, in a line shell.

        No signal ever reaches the target's bash, and no ^C byte its terminal: bash interrupted while it reads
        or parses a line drops what it has taken in so far and runs the rest of what it has read as a command,
        a rest no rule decided (``echo 'x;rm -rf /srv/app;#'`` cut inside the quotes runs the ``rm``). At the
        prompt the gateway handles the key itself: the line being typed is dropped and the prompt shown
        again. While a line runs, a helper on the target signals the program the line started, never bash
        (:data:`SIGNAL_SCRIPT`), and the next line waits until bash is ready again and the helper has ended.
        """
        notice = b""
        if key:  # as a terminal does: what was typed ahead is dropped (and the agent told which lines)
            notice = self._dropped(signal, list(self._outbox))
            self._outbox.clear()
            self._outbox_size = 0
            self._space.set()
        if signal not in FOREGROUND_SIGNALS:
            self.record("signal", {"channel": self.number, "signal": signal, "delivered": False})
            return
        if not self._in_flight:  # at the prompt (or before it): nothing runs, nothing is sent
            if not key:
                self.record("signal", {"channel": self.number, "signal": signal, "delivered": False})
            elif self.pty:
                redraw = notice + b"\r\n" + self._prompt
                self.process.stdout.write(redraw)
                self._record_out("stdout", redraw)
            return
        if notice:  # right after the ^C the agent's terminal shows, before what the program and bash print next
            self.process.stdout.write(notice + b"\r\n")
            self._record_out("stdout", notice + b"\r\n")
        if len(self._signals) < SIGNALS_QUEUED:
            self._signals.append(signal)
        if self._signaller is None:
            self._signaller = asyncio.ensure_future(self._deliver_signals())

    def _dropped(self, signal: str, queued: Sequence[bytes | None]) -> bytes:
        """Lines typed ahead that a key drops before the target saw them. The agent saw them echoed and the
        recording has them as allowed commands: they are recorded as dropped, and the returned notice (to show
        on the agent's terminal, on the line after the key's echo) lists them."""
        lines = [
            "^D" if data is None or data == b"\x04" else data.decode("utf-8", "replace").rstrip("\n") for data in queued
        ]
        lines = [line for line in lines if line.strip()]
        if not lines:
            return b""
        self.record("lines.dropped", {"channel": self.number, "signal": signal, "lines": lines})
        listed = ", ".join(f"`{line[:100]}`" for line in lines[:DROPPED_SHOWN])
        more = f" and {len(lines) - DROPPED_SHOWN} more" if len(lines) > DROPPED_SHOWN else ""
        return (
            f"\r\nlictor: the {signal_text(signal)} dropped {len(lines)} line{'s' if len(lines) > 1 else ''} "
            f"typed ahead, which did not run: {listed}{more}"
        ).encode("utf-8", "replace")

    async def _deliver_signals(self) -> None:
        signal = ""
        try:
            while self._signals and self._in_flight:
                signal = self._signals.popleft()
                self.record("signal", {"channel": self.number, "signal": signal})
                await self._signal_foreground(signal)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the signal is not delivered; nothing reached bash
            log.warning("ssh channel %s: delivering a signal failed: %s", self.number, exc)
            await self._write_err(f"lictor: the {signal_text(signal)} could not be delivered on the target\n")
        finally:
            self._signaller = None
            self._dispatch()

    async def _signal_foreground(self, signal: str) -> None:
        """Run :data:`SIGNAL_SCRIPT` on the target (on the line shell's own upstream connection) until it has
        signalled, given up, or the line has ended (then its input is closed and it ends within 50 ms)."""
        pid = self._hello.pid if self._hello is not None else None
        lease = self.lease
        if pid is None or lease is None:
            raise RuntimeError("the line shell's process id is not known")
        own = "0" if signal == "TSTP" else "1"  # a stopped command substitution would hang bash
        command = shlex.join(
            [
                "exec",
                self.agent.config.line_shell,
                "--noprofile",
                "--norc",
                "-c",
                SIGNAL_SCRIPT,
                "lictor-signal",
                str(pid),
                signal,
                own,
            ]
        )
        helper = await asyncio.wait_for(
            lease.conn.create_process(command, encoding=None, request_pty=False), SIGNAL_STOP_WAIT
        )
        ended = asyncio.ensure_future(helper.wait_closed())
        line_done = asyncio.ensure_future(self._line_done.wait())
        try:
            await asyncio.wait({ended, line_done}, return_when=asyncio.FIRST_COMPLETED)
            if not ended.done():
                helper.stdin.write_eof()
                try:
                    await asyncio.wait_for(asyncio.shield(ended), SIGNAL_STOP_WAIT)
                except TimeoutError:  # it can only signal what the shell runs, never the shell: go on
                    log.warning("ssh channel %s: a signal's helper on the target did not end", self.number)
                    return
        finally:
            line_done.cancel()
            if not ended.done():
                ended.cancel()
                helper.close()
        status = helper.exit_status
        if status == 2:
            await self._write_err(
                f"lictor: the {signal_text(signal)} was dropped: for 30 s no program of the line was in the"
                " foreground (bash itself, running a builtin, is never interrupted)\n"
            )
        elif status not in (0, 1):
            raise RuntimeError(f"the signal's helper on the target ended with status {status}")


def signal_text(signal: str) -> str:
    return {"INT": "interrupt (^C)", "QUIT": "quit (^\\)", "TSTP": "suspend (^Z)"}.get(signal, f"signal {signal}")
