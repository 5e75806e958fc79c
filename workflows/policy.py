"""SnapshotPolicyRun: one tick of a recurring policy, started by its Temporal Schedule.

It starts a VolumeSnapshot for the policy's volume (abandoned, so the snapshot outlives the
run) and then applies retention: the oldest of the policy's live snapshots beyond ``keep``
are deleted, as CloudStack's ``maxSnaps`` does. The schedule's overlap policy (SKIP) makes
sure a slow tick is never run twice at once.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from snapferry.activities.contracts import (
        RetentionRequest,
        SnapshotPolicy,
        SnapshotRequest,
        SnapshotState,
        VolumeRef,
    )
    from snapferry.activities.names import APPLY_RETENTION, CHECK_VOLUME

from .routing import (
    CHECK_VOLUME_WORKFLOW,
    CONTROL_QUEUE,
    SNAPSHOT_POLICY_RUN_WORKFLOW,
    host_queue,
    snapshot_workflow_id,
)
from .snapshot import VolumeSnapshotWorkflow, search_attributes


@workflow.defn(name=SNAPSHOT_POLICY_RUN_WORKFLOW)
class SnapshotPolicyRunWorkflow:
    @workflow.run
    async def run(self, policy: SnapshotPolicy) -> list[str]:
        req = SnapshotRequest(
            snapshot_id=str(workflow.uuid4()),
            volume=policy.volume,
            backup=policy.backup,
            quiesce=policy.quiesce,
            check_boot=policy.check_boot,
            policy_id=policy.policy_id,
        )
        await workflow.start_child_workflow(
            VolumeSnapshotWorkflow.run,
            req,
            id=snapshot_workflow_id(req.snapshot_id),
            task_queue=CONTROL_QUEUE,
            parent_close_policy=ParentClosePolicy.ABANDON,
            search_attributes=search_attributes(req, SnapshotState.ALLOCATED),
            static_summary=f"Policy {policy.policy_id}: snapshot of "
            f"{policy.volume.vm.name}/{policy.volume.disk}",
        )
        workflow.set_current_details(f"took snapshot {req.snapshot_id}; applying retention")
        deleted: list[str] = await workflow.execute_activity(
            APPLY_RETENTION,
            RetentionRequest(policy_id=policy.policy_id, keep=policy.keep),
            task_queue=CONTROL_QUEUE,
            start_to_close_timeout=timedelta(minutes=30),
            retry_policy=RetryPolicy(maximum_attempts=5),
        )
        workflow.set_current_details(
            f"took snapshot {req.snapshot_id}; retention deleted {len(deleted)}"
        )
        return deleted


# A host worker that polls its queue answers a lookup in well under a second; these bounds
# only keep a CLI from waiting long on one that is stuck.
CHECK_VOLUME_TIMEOUT = timedelta(seconds=15)


@workflow.defn(name=CHECK_VOLUME_WORKFLOW)
class CheckVolumeWorkflow:
    """Ask the VM's host whether the volume exists, before a policy is created for it: the
    operator hears about a mistyped VM or disk now, not from the first tick. A workflow,
    since only a host's own worker can look on that host."""

    @workflow.run
    async def run(self, volume: VolumeRef) -> None:
        await workflow.execute_activity(
            CHECK_VOLUME,
            volume,
            task_queue=host_queue(volume.vm.host),
            schedule_to_close_timeout=CHECK_VOLUME_TIMEOUT,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=200), maximum_attempts=3
            ),
        )
