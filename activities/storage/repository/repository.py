"""A repository on secondary storage: open it, find and read blobs, list and drop backups.

The store is a directory (an NFS mount in production); every file in it is written under a
temporary name, fsynced and renamed, so a crash leaves either the old state or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ...errors import BackupCorrupt, InvalidInput
from ..files import atomic_write, make_dirs
from .backups import BackupManifest, BackupReader, BackupWriter
from .blobs import DEFAULT_ZSTD_LEVEL, BlobCodec
from .index import BlobIndex
from .keys import RepositoryKey
from .layout import backup_dir, check_name, load_or_create_config
from .packs import BlobLocation, pack_path, read_blob


class Repository:
    def __init__(
        self, root: Path, key: RepositoryKey | None = None, *, level: int = DEFAULT_ZSTD_LEVEL
    ) -> None:
        self.root = root
        self.config = load_or_create_config(root, key)
        self.codec = BlobCodec(key, level=level)
        self.index = BlobIndex(root)
        self.damaged = self._load_damaged()

    # -- blobs ------------------------------------------------------------------------
    def _load_damaged(self) -> set[tuple[str, int]]:
        path = self.root / "damaged.json"
        if not path.exists():
            return set()
        return {(p, o) for p, o in json.loads(path.read_text())}

    def save_damaged(self, damaged: set[tuple[str, int]]) -> None:
        self.damaged = damaged
        atomic_write(self.root / "damaged.json", json.dumps(sorted(damaged)))

    def find(self, blob_id: bytes) -> BlobLocation | None:
        """Where a good copy of the blob is (copies a verify found damaged are skipped)."""
        for f in self.index.files.values():
            found = f.find(blob_id)
            if found is not None and (found.pack, found.offset) not in self.damaged:
                return found
        return None

    def read_blob(self, blob_id: bytes, *, where: str) -> bytes:
        found = self.find(blob_id)
        if found is None:
            self.index.refresh()  # written by another process since we opened
            found = self.find(blob_id)
        if found is None:
            raise BackupCorrupt(f"{where}: blob {blob_id.hex()[:16]} is not in the repository")
        try:
            return read_blob(self.root, found, self.codec)
        except BackupCorrupt as err:
            raise BackupCorrupt(f"{where}: {err}") from None

    @contextlib.contextmanager
    def pack_lock(self, *, exclusive: bool) -> Iterator[None]:
        """Writers touch packs they reuse under the shared lock; gc's check-then-delete of a
        pack holds it exclusively, so no pack is deleted between a touch and its use."""
        path = self.root / "locks" / "packs"
        make_dirs(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def touch_pack(self, pack: str, touched: set[str]) -> bool:
        """Mark a pack as in use by a running backup (its mtime, as Proxmox Backup Server
        marks chunks by atime); False if gc removed it, and then the chunk is stored again."""
        if pack in touched:
            return True
        with self.pack_lock(exclusive=False):
            try:
                os.utime(pack_path(self.root, pack))
            except FileNotFoundError:
                return False
        touched.add(pack)
        return True

    # -- backups ------------------------------------------------------------------------
    def backup_dir(self, vm: str, disk: str) -> Path:
        return backup_dir(self.root, vm, disk)

    def manifest_path(self, vm: str, disk: str, snapshot_id: str) -> Path:
        return self.backup_dir(vm, disk) / f"{check_name('snapshot', snapshot_id)}.json"

    def manifest(self, vm: str, disk: str, snapshot_id: str) -> BackupManifest:
        path = self.manifest_path(vm, disk, snapshot_id)
        try:
            return BackupManifest.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise InvalidInput(f"no backup {snapshot_id} of {vm}/{disk} in {self.root}") from None

    def manifests(self) -> Iterator[BackupManifest]:
        base = self.root / "backups"
        if base.is_dir():
            for path in sorted(base.glob("*/*/*.json")):
                yield BackupManifest.model_validate_json(path.read_text())

    def writer(self, **kwargs: object) -> BackupWriter:
        return BackupWriter(self, **kwargs)  # type: ignore[arg-type]

    def reader(self, manifest: BackupManifest) -> BackupReader:
        return BackupReader(self, manifest)

    def delete_backup(self, vm: str, disk: str, snapshot_id: str) -> None:
        """Forget a backup: its manifest first (then it is gone), then its index. Its chunks
        stay until gc finds nothing else uses them; no other backup depends on it."""
        manifest = self.manifest_path(vm, disk, snapshot_id)
        manifest.unlink(missing_ok=True)
        manifest.with_suffix(".segments").unlink(missing_ok=True)
        manifest.with_suffix(".segments.partial").unlink(missing_ok=True)
        manifest.with_suffix(".segments.checkpoint").unlink(missing_ok=True)
