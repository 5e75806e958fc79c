"""The repository as the backup, restore and delete activities use it: per volume.

A volume's backups are ``backups/<vm>/<disk>/`` in the repository. Every one is whole, so a
delete removes one backup and nothing else: no chain, no hidden backups (CloudStack's
"Hidden" state stays a plain-file store's). The key is read from the file
``SNAPFERRY_REPOSITORY_KEY_FILE`` names, never from a payload.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ...contracts import VolumeRef
from ...errors import BackupCorrupt
from ..files import FILE_MODE
from .backups import BackupManifest
from .keys import key_from_env
from .packs import pack_path
from .repository import Repository


class RepositoryStore:
    def __init__(self, root: Path, *, level: int = 3) -> None:
        self.root = root
        self.level = level

    def open(self) -> Repository:
        """The repository, its index as it is now (other writers add to it all along)."""
        return Repository(self.root, key_from_env(), level=self.level)

    def manifest_path(self, volume: VolumeRef, snapshot_id: str) -> Path:
        return self.root / "backups" / volume.vm.name / volume.disk / f"{snapshot_id}.json"

    def history(self, volume: VolumeRef) -> list[BackupManifest]:
        """The volume's finished backups, oldest first (a manifest means verified)."""
        directory = self.root / "backups" / volume.vm.name / volume.disk
        if not directory.is_dir():
            return []
        found = [
            BackupManifest.model_validate_json(p.read_text()) for p in directory.glob("*.json")
        ]
        return sorted(found, key=lambda m: m.created)

    @staticmethod
    def read_manifest(path: str | Path) -> BackupManifest:
        return BackupManifest.model_validate_json(Path(path).read_text())

    def verify(
        self, manifest: BackupManifest, *, on_progress: Callable[[int, int], None] | None = None
    ) -> tuple[int, int]:
        """Re-read every chunk of one backup from the medium (each pack's cached pages
        dropped once) and open it: (bytes of the disk checked, bytes read)."""
        repo = self.open()
        reader = repo.reader(manifest)
        dropped: set[str] = set()
        read = 0
        checked = 0
        for offset, cid in reader.chunks():
            loc = repo.find(cid)
            if loc is not None and loc.pack not in dropped:
                _drop_cached(repo, loc.pack)
                dropped.add(loc.pack)
            data = reader.read_chunk(offset, cid)
            read += loc.length if loc is not None else len(data)
            checked = offset + len(data)
            if on_progress is not None:
                on_progress(checked, read)
        return checked, read

    @contextlib.contextmanager
    def materialized(
        self, manifest: BackupManifest, scratch_dir: Path, *, progress: Callable[[int], None]
    ) -> Iterator[Path]:
        """The backup as a sparse raw image for as long as the context lasts: every chunk
        checked against its ID as it is written (a damaged one fails, naming the snapshot
        and the offset), removed afterwards."""
        scratch_dir.mkdir(parents=True, exist_ok=True)
        # A name of its own: two restores of one backup (a retry beside a stale attempt,
        # two volumes from one snapshot) never write or remove each other's image.
        scratch = scratch_dir / f".{manifest.snapshot_id}.{uuid.uuid4().hex}.restore.raw"
        try:
            self.open().reader(manifest).restore_to(scratch, progress=progress)
            os.chmod(scratch, FILE_MODE)
            yield scratch
        finally:
            scratch.unlink(missing_ok=True)

    def discard_partial(self, volume: VolumeRef, snapshot_id: str) -> None:
        """What an unfinished backup left (its partial index); gc frees its chunks."""
        directory = self.root / "backups" / volume.vm.name / volume.disk
        for suffix in (".segments.partial", ".segments.checkpoint"):
            (directory / f"{snapshot_id}{suffix}").unlink(missing_ok=True)

    def delete(self, volume: VolumeRef, snapshot_id: str) -> None:
        if (self.root / "config.json").exists():
            self.open().delete_backup(volume.vm.name, volume.disk, snapshot_id)


def _drop_cached(repo: Repository, pack: str) -> None:
    try:
        fd = os.open(pack_path(repo.root, pack), os.O_RDONLY)
    except FileNotFoundError:
        raise BackupCorrupt(f"pack {pack} is missing") from None
    try:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
