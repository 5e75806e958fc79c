"""Retention for recurring policies: keep the newest N live snapshots of a policy.

It reads visibility (one query by the PolicyId search attribute, running workflows only) and
sends the delete update to each snapshot beyond N, oldest first. Deletes are idempotent, so a
retried run is safe.

A snapshot that continued as new has a closed run in visibility beside its running one, with
a *later* start time on the running one: counting runs, or ordering by run start, would count
it twice and take it for the newest. So only running workflows count, each once, ordered by
the record's own creation time.
"""

from __future__ import annotations

from temporalio import activity
from temporalio.client import WorkflowUpdateFailedError

from .catalog import running_snapshot_records
from .contracts import RetentionRequest, SnapshotState
from .errors import converts_errors
from .names import APPLY_RETENTION, DELETE_SNAPSHOT_UPDATE

_GONE = {
    SnapshotState.HIDDEN.value,
    SnapshotState.DESTROYING.value,
    SnapshotState.DESTROYED.value,
    SnapshotState.ERROR.value,
}


class PolicyActivities:
    @activity.defn(name=APPLY_RETENTION)
    @converts_errors
    async def apply_retention(self, req: RetentionRequest) -> list[str]:
        client = activity.client()
        live = [
            (wf_id, record)
            for wf_id, record in await running_snapshot_records(
                client, [f'PolicyId = "{req.policy_id}"']
            )
            if record.state.value not in _GONE
        ]
        live.sort(key=lambda item: (item[1].created is not None, item[1].created), reverse=True)
        deleted = []
        for wf_id, _record in live[req.keep :]:
            try:
                await client.get_workflow_handle(wf_id).execute_update(DELETE_SNAPSHOT_UPDATE)
                deleted.append(wf_id)
            except WorkflowUpdateFailedError as err:
                # Still being taken, or already deleting: the next run catches up.
                activity.logger.warning("retention could not delete %s: %s", wf_id, err.cause)
        return deleted
