"""The copy engine against real files: sparse skipping, checksums, resume, cancel."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activities.errors import BackupCancelled, BackupCorrupt
from activities.storage import checksum
from activities.storage.copy_engine import Checkpoint, CopyEngine, CopyTarget, verify_copy
from activities.storage.reader import DataExtent

CHUNK = 64 * 1024


class BytesReader:
    """A reader over an in-memory disk with declared data extents (holes read as zeros)."""

    def __init__(self, data: bytes, extents: list[tuple[int, int]]) -> None:
        self.data = data
        self.virtual_size = len(data)
        self._extents = [
            DataExtent(start=s, length=n, path="mem", host_offset=s) for s, n in extents
        ]
        self.reads = 0

    def data_extents(self) -> list[DataExtent]:
        return self._extents

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        view[:] = self.data[guest_offset : guest_offset + len(view)]
        self.reads += len(view)

    def close(self) -> None:
        pass


def disk_with_holes(size: int, extents: list[tuple[int, int]], seed: int = 1) -> bytes:
    buf = bytearray(size)
    rnd = __import__("random").Random(seed)
    for s, n in extents:
        buf[s : s + n] = rnd.randbytes(n)
    return bytes(buf)


def target_in(tmp: Path) -> CopyTarget:
    return CopyTarget(data=tmp / "img.raw.partial", digests=tmp / "img.chunks.partial")


def test_copy_equals_source_skips_holes_and_stays_sparse(tmp_path: Path) -> None:
    size = 40 * CHUNK
    extents = [(3 * CHUNK + 100, 2 * CHUNK), (30 * CHUNK, CHUNK // 2)]
    data = disk_with_holes(size, extents)
    reader = BytesReader(data, extents)
    out = CopyEngine(chunk_size=CHUNK).copy(reader, target_in(tmp_path))
    written = (tmp_path / "img.raw.partial").read_bytes()
    assert written == data
    assert reader.reads == sum(n for _, n in extents)  # holes never read
    assert out.bytes_copied == sum(n for _, n in extents)
    assert out.checksum == checksum.file_checksum(tmp_path / "img.raw.partial", CHUNK)[0]
    # Sparse: allocated blocks cover the data chunks only, far below the virtual size.
    assert os.stat(tmp_path / "img.raw.partial").st_blocks * 512 <= 5 * CHUNK
    digests = (tmp_path / "img.chunks.partial").read_text().split()
    assert len(digests) == 40
    assert digests[0] == checksum.zero_digest(CHUNK)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(min_value=1, max_value=12 * CHUNK + 999),
    cuts=st.lists(st.integers(min_value=0, max_value=12 * CHUNK + 999), max_size=8),
    stop_after=st.integers(min_value=0, max_value=13),
)
def test_resume_after_any_checkpoint_gives_the_same_bytes_and_checksum(
    tmp_path_factory: pytest.TempPathFactory, size: int, cuts: list[int], stop_after: int
) -> None:
    tmp = tmp_path_factory.mktemp("resume")
    points = sorted({min(c, size) for c in cuts} | {0, size})
    extents = [
        (a, b - a)
        for i, (a, b) in enumerate(zip(points, points[1:], strict=False))
        if i % 2 == 0 and b > a
    ]
    data = disk_with_holes(size, extents)
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=CHUNK)
    checkpoints: list[Checkpoint] = []

    class Crash(Exception):
        pass

    def crash_after(cp: Checkpoint, done: int) -> None:
        checkpoints.append(cp)
        if len(checkpoints) > stop_after:
            raise Crash

    target = target_in(tmp)
    with contextlib.suppress(Crash):
        engine.copy(BytesReader(data, extents), target, on_checkpoint=crash_after)
    # Garbage past the checkpoint must not survive the resume.
    with open(target.data, "r+b") as f:
        f.seek(0, 2)
        f.write(b"\xff" * 1000)
    resume = checkpoints[-1] if checkpoints else None
    out = engine.copy(BytesReader(data, extents), target, resume=resume)
    assert target.data.read_bytes() == data
    assert out.checksum == checksum.file_checksum(target.data, CHUNK)[0]
    if resume is not None and resume.chunks_done < out.chunks:
        assert out.resumed_from == resume.chunks_done * CHUNK


def test_a_checkpoint_that_does_not_match_its_files_is_not_trusted(tmp_path: Path) -> None:
    data = disk_with_holes(8 * CHUNK, [(0, 8 * CHUNK)])
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=CHUNK)
    bogus = Checkpoint(chunks_done=4, state="00" * 32, chunk_size=CHUNK)
    out = engine.copy(BytesReader(data, [(0, 8 * CHUNK)]), target_in(tmp_path), resume=bogus)
    assert out.resumed_from == 0
    assert target_in(tmp_path).data.read_bytes() == data


def test_cancel_stops_within_a_chunk(tmp_path: Path) -> None:
    data = disk_with_holes(8 * CHUNK, [(0, 8 * CHUNK)])
    reader = BytesReader(data, [(0, 8 * CHUNK)])
    calls = iter(range(100))
    with pytest.raises(BackupCancelled):
        CopyEngine(chunk_size=CHUNK).copy(
            reader, target_in(tmp_path), should_stop=lambda: next(calls) >= 3
        )
    assert reader.reads == 3 * CHUNK


def test_verify_catches_a_flipped_byte(tmp_path: Path) -> None:
    data = disk_with_holes(4 * CHUNK, [(0, 4 * CHUNK)])
    target = target_in(tmp_path)
    out = CopyEngine(chunk_size=CHUNK).copy(BytesReader(data, [(0, 4 * CHUNK)]), target)
    verify_copy(target.data, out.checksum)
    with open(target.data, "r+b") as f:
        f.seek(CHUNK + 7)
        f.write(b"\x00" if data[CHUNK + 7] else b"\x01")
    with pytest.raises(BackupCorrupt):
        verify_copy(target.data, out.checksum)


def test_rate_limit_paces_the_copy(tmp_path: Path) -> None:
    data = disk_with_holes(16 * CHUNK, [(0, 16 * CHUNK)])
    slept: list[float] = []
    rate = 4 * 1024 * 1024
    CopyEngine(chunk_size=CHUNK, rate_limit_bps=rate, sleep=slept.append).copy(
        BytesReader(data, [(0, 16 * CHUNK)]), target_in(tmp_path)
    )
    # The engine asks to sleep whenever it is ahead of schedule; since the injected sleep
    # returns at once, it keeps asking, and its last request is for the whole schedule.
    assert slept and max(slept) == pytest.approx(16 * CHUNK / rate, rel=0.2)


def test_chunk_size_must_be_block_aligned() -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        CopyEngine(chunk_size=1000)
