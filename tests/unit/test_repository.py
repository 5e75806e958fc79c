"""The backup repository against real files: every backup whole, dedup, compression,
encryption, resume, verify, gc and sync, each checked by restoring and comparing bytes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from snapferry.activities.errors import BackupCorrupt
from snapferry.activities.storage.repository import (
    Repository,
    RepositoryKeyError,
    create_key_file,
    jobs,
    load_key_file,
)
from snapferry.activities.storage.repository.keys import RepositoryKey

CHUNK = 64 * 1024
MIB = 1024 * 1024


def text_like(n: int, seed: int = 1) -> bytes:
    """Log-like lines (what guests' /var/log holds)."""
    rnd = random.Random(seed)
    words = ["INFO", "WARN", "kernel:", "systemd[1]:", "Started", "session", "eth0", "link up"]
    out = bytearray()
    i = 0
    while len(out) < n:
        out += (
            f"2026-12-07T08:{i % 60:02d}:{rnd.randrange(60):02d} host{rnd.randrange(9)} ".encode()
        )
        out += (
            " ".join(rnd.choice(words) for _ in range(8)).encode()
            + f" id={rnd.randrange(10**6)}\n".encode()
        )
        i += 1
    return bytes(out[:n])


def backup(repo: Repository, image: bytes, sid: str, *, vm: str = "vm1", parent=None, extents=None):
    """A backup of ``image``: every chunk (full), or only ``extents`` (an incremental)."""
    w = repo.writer(snapshot_id=sid, vm=vm, disk="vda", virtual_size=len(image), parent=parent)
    for start, length in extents if extents is not None else [(0, len(image))]:
        w.write(start, image[start : start + length])
    return w.commit()


def restored(repo: Repository, manifest, tmp_path: Path) -> bytes:
    out = tmp_path / f"restore-{manifest.snapshot_id}.raw"
    repo.reader(manifest).restore_to(out)
    return out.read_bytes()


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def sparse_disk(size: int, data: dict[int, bytes]) -> bytes:
    disk = bytearray(size)
    for offset, payload in data.items():
        disk[offset : offset + len(payload)] = payload
    return bytes(disk)


def test_a_full_and_an_incremental_restore_exact_bytes_and_each_stands_alone(tmp_path):
    repo = Repository(tmp_path / "repo")
    base = sparse_disk(32 * MIB + 12345, {0: os.urandom(3 * MIB), 20 * MIB: text_like(MIB)})
    full = backup(repo, base, "s1")
    changed = bytearray(base)
    changed[5 * MIB : 5 * MIB + CHUNK] = os.urandom(CHUNK)
    changed[-100:] = b"z" * 100  # the short last chunk
    inc = backup(
        repo,
        bytes(changed),
        "s2",
        parent=full,
        extents=[(5 * MIB, CHUNK), (len(base) - 12345 % CHUNK, 12345 % CHUNK)],
    )
    assert restored(repo, full, tmp_path) == base
    assert restored(repo, inc, tmp_path) == bytes(changed)
    assert inc.new_bytes < 3 * CHUNK + 4096  # two chunks and two segment blobs
    repo.delete_backup("vm1", "vda", "s1")
    assert jobs.gc(repo, now=1e12).packs_removed == 0  # the incremental still uses them all
    assert restored(Repository(tmp_path / "repo"), inc, tmp_path) == bytes(changed)


def test_a_second_vm_with_the_same_data_adds_under_5_percent(tmp_path):
    repo = Repository(tmp_path / "repo")
    image = sparse_disk(64 * MIB, {0: os.urandom(40 * MIB)})
    backup(repo, image, "a", vm="vm1")
    first = store_bytes(tmp_path / "repo")
    second = backup(repo, image, "b", vm="vm2")
    added = store_bytes(tmp_path / "repo") - first
    assert added <= 0.05 * first, (added, first)
    assert restored(repo, second, tmp_path) == image


def test_one_percent_scattered_64k_writes_store_under_3_percent(tmp_path):
    repo = Repository(tmp_path / "repo")
    size = 256 * MIB
    image = bytearray(os.urandom(size))
    full = backup(repo, bytes(image), "full")
    rnd = random.Random(7)
    chunks = rnd.sample(range(size // CHUNK), size // CHUNK // 100)
    for c in chunks:
        image[c * CHUNK : (c + 1) * CHUNK] = os.urandom(CHUNK)
    before = store_bytes(tmp_path / "repo")
    inc = backup(
        repo, bytes(image), "inc", parent=full, extents=[(c * CHUNK, CHUNK) for c in sorted(chunks)]
    )
    added = store_bytes(tmp_path / "repo") - before
    assert added <= 0.03 * size, added / size
    assert restored(repo, inc, tmp_path) == bytes(image)


def test_log_text_compresses_to_40_percent_and_random_data_costs_under_1_percent(tmp_path):
    text = Repository(tmp_path / "text")
    backup(text, text_like(16 * MIB), "t")
    assert store_bytes(tmp_path / "text" / "packs") <= 0.40 * 16 * MIB
    rnd = Repository(tmp_path / "rnd", load_key_file(_key(tmp_path)))
    backup(rnd, os.urandom(16 * MIB), "r")
    assert store_bytes(tmp_path / "rnd") <= 1.01 * 16 * MIB


def _key(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    if not path.exists():
        create_key_file(path)
    return path


def test_encrypted_store_holds_no_plaintext_and_keyed_ids(tmp_path):
    key = load_key_file(_key(tmp_path))
    assert oct(_key(tmp_path).stat().st_mode & 0o777) == "0o600"
    secret = b"TENANT-SECRET-" * 5000
    image = sparse_disk(8 * MIB, {0: secret, 4 * MIB: text_like(MIB)})
    repo = Repository(tmp_path / "repo", key)
    manifest = backup(repo, image, "s")
    assert manifest.key_fingerprint == key.fingerprint
    for path in (tmp_path / "repo").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"TENANT-SECRET" not in data and b"systemd[1]" not in data, path
    plain = Repository(tmp_path / "plain")
    other = Repository(tmp_path / "other", RepositoryKey.from_master(os.urandom(32)))
    block = image[:CHUNK]
    ids = {r.codec.blob_id(block) for r in (repo, plain, other)}
    assert len(ids) == 3  # equal plaintexts are equal IDs only under one key
    assert restored(Repository(tmp_path / "repo", key), manifest, tmp_path) == image


def test_wrong_or_missing_key_is_refused_clearly(tmp_path):
    key = load_key_file(_key(tmp_path))
    Repository(tmp_path / "repo", key)
    with pytest.raises(RepositoryKeyError, match="SNAPFERRY_REPOSITORY_KEY_FILE"):
        Repository(tmp_path / "repo")
    with pytest.raises(RepositoryKeyError, match=f"made with key {key.fingerprint}"):
        Repository(tmp_path / "repo", RepositoryKey.from_master(os.urandom(32)))
    with pytest.raises(RepositoryKeyError, match="does not exist"):
        load_key_file(tmp_path / "nope")
    (tmp_path / "bad").write_text("not hex\n")
    with pytest.raises(RepositoryKeyError, match="not a key"):
        load_key_file(tmp_path / "bad")
    with pytest.raises(RepositoryKeyError, match="never overwritten"):
        create_key_file(_key(tmp_path))
    assert key.id_key.hex() not in repr(key) and key.encryption_key.hex() not in repr(key)


def test_a_writer_killed_midway_resumes_from_its_checkpoint(tmp_path):
    repo = Repository(tmp_path / "repo")
    image = os.urandom(24 * MIB)
    w = repo.writer(snapshot_id="s", vm="vm1", disk="vda", virtual_size=len(image))
    w.write(0, image[: 10 * MIB + CHUNK])
    assert w.checkpoint() == 8 * MIB  # two whole 4 MiB segments are durable
    del w  # killed: no commit, no abort
    repo = Repository(tmp_path / "repo")
    w = repo.writer(snapshot_id="s", vm="vm1", disk="vda", virtual_size=len(image), resume=True)
    assert w.resume_offset == 8 * MIB
    w.write(w.resume_offset, image[w.resume_offset :])
    manifest = w.commit()
    assert restored(repo, manifest, tmp_path) == image
    assert manifest.new_bytes < len(image) - 7 * MIB  # what was done is not stored again


def test_verify_reads_every_pack_names_damage_and_the_next_backup_heals_it(tmp_path):
    repo = Repository(tmp_path / "repo")
    image = os.urandom(12 * MIB)
    first = backup(repo, image, "s1")
    assert jobs.verify(repo).ok
    pack = next((tmp_path / "repo" / "packs").glob("??/*.pack"))
    with open(pack, "r+b") as f:
        f.seek(4 * MIB + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = jobs.verify(repo)
    assert not result.ok and len(result.damaged) == 1
    ((where, offsets),) = result.snapshots.items()
    assert where == "vm1/vda/s1" and len(offsets) == 1
    with pytest.raises(BackupCorrupt, match=f"backup s1 of vm1/vda at offset {offsets[0]}"):
        restored(repo, first, tmp_path)
    second = backup(repo, image, "s2")  # stores the damaged chunk again, nothing else
    assert second.new_bytes < 2 * CHUNK
    assert restored(repo, first, tmp_path) == image  # the good copy now serves both
    assert jobs.verify(repo).snapshots == {}


def test_gc_frees_everything_once_every_backup_is_deleted(tmp_path):
    repo = Repository(tmp_path / "repo")
    a = backup(repo, os.urandom(20 * MIB), "a")
    backup(repo, os.urandom(20 * MIB), "b", vm="vm2")
    full = store_bytes(tmp_path / "repo")
    repo.delete_backup("vm1", "vda", "a")
    assert jobs.gc(repo).packs_removed == 0  # too young: within the safety margin
    jobs.gc(repo, now=1e12)
    assert restored(repo, repo.manifest("vm2", "vda", "b"), tmp_path)
    repo.delete_backup("vm2", "vda", "b")
    result = jobs.gc(repo, now=1e12)
    assert result.packs_removed >= 1 and store_bytes(tmp_path / "repo") < 0.01 * full
    assert a.snapshot_id == "a"


def test_gc_while_a_backup_runs_keeps_what_it_reuses(tmp_path):
    repo = Repository(tmp_path / "repo")
    image = os.urandom(8 * MIB)
    backup(repo, image, "old")
    repo.delete_backup("vm1", "vda", "old")  # its chunks are garbage now...
    w = repo.writer(snapshot_id="new", vm="vm1", disk="vda", virtual_size=len(image))
    w.write(0, image)  # ...but a running backup reuses them (and touches their pack)
    w.checkpoint()
    jobs.gc(repo, now=os.path.getmtime(next((tmp_path / "repo" / "packs").glob("??/*.pack"))) + 1)
    manifest = w.commit()
    assert restored(repo, manifest, tmp_path) == image


def test_sync_copies_only_what_is_missing_needs_no_key_and_the_copy_restores(tmp_path):
    key = load_key_file(_key(tmp_path))
    repo = Repository(tmp_path / "repo", key)
    image = os.urandom(6 * MIB)
    m1 = backup(repo, image, "s1")
    first = jobs.sync(tmp_path / "repo", tmp_path / "copy")
    assert first.backups_copied == 1 and first.packs_copied >= 1
    leftover = tmp_path / "copy" / "packs" / "ab" / ".x.pack.sync"  # a killed copy's temp
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"partial")
    m2 = backup(repo, image[::-1], "s2", parent=m1)
    again = jobs.sync(tmp_path / "repo", tmp_path / "copy")
    assert again.backups_copied == 1 and again.packs_copied == 1
    copy = Repository(tmp_path / "copy", key)
    assert restored(copy, m1, tmp_path) == image and restored(copy, m2, tmp_path) == image[::-1]
    assert jobs.verify(copy).ok


def test_status_reports_dedup_and_compression(tmp_path):
    repo = Repository(tmp_path / "repo")
    image = sparse_disk(16 * MIB, {0: text_like(4 * MIB)})
    backup(repo, image, "a")
    backup(repo, image, "b", vm="vm2")
    s = jobs.status(repo)
    assert s.backups == 2 and s.dedup_ratio == pytest.approx(2.0, rel=0.01)
    assert s.compression_ratio > 2.5
    assert s.last_verify is None and s.last_gc is None
    jobs.verify(repo)
    jobs.gc(repo)
    s = jobs.status(repo)
    assert s.last_verify is not None and s.last_verify["blobs"] > 0
    assert s.last_verify["damaged"] == 0 and s.last_gc is not None and "at" in s.last_gc


def test_a_thin_terabyte_disk_costs_its_data_not_its_size(tmp_path):
    repo = Repository(tmp_path / "repo")
    size = 1 << 40
    w = repo.writer(snapshot_id="big", vm="vm1", disk="vda", virtual_size=size)
    payload = os.urandom(MIB)
    for offset in (0, 300 << 30, size - MIB):
        w.write(offset, payload)
    manifest = w.commit()
    assert manifest.data_bytes == 3 * MIB
    reader = repo.reader(manifest)
    assert reader.read(300 << 30, MIB) == payload and reader.read(5 << 30, 4096) == bytes(4096)
    assert store_bytes(tmp_path / "repo") < 3 * MIB + 9 * MIB  # data + an 8 MiB index


def test_cli_creates_a_key_and_runs_the_jobs(tmp_path, monkeypatch, capsys):
    from snapferry.workers.cli import run

    monkeypatch.setenv("SNAPFERRY_SECONDARY", str(tmp_path / "sec"))
    assert run(["repository", "status"]) == 1
    assert "not a snapferry repository" in capsys.readouterr().err
    assert run(["repository", "key", "create", str(tmp_path / "k")]) == 0
    monkeypatch.setenv("SNAPFERRY_REPOSITORY_KEY_FILE", str(tmp_path / "k"))
    repo = Repository(tmp_path / "sec" / "repository", load_key_file(tmp_path / "k"))
    backup(repo, os.urandom(2 * MIB), "s1")
    assert run(["repository", "verify"]) == 0
    assert run(["repository", "sync", "--to", str(tmp_path / "copy")]) == 0
    assert run(["repository", "gc"]) == 0
    capsys.readouterr()
    assert run(["repository", "status", "--json"]) == 0
    assert '"backups": 1' in capsys.readouterr().out
    monkeypatch.delenv("SNAPFERRY_REPOSITORY_KEY_FILE")
    assert run(["repository", "verify"]) == 1
    assert "SNAPFERRY_REPOSITORY_KEY_FILE" in capsys.readouterr().err
