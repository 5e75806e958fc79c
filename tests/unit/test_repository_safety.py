"""The repository's data-safety sequences on real files: gc beside resumed and incremental
backups, damaged copies, a sync racing a backup, index and manifest tampering, resizes,
the read-back of a resumed backup. Each one publishes a backup that does not restore, or
fails one that should not, unless the store guards against it."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snapferry.activities.errors import BackupCorrupt
from snapferry.activities.storage.reader import DataExtent
from snapferry.activities.storage.repository import Repository, jobs
from snapferry.activities.storage.repository.ingest import ingest
from snapferry.activities.storage.repository.packs import all_packs

from .test_repository_ingest import BytesReader, restored

MIB = 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as p:
        yield p


def age_packs(root: Path, seconds: float = 3 * 3600) -> None:
    """As if the packs were written long before: gc's grace period is over for them."""
    t = time.time() - seconds
    for p in (root / "packs").glob("??/*.pack"):
        os.utime(p, (t, t))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def test_gc_between_an_interrupted_attempt_and_its_resume_keeps_what_it_made(tmp_path, pool):
    root = tmp_path / "repo"
    data = os.urandom(16 * MIB)
    reader = BytesReader(data)
    reader.fail_at = 12 * MIB
    w = Repository(root).writer(snapshot_id="b1", vm="vm2", disk="vda", virtual_size=len(data))
    with pytest.raises(OSError):
        ingest(reader, w, pool=pool, delta=False, checkpoint_bytes=4 * MIB)
    age_packs(root, 7200)
    for writer in (root / "writers").glob("*"):  # a retry long after: its writer file is stale
        os.utime(writer, (time.time() - 7200,) * 2)
    jobs.gc(Repository(root))
    repo = Repository(root)
    resumed = repo.writer(
        snapshot_id="b1", vm="vm2", disk="vda", virtual_size=len(data), resume=True
    )
    out = ingest(BytesReader(data), resumed, pool=pool, delta=False)
    assert restored(repo, out.manifest, tmp_path) == data


def test_a_parent_deleted_and_collected_during_an_incremental_leaves_it_whole(tmp_path):
    root = tmp_path / "repo"
    repo = Repository(root)
    base = os.urandom(4 * MIB) + bytes(4 * MIB)
    w = repo.writer(snapshot_id="p", vm="vm1", disk="vda", virtual_size=len(base))
    w.write(0, base)
    parent = w.commit()
    age_packs(root)
    now = bytearray(base)
    now[0:CHUNK] = os.urandom(CHUNK)
    now[4 * MIB : 4 * MIB + CHUNK] = os.urandom(CHUNK)
    child = Repository(root).writer(
        snapshot_id="c", vm="vm1", disk="vda", virtual_size=len(now), parent=parent
    )
    child.write(0, bytes(now[0:CHUNK]))
    Repository(root).delete_backup("vm1", "vda", "p")
    jobs.gc(Repository(root))
    child.write(4 * MIB, bytes(now[4 * MIB : 4 * MIB + CHUNK]))
    manifest = child.commit()
    assert restored(Repository(root), manifest, tmp_path) == bytes(now)


def test_an_incremental_over_a_damaged_parent_stores_the_chunk_again(tmp_path, pool):
    root = tmp_path / "repo"
    disk = bytearray(os.urandom(8 * MIB))
    full = ingest(
        BytesReader(bytes(disk)),
        Repository(root).writer(snapshot_id="s1", vm="vm1", disk="vda", virtual_size=len(disk)),
        pool=pool,
        delta=False,
    ).manifest
    flip_byte(next(all_packs(root)), 6 * MIB + 100)
    assert not jobs.verify(Repository(root)).ok
    disk[0:4096] = os.urandom(4096)
    repo = Repository(root)
    assert repo.unreadable(full)  # the backup activity then plans a full
    # and a full over the same disk heals it: the damaged chunk is stored again.
    out = ingest(
        BytesReader(bytes(disk)),
        repo.writer(snapshot_id="s2", vm="vm1", disk="vda", virtual_size=len(disk)),
        pool=pool,
        delta=False,
    )
    assert restored(Repository(root), out.manifest, tmp_path) == bytes(disk)
    assert not Repository(root).unreadable(out.manifest)


def test_gc_keeps_the_good_copy_of_a_chunk_whose_other_copy_is_damaged(tmp_path):
    for _ in range(40):  # until the damaged pack's name sorts first, as the index reads it
        root = tmp_path / f"repo{_}"
        repo = Repository(root)
        x = os.urandom(CHUNK)
        img1 = os.urandom(2 * MIB) + x
        w = repo.writer(snapshot_id="s1", vm="vm1", disk="vda", virtual_size=len(img1))
        w.write(0, img1)
        s1 = w.commit()
        damaged = next(all_packs(root))
        flip_byte(damaged, 2 * MIB + 500)
        jobs.verify(Repository(root))
        w = Repository(root).writer(snapshot_id="s2", vm="vm2", disk="vda", virtual_size=CHUNK)
        w.write(0, x)
        w.commit()
        good = next(p for p in all_packs(root) if p != damaged)
        if damaged.name < good.name:
            break
    Repository(root).delete_backup("vm2", "vda", "s2")
    age_packs(root)
    jobs.gc(Repository(root))
    assert good.exists()
    assert restored(Repository(root), s1, tmp_path)[2 * MIB :] == x


def test_a_backup_committed_during_a_sync_is_copied_whole_or_not_at_all(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    a = os.urandom(8 * MIB)
    w = Repository(src).writer(snapshot_id="a", vm="vm1", disk="vda", virtual_size=len(a))
    w.write(0, a)
    w.commit()
    new = os.urandom(8 * MIB)
    done: list[int] = []

    def progress(_msg: str) -> None:
        if not done:  # a backup finishes on the source while sync copies its first pack
            done.append(1)
            w = Repository(src).writer(snapshot_id="b", vm="vm2", disk="vda", virtual_size=len(new))
            w.write(0, new)
            w.commit()

    jobs.sync(src, dst, progress=progress)
    assert jobs.verify(Repository(dst)).ok
    copy = Repository(dst)
    if (dst / "backups" / "vm2" / "vda" / "b.json").exists():
        assert restored(copy, copy.manifest("vm2", "vda", "b"), tmp_path) == new
    jobs.sync(src, dst)  # the next run copies it
    assert restored(Repository(dst), Repository(dst).manifest("vm2", "vda", "b"), tmp_path) == new


def test_a_tampered_backup_index_is_refused_not_restored(tmp_path):
    from snapferry.activities.storage.repository import create_key_file

    key = create_key_file(tmp_path / "k")
    repo = Repository(tmp_path / "repo", key)
    img = os.urandom(4 * MIB) + os.urandom(4 * MIB)
    w = repo.writer(snapshot_id="s", vm="vm1", disk="vda", virtual_size=len(img))
    w.write(0, img)
    manifest = w.commit()
    index = tmp_path / "repo" / "backups" / "vm1" / "vda" / "s.segments"
    raw = bytearray(index.read_bytes())
    raw[8:40], raw[40:72] = raw[40:72], raw[8:40]  # swap the two segments' IDs
    index.write_bytes(bytes(raw))
    with pytest.raises(BackupCorrupt, match="index"):
        restored(Repository(tmp_path / "repo", key), manifest, tmp_path)
    # and a manifest edited to match the new index is refused too (it is authenticated).
    mpath = index.with_suffix(".json")
    doc = json.loads(mpath.read_text())
    import hashlib

    doc["index_sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    mpath.write_text(json.dumps(doc))
    edited = Repository(tmp_path / "repo", key).manifest("vm1", "vda", "s")
    with pytest.raises(BackupCorrupt, match="manifest"):
        restored(Repository(tmp_path / "repo", key), edited, tmp_path)


def test_an_incremental_after_an_unaligned_resize_restores(tmp_path, pool):
    repo = Repository(tmp_path / "repo")
    base = os.urandom(MIB + 512)
    p = ingest(
        BytesReader(base),
        repo.writer(snapshot_id="p", vm="vm1", disk="vda", virtual_size=len(base)),
        pool=pool,
        delta=False,
    ).manifest
    grown = bytearray(base + bytes(MIB - 512))
    grown[0:4096] = os.urandom(4096)
    m = ingest(
        BytesReader(bytes(grown), [DataExtent(0, 4096, "m", 0)]),
        repo.writer(snapshot_id="c", vm="vm1", disk="vda", virtual_size=len(grown), parent=p),
        pool=pool,
        delta=True,
    ).manifest
    assert restored(repo, m, tmp_path) == bytes(grown)


def test_a_resumed_backup_reads_back_what_its_first_attempt_stored(tmp_path, pool):
    root = tmp_path / "repo"
    data = os.urandom(24 * MIB)
    flipped: list[int] = []

    def flip(_cp: object, done: int) -> None:
        if done and not flipped:  # the medium damages a pack right after it was sealed
            flipped.append(1)
            flip_byte(next(all_packs(root)), MIB + 7)

    reader = BytesReader(data)
    reader.fail_at = 20 * MIB
    w = Repository(root).writer(snapshot_id="s1", vm="vm1", disk="vda", virtual_size=len(data))
    with pytest.raises((OSError, BackupCorrupt)):
        ingest(reader, w, pool=pool, delta=False, checkpoint_bytes=8 * MIB, on_checkpoint=flip)
    w2 = Repository(root).writer(
        snapshot_id="s1", vm="vm1", disk="vda", virtual_size=len(data), resume=True
    )
    with pytest.raises(BackupCorrupt):
        ingest(BytesReader(data), w2, pool=pool, delta=False)
    assert not (root / "backups" / "vm1" / "vda" / "s1.json").exists()


def test_a_writer_whose_index_went_stale_during_gc_still_commits(tmp_path):
    root = tmp_path / "repo"
    img = os.urandom(8 * MIB)
    w = Repository(root).writer(snapshot_id="old", vm="vm0", disk="vda", virtual_size=len(img))
    w.write(0, img)
    w.commit()
    age_packs(root)
    w = Repository(root).writer(snapshot_id="new", vm="vm1", disk="vda", virtual_size=len(img))
    Repository(root).delete_backup("vm0", "vda", "old")
    jobs.gc(Repository(root))
    w.write(0, img)
    manifest = w.commit()
    assert restored(Repository(root), manifest, tmp_path) == img
