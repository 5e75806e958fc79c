"""Record workflow histories for the replay tests: ``python -m tests.replay.record``.

Run it only when a workflow change is deliberate (and guarded with ``workflow.patched``);
the committed histories are what running workflows in production look like, and replaying
them against the current code proves the change does not break them.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from temporalio.exceptions import ApplicationError

from tests.workflow.conftest import Mocks, make_request
from workflows.routing import CONTROL_QUEUE, backup_workflow_id, snapshot_workflow_id
from workflows.snapshot import VolumeSnapshotWorkflow

HISTORIES = Path(__file__).parent / "histories"


async def record() -> None:
    from tests.workflow import conftest

    env_gen = conftest.env.__wrapped__()  # type: ignore[attr-defined]
    env = await env_gen.__anext__()
    mocks_gen = conftest.mocks.__wrapped__(env)  # type: ignore[attr-defined]
    mocks: Mocks = await mocks_gen.__anext__()

    def transient(_req):  # type: ignore[no-untyped-def]
        raise ApplicationError("store gone", type="SecondaryStoreUnavailable")

    # 1. happy path; 2. a backup that fails for good, then an operator retry.
    for name, outcomes in (("happy", []), ("failed-then-retried", [transient] * 4)):
        mocks.backup_outcomes = list(outcomes)
        req = make_request()
        handle = await env.client.start_workflow(
            VolumeSnapshotWorkflow.run,
            req,
            id=snapshot_workflow_id(req.snapshot_id),
            task_queue=CONTROL_QUEUE,
        )
        await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
        if outcomes:
            while not (await handle.query(VolumeSnapshotWorkflow.get_record)).backup_error:
                await env.sleep(60)
            await handle.execute_update(VolumeSnapshotWorkflow.retry_backup)
        await handle.result()
        HISTORIES.mkdir(exist_ok=True)
        (HISTORIES / f"volume-snapshot-{name}.json").write_text(
            (await handle.fetch_history()).to_json()
        )
        child = env.client.get_workflow_handle(backup_workflow_id(req.snapshot_id, 1))
        (HISTORIES / f"backup-snapshot-{name}.json").write_text(
            (await child.fetch_history()).to_json()
        )
        print(f"recorded {name}")
    await mocks_gen.aclose()
    await env_gen.aclose()


if __name__ == "__main__":
    asyncio.run(record())
    sys.stdout.flush()
    os._exit(0)
