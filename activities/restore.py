"""Operations on finished backups: verify, restore as a volume or template, delete.

They run on the backup pool, which sees secondary storage (and, as for backups, the primary
pool's paths). Every restore is verified before it appears under its final name: the backup
is re-read against its manifest checksum, converted into ``<name>.partial``, compared with
``qemu-img compare``, then renamed.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import CancelledError

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
from .storage.backup_image import backup_image, repository_of
from .storage.files import FILE_MODE, atomic_write, fsync_replace, make_dirs
from .storage.repository import BackupManifest
from .storage.repository.store import RepositoryStore
from .storage.secondary import Manifest, SecondaryStore


def heartbeat(*details: object) -> None:
    """Heartbeat if running as an activity (the helpers also run outside one, in tests)."""
    if activity.in_activity():
        activity.heartbeat(*details)


def qemu_img_checked(*args: str, what: str) -> None:
    """Run qemu-img, heartbeating while it runs (a convert of a large image takes a while);
    a cancel delivered through the heartbeat stops it."""
    proc = subprocess.Popen(
        ["qemu-img", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        while True:
            try:
                _, stderr = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                heartbeat(f"qemu-img {args[0]}")
                if activity.in_activity() and activity.is_cancelled():
                    raise CancelledError(f"qemu-img {args[0]} cancelled") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BackupCorrupt(f"{what}: qemu-img {args[0]} failed: {stderr.strip()}")


def _progress(done: int, _other: int) -> None:
    heartbeat(done)


@contextlib.contextmanager
def heartbeating(every_s: float = 1.0) -> Iterator[None]:
    """Heartbeat from a helper thread while a step with no progress callback of its own
    runs (a hypervisor's upload): a killed worker still stops the heartbeats at once."""
    if not activity.in_activity():
        yield
        return
    done = threading.Event()
    ctx = contextvars.copy_context()  # the activity's context, for activity.heartbeat

    def beat() -> None:
        while not done.wait(every_s):
            activity.heartbeat("working")

    thread = threading.Thread(target=ctx.run, args=(beat,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class RestoreActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = SecondaryStore(settings.secondary)
        self.repository = RepositoryStore(settings.repository, level=settings.repository_zstd_level)
        self.drivers = Drivers(settings)

    def _manifest(self, path: str) -> Manifest | BackupManifest:
        """A backup's manifest, from the store it names: the repository or plain files
        (backups in either restore, whichever store new backups go to)."""
        p = Path(path)
        if not p.exists():
            raise InvalidInput(f"backup manifest {path} does not exist")
        repository = repository_of(p)
        if repository is not None:
            return repository.read_manifest(p)
        return self.store.read_manifest(p)

    @activity.defn(name=VERIFY_BACKUP)
    @converts_errors
    def verify_backup(self, manifest_path: str) -> str:
        """Re-read a backup and check it against its manifest; returns the checksum."""
        manifest = self._manifest(manifest_path)
        t0 = time.monotonic()
        if isinstance(manifest, BackupManifest):
            repository = repository_of(manifest_path)
            assert repository is not None  # _manifest read it from there
            _, read = repository.verify(manifest, on_progress=_progress)
        else:
            read = self.store.verify(manifest, on_progress=_progress).bytes_read
        activity.logger.info(
            "verified %s: read %d of %d bytes in %.2f s",
            manifest_path,
            read,
            manifest.virtual_size,
            time.monotonic() - t0,
        )
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
        with backup_image(req.manifest_path, on_progress=_progress) as raw:  # verified
            if req.kind == RestoreKind.VOLUME:
                # A hypervisor with its own primary storage (a datastore, an SR) puts it there.
                driver = self.drivers.get(req.volume.vm.hypervisor)
                with heartbeating():
                    placed = driver.create_volume(req, str(raw))
                if placed is not None:
                    return placed
            return self._restore_qcow2(req, target, raw, manifest)

    def _restore_qcow2(
        self, req: RestoreRequest, target: Path, raw: Path, manifest: Manifest | BackupManifest
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
            # A repository backup stands alone: deleting it touches no other backup.
            self.repository.delete(req.volume, req.snapshot_id)
            return self.store.delete_chain_aware(req.volume, req.snapshot_id)
        except OSError as exc:
            raise classify_os_error(exc, where=str(self.store.directory(req.volume))) from exc
