"""The copy engine's checkpoint rate and its writeback between checkpoints: checkpoints by
data copied and by time, each reported only after an fdatasync that followed every write
before it, writeback started for what was written, and the stall guard told between
checkpoints only while the syncs keep up."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from snapferry.activities.storage import liveness
from snapferry.activities.storage.copy_engine import Checkpoint, CopyEngine, writer

from .test_copy_engine import CHUNK, BytesReader, disk_with_holes, target_in

NEVER = 1e9


def test_checkpoints_count_data_copied_not_holes(tmp_path: Path) -> None:
    # 64 chunks, data in 8 of them: a checkpoint every 2 chunks of *data*, plus the last.
    extents = [(k * 8 * CHUNK, CHUNK) for k in range(8)]
    data = disk_with_holes(64 * CHUNK, extents)
    reports: list[int] = []
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=2 * CHUNK, checkpoint_seconds=NEVER)
    engine.copy(
        BytesReader(data, extents),
        target_in(tmp_path),
        on_checkpoint=lambda _c, d: reports.append(d),
    )
    assert reports[0] == 0  # the accepted start point
    assert len(reports) - 1 == 4 + 1  # 8 data chunks / 2, and the end
    assert reports[-1] == len(data)
    assert target_in(tmp_path).data.read_bytes() == data


def test_checkpoints_come_by_time_when_data_is_slow(tmp_path: Path) -> None:
    data = disk_with_holes(8 * CHUNK, [(0, 8 * CHUNK)])

    class SlowReader(BytesReader):
        def read_range(self, extent, guest_offset, view):  # type: ignore[no-untyped-def]
            time.sleep(0.03)
            super().read_range(extent, guest_offset, view)

    reports: list[int] = []
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=1 << 40, checkpoint_seconds=0.05)
    engine.copy(
        SlowReader(data, [(0, len(data))]),
        target_in(tmp_path),
        on_checkpoint=lambda _c, d: reports.append(d),
    )
    assert len(reports) - 1 >= 3  # by time (the size bound is never reached), and the end
    assert reports == sorted(reports) and reports[-1] == len(data)


def test_each_checkpoint_is_reported_after_an_fdatasync_that_followed_its_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durability contract under the staged pipeline: when a checkpoint at ``end`` is
    reported, an fdatasync of the data file began after every write below ``end`` had
    returned, and writeback was started for what was written."""
    data = disk_with_holes(32 * CHUNK, [(0, 32 * CHUNK)])
    events: list[tuple[str, int, int]] = []
    lock = threading.Lock()
    real_pwrite, real_fdatasync = os.pwrite, os.fdatasync
    real_sfr = writer.sync_file_range
    assert real_sfr is not None  # glibc has it
    target = target_in(tmp_path)

    def pwrite(fd: int, buf, offset: int) -> int:  # type: ignore[no-untyped-def]
        n = real_pwrite(fd, buf, offset)
        with lock:
            events.append(("write", offset, offset + n))
        return n

    def fdatasync(fd: int) -> None:
        with lock:
            events.append(("sync-start", fd, 0))
        real_fdatasync(fd)

    def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
        assert flags == writer.SYNC_FILE_RANGE_WRITE  # start writeback, never wait here
        with lock:
            events.append(("writeback", offset, offset + length))
        real_sfr(fd, offset, length, flags)  # type: ignore[misc]

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    monkeypatch.setattr(writer.os, "fdatasync", fdatasync)
    monkeypatch.setattr(writer, "sync_file_range", sync_file_range)
    monkeypatch.setattr(writer, "_WRITEBACK_BYTES", 4 * CHUNK)

    def on_checkpoint(_cp: Checkpoint, end: int) -> None:
        with lock:
            seen = list(events)
        syncs = [i for i, e in enumerate(seen) if e[0] == "sync-start"]
        if end == 0:
            return
        assert syncs, "reported before any fdatasync"
        last_sync = syncs[-1]
        covered = [e for e in seen[:last_sync] if e[0] == "write"]
        assert sum(b - a for _, a, b in covered if b <= end) >= end, (end, covered)
        assert all(a >= end or b <= end for _, a, b in covered)

    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=3 * CHUNK, checkpoint_seconds=NEVER)
    engine.copy(BytesReader(data, [(0, len(data))]), target, on_checkpoint=on_checkpoint)
    started = sorted((a, b) for kind, a, b in events if kind == "writeback")
    assert started and started[0][0] == 0
    assert all(b - a >= 4 * CHUNK for a, b in started)  # batched, not one call per chunk
    assert target.data.read_bytes() == data


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EIO])
def test_writeback_refused_is_only_a_hint_an_io_error_stops_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    calls: list[int] = []

    def refuse(_fd: int, offset: int, _length: int, _flags: int) -> None:
        calls.append(offset)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(writer, "sync_file_range", refuse)
    monkeypatch.setattr(writer, "_WRITEBACK_BYTES", CHUNK)
    data = disk_with_holes(16 * CHUNK, [(0, 16 * CHUNK)])
    engine = CopyEngine(chunk_size=CHUNK)
    target = target_in(tmp_path)
    if code == errno.EIO:
        with pytest.raises(OSError) as err:
            engine.copy(BytesReader(data, [(0, len(data))]), target)
        assert err.value.errno == errno.EIO
    else:
        engine.copy(BytesReader(data, [(0, len(data))]), target)
        assert len(calls) == 1  # refused once, then not asked again
        assert target.data.read_bytes() == data


def test_the_stall_guard_hears_from_the_copy_between_checkpoints_only_while_syncs_keep_up(
    tmp_path: Path,
) -> None:
    data = disk_with_holes(32 * CHUNK, [(0, 32 * CHUNK)])
    reader = BytesReader(data, [(0, len(data))])

    # Syncs keep up (one checkpoint, the last): heard from chunk by chunk.
    alive: list[float] = []
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=1 << 40, checkpoint_seconds=NEVER)
    with liveness.reporting_to(lambda: alive.append(time.monotonic())):
        engine.copy(reader, target_in(tmp_path / "a"))
    assert len(alive) == 32

    # The first sync hangs (a stuck flush) while later checkpoints are asked for: once a
    # second one waits behind it, the copy stops vouching for itself; only reports count.
    hung: list[int] = []

    def on_checkpoint(_cp: Checkpoint, end: int) -> None:
        if end and not hung:
            hung.append(len(alive))
            time.sleep(0.2)
            hung.append(len(alive))

    alive.clear()
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=CHUNK, checkpoint_seconds=NEVER)
    with liveness.reporting_to(lambda: alive.append(time.monotonic())):
        engine.copy(reader, target_in(tmp_path / "b"), on_checkpoint=on_checkpoint)
    assert hung[1] <= 2, hung  # at most the chunks before the second checkpoint was due
