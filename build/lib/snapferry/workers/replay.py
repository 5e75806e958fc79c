"""``snapferry replay``: replay the histories of closed workflows against the current code.

Run it before rolling out a workflow change: a non-determinism error here is an error that
running workflows would hit. ``--export DIR`` also saves the histories as JSON, ready to be
committed under tests/replay/histories so that CI keeps checking them.
"""

from __future__ import annotations

from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Replayer

from snapferry.workflows.routing import (
    BACKUP_SNAPSHOT_WORKFLOW,
    SNAPSHOT_POLICY_RUN_WORKFLOW,
    VOLUME_SNAPSHOT_WORKFLOW,
)

from .client import data_converter
from .worker import WORKFLOWS

TYPES = (VOLUME_SNAPSHOT_WORKFLOW, BACKUP_SNAPSHOT_WORKFLOW, SNAPSHOT_POLICY_RUN_WORKFLOW)


async def replay_closed(
    client: Client, *, limit: int = 100, export: Path | None = None
) -> tuple[int, list[str]]:
    """Replay up to ``limit`` closed workflows; returns (count, failure messages)."""
    types = " OR ".join(f'WorkflowType = "{t}"' for t in TYPES)
    query = f'({types}) AND ExecutionStatus != "Running"'
    replayer = Replayer(workflows=WORKFLOWS, data_converter=data_converter())
    count, failures = 0, []
    async for wf in client.list_workflows(query, limit=limit):
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        if export is not None:
            export.mkdir(parents=True, exist_ok=True)
            (export / f"{wf.id}.json").write_text(history.to_json())
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        count += 1
        if result.replay_failure is not None:
            failures.append(f"{wf.id} ({wf.workflow_type}): {result.replay_failure}")
    return count, failures
