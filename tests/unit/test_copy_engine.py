"""The copy engine against real files: sparse skipping, checksums, resume, cancel."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapferry.activities.errors import BackupCancelled, BackupCorrupt, BackupStalled
from snapferry.activities.storage import checksum
from snapferry.activities.storage.copy_engine import (
    Checkpoint,
    CopyEngine,
    CopyTarget,
    StopFlag,
    verify_copy,
)
from snapferry.activities.storage.reader import DataExtent

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


def per_chunk(digests: Path) -> list[str]:
    """The ``.chunks`` file's digests, one per chunk (a run line expanded)."""
    with open(digests) as f:
        return [d for d, n in checksum.read_digest_lines(f) for _ in range(n)]


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
    digests = per_chunk(tmp_path / "img.chunks.partial")
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


# -- cost in proportion to the data, a verify that reads the medium, stalls ------
class ThinReader:
    """A reader of a large thin disk that holds no bytes: data chunks are generated from
    their offset, and its extents are a generator that records how far it was consumed."""

    def __init__(self, size: int, data_chunks: list[int], chunk: int) -> None:
        self.virtual_size = size
        self.chunk = chunk
        self.data_chunks = data_chunks
        self.yielded = 0
        self.reads = 0
        self.max_ahead = 0

    @staticmethod
    def content(offset: int, length: int) -> bytes:
        seed = (offset // 4096).to_bytes(8, "little")
        return (seed * (length // 8 + 1))[:length]

    def data_extents(self):  # type: ignore[no-untyped-def]
        for k in self.data_chunks:
            self.yielded += 1
            yield DataExtent(start=k * self.chunk, length=self.chunk, path="gen", host_offset=0)

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        self.reads += 1
        # How many extents the engine had pulled beyond the one it is reading now.
        self.max_ahead = max(self.max_ahead, self.yielded - self.reads)
        view[:] = self.content(guest_offset, len(view))

    def close(self) -> None:
        pass


def test_a_thin_volume_is_verified_by_reading_its_data_only(tmp_path: Path) -> None:
    chunk = 1024 * 1024
    size = 4096 * chunk  # 4 GiB virtual
    data_chunks = [3, 4, 1000, 4095]
    reader = ThinReader(size, data_chunks, chunk)
    target = target_in(tmp_path)
    out = CopyEngine(chunk_size=chunk).copy(reader, target)
    assert out.bytes_copied == len(data_chunks) * chunk
    # The extents are streamed: the engine never pulls more than the next one ahead.
    assert reader.max_ahead <= 1
    progress: list[tuple[int, int]] = []
    report = verify_copy(
        target.data,
        out.checksum,
        digests=target.digests,
        on_progress=lambda done, read: progress.append((done, read)),
    )
    # The engine's own counter: the verify read the data chunks and nothing else.
    assert report.bytes_read == len(data_chunks) * chunk
    assert report.chunks_read == len(data_chunks) and report.chunks == 4096
    assert report.cache_dropped
    assert progress and progress[-1] == (size, report.bytes_read)
    # The end-to-end checksum is the same chain as before, zero digests included.
    assert report.checksum == out.checksum == checksum.file_checksum(target.data, chunk)[0]


def _write_direct(path: Path, offset: int, flip: Callable[[bytearray], None]) -> None:
    """Change the 4 KiB block at ``offset`` through O_DIRECT (past the page cache)."""
    import mmap

    block = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        os.preadv(fd, [block], offset)
        buf = bytearray(block)
        flip(buf)
        block[:] = bytes(buf)
        os.pwritev(fd, [block], offset)
    finally:
        os.close(fd)
        block.close()


def _flip_first(buf: bytearray) -> None:
    buf[100] ^= 0x01


def test_verify_catches_a_byte_flipped_on_disk_in_data_and_in_a_hole(tmp_path: Path) -> None:
    chunk = 64 * 1024
    size = 64 * chunk
    reader = ThinReader(size, [2, 40], chunk)
    target = target_in(tmp_path)
    out = CopyEngine(chunk_size=chunk).copy(reader, target)
    verify_copy(target.data, out.checksum, digests=target.digests)
    pristine = target.data.read_bytes()

    # A byte inside a hole region: chunk 10's recorded digest is the zero digest, and its
    # range is a hole, so the verify must notice that it now holds data and read it.
    assert per_chunk(target.digests)[10] == checksum.zero_digest(chunk)
    _write_direct(target.data, 10 * chunk + 8192, _flip_first)
    with pytest.raises(BackupCorrupt, match="chunk 10 "):
        verify_copy(target.data, out.checksum, digests=target.digests)

    target.data.write_bytes(pristine)
    verify_copy(target.data, out.checksum, digests=target.digests)
    # A byte inside a data chunk, flipped on disk with the page cache dropped first.
    fd = os.open(target.data, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    _write_direct(target.data, 40 * chunk + 4096, _flip_first)
    with pytest.raises(BackupCorrupt, match="chunk 40 "):
        verify_copy(target.data, out.checksum, digests=target.digests)
    # And the chunk-digest file itself is checked against the chain.
    target.data.write_bytes(pristine)
    lines = per_chunk(target.digests)
    lines[5] = "00" * 32
    target.digests.write_text("".join(d + "\n" for d in lines))
    with pytest.raises(BackupCorrupt):
        verify_copy(target.data, out.checksum, digests=target.digests)


@contextlib.contextmanager
def loop_mounted_ext4(tmp: Path):  # type: ignore[no-untyped-def]
    """A small ext4 on a loop device: its block device can be written past the file's page
    cache, which is exactly a write the medium lost or a bit it flipped. Yields (mount
    point, device). Root and loop devices needed; skipped otherwise."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("losetup") or not Path("/dev/loop-control").exists():
        pytest.skip("needs root and loop devices")
    image = tmp / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    try:
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
        ).stdout.strip()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no loop device: {exc.stderr}")
    mnt = tmp / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        mounted = True
        yield mnt, dev
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)
        image.unlink(missing_ok=True)


def _physical_offset(path: Path, logical: int) -> int:
    """Byte offset on the device of the file's byte ``logical`` (filefrag's extent map)."""
    import re
    import subprocess

    out = subprocess.run(
        ["filefrag", "-v", "-b4096", str(path)], capture_output=True, text=True, check=True
    ).stdout
    for m in re.finditer(r"^\s*\d+:\s+(\d+)\.\.\s*(\d+):\s+(\d+)\.\.", out, re.M):
        first, last, phys = (int(g) for g in m.groups())
        if first * 4096 <= logical < (last + 1) * 4096:
            return phys * 4096 + (logical - first * 4096)
    raise AssertionError(f"{path}: byte {logical} is not mapped:\n{out}")


def test_verify_reads_the_medium_not_the_page_cache(tmp_path: Path) -> None:
    chunk = 64 * 1024
    with loop_mounted_ext4(tmp_path) as (mnt, dev):
        reader = ThinReader(32 * chunk, [1, 7], chunk)
        target = target_in(mnt)
        out = CopyEngine(chunk_size=chunk).copy(reader, target)
        cached = target.data.read_bytes()  # every page of it is in the page cache now
        offset = 7 * chunk + 12345
        # The medium changes under the cache: a write straight to the device, O_DIRECT.
        _write_direct(
            Path(dev),
            _physical_offset(target.data, offset) // 4096 * 4096,
            lambda buf: buf.__setitem__(offset % 4096, buf[offset % 4096] ^ 0x80),
        )
        assert target.data.read_bytes() == cached  # the page cache still says all is well
        with pytest.raises(BackupCorrupt, match="chunk 7 "):
            verify_copy(target.data, out.checksum, digests=target.digests)


def test_a_stall_stops_the_copy_as_retryable_a_cancel_as_final(tmp_path: Path) -> None:
    data = disk_with_holes(8 * CHUNK, [(0, 8 * CHUNK)])
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=CHUNK)
    flag = StopFlag()
    checkpoints: list[Checkpoint] = []

    class StallingReader(BytesReader):
        def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
            super().read_range(extent, guest_offset, view)
            if self.reads >= 3 * CHUNK:
                flag.stall(48)  # what the activity's guard does when nothing moved

    target = target_in(tmp_path)
    with pytest.raises(BackupStalled) as stalled:
        engine.copy(
            StallingReader(data, [(0, 8 * CHUNK)]),
            target,
            on_checkpoint=lambda cp, _d: checkpoints.append(cp),
            should_stop=flag,
        )
    assert not stalled.value.non_retryable  # retried, from its checkpoint
    out = engine.copy(BytesReader(data, [(0, 8 * CHUNK)]), target, resume=checkpoints[-1])
    assert out.resumed_from == checkpoints[-1].chunks_done * CHUNK
    assert target.data.read_bytes() == data

    cancelled = StopFlag()
    cancelled.cancel()
    cancelled.stall(60)  # a cancel stays a cancel
    with pytest.raises(BackupCancelled) as final:
        CopyEngine(chunk_size=CHUNK).copy(
            BytesReader(data, [(0, 8 * CHUNK)]), target_in(tmp_path), should_stop=cancelled
        )
    assert final.value.non_retryable
