"""The live volume snapshots that visibility finds, each with its record, read once.

Retention and the operators' batch commands both need "running VolumeSnapshot workflows
matching these search attributes, with their records": visibility gives the IDs (one call,
no workflow woken), and a query per snapshot gives what visibility cannot say (since when,
why a backup failed, when it was created). A snapshot that continued as new also has a closed
run in visibility; only running workflows count, each once.
"""

from __future__ import annotations

from temporalio.client import Client, WorkflowQueryFailedError
from temporalio.service import RPCError

from .contracts import SnapshotRecord
from .names import SNAPSHOT_RECORD_QUERY


async def running_snapshot_records(
    client: Client, clauses: list[str]
) -> list[tuple[str, SnapshotRecord]]:
    """``(workflow ID, record)`` of each running VolumeSnapshot the clauses select."""
    query = " AND ".join(
        ['WorkflowType = "VolumeSnapshot"', 'ExecutionStatus = "Running"', *clauses]
    )
    ids = sorted({wf.id async for wf in client.list_workflows(query)})
    found = []
    for wf_id in ids:
        try:
            record = await client.get_workflow_handle(wf_id).query(
                SNAPSHOT_RECORD_QUERY, result_type=SnapshotRecord
            )
        except (RPCError, WorkflowQueryFailedError):
            continue  # closed since it was listed: not live any more
        found.append((wf_id, record))
    return found
