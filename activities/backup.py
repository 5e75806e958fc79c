"""The backup activity: drive the copy engine from a backup worker, durably.

The copy itself is blocking file I/O, so it runs in the worker's bounded thread pool while
this coroutine heartbeats the engine's latest fsynced checkpoint, forwards progress to the
workflow (for the Web UI's current details), and turns a cancel into a clean stop. A retry
after a crash reads the checkpoint back from ``activity.info().heartbeat_details``.

Every long step heartbeats: the copy (its checkpoints), the verify before the rename and the
verify of an already finished backup (their progress callbacks), a reader skipping forward
in a stream and the wait for a stale attempt's lock (:mod:`.storage.liveness`). Only when
nothing moves for 0.8 x the heartbeat timeout does the guard stop vouching for the attempt:
the copy stops with the retryable ``BackupStalled`` (never ``BackupCancelled``, which is an
operator's cancel or a delete), and the heartbeat timeout hands the backup to a retry.

Retries: a crashed or lost attempt (heartbeat timeout) is retried after the workflow's short
policy interval; a failure raised here asks for CloudStack's ``backup.retry.interval``
(doubled per attempt) through ``ApplicationError.next_retry_delay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from .backup_repository import copy_to_repository, hashing_pool, repository_result
from .contracts import BackupPlan, BackupProgress, BackupResult, CopyRequest
from .errors import (
    BackupCorrupt,
    SnapferryError,
    SourceGone,
    as_application_error,
    classify_os_error,
)
from .hypervisors import Drivers
from .hypervisors.base import BackupHistoryEntry
from .names import BACKUP_PROGRESS_SIGNAL, BACKUP_SNAPSHOT
from .progress import signal_interval
from .settings import Settings
from .storage import liveness
from .storage.checksum import VerifyReport
from .storage.copy_engine import Checkpoint, CopyEngine, StopFlag
from .storage.repository.store import RepositoryStore
from .storage.secondary import SecondaryStore

T = TypeVar("T")

DELTA_CHUNK_SIZE = 64 * 1024  # see BackupActivities._engine_for

log = logging.getLogger(__name__)


def _checkpoint_from(details: Any) -> Checkpoint | None:
    if not details:
        return None
    try:
        return Checkpoint.model_validate(details[0])
    except ValueError:
        return None


def retry_delay(req: CopyRequest) -> timedelta | None:
    """How long a failed attempt asks Temporal to wait: CloudStack's backup.retry.interval,
    doubled per attempt (as the workflow's policy did before it served crashes only)."""
    if req.retry_interval_s is None:
        return None
    n = activity.info().attempt
    cap = max(req.retry_interval_s, 3600.0)
    return timedelta(seconds=min(req.retry_interval_s * 2.0 ** (n - 1), cap))


def effective_rate_limit(worker_bps: float | None, snapshot_mbps: float | None) -> float | None:
    """Bytes a second a backup may read: the lower of the worker's limit and the snapshot's
    (a policy's) own; None when neither sets one."""
    limits = [worker_bps, snapshot_mbps * 1e6 if snapshot_mbps else None]
    return min((x for x in limits if x), default=None)


def backup_result(
    manifest: Any, counters: CopyCounters, path: str, manifest_path: Path, stored: int
) -> BackupResult:
    """The activity's answer, from a finished backup's manifest (either store's: both
    carry checksum, virtual_size, parent, depth and full_reason) and its counters."""
    return BackupResult(
        path=path,
        manifest_path=str(manifest_path),
        checksum=manifest.checksum,
        virtual_size=manifest.virtual_size,
        bytes_copied=counters.bytes_copied,
        resumed_from=counters.resumed_from,
        attempts=activity.info().attempt,
        verify_bytes_read=counters.verify_bytes_read,
        verify_seconds=counters.verify_seconds,
        bytes_stored=stored,
        parent=manifest.parent,
        depth=manifest.depth,
        full_reason=manifest.full_reason,
    )


@dataclass(frozen=True)
class CopyCounters:
    bytes_copied: int
    resumed_from: int
    verify_bytes_read: int = 0
    verify_seconds: float = 0.0


class _Watch:
    """What the heartbeat loop watches, fed from the copy thread: the latest fsynced
    checkpoint, the bytes done, the phase, and when anything last moved."""

    def __init__(self, resume: Checkpoint | None) -> None:
        self._lock = threading.Lock()
        self.checkpoint: BaseModel | None = resume
        self.done = resume.chunks_done * resume.chunk_size if resume else 0
        self.phase = "copy"
        self.last_alive = time.monotonic()

    def on_checkpoint(self, cp: BaseModel, done: int) -> None:
        with self._lock:
            self.checkpoint, self.done, self.phase = cp, done, "copy"
            self.last_alive = time.monotonic()

    def on_copy(self, done: int) -> None:
        with self._lock:
            self.done, self.phase = done, "copy"
            self.last_alive = time.monotonic()

    def on_verify(self, verified: int, _read: int) -> None:
        with self._lock:
            self.done, self.phase = verified, "verify"
            self.last_alive = time.monotonic()

    def touch(self) -> None:
        self.last_alive = time.monotonic()


_RUNNING: dict[str, float] = {}  # snapshot ID -> when its backup began (wall clock)


@contextlib.asynccontextmanager
async def oldest_running_gauge(req: CopyRequest) -> AsyncIterator[None]:
    """Keep ``snapferry_backup_oldest_running_age_seconds`` (this process's oldest running
    backup, from its first attempt) current while this backup runs, for the alert on a
    snapshot BackingUp for too long. One series per worker process: bounded cardinality."""
    gauge = activity.metric_meter().create_gauge_float(
        "snapferry_backup_oldest_running_age_seconds", unit="s"
    )
    _RUNNING[req.snapshot_id] = (req.backup_started or datetime.now(UTC)).timestamp()

    def update() -> None:
        now = time.time()
        gauge.set(max((now - t for t in _RUNNING.values()), default=0.0))

    async def keep_updating() -> None:
        while True:
            update()
            await asyncio.sleep(5)

    task = asyncio.create_task(keep_updating())
    try:
        yield
    finally:
        task.cancel()
        _RUNNING.pop(req.snapshot_id, None)
        update()


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
        self.repository = RepositoryStore(settings.repository, level=settings.repository_zstd_level)
        self.hashing = hashing_pool(os.cpu_count() or 1)

    def _result(self, req: CopyRequest, counters: CopyCounters) -> BackupResult:
        manifest_path = self.store.manifest_path(req.volume, req.snapshot_id)
        manifest = self.store.read_manifest(manifest_path)
        # What the store really allocated for it: holes cost nothing there.
        stored = os.stat(manifest.path).st_blocks * 512
        return backup_result(manifest, counters, manifest.path, manifest_path, stored)

    def rate_limit_bps(self, req: CopyRequest) -> float | None:
        return effective_rate_limit(self.settings.backup_rate_limit_bps, req.rate_limit_mbps)

    def _engine_for(self, plan: BackupPlan, req: CopyRequest | None = None) -> CopyEngine:
        """A delta is copied in small chunks. Each chunk is read, hashed and verified whole,
        zeros included, so a delta of scattered clusters in 8 MiB chunks would cost about
        the whole volume in hashing; in DELTA_CHUNK_SIZE chunks it costs about its data.
        The chunk size is part of the checksum (and of each checkpoint), and the plan is
        kept for a resume, so a resumed delta copies in the same chunks."""
        engine = self.engine
        if plan.parent is not None and engine.chunk_size > DELTA_CHUNK_SIZE:
            engine = engine.with_chunk_size(DELTA_CHUNK_SIZE)
        rate = self.rate_limit_bps(req) if req is not None else engine.rate_limit_bps
        if rate != engine.rate_limit_bps:
            engine = engine.with_rate_limit(rate)
        return engine

    def _new_plan(
        self,
        driver: Any,
        req: CopyRequest,
        *,
        full_because: str | None,
        history: Callable[[], Sequence[BackupHistoryEntry]] | None = None,
    ) -> BackupPlan:
        """Choose full or delta and keep the choice beside the partial files; under the
        volume's chain lock, so that no delete removes the base being chosen. A full is
        forced ``full_because`` something (an operator's ``--full``, a lost base).
        ``history``: the volume's backups to plan from (default: the plain-file store's)."""
        if full_because is None and req.full:
            full_because = "a full backup was asked for (--full)"
        with self.store.volume_lock(req.volume):
            backups = (
                history() if history is not None else self.store.completed(req.volume, hidden=False)
            )
            if full_because is not None:
                plan = BackupPlan(reason=full_because)
            else:
                plan = driver.plan_backup(req.source, backups, delta_max=req.delta_max)
            self.store.save_plan(req.volume, req.snapshot_id, plan)
        if plan.parent is None:
            log.info("backup %s is a full backup: %s", req.snapshot_id, plan.reason)
        return plan

    def _copy(
        self,
        req: CopyRequest,
        resume: Checkpoint | None,
        watch: _Watch,
        stop: StopFlag,
        lock_wait_s: float,
    ) -> CopyCounters:
        """Blocking part: copy, verify, rename, write the manifest. Returns counters.

        An exclusive lock on the store makes sure a stale attempt (cut off from the server,
        its heartbeat timed out) can never write the same ``.partial`` files as its retry.
        """
        target = self.store.target(req.volume, req.snapshot_id)

        def on_verify(verified: int, read: int) -> None:
            watch.on_verify(verified, read)
            stop.raise_if_set()

        try:
            with self.store.exclusive(req.volume, req.snapshot_id, wait_s=lock_wait_s):
                driver = self.drivers.get(req.volume.vm.hypervisor)
                # A resumed copy must go on against the base its first attempt chose.
                plan = self.store.load_plan(req.volume, req.snapshot_id) if resume else None
                if plan is None:
                    resume = None
                    plan = self._new_plan(driver, req, full_because=None)
                try:
                    reader = driver.open_reader(req.source, plan)
                except SourceGone as exc:
                    if plan.base_image is None:
                        raise
                    # The delta's base went (a newer backup's release destroyed it): what
                    # was copied against it is worthless, so start over as a full.
                    self.store.discard_partial(target)
                    resume = None
                    plan = self._new_plan(driver, req, full_because=f"the delta base went: {exc}")
                    reader = driver.open_reader(req.source, plan)
                # A delta's extents go into its manifest (a restore applies them whole), so
                # they are listed once here and handed to the engine; a full's are streamed.
                listed = list(reader.data_extents()) if plan.parent is not None else None
                extents = [(e.start, e.length) for e in listed] if listed is not None else None
                try:
                    outcome = self._engine_for(plan, req).copy(
                        reader,
                        target,
                        resume=resume,
                        on_checkpoint=watch.on_checkpoint,
                        should_stop=stop,
                        extents=listed,
                    )
                finally:
                    reader.close()

                def source_still_intact() -> None:
                    # After every read, under the chain lock: a stale attempt whose layer a
                    # delete released (and merged below) meanwhile read bytes that are not
                    # the snapshot's, so it must not publish them.
                    if not driver.source_intact(req.source):
                        raise SourceGone(
                            f"the snapshot's layer {req.source.overlay or req.source.image} was"
                            " merged away or deleted while this attempt copied it: its backup"
                            " is not published"
                        )

                try:
                    _, report = self.store.finalize(
                        volume=req.volume,
                        snapshot_id=req.snapshot_id,
                        target=target,
                        outcome=outcome,
                        source=req.source.image,
                        source_format=req.source.image_format,
                        plan=plan,
                        extents=extents,
                        on_progress=on_verify,
                        before_publish=source_still_intact,
                        change_id=req.source.change_id,
                    )
                except (BackupCorrupt, SourceGone):
                    # Resuming would only re-verify the same bad bytes (or copy a layer that
                    # is gone): nothing copied is worth keeping.
                    self.store.discard_partial(target)
                    raise
        except OSError as exc:
            raise classify_os_error(exc, where=str(target.data.parent)) from exc
        log.info(
            "backup %s verified: read %d bytes of %d in %.2f s (%d of %d chunks)",
            req.snapshot_id,
            report.bytes_read,
            outcome.virtual_size,
            report.seconds,
            report.chunks_read,
            report.chunks,
        )
        return CopyCounters(
            bytes_copied=outcome.bytes_copied,
            resumed_from=outcome.resumed_from,
            verify_bytes_read=report.bytes_read,
            verify_seconds=report.seconds,
        )

    def _verify_finished(self, req: CopyRequest, watch: _Watch, stop: StopFlag) -> VerifyReport:
        manifest = self.store.read_manifest(self.store.manifest_path(req.volume, req.snapshot_id))

        def on_verify(verified: int, read: int) -> None:
            watch.on_verify(verified, read)
            stop.raise_if_set()

        return self.store.verify(manifest, on_progress=on_verify)

    @activity.defn(name=BACKUP_SNAPSHOT)
    async def backup_snapshot(self, req: CopyRequest) -> BackupResult:
        try:
            async with oldest_running_gauge(req):
                return await self._backup(req)
        except SnapferryError as exc:
            raise as_application_error(exc, next_retry_delay=retry_delay(req)) from exc
        except ApplicationError:
            raise
        except Exception as exc:  # a bug or an unforeseen error is a failure too
            raise ApplicationError(
                f"{type(exc).__name__}: {exc}",
                type=type(exc).__name__,
                next_retry_delay=retry_delay(req),
            ) from exc

    async def _backup(self, req: CopyRequest) -> BackupResult:
        if self.settings.backup_store == "repository":
            return await self._backup_to_repository(req)
        info = activity.info()
        manifest = self.store.manifest_path(req.volume, req.snapshot_id)
        if manifest.exists():
            # Finished before (the manifest is written last): verify instead of copying,
            # heartbeating all along (a verify of a large volume takes a while).
            stop = StopFlag()
            watch = _Watch(None)
            try:
                report = await self._heartbeating(
                    req, lambda: self._verify_finished(req, watch, stop), watch, stop
                )
                return self._result(
                    req,
                    CopyCounters(
                        bytes_copied=0,
                        resumed_from=req.source.virtual_size,
                        verify_bytes_read=report.bytes_read,
                        verify_seconds=report.seconds,
                    ),
                )
            except BackupCorrupt:
                self.store.discard_backup(req.volume, req.snapshot_id)  # and copy it again

        resume = _checkpoint_from(info.heartbeat_details)
        watch = _Watch(resume)
        stop = StopFlag()
        hb = (info.heartbeat_timeout or timedelta(seconds=60)).total_seconds()
        # A retry after a stall finds the stuck attempt holding the lock until the store
        # answers: wait for it a while (heartbeating) rather than spend an attempt.
        lock_wait = max(60.0, 3 * hb)
        try:
            counters = await self._heartbeating(
                req, lambda: self._copy(req, resume, watch, stop, lock_wait), watch, stop
            )
        except asyncio.CancelledError:
            details = activity.cancellation_details()
            if details is not None and details.cancel_requested:
                # Cancelled by the workflow (operator cancel, delete): leave nothing behind.
                # Any other cancel (timeout, shutdown, pause) keeps the files for the resume.
                self.store.discard_partial(self.store.partial_target(req.volume, req.snapshot_id))
            raise
        return self._result(req, counters)

    async def _backup_to_repository(self, req: CopyRequest) -> BackupResult:
        store = self.repository
        stop, watch = StopFlag(), _Watch(None)

        def on_verify(verified: int, read: int) -> None:
            watch.on_verify(verified, read)
            stop.raise_if_set()

        path = store.manifest_path(req.volume, req.snapshot_id)
        if path.exists():
            # Finished before (the manifest is written last): verify instead of copying.
            manifest = store.read_manifest(path)
            try:
                t0 = time.monotonic()
                _, read = await self._heartbeating(
                    req, lambda: store.verify(manifest, on_progress=on_verify), watch, stop
                )
                counters = CopyCounters(0, req.source.virtual_size, read, time.monotonic() - t0)
                return repository_result(req, store, manifest, counters)
            except BackupCorrupt:
                store.delete(req.volume, req.snapshot_id)  # and copy it again
        hb = (activity.info().heartbeat_timeout or timedelta(seconds=60)).total_seconds()
        try:
            manifest, counters = await self._heartbeating(
                req,
                lambda: copy_to_repository(self, req, watch, stop, max(60.0, 3 * hb)),
                watch,
                stop,
            )
        except asyncio.CancelledError:
            details = activity.cancellation_details()
            if details is not None and details.cancel_requested:
                store.discard_partial(req.volume, req.snapshot_id)
                self.store.plan_path(req.volume, req.snapshot_id).unlink(missing_ok=True)
            raise
        return repository_result(req, store, manifest, counters)

    async def _heartbeating(
        self, req: CopyRequest, fn: Callable[[], T], watch: _Watch, stop: StopFlag
    ) -> T:
        """Run ``fn`` on the copy pool; heartbeat while it moves, signal progress, stop it
        on a cancel (``BackupCancelled``) or when it stalls (``BackupStalled``)."""
        info = activity.info()
        loop = asyncio.get_running_loop()

        def alive() -> None:
            watch.touch()
            stop.raise_if_set()

        def run() -> T:
            with liveness.reporting_to(alive):
                return fn()

        assert info.workflow_id is not None, "backup_snapshot runs inside a workflow"
        handle = activity.client().get_workflow_handle(
            info.workflow_id, run_id=info.workflow_run_id
        )
        fut = loop.run_in_executor(self.executor, run)
        stall_limit = (info.heartbeat_timeout or timedelta(seconds=60)).total_seconds() * 0.8
        last_signal = 0.0
        started = time.monotonic()
        first_done = watch.done
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.25)
                now = time.monotonic()
                if fut not in done and now - watch.last_alive > stall_limit:
                    # The copy is stuck (a hung store?): stop vouching for it, so that the
                    # heartbeat timeout hands the backup to a retry, and make it stop with
                    # the retryable BackupStalled as soon as it moves again.
                    stop.stall(now - watch.last_alive)
                elif watch.checkpoint is not None:
                    activity.heartbeat(watch.checkpoint.model_dump())
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
                    bytes_done = req.source.virtual_size if fut in done else watch.done
                    progress = BackupProgress(
                        snapshot_id=req.snapshot_id,
                        bytes_done=bytes_done,
                        bytes_total=req.source.virtual_size,
                        bytes_per_second=(
                            (bytes_done - first_done) / max(now - started, 1e-6)
                            if watch.phase == "copy" or fut in done
                            else 0.0
                        ),
                        attempt=info.attempt,
                        phase="done" if fut in done else watch.phase,
                    )
                    try:
                        await handle.signal(BACKUP_PROGRESS_SIGNAL, progress)
                    except Exception as exc:  # progress is best effort; the copy goes on
                        log.warning("progress signal failed: %s", exc)
                    last_signal = now
                if fut in done:
                    break
            return fut.result()
        except asyncio.CancelledError:
            stop.cancel()
            await asyncio.wait({fut})
            raise
