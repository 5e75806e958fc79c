"""Repository jobs: verify (re-read from the medium), gc (mark and sweep), sync, status.

Each walks the repository in flat memory: packs one at a time, blob IDs through sorted runs
on disk, backups' indexes through mmap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import BackupCorrupt
from ..files import FILE_MODE, atomic_write, fsync_dir, make_dirs
from .blobs import ZERO_ID
from .packs import CHUNK, BlobLocation, all_packs, pack_path, pack_table
from .repository import Repository

Progress = Callable[[str], None]
RUN_IDS = 1 << 20  # blob IDs sorted in memory per run (32 MiB)
WRITER_STALE_S = 3600.0  # a writer whose file was not touched for this long is dead
SAFETY_S = 300.0  # clock skew and in-flight renames


def _record_job(root: Path, job: str, counters: dict[str, int]) -> None:
    """When a job last ran to its end and what it found, for ``repository status``."""
    make_dirs(root / "jobs")
    atomic_write(root / "jobs" / f"{job}.json", json.dumps({"at": time.time(), **counters}))


def last_run(root: Path, job: str) -> dict[str, float] | None:
    path = root / "jobs" / f"{job}.json"
    return json.loads(path.read_text()) if path.exists() else None  # type: ignore[no-any-return]


def _drop_cache(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@dataclass
class VerifyResult:
    packs: int = 0
    blobs: int = 0
    bytes_read: int = 0
    damaged: list[str] = field(default_factory=list)  # "pack offset: reason"
    snapshots: dict[str, list[int]] = field(default_factory=dict)  # snapshot -> offsets

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.snapshots


def verify(repo: Repository, *, progress: Progress | None = None) -> VerifyResult:
    """Read every pack from the medium (its cached pages dropped first) and open every blob;
    then check that every backup finds each of its blobs whole. Damaged copies are recorded
    (damaged.json) so that no restore uses them and the next backup stores the chunk again."""
    result = VerifyResult()
    bad: set[tuple[str, int]] = set()
    for path in all_packs(repo.root):
        result.packs += 1
        name = path.name.removesuffix(".pack")
        try:
            entries = pack_table(path, repo.codec)
        except BackupCorrupt as err:
            result.damaged.append(f"{name}: {err}")
            bad.update((loc.pack, loc.offset) for loc in _index_entries_of(repo, name))
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            _drop_cache(fd)
            for loc in entries:
                stored = os.pread(fd, loc.length, loc.offset)
                result.blobs += 1
                result.bytes_read += len(stored)
                try:
                    repo.codec.decode(loc.blob_id, stored, where=f"pack {name}")
                except BackupCorrupt as err:
                    result.damaged.append(f"{name} offset {loc.offset}: {err}")
                    bad.add((name, loc.offset))
        finally:
            os.close(fd)
        if progress is not None:
            progress(f"verified pack {name} ({len(entries)} blobs)")
    repo.save_damaged(bad)
    repo.index.refresh()
    for manifest in repo.manifests():
        if progress is not None:
            progress(f"checking backup {manifest.snapshot_id}")
        try:
            reader = repo.reader(manifest)
        except BackupCorrupt as err:  # its index damaged, or its manifest not authentic
            result.damaged.append(str(err))
            result.snapshots[f"{manifest.vm}/{manifest.disk}/{manifest.snapshot_id}"] = [0]
            continue
        offsets: list[int] = []
        for seg in range(manifest.segments):
            seg_id = reader.segment_id(seg)
            if seg_id == ZERO_ID:
                continue
            if repo.find(seg_id) is None:
                offsets.append(seg * reader.seg_bytes)
                continue
            try:
                ids = reader.chunk_ids(seg)
            except BackupCorrupt:
                offsets.append(seg * reader.seg_bytes)
                continue
            for j, cid in enumerate(ids):
                if cid != ZERO_ID and repo.find(cid) is None:
                    offsets.append(seg * reader.seg_bytes + j * reader.chunk)
        if offsets:
            result.snapshots[f"{manifest.vm}/{manifest.disk}/{manifest.snapshot_id}"] = offsets
    _record_job(
        repo.root,
        "verify",
        {
            "packs": result.packs,
            "blobs": result.blobs,
            "bytes_read": result.bytes_read,
            "damaged": len(result.damaged),
            "backups_damaged": len(result.snapshots),
        },
    )
    return result


def _index_entries_of(repo: Repository, pack: str) -> Iterator[BlobLocation]:
    return (loc for loc in repo.index.sorted_records() if loc.pack == pack)


# -- gc ---------------------------------------------------------------------------------
def _sorted_runs(ids: Iterable[bytes], work: Path) -> Iterator[bytes]:
    """``ids`` sorted and deduplicated, through runs of RUN_IDS on disk."""
    runs: list[Path] = []
    batch: list[bytes] = []

    def spill() -> None:
        path = work / f"run{len(runs)}"
        path.write_bytes(b"".join(sorted(set(batch))))
        runs.append(path)
        batch.clear()

    for blob_id in ids:
        batch.append(blob_id)
        if len(batch) >= RUN_IDS:
            spill()
    if batch:
        spill()

    def read(path: Path) -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(32 * 4096):
                for i in range(0, len(block), 32):
                    yield block[i : i + 32]

    last = None
    for blob_id in heapq.merge(*(read(p) for p in runs)):
        if blob_id != last:
            last = blob_id
            yield blob_id


def _referenced(
    repo: Repository, partials: list[Path], progress: Progress | None = None
) -> Iterator[bytes]:
    """Every blob a backup uses: committed ones, and those a live writer has written."""
    from .backups import BackupReader

    for manifest in repo.manifests():
        if progress is not None:
            progress(f"marking backup {manifest.snapshot_id}")
        reader = BackupReader(repo, manifest)
        for seg in range(manifest.segments):
            seg_id = reader.segment_id(seg)
            if seg_id != ZERO_ID:
                yield seg_id
                yield from (c for c in reader.chunk_ids(seg) if c != ZERO_ID)
    for path in partials:  # a live writer's segments so far
        with contextlib.suppress(FileNotFoundError):
            raw = path.read_bytes()[8:]
            for i in range(0, len(raw), 32):
                seg_id = raw[i : i + 32]
                if seg_id != ZERO_ID:
                    yield seg_id
                    with contextlib.suppress(BackupCorrupt):
                        data = repo.read_blob(seg_id, where=str(path))
                        yield from (data[j : j + 32] for j in range(0, len(data), 32))


@dataclass
class GcResult:
    packs_removed: int = 0
    bytes_freed: int = 0
    packs_kept_young: int = 0
    packs_live: int = 0


def gc(repo: Repository, *, now: float | None = None, progress: Progress | None = None) -> GcResult:
    """Mark every blob a backup (or a running backup) uses, then delete packs that hold none
    of them and were not touched since the cutoff: the oldest running writer's start, less a
    safety margin. A writer touches each pack it reuses before it uses it (under the shared
    pack lock), and gc checks that time again right before a deletion (under the exclusive
    one), so a pack a running backup relies on is never deleted."""
    now = time.time() if now is None else now
    result = GcResult()
    writers = repo.root / "writers"
    started = [now]
    partials: list[Path] = []
    for path in sorted(writers.glob("*.json")) if writers.is_dir() else []:
        age = now - path.stat().st_mtime
        if age > WRITER_STALE_S:
            path.unlink(missing_ok=True)  # a writer that died: its partial data is garbage
            continue
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # it committed meanwhile: its manifest is read below
        started.append(float(info["started"]))
        snapshot = info["snapshot"]
        partials += list((repo.root / "backups").glob(f"*/*/{snapshot}.segments.partial"))
        # The parent an incremental inherits from, linked for its whole life: a delete of
        # the parent meanwhile must not free what the incremental will still inherit.
        partials.append(path.with_suffix(".parent.segments"))
    # A partial index with a checkpoint is resumable until its backup discards it: what
    # it names stays, however long the retry waits (its writer file may be long gone).
    backups = repo.root / "backups"
    for checkpoint in backups.glob("*/*/*.segments.checkpoint") if backups.is_dir() else []:
        partials.append(checkpoint.with_suffix(".partial"))
    cutoff = min(started) - SAFETY_S
    repo.index.refresh()
    with tempfile.TemporaryDirectory(
        dir=repo.root / "locks" if (repo.root / "locks").is_dir() else None
    ) as tmp:
        live_ids = _sorted_runs(_referenced(repo, partials, progress), Path(tmp))
        live_packs: set[str] = set()
        current = next(live_ids, None)
        # Every copy of a live blob is kept, not just the first the index lists: that one
        # may be a copy a verify found damaged, and the good one the only one to restore.
        for loc in repo.index.sorted_records(all_copies=True):
            while current is not None and current < loc.blob_id:
                current = next(live_ids, None)
            if current == loc.blob_id:
                live_packs.add(loc.pack)
    dropped: set[str] = set()
    for path in all_packs(repo.root):
        name = path.name.removesuffix(".pack")
        if name in live_packs:
            result.packs_live += 1
            continue
        with repo.pack_lock(exclusive=True):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mtime >= cutoff:
                result.packs_kept_young += 1
                continue
            path.unlink()
        dropped.add(name)
        result.packs_removed += 1
        result.bytes_freed += st.st_size
        if progress is not None:
            progress(f"removed pack {name}")
    for partial in (repo.root / "packs" / "tmp").glob("*.partial"):
        with contextlib.suppress(FileNotFoundError):
            if partial.stat().st_mtime < cutoff:
                partial.unlink()
    repo.index.rewrite(drop_packs=frozenset(dropped))
    _record_job(repo.root, "gc", dataclasses.asdict(result))
    return result


# -- sync -------------------------------------------------------------------------------
class Throttle:
    """At most ``bps`` bytes a second on average since the first byte (None: no limit), as
    Proxmox Backup Server's traffic control spares a link another zone shares."""

    def __init__(self, bps: float | None, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.bps = bps
        self.sleep = sleep
        self.done = 0
        self.t0 = time.monotonic()

    def took(self, n: int) -> None:
        self.done += n
        if self.bps:
            early = self.done / self.bps - (time.monotonic() - self.t0)
            if early > 0:
                self.sleep(early)


def _copy_file(src: Path, dst: Path, throttle: Throttle | None = None) -> int:
    """Copy under a temporary name, fsync, rename: a copy is whole or absent."""
    make_dirs(dst.parent)
    tmp = dst.with_name(f".{dst.name}.sync")
    with (
        open(src, "rb") as fin,
        open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as fout,
    ):
        while block := fin.read(1 << 20):
            fout.write(block)
            if throttle is not None:
                throttle.took(len(block))
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return src.stat().st_size


@dataclass
class SyncResult:
    packs_copied: int = 0
    bytes_copied: int = 0
    backups_copied: int = 0


def sync(
    src: Path,
    dst: Path,
    *,
    progress: Progress | None = None,
    rate_limit_bps: float | None = None,
) -> SyncResult:
    """Copy to a second repository what it lacks: packs (never changed once named, and
    renamed into place whole, so a name present is a copy whole), then index files, then
    each backup's index and, last, its manifest. Needs no key: only ciphertext moves. Run
    again after a crash, it goes on. ``rate_limit_bps`` bounds the bytes copied a second."""
    result = SyncResult()
    throttle = Throttle(rate_limit_bps)
    if not (src / "config.json").exists():
        raise BackupCorrupt(f"{src} is not a snapferry repository (no config.json)")
    make_dirs(dst)
    if not (dst / "config.json").exists():
        _copy_file(src / "config.json", dst / "config.json")
    elif (dst / "config.json").read_text() != (src / "config.json").read_text():
        raise BackupCorrupt(f"{dst} is another repository (its config differs from {src}'s)")
    # The backups to copy are listed before any pack is: each one's manifest was written
    # after its packs, so they are all among the packs copied below. A backup committed
    # later is copied by the next run, never as a manifest without its packs.
    manifests = sorted((src / "backups").glob("*/*/*.json")) if (src / "backups").is_dir() else []
    for path in all_packs(src):
        target = pack_path(dst, path.name.removesuffix(".pack"))
        if not target.exists():
            try:
                result.bytes_copied += _copy_file(path, target, throttle)
            except FileNotFoundError:  # gc removed it meanwhile: no listed backup uses it
                continue
            result.packs_copied += 1
            if progress is not None:
                progress(f"copied pack {path.name}")
    for path in sorted((src / "index").glob("*.idx")) if (src / "index").is_dir() else []:
        if not (dst / "index" / path.name).exists():
            with contextlib.suppress(FileNotFoundError):  # merged into another meanwhile
                result.bytes_copied += _copy_file(path, dst / "index" / path.name, throttle)
    for manifest in manifests:
        target = dst / manifest.relative_to(src)
        if target.exists():
            continue
        segments = manifest.with_suffix(".segments")
        try:
            result.bytes_copied += _copy_file(segments, target.with_suffix(".segments"), throttle)
            result.bytes_copied += _copy_file(manifest, target, throttle)
        except FileNotFoundError:  # deleted on the source meanwhile: not copied
            target.with_suffix(".segments").unlink(missing_ok=True)
            continue
        result.backups_copied += 1
    return result


# -- status -----------------------------------------------------------------------------
@dataclass
class Status:
    backups: int
    packs: int
    stored_bytes: int  # pack files on disk
    chunks: int
    logical_bytes: int  # sum of every backup's non-zero data
    unique_bytes: int  # plaintext of distinct chunks (after dedup, before compression)
    last_verify: dict[str, float] | None = None  # when it ended ("at", epoch s), its counts
    last_gc: dict[str, float] | None = None

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0


def status(repo: Repository) -> Status:
    repo.index.refresh()
    manifests = list(repo.manifests())
    chunk_bytes = repo.config.chunk_bytes
    chunks = sum(1 for loc in repo.index.sorted_records() if loc.kind == CHUNK)
    packs = list(all_packs(repo.root))
    return Status(
        backups=len(manifests),
        packs=len(packs),
        stored_bytes=sum(p.stat().st_size for p in packs),
        chunks=chunks,
        logical_bytes=sum(m.data_bytes for m in manifests),
        unique_bytes=chunks * chunk_bytes,  # an upper bound: last chunks may be short
        last_verify=last_run(repo.root, "verify"),
        last_gc=last_run(repo.root, "gc"),
    )
