"""The spool: append-only segment files where every event lands before anything else happens.

Theory of operation
-------------------
A record is ``header || body``; the 18-byte header holds a magic byte, the record type, the body
length, the record's sequence number and a CRC-32 over the header fields and the body. Sequence
numbers are gap-free and never reused for the life of the spool directory. Records go into
segment files named after their first sequence number (``00000000000000000001.seg``); the newest
("active") segment is the only one written to, through an ``O_APPEND`` descriptor, with one
``os.write`` per record.

Durability:

* When :meth:`Spool.append` returns, the record is in the kernel's page cache: it survives the
  gateway process being killed (even with SIGKILL), not a kernel crash or power loss.
* ``fdatasync`` runs every ``fsync_interval`` (group commit): in a background thread of the
  writing process, or, after :meth:`Spool.sync_elsewhere`, in another process that opens the
  segment files itself (the drain process: :class:`GroupCommit`), so the writer's interpreter is
  not interrupted 200 times a second. After a power loss, at most the records appended during the
  last interval can be missing.
* :meth:`Spool.sync` makes everything appended so far durable before it returns (``strict``).
* A failed or short write is rolled back (``ftruncate`` to the previous end) and raises
  :class:`RecordingError`; a failed ``fdatasync`` marks the spool broken: from then on every
  append raises, because the page cache may have dropped records already acknowledged.

Readers (the sink drainers) read only what :meth:`append` has published, from their own
descriptors. A segment is deleted only through :meth:`release`, with a sequence number that every
sink has committed; the active segment is never deleted, so the directory always tells the next
sequence number. On open, every segment is checked record by record; a torn tail (a write the
machine did not finish) is cut off and reported. A bad record followed by valid ones is not a torn
write (only the last write can be torn) but damage in place: the valid records after it are moved to
a segment of their own, the damaged bytes to ``damaged/``, and the numbers they held are reported
lost (the recorder audits every recovery problem, and the session chains they belonged to show the
gap). Nothing valid is cut. Each problem is noted in ``recovered`` before recovery changes a file and
kept there until the recorder has audited it (:meth:`Spool.recovery_reported`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import threading
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ._util import RecordingError, SpoolFull, fsync_dir, write_atomic

__all__ = [
    "AUDIT",
    "CARRY",
    "MANIFEST",
    "SESSION",
    "GroupCommit",
    "Offset",
    "Record",
    "Segment",
    "Spool",
    "SpoolReader",
    "SpoolView",
    "SpoolWatch",
]

log = logging.getLogger("lictor.recorder")

SESSION, AUDIT, MANIFEST, CARRY = 1, 2, 3, 4
TYPE_NAMES = {SESSION: "session", AUDIT: "audit", MANIFEST: "manifest", CARRY: "carry"}

_MAGIC = 0xA7
_HEADER = struct.Struct("<BBIQI")  # magic, type, body length, seq, crc32
_PREFIX = struct.Struct("<BBIQ")
HEADER_SIZE = _HEADER.size
MAX_BODY = 64 << 20
OFFSETS = "offsets"
"""The spool directory's subdirectory where each sink's committed position is kept (``SINK.off``)."""
_SUFFIX = ".seg"
_DAMAGED = "damaged"  # the spool directory's subdirectory where recovery keeps the bytes of damaged records
# What recovery found, one problem a line, written before it changes any file and removed once the problems
# are audited (Spool.recovery_reported): a restart stopped in between reports them again, not nothing.
_REPORTS = "recovered"


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    type: int
    body: bytes


@dataclass(slots=True)
class Segment:
    """One segment file. ``size`` is how many bytes are published to readers."""

    first_seq: int
    path: Path
    size: int = 0
    last_seq: int = 0  # first_seq - 1 while empty
    sealed: bool = False


def _crc(rtype: int, length: int, seq: int, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(_PREFIX.pack(_MAGIC, rtype, length, seq)))


def encode_record(seq: int, rtype: int, body: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, rtype, len(body), seq, _crc(rtype, len(body), seq, body)) + body


class CorruptSpool(RecordingError):
    """A record that does not check out where the spool says it is complete."""


def _parse(buf: bytes, pos: int, expect_seq: int | None) -> tuple[Record, int] | None:
    """The record at ``buf[pos:]`` and the position after it; None if it is incomplete.

    Raises CorruptSpool when the bytes there are not a valid record.
    """
    if len(buf) - pos < HEADER_SIZE:
        return None
    magic, rtype, length, seq, crc = _HEADER.unpack_from(buf, pos)
    if magic != _MAGIC or rtype not in TYPE_NAMES or length > MAX_BODY:
        raise CorruptSpool(f"bad record header at byte {pos}")
    end = pos + HEADER_SIZE + length
    if end > len(buf):
        return None
    body = bytes(buf[pos + HEADER_SIZE : end])
    if _crc(rtype, length, seq, body) != crc:
        raise CorruptSpool(f"record {seq} at byte {pos}: checksum mismatch")
    if expect_seq is not None and seq != expect_seq:
        raise CorruptSpool(f"record at byte {pos} has sequence {seq}, expected {expect_seq}")
    return Record(seq, rtype, body), end


def _scan(data: bytes, first_seq: int) -> tuple[int, int, str]:
    """(valid bytes, last seq, problem) of a segment's bytes; problem is "" when they are whole."""
    pos, seq = 0, first_seq
    problem = ""
    while pos < len(data):
        try:
            parsed = _parse(data, pos, seq)
        except CorruptSpool as exc:
            problem = str(exc)
            break
        if parsed is None:
            problem = f"incomplete record at byte {pos} ({len(data) - pos} bytes)"
            break
        pos = parsed[1]
        seq += 1
    return pos, seq - 1, problem


def _resync(data: bytes, start: int, after_seq: int) -> tuple[int, int] | None:
    """(byte position, sequence number) of the first whole, valid record at or after ``start`` that is
    numbered above ``after_seq``; None when there is none (what follows ``start`` is a torn tail).

    A write the machine did not finish can only be the last one: valid records after a bad one mean
    the bad one was damaged in place (a flipped bit, a bad sector), and those records are whole.
    Damage in place keeps every byte where it was, so the records it lost (``after_seq + 1`` up to the
    one found) filled the bytes before it, each at least a header: a checksummed record numbered
    beyond that (a stray one, from another spool's blocks or made up) is not the one that follows,
    and taking it would number on from it and cut the real records after it.
    """
    magic = bytes([_MAGIC])
    pos = data.find(magic, start)
    while pos >= 0:
        try:
            parsed = _parse(data, pos, None)
        except CorruptSpool:
            parsed = None
        if parsed is not None and after_seq < parsed[0].seq <= after_seq + 1 + (pos - start) // HEADER_SIZE:
            return pos, parsed[0].seq
        pos = data.find(magic, pos + 1)
    return None


class _SegmentList:
    """Lookups over ``segments`` (ordered by first sequence number), shared by the writer and the view."""

    segments: list[Segment]
    written_seq: int

    def first_seq(self) -> int:
        segments = self.segments
        return segments[0].first_seq if segments else self.written_seq + 1

    def next_segment(self, segment: Segment) -> Segment | None:
        for candidate in self.segments:
            if candidate.first_seq > segment.first_seq:
                return candidate
        return None

    def segment_for(self, seq: int) -> Segment | None:
        """The segment holding ``seq`` (or the first one after it, if ``seq`` was released)."""
        found: Segment | None = None
        for segment in self.segments:
            if segment.first_seq <= seq:
                found = segment
            elif found is None or found.last_seq < seq:
                return segment
            else:
                break
        return found


_LOCK = "lock"  # held (flock) by the one process writing the spool, and naming its pid


def writer_alive(directory: Path) -> bool:
    """Whether a live process is writing the spool in ``directory`` (read from its lock file, without
    taking the lock: a reader must never make the gateway's own start fail)."""
    try:
        os.kill(int((directory / _LOCK).read_text().split()[0]), 0)
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


_OPEN: weakref.WeakValueDictionary[str, Spool] = weakref.WeakValueDictionary()
_OPEN_LOCK = threading.Lock()


class Spool(_SegmentList):
    """The segment files of one spool directory (one gateway process at a time)."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        fsync_interval: float = 0.005,
        reserve_bytes: int = 1 << 20,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync_interval = fsync_interval
        self.reserve_bytes = reserve_bytes
        self._closed = True  # until the directory is ours (see __del__)
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._pending_fds: list[int] = []
        self._dir_dirty = False
        self._failed: str = ""
        self._stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._sync_elsewhere = False
        # Called when another instance in this process takes the directory over (its owner
        # must stop using it: drainers, offsets).
        self.on_takeover: Callable[[], None] | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._take_over()
        self._lock_fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise RecordingError(
                f"spool {self.directory} is in use by another gateway process; each gateway needs its own state_dir"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        try:
            self._open_files()
        except BaseException:
            os.close(self._lock_fd)
            raise
        with _OPEN_LOCK:
            _OPEN[str(self.directory.resolve())] = self

    def _open_files(self) -> None:
        self.gateway_id = self._gateway_id()
        self._remove_leftovers()
        self.recovery_problems: list[str] = self._unreported()
        # The first sequence number of the newest segment ever started, kept in place (no new
        # blocks needed), so sequence numbers are never reused even if every segment is gone.
        self._floor = Offset(self.directory / "floor")
        self._floor_seq = self._floor.position
        self.segments: list[Segment] = self._recover()
        # Sinks may hold records the spool no longer has (a tail lost in a power loss, or cut at a damaged
        # record, after they were sent): numbering goes on after them, or a sink would take new records for
        # ones it already has and drop them.
        for path in (self.directory / OFFSETS).glob("*.off"):
            self._floor_seq = max(self._floor_seq, (Offset.peek(path) or 0) + 1)
        self.total_bytes = sum(s.size for s in self.segments)
        self.written_seq = max(self._floor_seq - 1, 0)
        self.synced_seq = self.written_seq
        self._active: Segment | None = None
        self._fd = -1
        self._closed = False

    # -- opening -------------------------------------------------------------------------------

    def _take_over(self) -> None:
        """A second spool on the same directory in this process closes the first one (tests, reloads)."""
        with _OPEN_LOCK:
            old = _OPEN.pop(str(self.directory.resolve()), None)
        if old is not None:
            log.warning("spool %s reopened in the same process: closing the previous instance", self.directory)
            if old.on_takeover is not None:
                old.on_takeover()
            old.close()

    def _gateway_id(self) -> str:
        path = self.directory / "gateway-id"
        if path.exists():
            text = path.read_text().strip()
            if text:
                return text
        gid = uuid.uuid4().hex[:16]
        path.write_text(gid + "\n")
        return gid

    def _remove_leftovers(self) -> None:
        """Remove the temporary files of an atomic write (a new segment, damaged bytes) that a stop cut short:
        recovery writes them again, and they are counted in no limit, so each such stop would leave a copy."""
        for directory in (self.directory, self.directory / _DAMAGED):
            for leftover in directory.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)

    def _unreported(self) -> list[str]:
        try:
            text = (self.directory / _REPORTS).read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line]

    def _report(self, message: str) -> None:
        """Note a recovery problem, durably before recovery acts on it (best effort: on a full disk it is
        only in memory and the log, as before)."""
        log.error("%s", message)
        if message in self.recovery_problems:
            return  # found again by a recovery that a stop interrupted
        self.recovery_problems.append(message)
        try:
            write_atomic(self.directory / _REPORTS, "".join(f"{m}\n" for m in self.recovery_problems).encode())
        except OSError as exc:
            log.error("spool %s: could not keep the recovery problem until it is audited: %s", self.directory, exc)

    def recovery_reported(self, problems: list[str]) -> None:
        """These recovery problems are audited (in the spool, durably): a restart does not report them again."""
        rest = [m for m in self.recovery_problems if m not in problems]
        if rest:
            write_atomic(self.directory / _REPORTS, "".join(f"{m}\n" for m in rest).encode())
        else:
            (self.directory / _REPORTS).unlink(missing_ok=True)
            fsync_dir(self.directory)
        self.recovery_problems = rest

    def _recover(self) -> list[Segment]:
        segments: list[Segment] = []
        paths = sorted(self.directory.glob("*" + _SUFFIX))
        index = 0
        while index < len(paths):
            path = paths[index]
            index += 1
            try:
                first = int(path.stem)
            except ValueError:
                continue
            data = path.read_bytes()
            size, last, problem = _scan(data, first)
            if problem:
                found = _resync(data, size, last)
                if found is None:
                    message = f"spool segment {path.name}: {problem}; cut {len(data) - size} bytes after record {last}"
                else:
                    pos, seq = found
                    kept = self.directory / f"{seq:020d}{_SUFFIX}"
                    if seq == last + 1:
                        lost = f"{pos - size} bytes that are no record are"
                    else:
                        lost = f"record {last + 1} is" if seq == last + 2 else f"records {last + 1} to {seq - 1} are"
                    message = (
                        f"spool segment {path.name}: {problem}; {lost} damaged and lost"
                        + (f" (the {pos - size} bytes are kept in {_DAMAGED}/{path.name}.{size})" if pos > size else "")
                        + f"; the valid records that follow, from {seq} on, are kept in {kept.name}"
                    )
                    self._report(message)
                    self._split(path, data, size, found, kept)
                    if kept == path:
                        # Bytes before the segment's first record: the segment now starts at that record.
                        index -= 1
                        continue
                    if kept not in paths[index:]:
                        paths.insert(index, kept)  # checked in turn: it may be damaged further on
                self._report(message)
                with open(path, "r+b") as fh:
                    fh.truncate(size)
                    os.fsync(fh.fileno())
            if segments and first <= segments[-1].last_seq:
                raise RecordingError(f"spool segment {path.name} overlaps the previous segment; fix {self.directory}")
            self._floor_seq = max(self._floor_seq, last + 1)
            if size == 0:
                path.unlink()  # the floor file keeps its sequence number
                continue
            segments.append(Segment(first, path, size, last, sealed=True))
        return segments

    def _split(self, path: Path, data: bytes, size: int, found: tuple[int, int], kept: Path) -> None:
        """Move the valid records after a damaged span of ``path`` to the segment ``kept`` (named after their
        first sequence number, so numbering stays in order and the damaged numbers stay unused), and the
        damaged bytes to ``damaged/``. Written before ``path`` is cut: a crash in between finds the same
        damage again and writes the same files."""
        pos, _ = found
        if pos > size:
            (self.directory / _DAMAGED).mkdir(exist_ok=True)
            write_atomic(self.directory / _DAMAGED / f"{path.name}.{size}", data[size:pos])
        write_atomic(kept, data[pos:])

    # -- writing -------------------------------------------------------------------------------

    @property
    def active_size(self) -> int:
        return self._active.size if self._active is not None else -1

    @property
    def broken(self) -> str:
        return self._failed

    def start_segment(self, first: tuple[int, bytes] | None = None) -> Segment:
        """Start a new active segment, optionally with ``first`` (type, body) as its first record.

        Atomic: if the first record cannot be written the new file is removed and the previous
        segment stays active.
        """
        with self._lock:
            self._check_usable()
            seq = self.written_seq + 1
            path = self.directory / f"{seq:020d}{_SUFFIX}"
            if self._floor.position != seq:
                self._floor.commit(seq)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            segment = Segment(seq, path, 0, seq - 1)
            if first is not None:
                data = encode_record(seq, first[0], first[1])
                try:
                    if self.total_bytes + len(data) > self.max_bytes + self.reserve_bytes:
                        raise SpoolFull(f"spool {self.directory} is full")
                    written = os.write(fd, data)
                    if written != len(data):
                        raise OSError(errno.ENOSPC, "short write")
                except OSError:
                    os.close(fd)
                    path.unlink(missing_ok=True)
                    raise
                segment.size, segment.last_seq = len(data), seq
                self.total_bytes += len(data)
                self.written_seq = seq
            if self._active is not None:
                self._active.sealed = True
                self._pending_fds.append(self._fd)
            self._active, self._fd = segment, fd
            self.segments = [*self.segments, segment]
            self._dir_dirty = True
        if self._sync_elsewhere:
            # Rare (a new segment every segment_bytes): seal the previous one here and now rather
            # than keep its descriptor open for a sync thread that does not run in this process.
            self.sync()
        return segment

    def fail(self, message: str) -> None:
        """Records may not be durable (another process's ``fdatasync`` failed): refuse new ones."""
        if not self._failed:
            self._failed = message
            log.critical("spool %s: %s; refusing new events from now on", self.directory, message)

    def _check_usable(self) -> None:
        if self._closed:
            raise RecordingError(f"spool {self.directory} is closed")
        if self._failed:
            raise RecordingError(f"spool {self.directory} cannot make events durable: {self._failed}")

    def append(self, rtype: int, body: bytes, *, reserve: bool = False) -> int:
        """Append one record; return its sequence number once it is in the page cache.

        Raises :class:`SpoolFull` beyond ``max_bytes`` (``reserve`` allows ``reserve_bytes``
        more, for the records that close a session) and :class:`RecordingError` when the write
        fails; a failed write leaves the spool exactly as it was.
        """
        with self._lock:
            if self._failed or self._closed or self._active is None:
                self._check_usable()
                raise RecordingError(f"spool {self.directory} has no active segment")
            seq = self.written_seq + 1
            length = len(body)
            if length > MAX_BODY:
                raise RecordingError(f"event of {length} bytes is larger than the spool's limit of {MAX_BODY}")
            limit = self.max_bytes + (self.reserve_bytes if reserve else 0)
            if self.total_bytes + length + HEADER_SIZE > limit:
                raise SpoolFull(
                    f"the recording spool {self.directory} is full ({self.total_bytes} of {self.max_bytes} bytes): "
                    "a recording sink is behind or unreachable"
                )
            data = _HEADER.pack(_MAGIC, rtype, length, seq, _crc(rtype, length, seq, body)) + body
            segment = self._active
            try:
                written = os.write(self._fd, data)
            except OSError as exc:
                self._undo(segment)
                raise RecordingError(f"spool write failed ({exc.strerror or exc})") from exc
            if written != len(data):
                self._undo(segment)
                raise RecordingError(f"spool write failed (short write: {written} of {len(data)} bytes, disk full?)")
            segment.size += written
            segment.last_seq = seq
            self.total_bytes += written
            self.written_seq = seq
            return seq

    def _undo(self, segment: Segment) -> None:
        try:
            os.ftruncate(self._fd, segment.size)
        except OSError as exc:
            self._failed = f"could not roll back a failed write: {exc}"
            log.critical("spool %s: %s", self.directory, self._failed)

    # -- durability ----------------------------------------------------------------------------

    def sync_elsewhere(self) -> None:
        """Another process runs the periodic ``fdatasync`` (:class:`GroupCommit`); no thread here.

        :meth:`sync` (strict events) still runs here, and a rotated segment is synced and closed
        when the next one starts.
        """
        self._sync_elsewhere = True
        if self._pending_fds or self._dir_dirty:
            self.sync()

    def start_sync_thread(self) -> None:
        if self._sync_thread is not None or self._sync_elsewhere or self.fsync_interval <= 0:
            return
        self._sync_thread = threading.Thread(target=self._sync_loop, name="lictor-spool-fsync", daemon=True)
        self._sync_thread.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval):
            if self.written_seq > self.synced_seq or self._pending_fds:
                try:
                    self.sync()
                except RecordingError:
                    pass  # already logged and marked: appends now refuse

    def sync(self, upto: int | None = None) -> None:
        """Make every record appended so far durable (fdatasync); group commit for waiters."""
        with self._sync_lock:
            if upto is not None and self.synced_seq >= upto and not self._failed:
                return
            with self._lock:
                self._check_usable()
                target = self.written_seq
                pending, self._pending_fds = self._pending_fds, []
                fd = self._fd
                dirty, self._dir_dirty = self._dir_dirty, False
            try:
                for old in pending:
                    os.fdatasync(old)
                    os.close(old)
                if fd >= 0:
                    os.fdatasync(fd)
                if dirty:
                    fsync_dir(self.directory)
            except OSError as exc:
                self._failed = f"fdatasync failed: {exc}"
                log.critical("spool %s: %s; refusing new events from now on", self.directory, self._failed)
                raise RecordingError(f"spool {self.directory} cannot make events durable: {exc}") from exc
            self.synced_seq = max(self.synced_seq, target)

    # -- reading and releasing ---------------------------------------------------------------------

    def refresh(self) -> None:
        """Readers call this before reading; the writing process knows its segments already."""

    def release(self, upto: int) -> int:
        """Delete sealed segments whose records are all at or below ``upto``; return bytes freed."""
        with self._lock:
            keep: list[Segment] = []
            gone: list[Segment] = []
            for segment in self.segments:
                if segment.sealed and segment is not self._active and segment.last_seq <= upto:
                    gone.append(segment)
                else:
                    keep.append(segment)
            if not gone:
                return 0
            self.segments = keep
            freed = sum(s.size for s in gone)
            self.total_bytes -= freed
        for segment in gone:
            segment.path.unlink(missing_ok=True)
        return freed

    def records(self, after: int = 0) -> Iterator[Record]:
        """Every published record with a sequence number above ``after``, in order."""
        reader = SpoolReader(self, after)
        try:
            while True:
                batch = reader.read()
                if not batch:
                    return
                yield from batch
        finally:
            reader.close()

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._sync_thread is not None and self._sync_thread is not threading.current_thread():
            self._sync_thread.join(timeout=5)
        try:
            if not self._failed and self._active is not None:
                self.sync()
        except RecordingError:
            pass
        with self._lock:
            self._closed = True
            for fd in [*self._pending_fds, self._fd]:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._pending_fds, self._fd = [], -1
            if self._active is not None:
                self._active.sealed = True
        self._floor.close()
        try:
            os.close(self._lock_fd)
        except OSError:
            pass
        with _OPEN_LOCK:
            key = str(self.directory.resolve())
            if _OPEN.get(key) is self:
                del _OPEN[key]

    @property
    def closed(self) -> bool:
        return self._closed

    def __del__(self) -> None:
        # A gateway dropped without stop(): give its descriptors (and the directory lock) back.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for fd in [*self._pending_fds, self._fd, self._lock_fd]:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._floor.close()


def _first_record_complete(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            header = fh.read(HEADER_SIZE)
            if len(header) < HEADER_SIZE:
                return False
            length = _HEADER.unpack(header)[2]
            return bool(os.fstat(fh.fileno()).st_size >= HEADER_SIZE + int(length))
    except FileNotFoundError:
        return False


class SpoolWatch:
    """Wakes a thread of another process when the spool directory changes (Linux ``inotify``).

    The drain process's threads would otherwise poll the spool (hundreds of wake-ups a second on an
    idle gateway): with a watch they block while nothing is written. Events stay queued in the kernel
    until :meth:`clear`, so a write between :meth:`clear` and a look at the files is never missed: the
    next :meth:`wait` returns at once. :meth:`open` returns None where ``inotify`` is unavailable (the
    callers then poll, as before).
    """

    # IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    _MASK = 0x002 | 0x008 | 0x040 | 0x080 | 0x100 | 0x200

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, directory: Path) -> SpoolWatch | None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
            if fd < 0:
                return None
            if libc.inotify_add_watch(fd, os.fsencode(directory), cls._MASK) < 0:
                os.close(fd)
                return None
        except (OSError, AttributeError):
            return None
        return cls(fd)

    def clear(self) -> None:
        """Forget the changes seen so far."""
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> bool:
        """Block until the directory changed since the last :meth:`clear` (True) or ``timeout`` passed."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return bool(ready)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GroupCommit:
    """The periodic ``fdatasync`` of a spool written by another process (see :meth:`Spool.sync_elsewhere`).

    Every ``interval`` it syncs the newest segment file if it grew (the writer syncs a segment
    itself when it seals it), and, when the directory changed, every segment that grew and the
    directory. ``fdatasync`` works on any descriptor of the file: the pages the writer's
    ``os.write`` dirtied are flushed all the same. A failure is reported through
    ``on_failure`` (the writer then refuses new events, as its own sync thread would).

    With a :class:`SpoolWatch`, a round that found nothing grown is followed by a wait for the next
    change instead of the next tick, so an idle gateway's spool costs no wake-ups; the first round
    after a change runs at once, so the loss window stays ``interval``. ``on_grow`` is called after
    each round that synced something (the drain process wakes its idle drainers with it).
    """

    def __init__(
        self,
        directory: Path,
        interval: float,
        on_failure: Callable[[str], None],
        watch: SpoolWatch | None = None,
        on_grow: Callable[[], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.interval = interval
        self.on_failure = on_failure
        self.watch = watch
        self.on_grow = on_grow
        self._fds: dict[str, tuple[int, int]] = {}  # name -> (descriptor, size synced)
        self._newest: str | None = None
        self._dir_mtime = -1
        self._ticks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed = ""

    def start(self) -> None:
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lictor-spool-fsync", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        grew = True
        while not self.failed:
            if grew or self.watch is None:
                if self._stop.wait(self.interval):
                    break
            elif not self.watch.wait(0.5):  # idle: sleep until the spool changes, looking at _stop now and then
                if self._stop.is_set():
                    break
                continue
            if self.watch is not None:
                self.watch.clear()  # before looking: a write from now on leaves a change to wait for
            grew = self.sync_once()
            if grew and self.on_grow is not None:
                self.on_grow()

    def sync_once(self) -> bool:
        """One round; True if a segment had grown (and was synced)."""
        # The writer syncs a segment itself when it seals it, so only the newest one needs this; the
        # directory is listed again only when it changed (a segment started or was released).
        grew = False
        try:
            mtime = os.stat(self.directory).st_mtime_ns
            self._ticks += 1
            # mtimes are coarse (two changes within one clock tick look like one): list anyway now and then.
            if mtime != self._dir_mtime or self._ticks >= 20:
                self._dir_mtime = mtime
                self._ticks = 0
                grew = self._rescan()
            if self._newest is not None:
                grew = self._sync_if_grown(self._newest) or grew
        except OSError as exc:
            self._fail(f"fdatasync failed: {exc}")
        return grew

    def _rescan(self) -> bool:
        names = {n for n in os.listdir(self.directory) if n.endswith(_SUFFIX)}
        for name in list(self._fds):
            if name not in names:
                fd, _ = self._fds.pop(name)
                os.close(fd)
        new = grew = False
        for name in sorted(names):
            if name not in self._fds:
                try:
                    fd = os.open(self.directory / name, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # released in between
                self._fds[name] = (fd, -1)
                new = True
            # every segment once (the newest is the writer's alone afterwards)
            grew = self._sync_if_grown(name) or grew
        self._newest = max(self._fds) if self._fds else None
        if new:
            fsync_dir(self.directory)
        return grew

    def _sync_if_grown(self, name: str) -> bool:
        fd, synced = self._fds[name]
        size = os.fstat(fd).st_size
        if size == synced:
            return False
        os.fdatasync(fd)
        self._fds[name] = (fd, size)
        return True

    def _fail(self, message: str) -> None:
        self.failed = message
        log.critical("spool %s: %s", self.directory, message)
        self.on_failure(message)

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        if not self.failed:
            self.sync_once()
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()


class SpoolView(_SegmentList):
    """The segments of a spool written by another process, for readers (the drain process).

    It never writes or deletes anything and takes no lock. :meth:`refresh` lists the directory:
    a segment counts once its first record (the carry record the writer starts it with) is
    complete, so a segment whose start failed and is being removed is never read; a segment is
    sealed, with its final size, once a newer one counts (the writer has stopped appending to it
    before it creates the next). The active segment's size is the file's size: a record still
    being written (or rolled back) is incomplete there and read again later.
    """

    def __init__(self, directory: Path, written_seq: int = 0) -> None:
        self.directory = Path(directory)
        # The writer's position when this view was made (only a sanity bound for committed offsets).
        self.written_seq = written_seq
        self.segments: list[Segment] = []
        self._known: dict[int, Segment] = {}
        self.refresh()

    def refresh(self) -> None:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            names = []
        firsts = sorted(int(n[: -len(_SUFFIX)]) for n in names if n.endswith(_SUFFIX) and n[: -len(_SUFFIX)].isdigit())
        segments: list[Segment] = []
        for first in firsts:
            segment = self._known.get(first)
            if segment is None:
                path = self.directory / f"{first:020d}{_SUFFIX}"
                if not _first_record_complete(path):
                    continue
                segment = Segment(first, path, 0, first - 1)
            segments.append(segment)
        for index, segment in enumerate(segments):
            if segment.sealed:
                continue
            try:
                size = os.stat(segment.path).st_size
            except FileNotFoundError:
                continue
            segment.size = size
            if index + 1 < len(segments):
                segment.last_seq = segments[index + 1].first_seq - 1  # numbering is gap-free
                segment.sealed = True
        self._known = {s.first_seq: s for s in segments}
        self.segments = segments


class SpoolReader:
    """Reads published records after a sequence number, segment by segment, from its own descriptors."""

    CHUNK = 1 << 20

    def __init__(self, spool: Spool | SpoolView, after: int) -> None:
        self.spool = spool
        self.position = after  # the last sequence number handed out
        self._segment: Segment | None = None
        self._fd = -1
        self._offset = 0
        self._buf = b""

    def _open(self, segment: Segment) -> None:
        self._close_fd()
        self._segment = segment
        self._fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
        self._offset = 0
        self._buf = b""

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def read(self, max_records: int = 4096, max_bytes: int = 4 << 20) -> list[Record]:
        """Up to ``max_records`` records (about ``max_bytes``) after :attr:`position`; [] when caught up."""
        out: list[Record] = []
        size = 0
        self.spool.refresh()
        while len(out) < max_records and size < max_bytes:
            if self._segment is None:
                segment = self.spool.segment_for(self.position + 1)
                if segment is None:
                    break
                self._open(segment)
            segment = self._segment
            assert segment is not None
            published = segment.size
            sealed = segment.sealed
            if self._offset + len(self._buf) < published:
                want = min(self.CHUNK, published - self._offset - len(self._buf))
                chunk = os.pread(self._fd, want, self._offset + len(self._buf))
                if not chunk:
                    raise CorruptSpool(f"spool segment {segment.path.name} is shorter than published")
                self._buf += chunk
            pos = 0
            progressed = False
            while len(out) < max_records and size < max_bytes:
                parsed = _parse(self._buf, pos, None)
                if parsed is None:
                    break
                record, pos = parsed
                progressed = True
                if record.seq <= self.position:
                    continue
                if record.seq != self.position + 1 and self.position >= segment.first_seq:
                    raise CorruptSpool(
                        f"spool segment {segment.path.name}: record {record.seq} follows {self.position}"
                    )
                out.append(record)
                size += len(record.body)
                self.position = record.seq
            self._offset += pos
            self._buf = self._buf[pos:]
            if progressed:
                continue
            if self._offset + len(self._buf) < published:
                continue  # a record larger than what is buffered: read more
            if sealed and self._offset >= segment.size:
                following = self.spool.next_segment(segment)
                if following is None:
                    break
                self._open(following)
                continue
            break
        if self._buf and self._segment is not None and not self._segment.sealed:
            # An incomplete record at the end of the active segment: read it again next time (in
            # another process a failed write may still be rolled back and its bytes replaced).
            self._buf = b""
        return out

    def close(self) -> None:
        self._close_fd()
        self._segment = None


class Offset:
    """A sink's committed sequence number, updated in place with two checksummed slots.

    Each commit overwrites the older slot (generation, position, crc) and fdatasyncs, so a
    crash mid-write leaves the other slot intact, and an update needs no new disk blocks (it
    works on a full disk, which is exactly when a sink must be able to commit and free space).
    """

    _SLOT = struct.Struct("<QQI")
    _SLOT_SIZE = 32

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        data = os.pread(self._fd, 2 * self._SLOT_SIZE, 0)
        self.generation, self.position = self._newest(data)
        self.exists = self.generation > 0
        if len(data) < 2 * self._SLOT_SIZE:
            os.pwrite(self._fd, b"\0" * (2 * self._SLOT_SIZE - len(data)), len(data))
            os.fsync(self._fd)

    @classmethod
    def _newest(cls, data: bytes) -> tuple[int, int]:
        """(generation, position) of the newer valid slot in ``data``; (0, 0) when neither is valid."""
        best = (0, 0)
        for slot in range(2):
            raw = data[slot * cls._SLOT_SIZE : slot * cls._SLOT_SIZE + cls._SLOT.size]
            if len(raw) < cls._SLOT.size:
                continue
            gen, pos, crc = cls._SLOT.unpack(raw)
            if gen and zlib.crc32(raw[:16]) == crc and gen > best[0]:
                best = (gen, pos)
        return best

    @classmethod
    def peek(cls, path: Path) -> int | None:
        """The committed position stored at ``path``, read without opening it for writing (None if none)."""
        try:
            data = path.read_bytes()[: 2 * cls._SLOT_SIZE]
        except FileNotFoundError:
            return None
        generation, position = cls._newest(data)
        return position if generation else None

    def commit(self, position: int) -> None:
        gen = self.generation + 1
        raw = struct.pack("<QQ", gen, position)
        slot = self._SLOT.pack(gen, position, zlib.crc32(raw))
        os.pwrite(self._fd, slot, (gen % 2) * self._SLOT_SIZE)
        os.fdatasync(self._fd)
        self.generation, self.position, self.exists = gen, position, True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()
