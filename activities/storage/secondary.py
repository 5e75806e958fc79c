"""The secondary store: a directory (an NFS mount in production) of raw images + manifests.

Layout, per volume snapshot::

    <root>/snapshots/<vm>/<disk>/<snapshot-id>.raw            the guest-visible image, sparse
    <root>/snapshots/<vm>/<disk>/<snapshot-id>.raw.partial    while copying
    <root>/snapshots/<vm>/<disk>/<snapshot-id>.chunks         chunk digests (zero runs: one line)
    <root>/snapshots/<vm>/<disk>/<snapshot-id>.manifest.json  written last: its presence = done

Backups are raw so that any tool (``qemu-img``, ``dd``, ``sha256sum`` of chunks) can read them
without snapferry; sparse files keep holes free on the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from ..contracts import BackupPlan, DeleteBackupOutcome, VolumeRef
from ..errors import BackupCorrupt, SecondaryStoreUnavailable, classify_os_error
from . import checksum, liveness
from .checksum import VerifyReport, data_segments
from .copy_engine import CopyOutcome, CopyTarget, verify_copy
from .files import FILE_MODE, atomic_write, fsync_dir, make_dirs


class Manifest(BaseModel):
    snapshot_id: str
    vm: str
    disk: str
    hypervisor: str
    format: str = "raw"
    virtual_size: int
    chunk_size: int
    chunks: int
    checksum: str
    path: str
    chunks_file: str
    source: str
    source_format: str
    parent: str | None = None
    depth: int = 0
    extents: list[tuple[int, int]] | None = None
    full_reason: str | None = None
    change_id: str | None = None  # the source's change-tracking ID (PrimarySnapshot.change_id)
    created: datetime

    @property
    def data_bytes(self) -> int:
        """Bytes the backup carries: its extents for a delta, the whole image for a full."""
        if self.extents is None:
            return self.virtual_size
        return sum(length for _, length in self.extents)


class SecondaryStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, volume: VolumeRef) -> Path:
        return self.root / "snapshots" / volume.vm.name / volume.disk

    def image_path(self, volume: VolumeRef, snapshot_id: str) -> Path:
        return self.directory(volume) / f"{snapshot_id}.raw"

    def manifest_path(self, volume: VolumeRef, snapshot_id: str) -> Path:
        return self.directory(volume) / f"{snapshot_id}.manifest.json"

    def target(self, volume: VolumeRef, snapshot_id: str) -> CopyTarget:
        """Create the volume's directory and name the ``.partial`` files of one copy."""
        d = self.directory(volume)
        try:
            make_dirs(d)
            probe = d / f".{snapshot_id}.probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise classify_os_error(exc, where=str(d)) from exc
        return self.partial_target(volume, snapshot_id)

    def partial_target(self, volume: VolumeRef, snapshot_id: str) -> CopyTarget:
        d = self.directory(volume)
        return CopyTarget(
            data=d / f"{snapshot_id}.raw.partial", digests=d / f"{snapshot_id}.chunks.partial"
        )

    def finalize(
        self,
        *,
        volume: VolumeRef,
        snapshot_id: str,
        target: CopyTarget,
        outcome: CopyOutcome,
        source: str,
        source_format: str,
        plan: BackupPlan | None = None,
        extents: list[tuple[int, int]] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        before_publish: Callable[[], None] | None = None,
        change_id: str | None = None,
    ) -> tuple[Manifest, VerifyReport]:
        """Verify the partial copy (from the medium, data chunks only, against its chunk
        digests and chain checksum), then rename it into place and write the manifest last.
        ``on_progress(verified, read)`` keeps a long verify heartbeating.

        ``before_publish`` runs under the volume's chain lock just before the renames and
        may raise to publish nothing: the copy's source is checked again there, after every
        read of it, so that an attempt that read while its layer was released and merged
        (a stale attempt after a delete) can never leave a manifest behind."""
        report = verify_copy(
            target.data, outcome.checksum, digests=target.digests, on_progress=on_progress
        )
        image = self.image_path(volume, snapshot_id)
        chunks = image.with_suffix(".chunks")
        manifest = Manifest(
            snapshot_id=snapshot_id,
            vm=volume.vm.name,
            disk=volume.disk,
            hypervisor=volume.vm.hypervisor.value,
            virtual_size=outcome.virtual_size,
            chunk_size=checksum.parse_checksum(outcome.checksum)[0],
            chunks=outcome.chunks,
            checksum=outcome.checksum,
            path=str(image),
            chunks_file=str(chunks),
            source=source,
            source_format=source_format,
            parent=plan.parent if plan else None,
            depth=plan.depth if plan else 0,
            extents=extents,
            full_reason=plan.reason if plan and plan.parent is None else None,
            change_id=change_id,
            created=datetime.now(UTC),
        )
        mpath = self.manifest_path(volume, snapshot_id)
        with self.volume_lock(volume):
            if before_publish is not None:
                before_publish()
            self._publish(target, image, chunks, mpath, manifest, volume, snapshot_id)
        return manifest, report

    def _publish(
        self,
        target: CopyTarget,
        image: Path,
        chunks: Path,
        mpath: Path,
        manifest: Manifest,
        volume: VolumeRef,
        snapshot_id: str,
    ) -> None:
        """Rename the verified partials into place, then write the manifest, last."""
        try:
            for partial in (target.data, target.digests):
                os.chmod(partial, FILE_MODE)  # also for partials an older version made
            os.replace(target.data, image)
            os.replace(target.digests, chunks)
            fsync_dir(mpath.parent)  # the renames are on the medium before the manifest
            atomic_write(mpath, manifest.model_dump_json(indent=2))  # written last
            self.plan_path(volume, snapshot_id).unlink(missing_ok=True)
            fsync_dir(mpath.parent)
        except OSError as exc:
            raise classify_os_error(exc, where=str(mpath.parent)) from exc

    @staticmethod
    def read_manifest(path: Path) -> Manifest:
        return Manifest.model_validate(json.loads(path.read_text()))

    @staticmethod
    def verify(
        manifest: Manifest, on_progress: Callable[[int, int], None] | None = None
    ) -> VerifyReport:
        """Re-read a finished backup from the medium and check size, chunk digests and
        chain checksum against its manifest; only the chunks holding data are read."""
        image = Path(manifest.path)
        if image.stat().st_size != manifest.virtual_size:
            raise BackupCorrupt(
                f"{image}: size {image.stat().st_size} != manifest {manifest.virtual_size}"
            )
        chunks = Path(manifest.chunks_file)
        if not chunks.exists():
            raise BackupCorrupt(f"{image}: its chunk digests {chunks} are missing")
        return verify_copy(image, manifest.checksum, digests=chunks, on_progress=on_progress)

    def discard_partial(self, target: CopyTarget) -> None:
        for p in (target.data, target.digests):
            p.unlink(missing_ok=True)
        snapshot_id = target.data.name.split(".", 1)[0]
        (target.data.parent / f".{snapshot_id}.plan.json").unlink(missing_ok=True)

    # -- incremental backups: the plan, the history, the chain ------------------------------
    def plan_path(self, volume: VolumeRef, snapshot_id: str) -> Path:
        return self.directory(volume) / f".{snapshot_id}.plan.json"

    def save_plan(self, volume: VolumeRef, snapshot_id: str, plan: BackupPlan) -> None:
        # Atomic: a crash mid-write must not leave a half plan that a resume misreads.
        atomic_write(self.plan_path(volume, snapshot_id), plan.model_dump_json())

    def load_plan(self, volume: VolumeRef, snapshot_id: str) -> BackupPlan | None:
        path = self.plan_path(volume, snapshot_id)
        return BackupPlan.model_validate_json(path.read_text()) if path.exists() else None

    def completed(self, volume: VolumeRef, *, hidden: bool = True) -> list[Manifest]:
        """The volume's finished backups, oldest first (a manifest means verified);
        ``hidden=False`` leaves out those of deleted snapshots kept for their dependants."""
        manifests = [
            self.read_manifest(p)
            for p in self.directory(volume).glob("*.manifest.json")
            if hidden or not self.hidden_marker(volume, p.name.split(".")[0]).exists()
        ]
        return sorted(manifests, key=lambda m: m.created)

    @staticmethod
    def chain(manifest: Manifest) -> list[Manifest]:
        """``manifest`` and its parents down to the full backup, newest first."""
        chain = [manifest]
        while chain[-1].parent is not None:
            parent = Path(chain[-1].path).with_name(f"{chain[-1].parent}.manifest.json")
            if not parent.exists():
                raise BackupCorrupt(
                    f"backup {manifest.snapshot_id} needs {chain[-1].parent}, which is gone"
                )
            chain.append(SecondaryStore.read_manifest(parent))
        return chain

    @staticmethod
    @contextlib.contextmanager
    def materialized(
        manifest: Manifest, on_progress: Callable[[int, int], None] | None = None
    ) -> Iterator[Path]:
        """The snapshot's full raw image for as long as the context lasts (a scratch file
        beside the backup when it has to be rebuilt from a chain, removed afterwards).
        ``on_progress(done, total)`` is called as it goes (verify and rebuild), so that a
        long restore can heartbeat."""
        scratch = Path(manifest.path).with_name(f".{manifest.snapshot_id}.restore.raw")
        try:
            yield SecondaryStore.materialize(manifest, scratch, on_progress=on_progress)
        finally:
            scratch.unlink(missing_ok=True)

    @staticmethod
    def materialize(
        manifest: Manifest,
        scratch: Path,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """A raw image of the snapshot: the backup itself when it is full; else the full
        backup with each delta's extents applied over it, oldest first, into ``scratch``.
        Every link of the chain is verified against its manifest first. Only data moves:
        the full backup's data segments (SEEK_DATA/SEEK_HOLE) and the deltas' extents, so
        the cost follows the data, not the virtual size."""
        report = on_progress or (lambda _d, _t: None)
        chain = SecondaryStore.chain(manifest)
        for link in chain:
            SecondaryStore.verify(link, on_progress=lambda done, _read: report(done, 0))
        if len(chain) == 1:
            return Path(manifest.path)
        block = 8 * 1024 * 1024
        buf = bytearray(block)
        last = [time.monotonic()]

        def copy_range(src: int, dst: int, start: int, length: int) -> None:
            # Clamped to the snapshot's size: a link taken while the volume was larger (a
            # resize, then a revert to a snapshot from before it) must not carry its tail
            # into this image, nor grow it.
            length = max(0, min(length, manifest.virtual_size - start))
            left, pos = length, start
            while left:
                n = os.preadv(src, [memoryview(buf)[: min(left, block)]], pos)
                if n == 0:
                    raise BackupCorrupt(f"backup ends before {pos} (expected {start + length})")
                view = memoryview(buf)[:n]
                while view:
                    view = view[os.pwrite(dst, view, pos + n - len(view)) :]
                pos += n
                left -= n
                if time.monotonic() - last[0] >= 0.5:
                    report(pos, manifest.virtual_size)
                    last[0] = time.monotonic()

        out = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.ftruncate(out, manifest.virtual_size)  # all hole: zeros for free
            full = os.open(chain[-1].path, os.O_RDONLY)
            try:
                for a, b in data_segments(full, 0, manifest.virtual_size):
                    copy_range(full, out, a, b - a)
            finally:
                os.close(full)
            for link in reversed(chain[:-1]):
                delta = os.open(link.path, os.O_RDONLY)
                try:
                    # A delta's extents are written whole: zeros inside them (holes in
                    # the delta file, read for free) must overwrite the base's data.
                    for start, length in link.extents or []:
                        copy_range(delta, out, start, length)
                finally:
                    os.close(delta)
            os.fsync(out)
        finally:
            os.close(out)
        return scratch

    def discard_backup(self, volume: VolumeRef, snapshot_id: str) -> None:
        """Remove a finished backup that failed verification (manifest first)."""
        image = self.image_path(volume, snapshot_id)
        for p in (self.manifest_path(volume, snapshot_id), image, image.with_suffix(".chunks")):
            p.unlink(missing_ok=True)

    def hidden_marker(self, volume: VolumeRef, snapshot_id: str) -> Path:
        return self.directory(volume) / f"{snapshot_id}.hidden"

    def dependants(self, volume: VolumeRef, snapshot_id: str) -> list[str]:
        """Backups that name ``snapshot_id`` as parent: finished ones (their manifest) and
        ones still being copied (their plan), so a running delta's base is never deleted."""
        finished = [m.snapshot_id for m in self.completed(volume) if m.parent == snapshot_id]
        running = [
            p.name[1:].split(".", 1)[0]
            for p in self.directory(volume).glob(".*.plan.json")
            if BackupPlan.model_validate_json(p.read_text()).parent == snapshot_id
        ]
        return finished + running

    @contextlib.contextmanager
    def volume_lock(self, volume: VolumeRef) -> Iterator[None]:
        """One chain change at a time per volume (choosing a delta's base, deleting): a
        delete must not remove a base while a backup is choosing it, nor two deletes of a
        chain race each other into an orphan. flock, which NFSv4 honours."""
        # Kept apart from the volume's directory, which holds backups and nothing else.
        lock = self.root / ".locks" / volume.vm.name / f"{volume.disk}.chain.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def delete_chain_aware(self, volume: VolumeRef, snapshot_id: str) -> DeleteBackupOutcome:
        """Delete one snapshot's backup unless later deltas need it (then hide it); then
        purge every hidden backup that nothing needs any more, until none is left.

        The sweep looks at the whole directory rather than following this backup's parent,
        so a retried delete (its own manifest already gone) still reports what it purged,
        and a purge an interrupted attempt left undone is finished."""
        with self.volume_lock(volume):
            if self.dependants(volume, snapshot_id):
                self.hidden_marker(volume, snapshot_id).touch()
                return DeleteBackupOutcome(hidden=True)
            self.discard_everything(volume, snapshot_id)
            purged: list[str] = []
            while True:
                orphans = [
                    marker.name.split(".", 1)[0]
                    for marker in self.directory(volume).glob("*.hidden")
                    if not self.dependants(volume, marker.name.split(".", 1)[0])
                ]
                if not orphans:
                    return DeleteBackupOutcome(purged=purged)
                for orphan in orphans:
                    self.discard_everything(volume, orphan)
                    purged.append(orphan)

    def discard_everything(self, volume: VolumeRef, snapshot_id: str) -> None:
        """Every file of one snapshot, in an order that never leaves a whole-looking backup."""
        self.discard_backup(volume, snapshot_id)
        self.discard_partial(self.partial_target(volume, snapshot_id))
        (self.directory(volume) / f".{snapshot_id}.lock").unlink(missing_ok=True)
        self.hidden_marker(volume, snapshot_id).unlink(missing_ok=True)

    @contextlib.contextmanager
    def exclusive(
        self, volume: VolumeRef, snapshot_id: str, *, wait_s: float = 0.0
    ) -> Iterator[None]:
        """Hold the per-snapshot lock (flock, which NFSv4 honours) while writing its files.

        A retry that follows a stall or a heartbeat timeout often finds the previous
        attempt still holding it, stuck in the store until the store answers. It waits up
        to ``wait_s`` for it (reporting :func:`~.liveness.alive` meanwhile, so it heartbeats)
        instead of failing at once and spending an attempt."""
        lock = self.directory(volume) / f".{snapshot_id}.lock"
        deadline = time.monotonic() + wait_s
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise SecondaryStoreUnavailable(
                        f"another attempt is still writing snapshot {snapshot_id}'s backup"
                    ) from None
                liveness.alive()
                time.sleep(0.2)
                continue
            if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
            # We locked a lock file its previous holder had already removed.
            os.close(fd)
            if time.monotonic() >= deadline:
                raise SecondaryStoreUnavailable(f"lost the race for {lock}; retrying")
        try:
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)  # the lock never outlives its holder
        finally:
            os.close(fd)
