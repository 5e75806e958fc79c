"""The backup activity's path into the backup repository (``SNAPFERRY_BACKUP_STORE=repository``).

The same contract as the plain-file path (:mod:`.backup`): a plan chosen once and kept for
a resume, the source read once through the driver's reader, everything verified from the
medium before the manifest is written, the source checked again under the volume's lock
just before it is, and a resume from the last checkpoint after any crash. What differs is
the store: chunks deduplicated across every backup, compressed, encrypted when a key is set,
and each backup a complete index of its disk (:mod:`.storage.repository`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .contracts import BackupPlan, BackupResult, CopyRequest
from .errors import BackupCorrupt, SourceGone, classify_os_error
from .storage.copy_engine import StopFlag
from .storage.files import make_dirs
from .storage.repository import BackupManifest
from .storage.repository.ingest import ingest
from .storage.repository.store import RepositoryStore

if TYPE_CHECKING:
    from .backup import BackupActivities, CopyCounters, _Watch

log = logging.getLogger(__name__)


def hashing_pool(threads: int) -> ThreadPoolExecutor:
    """Hash, look up, compress and encrypt chunks on every core (each step releases the GIL)."""
    return ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="repo-hash")


def repository_result(
    req: CopyRequest, store: RepositoryStore, manifest: BackupManifest, counters: CopyCounters
) -> BackupResult:
    from .backup import backup_result

    path = store.manifest_path(req.volume, req.snapshot_id)
    # What this backup added to the store: its unique, compressed (encrypted) chunks.
    return backup_result(
        manifest, counters, str(path.with_suffix(".segments")), path, manifest.new_bytes
    )


def copy_to_repository(
    acts: BackupActivities,
    req: CopyRequest,
    watch: _Watch,
    stop: StopFlag,
    lock_wait_s: float,
) -> tuple[BackupManifest, CopyCounters]:
    """Blocking part: plan, read, store, verify, publish. Under the snapshot's exclusive
    lock, so that a stale attempt never writes the same partial index as its retry."""
    from .backup import CopyCounters

    store = acts.repository
    try:
        # The snapshot's lock and its plan are kept where a plain-file backup keeps them,
        # so that one lock holds whichever store an attempt writes to.
        make_dirs(acts.store.directory(req.volume))
        with acts.store.exclusive(req.volume, req.snapshot_id, wait_s=lock_wait_s):
            driver = acts.drivers.get(req.volume.vm.hypervisor)
            repo = store.open()
            plan = acts.store.load_plan(req.volume, req.snapshot_id)
            resume = plan is not None
            if plan is None:
                plan = acts._new_plan(
                    driver, req, full_because=None, history=lambda: store.history(req.volume)
                )
            parent = _parent(store, req, plan)
            why_full = None
            if plan.parent is not None and parent is None:
                why_full = f"the base snapshot {plan.parent}'s backup is gone"
            elif parent is not None and repo.unreadable(parent):
                # An incremental would inherit the damaged chunks: a full stores them again.
                why_full = f"the base snapshot {plan.parent}'s backup is damaged (verify)"
            if why_full is not None:
                resume, parent = False, None
                store.discard_partial(req.volume, req.snapshot_id)
                plan = acts._new_plan(
                    driver, req, full_because=why_full, history=lambda: store.history(req.volume)
                )
            try:
                reader = driver.open_reader(req.source, plan)
            except SourceGone as exc:
                if plan.base_image is None:
                    raise
                # The delta's base went on primary: start over as a full.
                store.discard_partial(req.volume, req.snapshot_id)
                resume, parent = False, None
                plan = acts._new_plan(
                    driver,
                    req,
                    full_because=f"the delta base went: {exc}",
                    history=lambda: store.history(req.volume),
                )
                reader = driver.open_reader(req.source, plan)

            @contextlib.contextmanager
            def publishing() -> Iterator[None]:
                # After every read, under the chain lock: a stale attempt whose layer a
                # delete released meanwhile read bytes that are not the snapshot's.
                with acts.store.volume_lock(req.volume):
                    if not driver.source_intact(req.source):
                        raise SourceGone(
                            f"the snapshot's layer {req.source.overlay or req.source.image}"
                            " was merged away or deleted while this attempt copied it: its"
                            " backup is not published"
                        )
                    yield

            try:
                writer = repo.writer(
                    snapshot_id=req.snapshot_id,
                    vm=req.volume.vm.name,
                    disk=req.volume.disk,
                    virtual_size=reader.virtual_size,
                    parent=parent,
                    resume=resume,
                    meta=_meta(req, plan),
                )
                outcome = ingest(
                    reader,
                    writer,
                    pool=acts.hashing,
                    delta=plan.parent is not None,
                    should_stop=stop,
                    stop_error=stop.error,
                    on_checkpoint=watch.on_checkpoint,
                    on_progress=watch.on_copy,
                    rate_limit_bps=acts.rate_limit_bps(req),
                    publishing=publishing,
                )
            except (BackupCorrupt, SourceGone):
                store.discard_partial(req.volume, req.snapshot_id)  # nothing worth resuming
                raise
            finally:
                reader.close()
            acts.store.plan_path(req.volume, req.snapshot_id).unlink(missing_ok=True)
    except OSError as exc:
        raise classify_os_error(exc, where=str(store.root)) from exc
    log.info(
        "backup %s in the repository: read %d bytes, stored %d new, verified %d in %.2f s",
        req.snapshot_id,
        outcome.bytes_copied,
        outcome.manifest.new_bytes,
        outcome.verify_bytes_read,
        outcome.verify_seconds,
    )
    return outcome.manifest, CopyCounters(
        bytes_copied=outcome.bytes_copied,
        resumed_from=outcome.resumed_from,
        verify_bytes_read=outcome.verify_bytes_read,
        verify_seconds=outcome.verify_seconds,
    )


def _parent(store: RepositoryStore, req: CopyRequest, plan: BackupPlan) -> BackupManifest | None:
    if plan.parent is None:
        return None
    path = store.manifest_path(req.volume, plan.parent)
    return store.read_manifest(path) if path.exists() else None


def _meta(req: CopyRequest, plan: BackupPlan) -> dict[str, Any]:
    return {
        "hypervisor": req.volume.vm.hypervisor.value,
        "source": req.source.image,
        "source_format": req.source.image_format,
        "depth": plan.depth if plan.parent is not None else 0,
        "change_id": req.source.change_id,
        "full_reason": plan.reason if plan.parent is None else None,
    }
