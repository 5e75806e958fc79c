"""InstantRestore: a new VM running from a backup at once, its disk copied in while it runs.

One workflow per new VM (ID ``instant-<name>``), on the snapshot's KVM host: the first
activity starts the VM on a local overlay above the backup's NBD export (seconds, whatever
the size); the second copies the backup into the overlay while the VM runs (libvirt's block
pull), heartbeating its progress, which the Web UI shows as the activity's heartbeat
details, until the VM needs the backup no more. A host worker that dies meanwhile leaves the
VM running on its export (nbdkit runs in a session of its own) and the block job running in
libvirt; the retried activity adopts the job. A copy that fails for good raises the alert
``INSTANT_RESTORE.FAILED``; the VM keeps running on the export until an operator acts.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import Alert, InstantRunRequest, InstantRunResult
    from snapferry.activities.errors import NON_RETRYABLE_ERROR_TYPES
    from snapferry.activities.names import COPY_INSTANT_VM, RUN_INSTANT_VM

from .entity import cause_message, raise_alert
from .routing import HOST_HEARTBEAT_TIMEOUT, INSTANT_RESTORE_WORKFLOW, host_queue

START_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=3,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)
# The VM runs on the export meanwhile: a copy is tried again for as long as it takes.
COPY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    maximum_interval=timedelta(minutes=5),
    maximum_attempts=20,
    non_retryable_error_types=NON_RETRYABLE_ERROR_TYPES,
)

STARTING, RUNNING, COPIED, FAILED = "starting", "running", "copied", "failed"


def instant_workflow_id(name: str) -> str:
    return f"instant-{name}"


@workflow.defn(name=INSTANT_RESTORE_WORKFLOW)
class InstantRestoreWorkflow:
    def __init__(self) -> None:
        self.state = STARTING
        self.error: str | None = None

    @workflow.query(name="state")
    def current(self) -> tuple[str, str | None]:
        return self.state, self.error

    @workflow.run
    async def run(self, req: InstantRunRequest) -> InstantRunResult:
        where = f"VM {req.name} from snapshot {req.snapshot_id}'s backup"
        workflow.set_current_details(f"starting {where}")
        queue = host_queue(req.volume.vm.host)
        try:
            await workflow.execute_activity(
                RUN_INSTANT_VM,
                req,
                task_queue=queue,
                start_to_close_timeout=timedelta(minutes=10),
                heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
                retry_policy=START_RETRY,
            )
        except ActivityError as err:
            self.state, self.error = FAILED, cause_message(err)
            raise ApplicationError(self.error, non_retryable=True) from err
        self.state = RUNNING
        workflow.set_current_details(f"{where}: running; copying its disk in")
        try:
            result: InstantRunResult = await workflow.execute_activity(
                COPY_INSTANT_VM,
                req,
                result_type=InstantRunResult,
                task_queue=queue,
                start_to_close_timeout=timedelta(days=7),
                heartbeat_timeout=HOST_HEARTBEAT_TIMEOUT,
                retry_policy=COPY_RETRY,
            )
        except ActivityError as err:
            self.state, self.error = FAILED, cause_message(err)
            await raise_alert(
                Alert(
                    event="INSTANT_RESTORE.FAILED",
                    snapshot_id=req.snapshot_id,
                    vm=req.name,
                    disk=req.volume.disk,
                    message=f"copying {where} failed: {self.error}; it still runs on the"
                    " backup's export",
                )
            )
            raise ApplicationError(self.error, non_retryable=True) from err
        self.state = COPIED
        workflow.set_current_details(f"{where}: on its own disk ({result.overlay})")
        return result
