"""The recording spool: records, segments, recovery after torn writes, full disks, offsets."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lictor.recorder import Offset, RecordingError, Spool, SpoolFull, SpoolReader, SpoolView
from lictor.recorder._spool import AUDIT, CARRY, SESSION, encode_record

from tests.conftest import require


def _spool(path: Path, **kw: int | float) -> Spool:
    spool = Spool(path, **kw)  # type: ignore[arg-type]
    spool.start_segment()
    return spool


def _bodies(spool: Spool, after: int = 0) -> list[tuple[int, int, bytes]]:
    return [(r.seq, r.type, r.body) for r in spool.records(after)]


def test_append_read_in_order_across_segments(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool", segment_bytes=4096)
    expected = []
    for i in range(500):
        body = b'{"i":%d,"pad":"%s"}' % (i, b"x" * (i % 50))
        if spool.active_size >= spool.segment_bytes:
            spool.start_segment((CARRY, b'{"sessions":{}}'))
            expected.append(CARRY)
        seq = spool.append(SESSION if i % 2 else AUDIT, body)
        expected.append(seq)
    assert len(spool.segments) > 5
    records = list(spool.records())
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert [r.body for r in records if r.type != CARRY] == [
        b'{"i":%d,"pad":"%s"}' % (i, b"x" * (i % 50)) for i in range(500)
    ]
    # reading from the middle starts right after the given position
    assert next(r.seq for r in spool.records(250)) == 251
    spool.close()


def test_torn_tail_is_cut_on_reopen_and_sequence_continues(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool")
    for i in range(10):
        spool.append(SESSION, b'{"i":%d}' % i)
    path = spool.segments[-1].path
    spool.close()
    whole = encode_record(11, SESSION, b'{"i":10,"never":"finished"}')
    with open(path, "ab") as fh:
        fh.write(whole[: len(whole) // 2])  # a write the machine did not finish
    spool = Spool(tmp_path / "spool")
    assert spool.recovery_problems and "incomplete record" in spool.recovery_problems[0]
    assert path.stat().st_size == spool.segments[0].size
    spool.start_segment()
    assert spool.append(SESSION, b'{"i":"next"}') == 11
    assert [r.body for r in spool.records()][-2:] == [b'{"i":9}', b'{"i":"next"}']
    spool.close()


def test_flipped_byte_is_detected_by_the_checksum(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool")
    for i in range(5):
        spool.append(SESSION, b'{"value":"%d"}' % i)
    path = spool.segments[-1].path
    spool.close()
    data = bytearray(path.read_bytes())
    data[data.index(b'"value":"3"') + 9] ^= 0x01
    path.write_bytes(bytes(data))
    spool = Spool(tmp_path / "spool")
    [problem] = spool.recovery_problems
    assert "checksum" in problem and "record 4 is damaged and lost" in problem, problem
    # valid records after it mean it was damaged in place, not torn: only it is lost, and reported
    assert [r.seq for r in spool.records()] == [1, 2, 3, 5]
    assert [p.name for p in (tmp_path / "spool" / "damaged").iterdir()] == [f"{path.name}.{spool.segments[0].size}"]
    spool.start_segment()
    assert spool.append(SESSION, b'{"value":"next"}') == 6
    spool.close()


def test_recovery_from_damage_interrupted_midway_gives_the_same_spool(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool")
    for i in range(8):
        spool.append(SESSION, b'{"value":"%d"}' % i)
    path = spool.segments[-1].path
    spool.close()
    data = bytearray(path.read_bytes())
    for value in (b"2", b"5"):  # two damaged records, each followed by valid ones
        data[data.index(b'"value":"%s"' % value) + 9] ^= 0x01
    path.write_bytes(bytes(data))
    spool = Spool(tmp_path / "spool")
    assert len(spool.recovery_problems) == 2
    assert [r.seq for r in spool.records()] == [1, 2, 4, 5, 7, 8]
    spool.close()
    path.write_bytes(bytes(data))  # as if the machine stopped before the damaged segment was cut
    spool = Spool(tmp_path / "spool")
    assert [r.seq for r in spool.records()] == [1, 2, 4, 5, 7, 8]
    reader = SpoolView(tmp_path / "spool")  # the drain process's view reads across the lost numbers
    assert [r.seq for r in SpoolReader(reader, 1).read()] == [2, 4, 5, 7, 8]
    spool.close()


def test_a_stray_checksummed_record_in_a_damaged_span_is_not_taken_for_the_next_one(tmp_path: Path) -> None:
    # Recovery resynchronised on any record with a valid checksum numbered above the last good one: a stray one
    # in the damaged bytes (another spool's block, or made up) was kept and sent to the sinks as real, numbering
    # went on from it, and the real records after it, numbered below it, were cut.
    spool = _spool(tmp_path / "spool")
    for i in range(10):
        spool.append(SESSION, b'{"value":"%d"}' % i)
    path = spool.segments[-1].path
    spool.close()
    for stray in (10**6, 2**64 - 1):
        shutil.rmtree(tmp_path / "damaged-copy", ignore_errors=True)
        shutil.copytree(tmp_path / "spool", tmp_path / "damaged-copy")
        copy = tmp_path / "damaged-copy" / path.name
        real = encode_record(5, SESSION, b'{"value":"4"}')
        copy.write_bytes(path.read_bytes().replace(real, encode_record(stray, AUDIT, b'{"value":"X"}')))
        reopened = Spool(tmp_path / "damaged-copy")
        [problem] = reopened.recovery_problems
        assert "record 5 is damaged and lost" in problem and "from 6 on" in problem, problem
        assert [r.body for r in reopened.records()] == [b'{"value":"%d"}' % i for i in range(10) if i != 4]
        reopened.start_segment()
        assert reopened.append(SESSION, b'{"value":"next"}') == 11
        reopened.close()


def test_recovery_killed_midway_reports_again_what_it_had_already_cut(tmp_path: Path) -> None:
    # Recovery cut the first damaged segment, then the process was killed: the next recovery found only the
    # second one, and the loss in the first was never reported (nor audited).
    spool = _spool(tmp_path / "spool", segment_bytes=200)
    for i in range(20):
        if spool.active_size >= spool.segment_bytes:
            spool.start_segment((CARRY, b"{}"))
        spool.append(SESSION, b'{"value":"%02d"}' % i)
    spool.close()
    for value in (b"03", b"15"):  # in two segments
        [path] = [p for p in (tmp_path / "spool").glob("*.seg") if b'"value":"%s"' % value in p.read_bytes()]
        data = path.read_bytes()
        path.write_bytes(data.replace(b'"value":"%s"' % value, b'"value":"%s"' % value[::-1]))
    # die (SIGKILL) after the first segment is cut and synced, before the second one is looked at
    child = (
        "import os, signal, sys; from pathlib import Path; from lictor.recorder import Spool\n"
        "calls = []; real = os.fsync\n"
        "def fsync(fd):\n"
        "    real(fd); calls.append(fd)\n"
        "    if len(calls) == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.fsync = fsync; Spool(Path(sys.argv[1]))\n"
    )
    killed = subprocess.run([sys.executable, "-c", child, str(tmp_path / "spool")], capture_output=True, check=False)
    assert killed.returncode == -9, killed.stderr.decode()
    spool = Spool(tmp_path / "spool")
    assert len(spool.recovery_problems) == 2, spool.recovery_problems
    assert "record 4 is damaged" in spool.recovery_problems[0], spool.recovery_problems
    spool.recovery_reported(spool.recovery_problems[:1])  # audited: the next start does not report it again
    spool.close()
    spool = Spool(tmp_path / "spool")
    [problem] = spool.recovery_problems
    assert "record 4 is damaged" not in problem, problem
    spool.close()


def test_recovery_killed_while_writing_a_segment_leaves_no_copy_behind(tmp_path: Path) -> None:
    # A recovery killed while writing the segment of the records after a damaged one left the temporary file
    # behind, outside every limit: each restart stopped there kept one more copy of them.
    spool = _spool(tmp_path / "spool")
    for i in range(50):
        spool.append(SESSION, b'{"value":"%02d"}' % i)
    path = spool.segments[-1].path
    spool.close()
    path.write_bytes(path.read_bytes().replace(b'"value":"03"', b'"value":"30"'))
    child = (
        "import os, signal, sys; from pathlib import Path; from lictor.recorder import Spool\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    if str(dst).endswith('.seg'): os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(src, dst)\n"
        "os.replace = replace; Spool(Path(sys.argv[1]))\n"
    )
    for _ in range(2):
        killed = subprocess.run(
            [sys.executable, "-c", child, str(tmp_path / "spool")], capture_output=True, check=False
        )
        assert killed.returncode == -9, killed.stderr.decode()
    assert list((tmp_path / "spool").glob(".*.tmp"))  # what the killed recoveries were writing
    spool = Spool(tmp_path / "spool")
    assert [r.seq for r in spool.records()] == [s for s in range(1, 51) if s != 4]
    assert not list((tmp_path / "spool").glob(".*.tmp")) and not list((tmp_path / "spool").glob("damaged/.*.tmp"))
    spool.close()


def test_bytes_before_a_segments_first_record_are_set_aside_not_the_records(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool")
    for i in range(3):
        spool.append(SESSION, b'{"value":"%d"}' % i)
    path = spool.segments[-1].path
    spool.close()
    path.write_bytes(b"\0" * 40 + path.read_bytes())
    spool = Spool(tmp_path / "spool")
    [problem] = spool.recovery_problems
    assert "40 bytes that are no record are damaged and lost" in problem, problem
    assert [r.seq for r in spool.records()] == [1, 2, 3]
    spool.close()


def test_spool_full_refuses_without_changing_anything(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool", max_bytes=2000, segment_bytes=500, reserve_bytes=200)
    acknowledged = []
    with pytest.raises(SpoolFull, match="full"):
        for i in range(1000):
            if spool.active_size >= spool.segment_bytes:
                spool.start_segment()
            acknowledged.append(spool.append(SESSION, b'{"i":%d,"pad":"0123456789012345678901234567890"}' % i))
    before = (spool.written_seq, spool.total_bytes)
    with pytest.raises(SpoolFull):
        spool.append(SESSION, b"{}" * 40)
    assert (spool.written_seq, spool.total_bytes) == before
    # the reserve lets the records that close a session through
    closing = spool.append(SESSION, b'{"kind":"session.end"}', reserve=True)
    assert closing == before[0] + 1
    # releasing what every sink committed makes room again
    freed = spool.release(acknowledged[-1])
    assert freed > 0
    assert spool.append(SESSION, b'{"after":"release"}') == closing + 1
    assert [r.seq for r in spool.records()][-1] == closing + 1
    spool.close()


def test_release_keeps_the_active_and_uncommitted_segments(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool", segment_bytes=200)
    for i in range(40):
        if spool.active_size >= spool.segment_bytes:
            spool.start_segment()
        spool.append(SESSION, b'{"i":%d,"pad":"........................"}' % i)
    segments = list(spool.segments)
    middle = segments[len(segments) // 2]
    spool.release(middle.last_seq - 1)  # the middle segment is not fully committed
    assert spool.segments[0] is middle
    assert all(s.path.exists() for s in spool.segments)
    assert not segments[0].path.exists()
    spool.release(10**9)
    assert spool.segments == [segments[-1]]  # the active one stays: it carries the next sequence number
    assert spool.records(0).__next__().seq == segments[-1].first_seq
    spool.close()


def test_sequence_numbers_are_never_reused(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool")
    for _ in range(7):
        spool.append(SESSION, b"{}")
    spool.start_segment()  # empty active segment, previous one released
    spool.release(7)
    spool.close()
    for path in (tmp_path / "spool").glob("*.seg"):
        path.unlink()  # even with every segment gone
    spool = _spool(tmp_path / "spool")
    assert spool.append(SESSION, b"{}") == 8
    spool.close()


def test_offset_survives_a_torn_slot(tmp_path: Path) -> None:
    off = Offset(tmp_path / "sink.off")
    assert not off.exists and off.position == 0
    for pos in (5, 17, 42):
        off.commit(pos)
    off.close()
    again = Offset(tmp_path / "sink.off")
    assert again.position == 42 and again.exists
    again.close()
    data = bytearray((tmp_path / "sink.off").read_bytes())
    slot = (3 % 2) * 32  # generation 3 was written to slot 1
    data[slot + 9] ^= 0xFF  # tear the newest slot
    (tmp_path / "sink.off").write_bytes(bytes(data))
    torn = Offset(tmp_path / "sink.off")
    assert torn.position == 17  # the previous commit, never garbage
    torn.close()


def test_one_gateway_per_spool_directory(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool")
    code = (
        "import sys\nfrom pathlib import Path\nfrom lictor.recorder import Spool, RecordingError\n"
        "try:\n    Spool(Path(sys.argv[1]))\nexcept RecordingError as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "spool")], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 3 and "in use by another gateway process" in proc.stdout
    # in the same process, a new instance takes over (the old one refuses from then on)
    second = _spool(tmp_path / "spool")
    with pytest.raises(RecordingError, match="closed"):
        spool.append(SESSION, b"{}")
    assert second.append(SESSION, b"{}") == 1
    second.close()


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    require(mounted.returncode == 0, f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_rolls_back_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "disk", "256k") as disk:
        spool = _spool(disk / "spool", max_bytes=10 << 20, segment_bytes=16 << 10)
        acknowledged: dict[int, bytes] = {}
        failures = 0
        for i in range(100_000):
            body = b'{"i":%d,"pad":"%s"}' % (i, b"z" * 300)
            try:
                if spool.active_size >= spool.segment_bytes:
                    try:
                        spool.start_segment((CARRY, b"{}"))
                    except OSError:
                        pass
                acknowledged[spool.append(SESSION, body)] = body
            except RecordingError as exc:
                assert "disk full" in str(exc) or "No space" in str(exc)
                failures += 1
                if failures > 20:
                    break
        assert failures > 20 and len(acknowledged) > 100
        spool.sync()
        got = {r.seq: r.body for r in spool.records() if r.type == SESSION}
        assert got == acknowledged  # every acknowledged record, nothing half-written
        spool.close()
        reopened = Spool(disk / "spool")
        assert reopened.recovery_problems == []  # failed writes were rolled back, not left torn
        assert all(r.type == CARRY for r in reopened.records(max(acknowledged)))
        # freeing space (every sink committed) lets new records in again
        reopened.release(reopened.written_seq)
        reopened.start_segment()
        assert reopened.append(SESSION, b'{"after":"space"}') > max(acknowledged)
        reopened.close()
    assert os.path.ismount(tmp_path / "disk") is False


def test_view_from_another_process_reads_what_is_published(tmp_path: Path) -> None:

    spool = Spool(tmp_path / "spool", segment_bytes=2048)
    spool.start_segment((CARRY, b'{"sessions":{}}'))
    view = SpoolView(tmp_path / "spool")
    reader = SpoolReader(view, 0)
    seen: list[int] = []
    written: list[int] = [1]
    for i in range(300):
        if spool.active_size >= spool.segment_bytes:
            written.append(spool.start_segment((CARRY, b'{"sessions":{}}')).first_seq)
        written.append(spool.append(SESSION, b'{"i":%d}' % i))
        if i % 7 == 0:
            seen += [r.seq for r in reader.read()]
    seen += [r.seq for r in reader.read()]
    assert seen == written and len(spool.segments) > 3

    # a record still being written (or about to be rolled back) is not read, and is read again later
    active = spool.segments[-1].path
    size = active.stat().st_size
    with open(active, "ab") as fh:
        fh.write(encode_record(spool.written_seq + 1, AUDIT, b'{"torn":true}')[:25])
    assert reader.read() == []
    os.truncate(active, size)
    seq = spool.append(AUDIT, b'{"whole":true}')
    assert [(r.seq, r.body) for r in reader.read()] == [(seq, b'{"whole":true}')]

    # a segment whose start has not completed (or failed) does not seal the active one
    (tmp_path / "spool" / f"{spool.written_seq + 1:020d}.seg").write_bytes(b"")
    seq = spool.append(AUDIT, b'{"after":1}')
    assert [r.seq for r in reader.read()] == [seq]
    assert not view.segments[-1].sealed and view.segments[-1].path == active
    (tmp_path / "spool" / f"{spool.written_seq:020d}.seg").unlink(missing_ok=True)

    # segments released by the writer disappear from the view; a new reader starts after them
    spool.release(seq)
    assert len(list((tmp_path / "spool").glob("*.seg"))) == 1
    view.refresh()
    assert len(view.segments) == 1 and view.first_seq() == spool.segments[0].first_seq
    later = SpoolReader(view, seen[-1])
    assert [r.seq for r in later.read()][-1] == seq
    reader.close()
    later.close()
    spool.close()


def test_group_commit_in_another_process_syncs_grown_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lictor.recorder._spool import GroupCommit

    spool = _spool(tmp_path / "spool", segment_bytes=4096)
    spool.sync_elsewhere()
    assert spool._sync_thread is None
    spool.start_sync_thread()  # a no-op once another process syncs
    assert spool._sync_thread is None
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    failures: list[str] = []
    group = GroupCommit(tmp_path / "spool", 0.005, failures.append)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    group.sync_once()
    assert len(synced) == 1  # the active segment, opened by the group commit itself
    group.sync_once()
    assert len(synced) == 1  # nothing grew: nothing to sync
    spool.append(SESSION, b'{"x":1}')
    group.sync_once()
    assert len(synced) == 2
    before = len(spool.segments)
    while len(spool.segments) == before:  # rotation syncs and closes the sealed segment in the writer
        spool.append(SESSION, b'{"pad":"%s"}' % (b"x" * 500))
        if spool.active_size >= spool.segment_bytes:
            spool.start_segment((CARRY, b'{"sessions":{}}'))
    assert spool._pending_fds == []
    synced.clear()
    group.sync_once()
    assert len(synced) == 2  # the sealed segment grew since the last round, and the new one
    spool.release(spool.written_seq)
    group.sync_once()
    assert set(group._fds) == {s.path.name for s in spool.segments}  # descriptors of deleted files closed
    assert failures == []

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    spool.append(SESSION, b'{"x":2}')
    monkeypatch.setattr(os, "fdatasync", broken)
    group.sync_once()
    assert failures and "Input/output error" in failures[0]
    spool.fail(failures[0])  # what the gateway does with the drain process's report
    with pytest.raises(RecordingError, match="Input/output error"):
        spool.append(SESSION, b'{"x":3}')
    monkeypatch.setattr(os, "fdatasync", real)
    group.stop()
    spool.close()


def test_an_idle_group_commit_waits_for_the_spool_to_change(tmp_path: Path) -> None:
    from lictor.recorder._spool import GroupCommit, SpoolWatch

    spool = _spool(tmp_path / "spool")
    spool.sync_elsewhere()
    spool.append(SESSION, b'{"x":1}')
    watch = SpoolWatch.open(tmp_path / "spool")
    assert watch is not None  # Linux
    grown: list[float] = []
    group = GroupCommit(tmp_path / "spool", 0.005, pytest.fail, watch=watch, on_grow=lambda: grown.append(1))
    rounds = 0
    real = group.sync_once

    def counted() -> bool:
        nonlocal rounds
        rounds += 1
        return real()

    group.sync_once = counted  # type: ignore[method-assign]
    group.start()
    time.sleep(0.5)
    assert grown == [1]  # the segment the writer had grown, once
    assert rounds <= 3, rounds  # then idle: no round every 5 ms (100 of them in 0.5 s)
    for i in range(3):
        spool.append(SESSION, b'{"x":%d}' % i)
        name = spool.segments[-1].path.name
        size = spool.active_size
        deadline = time.monotonic() + 5
        while group._fds.get(name, (0, -1))[1] != size:  # synced to the last byte, soon after the write
            assert time.monotonic() < deadline, (name, size, group._fds)
            time.sleep(0.005)
        time.sleep(0.2)
    assert len(grown) == 4
    group.stop()
    watch.close()
    spool.close()


def test_a_failed_group_commit_in_the_drain_process_breaks_the_spool(tmp_path: Path) -> None:
    import io

    from lictor.recorder._drainproc import DrainProcess

    spool = _spool(tmp_path / "spool")
    spool.append(SESSION, b'{"x":1}')
    proc = DrainProcess(None, spool, [], None)  # type: ignore[arg-type]
    proc._read(io.BytesIO(b'{"fsync_failed": "fdatasync failed: [Errno 5] Input/output error"}\n'))
    assert "Input/output error" in spool.broken
    with pytest.raises(RecordingError, match="drain process"):
        spool.append(SESSION, b'{"x":2}')
    spool.close()


def test_a_drain_retries_a_failing_sink_until_its_deadline(tmp_path: Path) -> None:
    # At shutdown the gateway drains for up to stop_timeout: one transient sink error (a timeout, a
    # reset connection) must be retried, not leave the rest of the spool behind.
    from lictor.recorder._sinks import Drainer, Retention

    class FlakySink:
        name = "flaky"
        retention = Retention()

        def __init__(self) -> None:
            self.failures_left = 2
            self.got: list[int] = []

        def prepare(self, committed: int) -> int:
            return committed

        def write(self, records: list) -> None:  # type: ignore[type-arg]
            if self.failures_left:
                self.failures_left -= 1
                raise ConnectionResetError("connection reset by peer")
            self.got.extend(r.seq for r in records)

        def apply_retention(self, now: float) -> int:
            return 0

        def close(self) -> None:
            pass

    spool = Spool(tmp_path / "spool")
    spool.start_segment()
    seqs = [spool.append(SESSION, b'{"n": %d}' % i) for i in range(20)]
    sink = FlakySink()
    drainer = Drainer(sink, spool, Offset(tmp_path / "flaky.off"))  # type: ignore[arg-type]
    assert drainer.drain(time.monotonic() + 10)
    assert sink.got[-20:] == seqs and len(set(sink.got)) == len(sink.got)  # all of them, once, in order
    assert drainer.failures == 2
    drainer.close()
    spool.close()


def test_readers_in_another_process_wait_for_the_local_store_of_a_running_gateway(tmp_path: Path) -> None:
    import threading

    from lictor.recorder import RecordingsConfig
    from lictor.recorder._recorder import wait_for_local_store

    state = tmp_path / "state"
    config = RecordingsConfig.from_section({}, state)
    spool = Spool(config.spool_dir)  # this process is "the gateway": spool/lock names its pid
    spool.start_segment()
    seqs = [spool.append(AUDIT, b'{"kind": "decision"}') for _ in range(5)]
    offset = Offset(config.offset_path("local"))
    offset.commit(seqs[1])  # the drain process is three events behind
    started = time.monotonic()
    assert not wait_for_local_store(config, timeout=0.3)
    assert time.monotonic() - started >= 0.3
    threading.Timer(0.2, offset.commit, [seqs[-1]]).start()
    assert wait_for_local_store(config, timeout=5)
    assert Offset.peek(config.offset_path("local")) == seqs[-1]
    spool.close()  # the gateway is gone: nothing to wait for
    (config.spool_dir / "lock").write_text("999999999\n")
    offset.commit(seqs[0])
    started = time.monotonic()
    assert wait_for_local_store(config, timeout=5) and time.monotonic() - started < 1
    offset.close()
