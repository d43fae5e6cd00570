"""The drain process: feeds the sinks from the spool outside the gateway process.

The gateway process only appends to the spool. With ``recordings.drain: process`` (the default)
:class:`DrainProcess` runs ``python -m lictor.recorder._drainproc``, one child per gateway, whose
drainer threads read the spool (through :class:`~lictor.recorder._spool.SpoolView`), write the
sinks and commit their offsets, exactly as the drainer threads of ``drain: thread`` do; the
JSON decoding, hash chains, SQLite inserts and fsyncs no longer compete with the gateway's event
loop for its interpreter lock.

Protocol, one line each way:

* gateway -> child (stdin): first the configuration (JSON), then ``w`` (wake the drainers: a
  flush is waiting) and ``q SECONDS WRITTEN`` (drain up to WRITTEN for at most SECONDS, then
  exit). End of file means the gateway is gone: the child exits at once (it also asks the kernel
  for SIGKILL when its parent dies). Whatever it had not committed is sent again by the next
  drain process: writes are idempotent and offsets are committed after the writes.
* child -> gateway (stdout): one JSON status per sink after each commit and whenever its health
  changes: ``{"name", "committed", "healthy", "last_error", "failures"}``; and
  ``{"fsync_failed": MESSAGE}`` if the group commit failed (the gateway then refuses new events).

The child also runs the spool's group commit (:class:`~lictor.recorder._spool.GroupCommit`: an
``fdatasync`` of the grown segment files every ``fsync_interval``), so that the gateway process
has no thread waking up 200 times a second to take its interpreter lock. While nothing is written,
the child's threads wait on the spool directory (``inotify``, :class:`~lictor.recorder._spool.SpoolWatch`)
instead of polling it, so an idle gateway costs no CPU here either.

The gateway keeps ownership of the spool: it deletes a segment (:meth:`Spool.release`) once every
sink's reported committed position is past it; the child never deletes or writes spool files.
The child holds ``drain.lock`` in the spool directory, so a restarted child never overlaps one
that is still finishing. If the child dies, the gateway restarts it with backoff (up to 5 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ._sinks import Drainer
from ._spool import GroupCommit, Spool, SpoolView, SpoolWatch

if TYPE_CHECKING:
    from ..audit import AuditLog
    from ._recorder import RecordingsConfig

__all__ = ["DrainProcess", "main"]

log = logging.getLogger("lictor.recorder")

_CORE = str(Path(__file__).resolve().parents[2])  # the directory that holds the lictor package


class DrainProcess:
    """The gateway's side: starts the drain process, restarts it, mirrors each sink's status.

    ``drainers`` are the gateway's (idle) drainers, one per sink: their ``committed``,
    ``healthy``, ``last_error`` and ``failures`` are updated from the child's reports, so
    :meth:`SessionRecorder.status` and segment release work as with drainer threads.
    """

    def __init__(
        self, config: RecordingsConfig, spool: Spool, drainers: Sequence[Drainer], audit: AuditLog | None
    ) -> None:
        self.config = config
        self.spool = spool
        self.drainers = list(drainers)
        self._by_name = {d.name: d for d in self.drainers}
        self.on_retention: Callable[[str, list[str]], None] | None = None
        self.audit_paths = (str(audit.path), str(audit.verify_key_path)) if audit is not None else None
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._stop_wait = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lictor-drain-process", daemon=True)
        self._thread.start()

    # -- the monitor thread (it also spawns the child: PR_SET_PDEATHSIG follows the spawning thread)

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = _CORE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from lictor.recorder._drainproc import main; sys.exit(main())"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
            # Its own process group: Ctrl-C on the gateway's terminal signals the whole foreground group,
            # and the child must finish the last drain the gateway asks for when it stops. Its life is
            # the gateway's: stdin's end of file and PR_SET_PDEATHSIG end it.
            start_new_session=True,
        )
        assert proc.stdin is not None
        hello = {
            "parent": os.getpid(),
            "config": self.config.to_json(),
            "gateway_id": self.spool.gateway_id,
            "audit": self.audit_paths,
            "written": self.spool.written_seq,
        }
        try:
            proc.stdin.write(json.dumps(hello).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            pass  # it died at once: seen when its output ends
        return proc

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            started = time.monotonic()
            try:
                proc = self._spawn()
            except Exception as exc:
                log.error("could not start the recording drain process: %s", exc)
            else:
                with self._lock:
                    self._proc = proc
                    stopping = self._stopping
                if stopping:
                    self._send(self._quit_line(self.config.stop_timeout))
                assert proc.stdout is not None
                self._read(proc.stdout)
                rc = proc.wait()
                proc.stdout.close()
                if proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
                if self._stopping:
                    if rc != 0:
                        log.warning("the recording drain process exited with status %s while stopping", rc)
                    break
                self.restarts += 1
                log.error(
                    "the recording drain process %d exited (status %s); restarting it in %.1fs",
                    proc.pid,
                    rc,
                    backoff,
                )
            if time.monotonic() - started > 30:
                backoff = 0.1
            self._stop_wait.wait(backoff)
            backoff = min(backoff * 2, 5.0)
        with self._cond:
            self._cond.notify_all()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            try:
                doc = json.loads(raw)
                if "fsync_failed" in doc:
                    self.spool.fail(f"fdatasync failed in the drain process: {doc['fsync_failed']}")
                    continue
                if "retention" in doc:
                    self._retained(str(doc["retention"]["sink"]), [str(s) for s in doc["retention"]["sessions"]])
                    continue
                drainer = self._by_name[str(doc["name"])]
                committed, healthy = int(doc["committed"]), bool(doc["healthy"])
                last_error, failures = str(doc["last_error"]), int(doc["failures"])
            except (ValueError, KeyError, TypeError) as exc:
                log.error("unexpected output from the recording drain process: %r (%s)", raw[:200], exc)
                continue
            # Under the lock wait() checks ``committed`` with: it wakes on its own every 50 ms, and one wake-up
            # between the new position and the release returned from flush() with drained segments still there.
            with self._cond:
                drainer.committed, drainer.healthy = committed, healthy
                drainer.last_error, drainer.failures = last_error, failures
                self._release()  # before waking flush(): it returns with the drained segments gone
                self._cond.notify_all()

    def _retained(self, sink: str, sessions: list[str]) -> None:
        if self.on_retention is None:
            return
        try:
            self.on_retention(sink, sessions)
        except Exception as exc:
            log.error("could not report %d sessions retention removed from %s: %s", len(sessions), sink, exc)

    def _release(self) -> None:
        if self.spool.closed:
            return
        try:
            self.spool.release(min(d.committed for d in self.drainers))
        except OSError as exc:
            log.warning("could not delete drained spool segments: %s", exc)

    # -- commands ------------------------------------------------------------------------------

    def _send(self, line: bytes) -> None:
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None or proc.stdin.closed:
                return
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except (OSError, ValueError):
                pass  # it is gone; the monitor restarts it

    def _quit_line(self, seconds: float) -> bytes:
        return f"q {seconds:.3f} {self.spool.written_seq}\n".encode()

    def wake(self) -> None:
        self._send(b"w\n")

    def wait(self, target: int, deadline: float, names: Iterable[str] | None = None) -> bool:
        """Wait until the sinks ``names`` (default: all) have committed ``target``; False on timeout."""
        chosen = [self._by_name[n] for n in names] if names is not None else self.drainers
        self.wake()
        next_wake = time.monotonic() + 0.25
        with self._cond:
            while True:
                if all(d.committed >= target for d in chosen):
                    return True
                now = time.monotonic()
                if now >= deadline or self._thread is None or not self._thread.is_alive():
                    return all(d.committed >= target for d in chosen)
                if now >= next_wake:
                    self.wake()  # a restarted child, or a wake-up lost in between
                    next_wake = now + 0.25
                self._cond.wait(min(deadline - now, 0.05))

    def stop(self, timeout: float) -> None:
        """Let the child drain what was appended (for at most ``timeout``), then end it."""
        with self._lock:
            self._stopping = True
        self._stop_wait.set()
        self._send(self._quit_line(timeout))
        thread = self._thread
        if thread is not None:
            thread.join(timeout + 5.0)
            if thread.is_alive():
                self.kill()
                thread.join(5.0)
        self._thread = None

    def kill(self) -> None:
        """End the child at once (another recorder takes the spool over; nothing is lost)."""
        with self._lock:
            self._stopping = True
            proc = self._proc
        self._stop_wait.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
            self._thread = None


# -- the child ---------------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when the gateway dies (Linux); stdin's end of file does it elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)  # it died before we asked


def _lock_drain(directory: Path, parent: int) -> int:
    """Hold ``drain.lock``: wait for a previous drain process that is still finishing."""
    fd = os.open(directory / "drain.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        except OSError:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(0.05)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when this process stops
    buf = b""  # stdin is read unbuffered: a command may follow the configuration at once
    while b"\n" not in buf:
        chunk = os.read(0, 65536)
        if not chunk:
            return 0
        buf += chunk
    line, buf = buf.split(b"\n", 1)
    hello: dict[str, Any] = json.loads(line)
    parent = int(hello["parent"])
    _die_with_parent(parent)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s lictor-drain[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    from ..audit import AuditLog
    from ._recorder import RecordingsConfig, make_sink
    from ._spool import Offset

    config = RecordingsConfig.from_json(hello["config"])
    lock_fd = _lock_drain(config.spool_dir, parent)
    audit = AuditLog(*hello["audit"]) if hello.get("audit") else None
    view = SpoolView(config.spool_dir, int(hello["written"]))
    out_lock = threading.Lock()
    sent: dict[str, tuple[int, bool, str, int]] = {}

    def send(doc: dict[str, Any]) -> None:  # called with out_lock held
        try:
            os.write(1, json.dumps(doc).encode() + b"\n")
        except OSError:
            os._exit(0)  # the gateway is gone

    def report(drainer: Drainer) -> None:
        state = (drainer.committed, drainer.healthy, drainer.last_error, drainer.failures)
        with out_lock:
            if sent.get(drainer.name) == state:
                return
            sent[drainer.name] = state
            send(
                {
                    "name": drainer.name,
                    "committed": state[0],
                    "healthy": state[1],
                    "last_error": state[2],
                    "failures": state[3],
                }
            )

    def fsync_failed(message: str) -> None:
        with out_lock:
            send({"fsync_failed": message})

    def retention(sink: str, sessions: list[str]) -> None:
        with out_lock:
            send({"retention": {"sink": sink, "sessions": sessions}})

    # Idle, the threads below block on the spool directory (one wake-up per change) rather than poll it.
    watch = SpoolWatch.open(config.spool_dir)
    drainers: list[Drainer] = []

    def grown() -> None:
        for drainer in drainers:
            drainer.nudge()

    group = GroupCommit(config.spool_dir, config.fsync_interval, fsync_failed, watch=watch, on_grow=grown)
    group.start()
    for cfg in config.sinks:
        drainer = Drainer(
            make_sink(cfg, config, str(hello["gateway_id"]), audit),
            view,
            Offset(config.offset_path(cfg.name)),
            retention_interval=config.retention_interval,
            # Each batch costs fixed fdatasyncs (session files, audit and index databases, offset): in
            # this process latency does not matter (the spool holds every event, flush() wakes the
            # drainer at once), cores do, so batches are gathered for longer than in the gateway.
            linger=0.25,
        )
        if watch is not None and group.running:
            drainer.idle = 1.0  # the group commit's first round after a write nudges it
        drainer.on_commit = functools.partial(report, drainer)
        drainer.on_retention = retention
        drainers.append(drainer)
    for drainer in drainers:
        report(drainer)
        drainer.start()

    while True:
        if b"\n" not in buf:
            ready, _, _ = select.select([0], [], [], 0.2)
            for drainer in drainers:
                report(drainer)  # health changes (failures do not commit)
            if not ready:
                if os.getppid() != parent:
                    os._exit(0)
                continue
            chunk = os.read(0, 4096)
            if not chunk:
                # The gateway is gone without asking us to stop: leave at once, the next one resends.
                os._exit(0)
            buf += chunk
        while b"\n" in buf:
            command, buf = buf.split(b"\n", 1)
            words = command.decode().split()
            if not words:
                continue
            if words[0] == "w":
                for drainer in drainers:
                    drainer.wake()
            elif words[0] == "q":
                group.stop()
                if watch is not None:
                    watch.close()
                _finish(drainers, view, float(words[1]), int(words[2]), report)
                if audit is not None:
                    audit.close()
                os.close(lock_fd)
                return 0


def _finish(
    drainers: Sequence[Drainer], view: SpoolView, seconds: float, written: int, report: Callable[[Drainer], None]
) -> None:
    deadline = time.monotonic() + seconds
    view.written_seq = max(view.written_seq, written)
    for drainer in drainers:
        drainer.stop(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
    for drainer in drainers:
        if drainer._thread is None:
            drainer.drain(deadline)
        report(drainer)
    for drainer in drainers:
        if drainer._thread is None:
            drainer.close()


if __name__ == "__main__":
    sys.exit(main())
