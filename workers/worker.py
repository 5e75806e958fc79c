"""Worker assembly: which workflows and activities a process serves, on which queues.

* ``--host NAME``: take/release on ``snapferry-host-NAME`` (this process talks to libvirt),
  ``Settings.host_concurrency`` of them at once over all VMs, one at a time per KVM VM, of
  which ``host_long_concurrency`` long ones (workers/host_gate.py).
* ``--backup --concurrency N``: the bounded backup pool on ``snapferry-backup``; N is both
  ``max_concurrent_activities`` and the copy thread pool, the spec's separate thread pool.
  The same process serves alerts on ``snapferry-alerts``, so an alert never waits for a
  backup slot.
* Every process also serves the workflows on the control queue, so any worker keeps
  orchestration alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import PollerBehaviorAutoscaling, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from snapferry.activities.adopt import await_backup_workflow
from snapferry.activities.alerts import AlertActivities
from snapferry.activities.backup import BackupActivities
from snapferry.activities.host import HostActivities
from snapferry.activities.policy import PolicyActivities
from snapferry.activities.repository_jobs import RepositoryJobActivities
from snapferry.activities.restore import RestoreActivities
from snapferry.activities.settings import Settings
from snapferry.workers.host_gate import HostGate
from snapferry.workers.routing import routed_host
from snapferry.workflows.backup import BackupSnapshotWorkflow
from snapferry.workflows.instant import InstantRestoreWorkflow
from snapferry.workflows.policy import CheckVolumeWorkflow, SnapshotPolicyRunWorkflow
from snapferry.workflows.repository import RepositoryJobWorkflow
from snapferry.workflows.routing import ALERT_QUEUE, BACKUP_QUEUE, CONTROL_QUEUE, host_queue
from snapferry.workflows.snapshot import VolumeSnapshotWorkflow
from snapferry.workflows.vm_snapshot import VmSnapshotWorkflow

# Host operations a host worker accepts per thread: the ones past the threads wait in the
# gate for their VM or for a long slot (workers/host_gate.py), without a thread. Few, since
# an accepted operation's start-to-close clock runs while it waits.
HOST_SLOTS_PER_THREAD = 2

# Every workflow run gets a sandbox, and by default the sandbox imports each module the
# workflow needs afresh: half the worker's CPU per snapshot (bench/burst_bench.py: 23 ms a
# create, 14 with every module passed through). Our workflow modules keep no state and do
# nothing at import time, so they are imported once; the sandbox still refuses
# non-deterministic calls (datetime.now, random, I/O) inside a workflow
# (https://python.temporal.io/temporalio.worker.workflow_sandbox.SandboxRestrictions.html).
WORKFLOW_RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
)

# Workflow task pollers grow with the backlog. With the SDK's fixed five, split 1:4
# between the queue (a new workflow's first task) and the worker's sticky queue, a burst of
# creates waits for its first workflow tasks one poll round-trip at a time (bench/
# burst_bench.py: p50 of that wait 0.73 s -> 0.31 s for 36 creates at once).
WORKFLOW_POLLERS = PollerBehaviorAutoscaling()

WORKFLOWS = [
    VolumeSnapshotWorkflow,
    VmSnapshotWorkflow,
    BackupSnapshotWorkflow,
    SnapshotPolicyRunWorkflow,
    CheckVolumeWorkflow,
    RepositoryJobWorkflow,
    InstantRestoreWorkflow,
]


@contextlib.asynccontextmanager
async def running_workers(
    client: Client,
    settings: Settings,
    *,
    hosts: list[str] | None = None,
    backup: bool = False,
    concurrency: int = 2,
) -> AsyncIterator[list[Worker]]:
    """Run the requested workers until the context exits (then shut them down cleanly)."""
    hosts = hosts or []
    executors: list[ThreadPoolExecutor] = []
    workers: list[Worker] = [
        Worker(
            client,
            task_queue=CONTROL_QUEUE,
            workflows=WORKFLOWS,
            workflow_runner=WORKFLOW_RUNNER,
            workflow_task_poller_behavior=WORKFLOW_POLLERS,
            activities=[PolicyActivities().apply_retention, await_backup_workflow],
        ),
    ]
    if hosts:
        # The pool's size is the bound on host operations running at once; the slots are
        # more, so that operations waiting for their VM (in the gate) hold no thread.
        host_pool = ThreadPoolExecutor(
            max_workers=settings.host_concurrency, thread_name_prefix="host"
        )
        executors.append(host_pool)
        host_acts = HostActivities(settings)
        gate = HostGate(
            long_concurrency=settings.host_long_concurrency,
            wait_timeout_s=settings.domain_lock_timeout_s,
        )
        for host in hosts:
            with warnings.catch_warnings():
                # More slots than threads is the point (see HostGate), not a mistake.
                warnings.filterwarnings("ignore", message=".*activity_executor's max_workers")
                workers.append(
                    Worker(
                        client,
                        task_queue=host_queue(routed_host(host)),
                        activities=host_acts.all,
                        activity_executor=host_pool,
                        max_concurrent_activities=HOST_SLOTS_PER_THREAD * settings.host_concurrency,
                        interceptors=[gate],
                    )
                )
    if backup:
        copy_pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="copy")
        alert_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="alert")
        executors += [copy_pool, alert_pool]
        backups = BackupActivities(settings, executor=copy_pool)
        restores = RestoreActivities(settings)
        alerts = AlertActivities(settings)
        workers.append(
            Worker(
                client,
                task_queue=ALERT_QUEUE,
                activities=[alerts.raise_alert],
                activity_executor=alert_pool,
            )
        )
        workers.append(
            Worker(
                client,
                task_queue=BACKUP_QUEUE,
                workflows=WORKFLOWS,
                workflow_runner=WORKFLOW_RUNNER,
                workflow_task_poller_behavior=WORKFLOW_POLLERS,
                activities=[
                    backups.backup_snapshot,
                    restores.restore_backup,
                    restores.verify_backup,
                    restores.delete_backup,
                    RepositoryJobActivities(settings).run_repository_job,
                ],
                # Sync restore/verify/delete run on the copy pool, within the same bound.
                activity_executor=copy_pool,
                max_concurrent_activities=concurrency,
                # Heartbeats carry checkpoints: send them often so a crash loses little.
                max_heartbeat_throttle_interval=timedelta(milliseconds=250),
                default_heartbeat_throttle_interval=timedelta(milliseconds=250),
                graceful_shutdown_timeout=timedelta(seconds=5),
            )
        )
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield workers
    finally:
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        for ex in executors:
            ex.shutdown(wait=False, cancel_futures=True)
