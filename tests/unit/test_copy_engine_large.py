"""The copy engine on large thin volumes: its bookkeeping (checksum chain, ``.chunks`` file,
resume, verify) costs in proportion to the data, not the virtual size, its memory stays flat,
and every loop heartbeats; backups written with the per-chunk chain still verify and
restore."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from snapferry.activities.contracts import BackupPlan, VmRef, VolumeRef, new_snapshot_id
from snapferry.activities.errors import BackupCorrupt
from snapferry.activities.storage import checksum, liveness
from snapferry.activities.storage.copy_engine import (
    Checkpoint,
    CopyEngine,
    CopyTarget,
    verify_copy,
)
from snapferry.activities.storage.reader import DataExtent
from snapferry.activities.storage.secondary import Manifest, SecondaryStore

KIB = 1024
CHUNK = 64 * KIB  # a delta's chunk
GIB = 1024 * 1024 * KIB
TIB = 1024 * GIB


class ThinReader:
    """A thin disk with data in a few chunks, generated from their offset; ``zeros`` lists
    data chunks that hold zeros only (allocated zero clusters)."""

    def __init__(self, size: int, data_chunks: list[int], zeros: frozenset[int] = frozenset()):
        self.virtual_size = size
        self.data_chunks = data_chunks
        self.zeros = zeros

    @staticmethod
    def content(offset: int, length: int) -> bytes:
        seed = (offset // 4096 + 1).to_bytes(8, "little")
        return (seed * (length // 8 + 1))[:length]

    def data_extents(self) -> Iterator[DataExtent]:
        for k in self.data_chunks:
            length = min(CHUNK, self.virtual_size - k * CHUNK)
            yield DataExtent(start=k * CHUNK, length=length, path="gen", host_offset=0)

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        if extent.start // CHUNK in self.zeros:
            view[:] = bytes(len(view))
        else:
            view[:] = self.content(guest_offset, len(view))

    def close(self) -> None:
        pass


def target_in(tmp: Path, name: str = "img") -> CopyTarget:
    return CopyTarget(data=tmp / f"{name}.raw.partial", digests=tmp / f"{name}.chunks.partial")


@contextlib.contextmanager
def counting_advances(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count the chain's per-chunk steps (the ones that cost per chunk)."""
    calls = [0]
    real = checksum.advance

    def advance(state: str, digest: str) -> str:
        calls[0] += 1
        return real(state, digest)

    monkeypatch.setattr(checksum, "advance", advance)
    yield calls


def old_chain(path: Path, chunk_size: int) -> tuple[str, list[str]]:
    """The per-chunk chain, written out from its definition: what a backup of the previous
    version recorded (``sha256-chain``, one digest line per chunk)."""
    state = hashlib.sha256(b"snapferry-sha256-chain-v1").digest()
    digests = []
    data = path.read_bytes()
    for k in range(0, len(data), chunk_size):
        d = hashlib.sha256(data[k : k + chunk_size]).digest()
        digests.append(d.hex())
        state = hashlib.sha256(state + d).digest()
    return f"sha256-chain:{chunk_size}:{state.hex()}", digests


# -- the format ---------------------------------------------------------------------------
def test_a_run_of_zero_chunks_is_one_step_however_it_was_split() -> None:
    zero = checksum.zero_digest(CHUNK)
    data = checksum.chunk_digest(b"\x01" * CHUNK)
    one = checksum.Chain(checksum.RUNS, CHUNK)
    one.add_run(zero, 5)
    one.add(data)
    split = checksum.Chain(checksum.RUNS, CHUNK)
    split.add_run(zero, 2)
    split.add(zero)
    split.add_run(zero, 2)
    split.add(data)
    assert one.final() == split.final()
    # Defined by the module's docstring: one 41-byte step for the run, then the data.
    h0 = hashlib.sha256(b"snapferry-sha256-runs-v1").digest()
    h1 = hashlib.sha256(h0 + b"Z" + (5).to_bytes(8, "big")).digest()
    assert one.final() == hashlib.sha256(h1 + bytes.fromhex(data)).hexdigest()
    # A different run length is a different checksum; so is the same data elsewhere.
    other = checksum.Chain(checksum.RUNS, CHUNK)
    other.add_run(zero, 4)
    other.add(data)
    assert other.final() != one.final()


def test_digest_lines_round_trip_and_bad_lines_are_refused() -> None:
    zero = checksum.zero_digest(CHUNK)
    assert checksum.parse_digest_line(checksum.format_digest_line(zero, 31_000_000)) == (
        zero,
        31_000_000,
    )
    assert checksum.parse_digest_line(checksum.format_digest_line(zero)) == (zero, 1)
    for bad in ("", "abc", zero + "*0", zero + "*x", "zz" * 32):
        with pytest.raises(ValueError):
            checksum.parse_digest_line(bad)


def test_an_allocated_zero_chunk_hashes_as_a_hole(tmp_path: Path) -> None:
    hole = tmp_path / "hole.raw"
    allocated = tmp_path / "allocated.raw"
    for p in (hole, allocated):
        with open(p, "wb") as f:
            f.truncate(20 * CHUNK + 100)
            f.seek(3 * CHUNK)
            f.write(b"\x07" * CHUNK)
    with open(allocated, "r+b") as f:
        f.seek(9 * CHUNK)
        f.write(bytes(CHUNK))  # zeros, but allocated
    assert checksum.file_checksum(hole, CHUNK)[0] == checksum.file_checksum(allocated, CHUNK)[0]
    assert checksum.file_checksum(hole, CHUNK)[0].startswith("sha256-runs:")


# -- cost and memory ----------------------------------------------------------------------
def test_a_thin_delta_s_empty_tail_costs_nothing_per_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 64 * GIB  # a million 64 KiB chunks, three with data
    reader = ThinReader(size, [1, 5, 1000])
    target = target_in(tmp_path)
    with counting_advances(monkeypatch) as steps:
        tracemalloc.start()
        try:
            out = CopyEngine(chunk_size=CHUNK).copy(reader, target)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        copy_steps = steps[0]
        report = verify_copy(target.data, out.checksum, digests=target.digests)
    assert out.chunks == size // CHUNK
    assert copy_steps <= 3 + 4  # the data chunks (and a short last chunk), not the holes
    assert peak < 8 * 1024 * KIB, peak  # the engine's buffers, not the tail's digests
    assert target.digests.stat().st_size < 1024  # a few lines, however large the tail
    assert report.chunks_read == 3 and report.checksum == out.checksum
    assert checksum.file_checksum(target.data, CHUNK)[0] == out.checksum


def test_a_late_resume_costs_its_lines_and_heartbeats_as_it_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every other chunk holds data: 40 000 lines for the resume to walk.
    nchunks = 40_000
    reader = ThinReader(nchunks * CHUNK, list(range(0, nchunks, 2)))
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=1000 * CHUNK)
    checkpoints: list[Checkpoint] = []

    class Crash(Exception):
        pass

    def crash_late(cp: Checkpoint, _done: int) -> None:
        checkpoints.append(cp)
        if cp.chunks_done >= nchunks * 9 // 10:
            raise Crash

    target = target_in(tmp_path)
    with contextlib.suppress(Crash):
        engine.copy(reader, target, on_checkpoint=crash_late)
    late = checkpoints[-1]
    assert late.chunks_done >= nchunks * 9 // 10

    beats = [0]
    at_first_report: list[int] = []

    def first_report(cp: Checkpoint, _done: int) -> None:
        if not at_first_report:
            at_first_report.append(beats[0])

    def beat() -> None:
        beats[0] += 1

    with liveness.reporting_to(beat):
        out = engine.copy(reader, target, resume=late, on_checkpoint=first_report)
    assert out.resumed_from == late.chunks_done * CHUNK
    # Before its first report the resume walked ~36 000 lines and said so as it went.
    assert at_first_report and at_first_report[0] >= late.chunks_done // 2 // 4096
    verify_copy(target.data, out.checksum, digests=target.digests)


def test_a_resume_inside_a_run_of_zeros_gives_the_same_checksum(tmp_path: Path) -> None:
    # Holes, allocated zero chunks and data, with a checkpoint at every step, so that
    # checkpoints fall inside runs of zeros; a crash after each in turn, then a resume.
    nchunks = 64
    data_chunks = [3, 4, 5, 20, 21, 40, 63]
    zeros = frozenset({4, 20, 21})
    size = nchunks * CHUNK - 100  # a short last chunk
    reader = ThinReader(size, data_chunks, zeros)
    whole = CopyEngine(chunk_size=CHUNK).copy(reader, target_in(tmp_path, "whole"))
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=CHUNK, checkpoint_seconds=0.0)
    all_checkpoints: list[Checkpoint] = []
    engine.copy(
        reader, target_in(tmp_path, "probe"), on_checkpoint=lambda c, _d: all_checkpoints.append(c)
    )
    assert any(cp.zero_run for cp in all_checkpoints)  # some fall inside a run

    class Crash(Exception):
        pass

    for n in range(1, len(all_checkpoints)):
        seen: list[Checkpoint] = []

        def crash(cp: Checkpoint, _done: int, seen: list[Checkpoint] = seen, n: int = n) -> None:
            seen.append(cp)
            if len(seen) > n:
                raise Crash

        target = target_in(tmp_path, f"r{n}")
        with contextlib.suppress(Crash):
            engine.copy(reader, target, on_checkpoint=crash)
        out = engine.copy(reader, target, resume=seen[-1])
        assert out.resumed_from == seen[-1].chunks_done * CHUNK
        assert out.checksum == whole.checksum
        assert target.data.read_bytes() == target_in(tmp_path, "whole").data.read_bytes()
        verify_copy(target.data, out.checksum, digests=target.digests)


def test_a_checkpoint_of_the_per_chunk_chain_is_not_resumed_from(tmp_path: Path) -> None:
    reader = ThinReader(8 * CHUNK, list(range(8)))
    target = target_in(tmp_path)
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_bytes=CHUNK)
    seen: list[Checkpoint] = []
    engine.copy(reader, target, on_checkpoint=lambda c, _d: seen.append(c))
    old = seen[3].model_copy(update={"algorithm": "sha256-chain", "zero_run": 0})
    out = engine.copy(reader, target, resume=old)
    assert out.resumed_from == 0


def test_a_huge_thin_volume_resumes_late_with_flat_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 TiB virtual, 64 KiB chunks (16 M), a change every 10 GiB; killed at a checkpoint
    # past 900 GiB, then resumed.
    size = TIB
    data_chunks = list(range(7, size // CHUNK, 10 * GIB // CHUNK))
    reader = ThinReader(size, data_chunks)
    engine = CopyEngine(chunk_size=CHUNK, checkpoint_seconds=0.0)
    seen: list[Checkpoint] = []

    class Crash(Exception):
        pass

    def crash_late(cp: Checkpoint, _done: int) -> None:
        seen.append(cp)
        if cp.chunks_done * CHUNK > 900 * GIB:
            raise Crash

    target = target_in(tmp_path)
    with contextlib.suppress(Crash):
        engine.copy(reader, target, on_checkpoint=crash_late)
    with counting_advances(monkeypatch) as steps:
        out = engine.copy(reader, target, resume=seen[-1])
    assert out.resumed_from > 900 * GIB
    assert steps[0] <= 2 * len(data_chunks) + 4  # the data chunks' lines, not 16 M chunks
    report = verify_copy(target.data, out.checksum, digests=target.digests)
    assert report.chunks_read == len(data_chunks)
    assert checksum.file_checksum(target.data, CHUNK)[0] == out.checksum
    with open(target.data, "rb") as f:
        for k in data_chunks:
            f.seek(k * CHUNK)
            assert f.read(CHUNK) == ThinReader.content(k * CHUNK, CHUNK)


# -- backups of the previous version ------------------------------------------------------
VOLUME = VolumeRef(vm=VmRef(name="web01", host="h1", hypervisor="kvm"), disk="vda")


def test_a_backup_with_the_per_chunk_chain_still_verifies_and_restores(tmp_path: Path) -> None:
    store = SecondaryStore(tmp_path)
    d = store.directory(VOLUME)
    d.mkdir(parents=True)
    full = new_snapshot_id()
    image, chunks = d / f"{full}.raw", d / f"{full}.chunks"
    with open(image, "wb") as f:
        f.truncate(32 * CHUNK)
        f.seek(2 * CHUNK)
        f.write(b"\x11" * (3 * CHUNK))
    old_checksum, digests = old_chain(image, CHUNK)
    chunks.write_text("".join(x + "\n" for x in digests))  # one line per chunk
    manifest = Manifest(
        snapshot_id=full,
        vm="web01",
        disk="vda",
        hypervisor="kvm",
        virtual_size=32 * CHUNK,
        chunk_size=CHUNK,
        chunks=32,
        checksum=old_checksum,
        path=str(image),
        chunks_file=str(chunks),
        source="/primary/web01.qcow2",
        source_format="qcow2",
        created=datetime.now(UTC),
    )
    store.manifest_path(VOLUME, full).write_text(manifest.model_dump_json())
    assert SecondaryStore.verify(manifest).checksum == old_checksum
    assert checksum.verify_file(image, old_checksum).checksum == old_checksum

    # A delta of today's format on top of it restores to the right bytes.
    delta = new_snapshot_id()
    reader = ThinReader(32 * CHUNK, [3, 30])
    target = store.target(VOLUME, delta)
    outcome = CopyEngine(chunk_size=CHUNK).copy(reader, target)
    store.finalize(
        volume=VOLUME,
        snapshot_id=delta,
        target=target,
        outcome=outcome,
        source="/primary/web01.qcow2",
        source_format="qcow2",
        plan=BackupPlan(parent=full, base_image="base", depth=1),
        extents=[(3 * CHUNK, CHUNK), (30 * CHUNK, CHUNK)],
    )
    expected = bytearray(image.read_bytes())
    for k in (3, 30):
        expected[k * CHUNK : (k + 1) * CHUNK] = ThinReader.content(k * CHUNK, CHUNK)
    latest = store.read_manifest(store.manifest_path(VOLUME, delta))
    with SecondaryStore.materialized(latest) as restored:
        assert restored.read_bytes() == bytes(expected)

    # And the old backup's checks still bite.
    with open(image, "r+b") as f:
        f.seek(20 * CHUNK + 5)
        f.write(b"\x01")
    with pytest.raises(BackupCorrupt, match="chunk 20 "):
        SecondaryStore.verify(manifest)
    os.truncate(chunks, 10 * 65)
    with pytest.raises(BackupCorrupt):
        SecondaryStore.verify(manifest)
