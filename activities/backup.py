"""The backup activity: drive the copy engine from a backup worker, durably.

The copy itself is blocking file I/O, so it runs in the worker's bounded thread pool while
this coroutine heartbeats the engine's latest fsynced checkpoint, forwards progress to the
workflow (for the Web UI's current details), and turns a cancel into a clean stop. A retry
after a crash reads the checkpoint back from ``activity.info().heartbeat_details``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from temporalio import activity

from .contracts import BackupPlan, BackupProgress, BackupResult, CopyRequest
from .errors import BackupCorrupt, SourceGone, classify_os_error, converts_errors
from .hypervisors import Drivers
from .names import BACKUP_PROGRESS_SIGNAL, BACKUP_SNAPSHOT
from .progress import signal_interval
from .settings import Settings
from .storage.copy_engine import Checkpoint, CopyEngine
from .storage.secondary import SecondaryStore

log = logging.getLogger(__name__)


def _checkpoint_from(details: Any) -> Checkpoint | None:
    if not details:
        return None
    try:
        return Checkpoint.model_validate(details[0])
    except ValueError:
        return None


class BackupActivities:
    def __init__(self, settings: Settings, *, executor: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.store = SecondaryStore(settings.secondary)
        self.engine = CopyEngine(
            chunk_size=settings.chunk_size,
            checkpoint_bytes=settings.checkpoint_bytes,
            rate_limit_bps=settings.backup_rate_limit_bps,
        )
        self.executor = executor
        self.drivers = Drivers(settings)

    def _result(self, req: CopyRequest, *, bytes_copied: int, resumed_from: int) -> BackupResult:
        manifest = self.store.read_manifest(self.store.manifest_path(req.volume, req.snapshot_id))
        return BackupResult(
            path=manifest.path,
            manifest_path=str(self.store.manifest_path(req.volume, req.snapshot_id)),
            checksum=manifest.checksum,
            virtual_size=manifest.virtual_size,
            bytes_copied=bytes_copied,
            resumed_from=resumed_from,
            attempts=activity.info().attempt,
        )

    def _new_plan(self, driver: Any, req: CopyRequest, *, full: bool) -> BackupPlan:
        """Choose full or delta and keep the choice beside the partial files; under the
        volume's chain lock, so that no delete removes the base being chosen."""
        with self.store.volume_lock(req.volume):
            history = self.store.completed(req.volume, hidden=False)
            plan = BackupPlan() if full else driver.plan_backup(req.source, history)
            self.store.save_plan(req.volume, req.snapshot_id, plan)
        return plan

    def _copy(
        self,
        req: CopyRequest,
        resume: Checkpoint | None,
        on_checkpoint: Any,
        stop: threading.Event,
    ) -> tuple[int, int]:
        """Blocking part: copy, verify, rename, write the manifest. Returns counters.

        An exclusive lock on the store makes sure a stale attempt (cut off from the server,
        its heartbeat timed out) can never write the same ``.partial`` files as its retry.
        """
        target = self.store.target(req.volume, req.snapshot_id)
        try:
            with self.store.exclusive(req.volume, req.snapshot_id):
                driver = self.drivers.get(req.volume.vm.hypervisor)
                # A resumed copy must go on against the base its first attempt chose.
                plan = self.store.load_plan(req.volume, req.snapshot_id) if resume else None
                if plan is None:
                    resume = None
                    plan = self._new_plan(driver, req, full=False)
                try:
                    reader = driver.open_reader(req.source, plan)
                except SourceGone:
                    if plan.base_image is None:
                        raise
                    # The delta's base went (a newer backup's release destroyed it): what
                    # was copied against it is worthless, so start over as a full.
                    self.store.discard_partial(target)
                    resume, plan = None, self._new_plan(driver, req, full=True)
                    reader = driver.open_reader(req.source, plan)
                extents = (
                    [(e.start, e.length) for e in reader.data_extents()]
                    if plan.parent is not None
                    else None
                )
                try:
                    outcome = self.engine.copy(
                        reader,
                        target,
                        resume=resume,
                        on_checkpoint=on_checkpoint,
                        should_stop=stop.is_set,
                    )
                finally:
                    reader.close()
                try:
                    self.store.finalize(
                        volume=req.volume,
                        snapshot_id=req.snapshot_id,
                        target=target,
                        outcome=outcome,
                        source=req.source.image,
                        source_format=req.source.image_format,
                        parent=plan.parent,
                        depth=plan.depth,
                        extents=extents,
                    )
                except BackupCorrupt:
                    # Resuming would only re-verify the same bad bytes: start over instead.
                    self.store.discard_partial(target)
                    raise
        except OSError as exc:
            raise classify_os_error(exc, where=str(target.data.parent)) from exc
        return outcome.bytes_copied, outcome.resumed_from

    @activity.defn(name=BACKUP_SNAPSHOT)
    @converts_errors
    async def backup_snapshot(self, req: CopyRequest) -> BackupResult:
        info = activity.info()
        loop = asyncio.get_running_loop()
        manifest = self.store.manifest_path(req.volume, req.snapshot_id)
        if manifest.exists():
            # Finished before (the manifest is written last): verify instead of copying.
            try:
                await loop.run_in_executor(
                    self.executor, self.store.verify, self.store.read_manifest(manifest)
                )
                return self._result(req, bytes_copied=0, resumed_from=req.source.virtual_size)
            except BackupCorrupt:
                self.store.discard_backup(req.volume, req.snapshot_id)  # and copy it again

        resume = _checkpoint_from(info.heartbeat_details)
        latest: list[tuple[Checkpoint, int, float]] = []
        if resume is not None:
            latest.append((resume, resume.chunks_done * resume.chunk_size, time.monotonic()))
        stop = threading.Event()
        assert info.workflow_id is not None, "backup_snapshot runs inside a workflow"
        handle = activity.client().get_workflow_handle(
            info.workflow_id, run_id=info.workflow_run_id
        )

        def on_checkpoint(cp: Checkpoint, done: int) -> None:
            latest.append((cp, done, time.monotonic()))
            del latest[:-1]

        fut = loop.run_in_executor(self.executor, self._copy, req, resume, on_checkpoint, stop)
        stall_limit = (info.heartbeat_timeout or timedelta(seconds=60)).total_seconds() * 0.8
        last_signal = 0.0
        started = time.monotonic()
        first_done = latest[-1][1] if latest else 0
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.25)
                now = time.monotonic()
                last_progress = latest[-1][2] if latest else started
                if fut not in done and now - last_progress > stall_limit:
                    # The copy is stuck (a hung store?): stop vouching for it, so that the
                    # heartbeat timeout hands the backup to a retry.
                    stop.set()
                elif latest:
                    activity.heartbeat(latest[-1][0].model_dump())
                else:
                    activity.heartbeat()
                # Progress signals thin out as the backup ages (over all its attempts, so
                # that a backup retried many times does not send many times more), to bound
                # the history: about 1000 per tenfold of age past 1000 intervals.
                interval = signal_interval(
                    base_s=req.progress_interval_s,
                    backup_started=req.backup_started,
                    now=time.time(),
                )
                if fut in done or now - last_signal >= interval:
                    bytes_done = (
                        req.source.virtual_size if fut in done else (latest[-1][1] if latest else 0)
                    )
                    progress = BackupProgress(
                        snapshot_id=req.snapshot_id,
                        bytes_done=bytes_done,
                        bytes_total=req.source.virtual_size,
                        bytes_per_second=(bytes_done - first_done) / max(now - started, 1e-6),
                        attempt=info.attempt,
                    )
                    try:
                        await handle.signal(BACKUP_PROGRESS_SIGNAL, progress)
                    except Exception as exc:  # progress is best effort; the copy goes on
                        log.warning("progress signal failed: %s", exc)
                    last_signal = now
                if fut in done:
                    break
            bytes_copied, resumed_from = fut.result()
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait({fut})
            details = activity.cancellation_details()
            if details is not None and details.cancel_requested:
                # Cancelled by the workflow (operator cancel, delete): leave nothing behind.
                # Any other cancel (timeout, shutdown, pause) keeps the files for the resume.
                self.store.discard_partial(self.store.partial_target(req.volume, req.snapshot_id))
            raise
        return self._result(req, bytes_copied=bytes_copied, resumed_from=resumed_from)
