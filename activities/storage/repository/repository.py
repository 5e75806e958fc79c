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
from .blobs import DEFAULT_ZSTD_LEVEL, ZERO_ID, BlobCodec
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
        if not self.damaged:
            for f in self.index.files.values():
                found = f.find(blob_id)
                if found is not None:
                    return found
            return None
        copies = self._copies(blob_id)
        return copies[0] if copies else None

    def _copies(self, blob_id: bytes) -> list[BlobLocation]:
        found = [c for f in list(self.index.files.values()) for c in f.copies(blob_id)]
        return [c for c in found if (c.pack, c.offset) not in self.damaged]

    def read_blob(self, blob_id: bytes, *, where: str) -> bytes:
        """The blob's plaintext from the first copy that opens whole. A copy can be gone (gc
        swept a pack this process's index still lists, or compaction replaced an index
        file): the index is read again and every other copy tried before it fails."""
        last: BackupCorrupt | None = None
        for attempt in range(2):
            if attempt:
                self.index.refresh()
            for copy in self._copies(blob_id):
                try:
                    return read_blob(self.root, copy, self.codec)
                except BackupCorrupt as err:
                    last = err
        if last is None:
            raise BackupCorrupt(f"{where}: blob {blob_id.hex()[:16]} is not in the repository")
        raise BackupCorrupt(f"{where}: {last}") from None

    def unreadable(self, manifest: BackupManifest) -> bool:
        """Whether a backup references a blob with no good copy left (a verify found the
        only copies damaged): an incremental must not inherit from it, it plans a full.
        Walked only when a verify has recorded damage."""
        if not self.damaged:
            return False
        reader = BackupReader(self, manifest)
        for seg in range(manifest.segments):
            seg_id = reader.segment_id(seg)
            if seg_id == ZERO_ID:
                continue
            if self.find(seg_id) is None:
                return True
            try:
                ids = reader.chunk_ids(seg)
            except BackupCorrupt:
                return True
            if any(c != ZERO_ID and self.find(c) is None for c in ids):
                return True
        return False

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
