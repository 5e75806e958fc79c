"""BackupSnapshot: copy one snapshot to secondary storage, in the background.

It runs on the backup task queue as a child of VolumeSnapshot with ``ParentClosePolicy.ABANDON``
so that nothing that happens to the parent stops a backup. Retries follow CloudStack's
``backup.retry`` / ``backup.retry.interval`` (with backoff) for failures, which ask for that
interval themselves (``next_retry_delay``); a crashed or lost attempt (heartbeat timeout) is
retried after seconds. Each retry resumes from the last heartbeated checkpoint. When retries
run out, an alert is raised and the workflow fails, leaving the snapshot on primary for an
operator's ``backup retry``.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    is_cancelled_exception,
)
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import (
        Alert,
        BackupProgress,
        BackupRequest,
        BackupResult,
        CopyRequest,
    )
    from snapferry.activities.errors import NON_RETRYABLE_ERROR_TYPES
    from snapferry.activities.names import BACKUP_PROGRESS_SIGNAL, BACKUP_SNAPSHOT

from .entity import cause_message, raise_alert
from .routing import BACKUP_SNAPSHOT_WORKFLOW


def text_bar(done: int, total: int, width: int = 30) -> str:
    """``[####......]  42.0%``: the one progress bar, for the Web UI and the CLI alike."""
    fraction = done / total if total else 0.0
    filled = int(width * fraction)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}%"


def progress_details(p: BackupProgress, width: int = 30) -> str:
    """The Web UI's current details for a running backup."""
    mib = 1024 * 1024
    if p.phase == "verify":
        return (
            f"{text_bar(p.bytes_done, p.bytes_total, width)}  verifying {p.bytes_done // mib}/"
            f"{p.bytes_total // mib} MiB  attempt {p.attempt}"
        )
    return (
        f"{text_bar(p.bytes_done, p.bytes_total, width)}  {p.bytes_done // mib}/"
        f"{p.bytes_total // mib} MiB  {p.bytes_per_second / 1e6:.0f} MB/s  attempt {p.attempt}"
    )


# A crashed or lost attempt (heartbeat timeout) is retried after this, not after
# backup.retry.interval: a dead worker is not a failed backup.
CRASH_RETRY_INTERVAL_S = 2.0
FAST_RESUME_PATCH = "backup-fast-resume-after-crash"


@workflow.defn(name=BACKUP_SNAPSHOT_WORKFLOW)
class BackupSnapshotWorkflow:
    def __init__(self) -> None:
        self.progress: BackupProgress | None = None

    @workflow.run
    async def run(self, req: BackupRequest) -> BackupResult:
        vol = req.volume
        workflow.set_current_details(f"backing up {vol.vm.name}/{vol.disk}: starting")
        opts = req.options
        # Histories recorded before this behaviour keep their policy: every retry waited
        # backup.retry.interval. Now a failure raised by the activity asks for that wait
        # itself (next_retry_delay), so the policy's own interval serves only crashes.
        fast = workflow.patched(FAST_RESUME_PATCH)
        initial = (
            min(opts.retry_interval_s, CRASH_RETRY_INTERVAL_S) if fast else opts.retry_interval_s
        )
        try:
            result: BackupResult = await workflow.execute_activity(
                BACKUP_SNAPSHOT,
                CopyRequest(
                    snapshot_id=req.snapshot_id,
                    volume=vol,
                    source=req.source,
                    progress_interval_s=opts.progress_interval_s,
                    backup_started=workflow.info().start_time,
                    retry_interval_s=opts.retry_interval_s if fast else None,
                    full=opts.full,
                    delta_max=opts.delta_max,
                    rate_limit_mbps=opts.rate_limit_mbps,
                ),
                result_type=BackupResult,
                # A cancel waits for the activity's cleanup (no .partial left behind).
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                start_to_close_timeout=timedelta(seconds=opts.max_duration_s),
                heartbeat_timeout=timedelta(seconds=opts.heartbeat_timeout_s),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=initial),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=max(opts.retry_interval_s, 3600)),
                    maximum_attempts=opts.retry_attempts + 1,
                    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
                ),
            )
        except ActivityError as err:
            if is_cancelled_exception(err):
                raise
            message = cause_message(err)
            workflow.set_current_details(f"FAILED: {message}")
            await raise_alert(
                Alert(
                    event="SNAPSHOT.BACKUP.FAILED",
                    snapshot_id=req.snapshot_id,
                    vm=vol.vm.name,
                    disk=vol.disk,
                    message=(
                        f"backup of snapshot {req.snapshot_id} failed after retries: {message}."
                        " The snapshot is kept on primary storage; retry with"
                        f" 'snapferry backup retry {req.snapshot_id}'"
                    ),
                )
            )
            raise ApplicationError(message, type="BackupFailed", non_retryable=True) from err
        workflow.set_current_details(
            f"done: {result.path}\nchecksum {result.checksum}\n"
            f"copied {result.bytes_copied} bytes, resumed from {result.resumed_from}"
        )
        return result

    @workflow.signal(name=BACKUP_PROGRESS_SIGNAL)
    def on_progress(self, progress: BackupProgress) -> None:
        self.progress = progress
        workflow.set_current_details(progress_details(progress))

    @workflow.query(name="progress")
    def get_progress(self) -> BackupProgress | None:
        return self.progress
