"""A crashed backup attempt resumes after seconds; a failed one waits backup.retry.interval.

The real BackupSnapshot workflow with a mock ``backup_snapshot`` under its real name: the
first attempt stops heartbeating (a killed worker), the second fails the way the real
activity fails (its error asks for CloudStack's interval through ``next_retry_delay``, from
the real :func:`activities.backup.retry_delay`), the third succeeds. Times are the server's
(time-skipping), read from each attempt's ``current_attempt_scheduled_time``. Before the
fix the policy's interval was backup.retry.interval for every retry, crashes included.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import activity
from temporalio.testing import WorkflowEnvironment

from snapferry.activities.backup import retry_delay
from snapferry.activities.contracts import BackupResult, CopyRequest, SnapshotState
from snapferry.activities.errors import SecondaryStoreUnavailable, as_application_error
from snapferry.workers import starter
from snapferry.workflows.snapshot import VolumeSnapshotWorkflow

from .conftest import Mocks, make_request, ok_result
from .test_snapshot_workflow import start

RETRY_INTERVAL_S = 300.0


async def test_a_crash_resumes_after_seconds_a_failure_waits_the_retry_interval(
    env: WorkflowEnvironment, mocks: Mocks
) -> None:
    scheduled: list[datetime] = []
    requests: list[CopyRequest] = []

    def seen(req: CopyRequest) -> None:
        info = activity.info()
        assert info.attempt == len(scheduled) + 1
        scheduled.append(info.current_attempt_scheduled_time)
        requests.append(req)

    async def crash(req: CopyRequest) -> BackupResult:
        seen(req)
        await asyncio.sleep(4)  # no heartbeat: the worker is gone as far as Temporal knows
        return ok_result(req)  # too late: the attempt timed out already

    failures: list[timedelta | None] = []

    def failure(req: CopyRequest) -> BackupResult:
        seen(req)
        failures.append(retry_delay(req))
        raise as_application_error(
            SecondaryStoreUnavailable("store not writable"), next_retry_delay=failures[-1]
        )

    def success(req: CopyRequest) -> BackupResult:
        seen(req)
        return ok_result(req)

    mocks.backup_outcomes = [crash, failure, success]
    req = make_request(retry_attempts=3, retry_interval_s=RETRY_INTERVAL_S, heartbeat_timeout_s=1.0)
    handle = await start(env, req)
    await handle.execute_update(VolumeSnapshotWorkflow.wait_taken)
    for _ in range(100):  # (skipped) time passes, 30 s at a time
        record = await handle.query(VolumeSnapshotWorkflow.get_record)
        if starter.settled(record):
            break
        await env.sleep(30)

    assert record.state == SnapshotState.BACKED_UP and record.backup_error is None
    assert len(scheduled) == 3
    # Every attempt knows CloudStack's interval, to ask for it when it fails.
    assert {r.retry_interval_s for r in requests} == {RETRY_INTERVAL_S}
    crash_gap = (scheduled[1] - scheduled[0]).total_seconds()
    # The crash (heartbeat timeout) was retried well before the retry interval.
    assert crash_gap < RETRY_INTERVAL_S / 5, crash_gap
    # A failure asks for the interval, doubled per attempt as the policy did. (The
    # time-skipping server ignores next_retry_delay; the dev server honours it, which
    # tests/integration/test_large_volumes.py checks.)
    assert failures == [timedelta(seconds=2 * RETRY_INTERVAL_S)]
