"""The secondary store: a directory (an NFS mount in production) of raw images + manifests.

Layout, per volume snapshot::

    <root>/snapshots/<vm>/<disk>/<snapshot-id>.raw            the guest-visible image, sparse
    <root>/snapshots/<vm>/<disk>/<snapshot-id>.raw.partial    while copying
    <root>/snapshots/<vm>/<disk>/<snapshot-id>.chunks         one SHA-256 per chunk
    <root>/snapshots/<vm>/<disk>/<snapshot-id>.manifest.json  written last: its presence = done

Backups are raw so that any tool (``qemu-img``, ``dd``, ``sha256sum`` of chunks) can read them
without snapferry; sparse files keep holes free on the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from ..contracts import VolumeRef
from ..errors import BackupCorrupt, SecondaryStoreUnavailable, classify_os_error
from . import checksum
from .copy_engine import CopyOutcome, CopyTarget, verify_copy


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
    created: datetime


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            d.mkdir(parents=True, exist_ok=True)
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
        parent: str | None = None,
    ) -> Manifest:
        """Verify the partial copy, then rename it into place and write the manifest last."""
        verify_copy(target.data, outcome.checksum)
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
            parent=parent,
            created=datetime.now(UTC),
        )
        mpath = self.manifest_path(volume, snapshot_id)
        tmp = mpath.with_suffix(".json.partial")
        try:
            os.replace(target.data, image)
            os.replace(target.digests, chunks)
            with open(tmp, "w") as f:
                f.write(manifest.model_dump_json(indent=2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, mpath)
            _fsync_dir(mpath.parent)
        except OSError as exc:
            raise classify_os_error(exc, where=str(mpath.parent)) from exc
        return manifest

    @staticmethod
    def read_manifest(path: Path) -> Manifest:
        return Manifest.model_validate(json.loads(path.read_text()))

    @staticmethod
    def verify(manifest: Manifest) -> None:
        """Re-read a finished backup and check size and checksum against its manifest."""
        image = Path(manifest.path)
        if image.stat().st_size != manifest.virtual_size:
            raise BackupCorrupt(
                f"{image}: size {image.stat().st_size} != manifest {manifest.virtual_size}"
            )
        verify_copy(image, manifest.checksum)

    def discard_partial(self, target: CopyTarget) -> None:
        for p in (target.data, target.digests):
            p.unlink(missing_ok=True)

    def discard_backup(self, volume: VolumeRef, snapshot_id: str) -> None:
        """Remove a finished backup that failed verification (manifest first)."""
        image = self.image_path(volume, snapshot_id)
        for p in (self.manifest_path(volume, snapshot_id), image, image.with_suffix(".chunks")):
            p.unlink(missing_ok=True)

    def discard_everything(self, volume: VolumeRef, snapshot_id: str) -> None:
        """Every file of one snapshot, in an order that never leaves a whole-looking backup."""
        self.discard_backup(volume, snapshot_id)
        self.discard_partial(self.partial_target(volume, snapshot_id))
        (self.directory(volume) / f".{snapshot_id}.lock").unlink(missing_ok=True)

    @contextlib.contextmanager
    def exclusive(self, volume: VolumeRef, snapshot_id: str) -> Iterator[None]:
        """Hold the per-snapshot lock (flock, which NFSv4 honours) while writing its files."""
        lock = self.directory(volume) / f".{snapshot_id}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SecondaryStoreUnavailable(
                    f"another attempt is still writing snapshot {snapshot_id}'s backup"
                ) from None
            if not lock.exists() or os.stat(lock).st_ino != os.fstat(fd).st_ino:
                # We locked a lock file its previous holder had already removed.
                raise SecondaryStoreUnavailable(f"lost the race for {lock}; retrying")
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)  # the lock never outlives its holder
        finally:
            os.close(fd)
