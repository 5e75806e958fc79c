"""The repository's backup loop on real files: deltas completed from their parent, zero
extents, a crash between checkpoints, damage found by the verify behind the copy."""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapferry.activities.errors import BackupCorrupt
from snapferry.activities.storage.reader import DataExtent, ZeroExtent
from snapferry.activities.storage.repository import Repository, create_key_file, load_key_file
from snapferry.activities.storage.repository import packs as packs_module
from snapferry.activities.storage.repository.ingest import ingest

MIB = 1024 * 1024
CHUNK = 64 * 1024


class BytesReader:
    """A snapshot reader over bytes in memory, with the extents a driver would report."""

    def __init__(self, data: bytes, extents: list[DataExtent] | None = None) -> None:
        self.data = data
        self.virtual_size = len(data)
        self.extents = extents if extents is not None else whole(data)
        self.fail_at: int | None = None

    def data_extents(self) -> list[DataExtent]:
        return self.extents

    def read_range(self, extent: DataExtent, offset: int, view: memoryview) -> None:
        if self.fail_at is not None and offset + len(view) > self.fail_at:
            raise OSError(5, "simulated source error")
        view[:] = self.data[offset : offset + len(view)]

    def close(self) -> None:
        pass


def whole(data: bytes) -> list[DataExtent]:
    return [DataExtent(0, len(data), "mem", 0)]


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as p:
        yield p


def restored(repo: Repository, manifest, tmp_path: Path) -> bytes:
    out = tmp_path / f"{manifest.snapshot_id}.raw"
    repo.reader(manifest).restore_to(out)
    return out.read_bytes()


def backup(repo, reader, sid, pool, *, parent=None, delta=False, **kwargs):
    writer = repo.writer(
        snapshot_id=sid, vm="vm1", disk="vda", virtual_size=reader.virtual_size, parent=parent
    )
    return ingest(reader, writer, pool=pool, delta=delta, **kwargs)


def test_a_delta_of_sub_chunk_writes_is_completed_from_its_parent(tmp_path, pool):
    key = create_key_file(tmp_path / "k")
    repo = Repository(tmp_path / "repo", load_key_file(tmp_path / "k"))
    assert key.fingerprint == repo.config.key_fingerprint
    base = os.urandom(9 * MIB + 12345)  # a last chunk and a last segment that are short
    full = backup(repo, BytesReader(base, whole(base)), "s1", pool).manifest
    now = bytearray(base)
    rng = random.Random(3)
    changes = sorted(rng.sample(range(0, len(base) - 4096, 4096), 40))
    extents: list[DataExtent] = []
    for off in changes:
        now[off : off + 4096] = os.urandom(4096)
        extents.append(DataExtent(off, 4096, "mem", off))
    now[len(base) - 100 :] = bytes(100)  # the short tail changed to zeros
    extents.append(ZeroExtent(len(base) - 100, 100, "", 0))
    out = backup(repo, BytesReader(bytes(now), extents), "s2", pool, parent=full, delta=True)
    assert out.bytes_copied == 40 * 4096  # zeros are not read
    assert restored(repo, out.manifest, tmp_path) == bytes(now)
    assert restored(repo, full, tmp_path) == base
    # Whole: with its parent gone, the delta still restores.
    repo.delete_backup("vm1", "vda", "s1")
    assert restored(Repository(tmp_path / "repo", key), out.manifest, tmp_path) == bytes(now)
    assert out.manifest.new_bytes < 41 * CHUNK + 16 * 4096  # changed chunks and segments


def test_a_full_over_a_thin_disk_reads_only_its_data(tmp_path, pool):
    repo = Repository(tmp_path / "repo")
    size = 64 * 1024 * MIB  # 64 GiB virtual
    data = {3 * MIB + 100: os.urandom(5000), 40 * 1024 * MIB: os.urandom(CHUNK * 3)}

    class Thin(BytesReader):
        def read_range(self, extent, offset, view):  # type: ignore[no-untyped-def]
            start = extent.start
            piece = data[start]
            view[:] = piece[offset - start : offset - start + len(view)]

    reader = Thin(b"", [DataExtent(o, len(d), "mem", o) for o, d in sorted(data.items())])
    reader.virtual_size = size
    out = backup(repo, reader, "thin", pool)
    assert out.bytes_copied == sum(len(d) for d in data.values())
    r = repo.reader(out.manifest)
    for offset, piece in data.items():
        assert r.read(offset, len(piece)) == piece
    assert r.read(0, MIB) == bytes(MIB)


def test_a_crash_between_checkpoints_resumes_at_the_last_one_and_restores_exactly(tmp_path, pool):
    repo = Repository(tmp_path / "repo")
    image = os.urandom(64 * MIB)
    reader = BytesReader(image, whole(image))
    reader.fail_at = 62 * MIB  # the source fails after a checkpoint and several segments
    writer = repo.writer(snapshot_id="s", vm="vm1", disk="vda", virtual_size=len(image))
    seen: list[int] = []
    with pytest.raises(OSError):
        ingest(
            reader,
            writer,
            pool=pool,
            delta=False,
            checkpoint_bytes=40 * MIB,
            on_checkpoint=lambda cp, _d: seen.append(cp.offset),
        )
    partial = tmp_path / "repo" / "backups" / "vm1" / "vda" / "s.segments.partial"
    # Segments closed after the last checkpoint are in the partial index, not trusted.
    assert (partial.stat().st_size - 8) // 32 * 4 * MIB > seen[-1]
    reader.fail_at = None
    resumed = repo.writer(
        snapshot_id="s", vm="vm1", disk="vda", virtual_size=len(image), resume=True
    )
    assert resumed.resume_offset == seen[-1] > 0
    out = ingest(reader, resumed, pool=pool, delta=False)
    assert out.resumed_from == seen[-1]
    assert out.bytes_copied == len(image) - seen[-1]
    assert restored(repo, out.manifest, tmp_path) == image


def test_damage_found_behind_the_copy_publishes_nothing(tmp_path, pool, monkeypatch):
    repo = Repository(tmp_path / "repo")
    image = os.urandom(6 * MIB)
    finish = packs_module.PackWriter.finish

    def finish_then_damage(self):  # type: ignore[no-untyped-def]
        blobs = finish(self)
        path = packs_module.pack_path(self.root, blobs[0].pack)
        with open(path, "r+b") as f:  # a bit flips on the medium after the fsync
            f.seek(blobs[0].offset + 40)
            byte = f.read(1)
            f.seek(blobs[0].offset + 40)
            f.write(bytes([byte[0] ^ 1]))
        return blobs

    monkeypatch.setattr(packs_module.PackWriter, "finish", finish_then_damage)
    with pytest.raises(BackupCorrupt, match="pack"):
        backup(repo, BytesReader(image, whole(image)), "s", pool)
    assert not (tmp_path / "repo" / "backups" / "vm1" / "vda" / "s.json").exists()


def test_a_sync_rate_limit_bounds_the_bytes_copied_a_second(tmp_path, pool):
    from snapferry.activities.storage.repository import jobs

    repo = Repository(tmp_path / "repo")
    image = os.urandom(3 * MIB)
    backup(repo, BytesReader(image, whole(image)), "s", pool)
    slept: list[float] = []
    throttle = jobs.Throttle(1e6, sleep=slept.append)
    throttle.took(3 * MIB)
    assert sum(slept) > 2.5  # 3 MiB at 1 MB/s: about 3 s asked for, not slept in a test
    t0 = time.monotonic()
    result = jobs.sync(tmp_path / "repo", tmp_path / "copy", rate_limit_bps=20e6)
    elapsed = time.monotonic() - t0
    assert result.bytes_copied >= 3 * MIB and elapsed >= result.bytes_copied / 20e6 * 0.9


def test_the_index_finds_every_id_it_holds_and_none_it_does_not(tmp_path):
    from snapferry.activities.storage.repository.index import _IndexFile, write_index_file
    from snapferry.activities.storage.repository.packs import BlobLocation

    rng = random.Random(5)
    ids = [rng.randbytes(32) for _ in range(20000)]
    ids += [ids[0][:8] + rng.randbytes(24) for _ in range(50)]  # IDs sharing a prefix
    ids += [bytes(32)[:31] + b"\x01", b"\xff" * 32]  # at both ends of the ID space
    path = write_index_file(
        tmp_path, [BlobLocation(i, 0, "ab" * 32, n, 1) for n, i in enumerate(ids)]
    )
    assert path is not None
    index = _IndexFile(path)
    for blob_id in ids:
        found = index.find(blob_id)
        assert found is not None and found.blob_id == blob_id
    for _ in range(2000):
        assert index.find(rng.randbytes(32)) is None
    assert index.find(bytes(32)) is None and index.find(ids[0][:8] + bytes(24)) is None


def test_a_backup_reads_at_the_lower_of_the_worker_and_policy_rate_limits(tmp_path, pool):
    from snapferry.activities.backup import effective_rate_limit

    assert effective_rate_limit(None, None) is None
    assert effective_rate_limit(100e6, None) == 100e6
    assert effective_rate_limit(None, 20) == 20e6
    assert effective_rate_limit(100e6, 20) == 20e6 and effective_rate_limit(10e6, 20) == 10e6
    repo = Repository(tmp_path / "repo")
    image = os.urandom(8 * MIB)
    asked: list[float] = []
    backup(
        repo, BytesReader(image, whole(image)), "s", pool, rate_limit_bps=2e6, sleep=asked.append
    )
    assert max(asked) > 8 * MIB / 2e6 * 0.8  # the last wait brings it to about 4 s
