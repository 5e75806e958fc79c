"""Operations on finished backups: verify, restore as a volume or template, delete.

They run on the backup pool, which sees secondary storage (and, as for backups, the primary
pool's paths). Every restore is verified before it appears under its final name: the backup
is re-read against its manifest checksum, converted into ``<name>.partial``, compared with
``qemu-img compare``, then renamed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from temporalio import activity

from .contracts import (
    DeleteBackupOutcome,
    DeleteBackupRequest,
    RestoreKind,
    RestoreRequest,
    RestoreResult,
)
from .errors import BackupCorrupt, InvalidInput, classify_os_error, converts_errors
from .hypervisors import Drivers
from .names import DELETE_BACKUP, RESTORE_BACKUP, VERIFY_BACKUP
from .settings import Settings
from .storage.files import FILE_MODE, atomic_write, fsync_replace, make_dirs
from .storage.secondary import Manifest, SecondaryStore


def qemu_img_checked(*args: str, what: str) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BackupCorrupt(f"{what}: qemu-img {args[0]} failed: {proc.stderr.strip()}")


class RestoreActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = SecondaryStore(settings.secondary)
        self.drivers = Drivers(settings)

    def _manifest(self, path: str):  # type: ignore[no-untyped-def]
        p = Path(path)
        if not p.exists():
            raise InvalidInput(f"backup manifest {path} does not exist")
        return self.store.read_manifest(p)

    @activity.defn(name=VERIFY_BACKUP)
    @converts_errors
    def verify_backup(self, manifest_path: str) -> str:
        """Re-read a backup and check it against its manifest; returns the checksum."""
        manifest = self._manifest(manifest_path)
        self.store.verify(manifest)
        return manifest.checksum

    def target_path(self, req: RestoreRequest) -> Path:
        if req.kind == RestoreKind.VOLUME:
            return Path(req.primary_dir) / f"{req.name}.qcow2"
        return self.settings.secondary / "templates" / f"{req.name}.qcow2"

    @activity.defn(name=RESTORE_BACKUP)
    @converts_errors
    def restore_backup(self, req: RestoreRequest) -> RestoreResult:
        manifest = self._manifest(req.manifest_path)
        target = self.target_path(req)
        if target.exists():
            raise InvalidInput(f"{req.kind.value} {req.name!r} already exists at {target}")
        with self.store.materialized(manifest) as raw:  # verified, chain applied
            if req.kind == RestoreKind.VOLUME:
                # A hypervisor with its own primary storage (a datastore, an SR) puts it there.
                driver = self.drivers.get(req.volume.vm.hypervisor)
                placed = driver.create_volume(req, str(raw))
                if placed is not None:
                    return placed
            return self._restore_qcow2(req, target, raw, manifest)

    def _restore_qcow2(
        self, req: RestoreRequest, target: Path, raw: Path, manifest: Manifest
    ) -> RestoreResult:
        """A file-backed qcow2 volume or template, compared before its final name."""
        partial = target.with_name(target.name + ".partial")
        try:
            make_dirs(target.parent)
            partial.unlink(missing_ok=True)
            qemu_img_checked(
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                str(raw),
                str(partial),
                what=f"restoring {req.snapshot_id}",
            )
            qemu_img_checked(
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "qcow2",
                str(raw),
                str(partial),
                what=f"checking the restore of {req.snapshot_id}",
            )
            os.chmod(partial, FILE_MODE)
            # qemu-img does not fsync: the bytes reach the medium before the final name.
            fsync_replace(partial, target)
            if req.kind == RestoreKind.TEMPLATE:
                atomic_write(
                    target.with_suffix(".template.json"),
                    json.dumps(
                        {
                            "name": req.name,
                            "path": str(target),
                            "format": "qcow2",
                            "virtual_size": manifest.virtual_size,
                            "from_snapshot": req.snapshot_id,
                            "snapshot_checksum": manifest.checksum,
                        },
                        indent=2,
                    ),
                )
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise classify_os_error(exc, where=str(target.parent)) from exc
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return RestoreResult(path=str(target), virtual_size=manifest.virtual_size)

    @activity.defn(name=DELETE_BACKUP)
    @converts_errors
    def delete_backup(self, req: DeleteBackupRequest) -> DeleteBackupOutcome:
        """Remove a snapshot's files from the store, chain-aware: a backup later deltas
        depend on is hidden instead, and hidden ancestors left without dependants go too.
        Files go manifest first, so a half-deleted backup never looks whole. Idempotent."""
        try:
            return self.store.delete_chain_aware(req.volume, req.snapshot_id)
        except OSError as exc:
            raise classify_os_error(exc, where=str(self.store.directory(req.volume))) from exc
