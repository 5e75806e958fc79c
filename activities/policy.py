"""Retention for recurring policies: keep the newest N live snapshots of a policy.

It reads visibility (one query by the PolicyId search attribute) and sends the delete update
to each snapshot beyond N, oldest first. Deletes are idempotent, so a retried run is safe.
"""

from __future__ import annotations

from temporalio import activity
from temporalio.client import WorkflowUpdateFailedError
from temporalio.common import SearchAttributeKey

from .contracts import RetentionRequest, SnapshotState
from .errors import converts_errors
from .names import APPLY_RETENTION, DELETE_SNAPSHOT_UPDATE

_STATE = SearchAttributeKey.for_keyword("SnapshotState")
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
        live = []
        query = f'WorkflowType = "VolumeSnapshot" AND PolicyId = "{req.policy_id}"'
        async for wf in client.list_workflows(query):
            if wf.typed_search_attributes.get(_STATE) not in _GONE:
                live.append(wf)
        live.sort(key=lambda wf: wf.start_time, reverse=True)
        deleted = []
        for wf in live[req.keep :]:
            try:
                await client.get_workflow_handle(wf.id).execute_update(DELETE_SNAPSHOT_UPDATE)
                deleted.append(wf.id)
            except WorkflowUpdateFailedError as err:
                # Still being taken, or already deleting: the next run catches up.
                activity.logger.warning("retention could not delete %s: %s", wf.id, err.cause)
        return deleted
