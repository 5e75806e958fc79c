"""What management code calls: create, show, list, wait, retry, over an injected client.

The CLI, the demo, the benchmarks and the tests all go through these functions, so the
Temporal calls management code should make are written down exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from snapferry.activities.catalog import running_snapshot_records
from snapferry.activities.contracts import (
    BackupProgress,
    SnapshotRecord,
    SnapshotRequest,
    SnapshotState,
    VmRef,
    VmSnapshotRecord,
    VmSnapshotRequest,
    VmSnapshotState,
    validate_snapshot_id,
)
from snapferry.workers.routing import routed_host
from snapferry.workflows.entity import cause_message
from snapferry.workflows.routing import (
    CONTROL_QUEUE,
    SNAPSHOT_ID,
    SNAPSHOT_STATE,
    VM_ID,
    VM_SNAPSHOT_WORKFLOW,
    VOLUME_ID,
    VOLUME_SNAPSHOT_WORKFLOW,
    snapshot_workflow_id,
    vm_snapshot_workflow_id,
    volume_id,
)
from snapferry.workflows.snapshot import (
    MOVE_HOST_UPDATE,
    RETRY_BACKUP_UPDATE,
    WAIT_TAKEN_UPDATE,
    VolumeSnapshotWorkflow,
    search_attributes,
)
from snapferry.workflows.vm_snapshot import (
    WAIT_CREATED_UPDATE,
    VmSnapshotWorkflow,
    vm_search_attributes,
)


class SnapferryClientError(Exception):
    """An error for the caller, with a message that says what was wrong."""


@dataclass(frozen=True)
class Kind:
    """One kind of catalog entity: how to find its workflow and read its record."""

    noun: str
    workflow_type: str
    workflow_id: Callable[[str], str]
    record_type: type
    states: type[StrEnum]


VOLUME = Kind(
    "snapshot", VOLUME_SNAPSHOT_WORKFLOW, snapshot_workflow_id, SnapshotRecord, SnapshotState
)
VM = Kind(
    "VM snapshot", VM_SNAPSHOT_WORKFLOW, vm_snapshot_workflow_id, VmSnapshotRecord, VmSnapshotState
)


def _routed(vm: VmRef) -> VmRef:
    """The VM with its host as it is routed (an alias while encryption is on)."""
    return vm.model_copy(update={"host": routed_host(vm.host)})


async def _create(
    client: Client,
    kind: Kind,
    run: Any,
    req: Any,
    *,
    update: str,
    search: Any,
    summary: str,
    details: str,
    what: str,
) -> Any:
    """Update-with-start, the one way an entity is created: the answer comes from
    ``update`` (when the take is done), the same ID always maps to the same workflow
    (USE_EXISTING), and a closed entity's ID is never reused (REJECT_DUPLICATE): a repeated
    create must not take a second snapshot under the same ID."""
    start = WithStartWorkflowOperation(
        run,
        req,
        id=kind.workflow_id(req.snapshot_id),
        task_queue=CONTROL_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=search,
        static_summary=summary,
        static_details=details,
    )
    try:
        return await client.execute_update_with_start_workflow(
            update, start_workflow_operation=start, result_type=kind.record_type
        )
    except WorkflowUpdateFailedError as err:
        raise SnapferryClientError(f"{what} failed: {cause_message(err.cause)}") from err
    except WorkflowAlreadyStartedError:
        # The snapshot exists and its workflow is closed: answer with its record.
        return await get_record(client, req.snapshot_id, kind)


async def create_snapshot(client: Client, req: SnapshotRequest) -> SnapshotRecord:
    """Start (or join) the snapshot's workflow and return once the take is done."""
    req = req.model_copy(
        update={"volume": req.volume.model_copy(update={"vm": _routed(req.volume.vm)})}
    )
    vm, disk = req.volume.vm, req.volume.disk
    record: SnapshotRecord = await _create(
        client,
        VOLUME,
        VolumeSnapshotWorkflow.run,
        req,
        update=WAIT_TAKEN_UPDATE,
        search=search_attributes(req, SnapshotState.ALLOCATED),
        summary=f"Volume snapshot of {vm.name}/{disk} on {vm.host}",
        details=(
            f"snapshot {req.snapshot_id}\nvm {vm.name} disk {disk}\n"
            f"host {vm.host} ({vm.hypervisor.value})"
        ),
        what=f"snapshot of {vm.name}/{disk}",
    )
    return record


def _check_id(snapshot_id: str) -> str:
    try:
        return validate_snapshot_id(snapshot_id)
    except ValueError as err:
        raise SnapferryClientError(str(err)) from err


async def get_record(client: Client, snapshot_id: str, kind: Kind = VOLUME) -> Any:
    """The record, from the running entity (a query) or the closed workflow's result."""
    handle = client.get_workflow_handle(
        kind.workflow_id(_check_id(snapshot_id)), result_type=kind.record_type
    )
    try:
        desc = await handle.describe()
        if desc.status == WorkflowExecutionStatus.RUNNING:
            return await handle.query("record", result_type=kind.record_type)
        if desc.status == WorkflowExecutionStatus.COMPLETED:
            return await handle.result()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise SnapferryClientError(f"no {kind.noun} with ID {snapshot_id}") from err
        raise
    raise SnapferryClientError(
        f"{kind.noun} {snapshot_id}'s workflow is {desc.status.name if desc.status else '?'};"
        " see it in the Web UI"
    )


async def list_snapshots(
    client: Client,
    *,
    vm: str | None = None,
    disk: str | None = None,
    state: str | None = None,
    kind: Kind = VOLUME,
    limit: int = 10000,
) -> list[dict[str, Any]]:
    """List from visibility (search attributes) only: one call, fine for thousands."""
    clauses = [f'WorkflowType = "{kind.workflow_type}"']
    if vm:
        clauses.append(f'VmId = "{vm}"')
    if disk and vm:
        clauses.append(f'VolumeId = "{volume_id(vm, disk)}"')
    elif disk:
        raise SnapferryClientError("filtering by disk needs --vm too (a disk name is per VM)")
    if state:
        try:
            value = kind.states(state).value
        except ValueError:
            raise SnapferryClientError(
                f"{state!r} is not a {kind.noun} state: one of"
                f" {', '.join(s.value for s in kind.states)}"
            ) from None
        clauses.append(f'SnapshotState = "{value}"')
    rows = []
    # A snapshot that continued as new has a closed run beside its running one: list each
    # snapshot once, as its newest run says.
    newest: dict[str, Any] = {}
    async for wf in client.list_workflows(" AND ".join(clauses), limit=limit):
        if wf.id not in newest or wf.start_time > newest[wf.id].start_time:
            newest[wf.id] = wf
    for wf in sorted(newest.values(), key=lambda wf: wf.start_time):
        sa = wf.typed_search_attributes
        row = {
            "id": sa.get(SNAPSHOT_ID),
            "state": sa.get(SNAPSHOT_STATE),
            "vm": sa.get(VM_ID),
            "workflow_id": wf.id,
            "started": wf.start_time.isoformat(),
        }
        if kind is VOLUME:
            row["disk"] = (sa.get(VOLUME_ID) or ":").split(":", 1)[1]
        rows.append(row)
    return rows


async def move_vm(client: Client, *, vm: str, host: str) -> list[str]:
    """Tell every live snapshot (volume and VM) of ``vm`` that it now runs on ``host``, as
    management code must after a live migration: their releases and reverts then go to
    that host's queue. Returns the workflow IDs told; refusals are collected, not fatal."""
    query = f'VmId = "{vm}" AND ExecutionStatus = "Running"'
    moved, refused = [], []
    async for wf in client.list_workflows(query):
        if wf.workflow_type not in (VOLUME.workflow_type, VM.workflow_type):
            continue
        try:
            await client.get_workflow_handle(wf.id).execute_update(
                MOVE_HOST_UPDATE, routed_host(host)
            )
            moved.append(wf.id)
        except WorkflowUpdateFailedError as err:
            refused.append(f"{wf.id}: {cause_message(err.cause)}")
    if refused:
        raise SnapferryClientError(
            f"moved {len(moved)} snapshot(s) of {vm} to {host}; refused: " + "; ".join(refused)
        )
    return moved


async def wait_for_state(
    client: Client, snapshot_id: str, state: SnapshotState, *, timeout: float = 600.0
) -> SnapshotRecord:
    deadline = time.monotonic() + timeout
    while True:
        record = await get_record(client, snapshot_id)
        if record.state == state:
            return record
        if record.state == SnapshotState.ERROR:
            raise SnapferryClientError(f"snapshot {snapshot_id} is in Error: {record.error}")
        if time.monotonic() > deadline:
            raise SnapferryClientError(
                f"snapshot {snapshot_id} is {record.state.value}, not {state.value},"
                f" after {timeout:.0f}s"
            )
        await asyncio.sleep(0.25)


def settled(record: SnapshotRecord) -> bool:
    """Nothing more will happen without an operator: backed up and primary released, or the
    backup failed and waits for a retry, or the snapshot is in Error or destroyed."""
    return (
        (record.state == SnapshotState.BACKED_UP and record.primary_released)
        or (record.state == SnapshotState.CREATED_ON_PRIMARY and bool(record.backup_error))
        or record.state in (SnapshotState.ERROR, SnapshotState.DESTROYED)
    )


async def wait_settled(
    client: Client, snapshot_id: str, *, timeout: float = 600.0
) -> SnapshotRecord:
    """Wait until the snapshot is settled (see :func:`settled`)."""
    deadline = time.monotonic() + timeout
    while True:
        record = await get_record(client, snapshot_id)
        if settled(record):
            return record
        if time.monotonic() > deadline:
            raise SnapferryClientError(
                f"snapshot {snapshot_id} is still {record.state.value} after {timeout:.0f}s"
            )
        await asyncio.sleep(0.25)


async def backup_progress(client: Client, record: SnapshotRecord) -> BackupProgress | None:
    if not record.backup_workflow_id:
        return None
    handle = client.get_workflow_handle(record.backup_workflow_id)
    return await handle.query("progress", result_type=BackupProgress | None)  # type: ignore[arg-type]


async def snapshot_operation(
    client: Client,
    snapshot_id: str,
    update: str,
    *args: Any,
    result_type: type = SnapshotRecord,
    kind: Kind = VOLUME,
) -> Any:
    """Send one operation (an update) to a snapshot's workflow, with errors for humans."""
    handle = client.get_workflow_handle(kind.workflow_id(_check_id(snapshot_id)))
    try:
        return await handle.execute_update(update, args=args, result_type=result_type)
    except WorkflowUpdateFailedError as err:
        raise SnapferryClientError(cause_message(err.cause)) from err
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        # No running workflow: either the entity ended (say in which state) or never was.
        record = await get_record(client, snapshot_id, kind)
        raise SnapferryClientError(
            f"{kind.noun} {snapshot_id} is {record.state.value}; its workflow is closed"
        ) from err


TRANSITIONAL = (SnapshotState.CREATING, SnapshotState.CREATED_ON_PRIMARY, SnapshotState.BACKING_UP)


async def failed_backups(
    client: Client, *, vm: str | None = None, policy: str | None = None
) -> list[SnapshotRecord]:
    """Snapshots whose backup failed for good and wait for an operator's retry."""
    clauses = [f'SnapshotState = "{SnapshotState.CREATED_ON_PRIMARY.value}"']
    if vm:
        clauses.append(f'VmId = "{vm}"')
    if policy:
        clauses.append(f'PolicyId = "{policy}"')
    return [r for _id, r in await running_snapshot_records(client, clauses) if r.backup_error]


async def retry_all_failed(
    client: Client,
    *,
    vm: str | None = None,
    policy: str | None = None,
    rate_per_s: float = 5.0,
    on_each: Callable[[SnapshotRecord, str | None], None] = lambda _r, _e: None,
) -> tuple[list[str], list[str]]:
    """Retry every failed backup (of one VM, of one policy), at most ``rate_per_s`` a second
    so a thousand retries after a store outage reach the backup pool as a trickle, not a
    flood. Returns (retried, refused) snapshot IDs; ``on_each`` reports as it goes."""
    if rate_per_s <= 0:
        raise SnapferryClientError("--rate must be positive")
    retried, refused = [], []
    for record in await failed_backups(client, vm=vm, policy=policy):
        try:
            await retry_backup(client, record.id)
            retried.append(record.id)
            on_each(record, None)
        except SnapferryClientError as err:  # its state changed meanwhile: say so, go on
            refused.append(record.id)
            on_each(record, str(err))
        await asyncio.sleep(1 / rate_per_s)
    return retried, refused


async def stuck_snapshots(
    client: Client, *, older_than_s: float, vm: str | None = None
) -> list[tuple[SnapshotRecord, float]]:
    """Snapshots in a transitional state (Creating, CreatedOnPrimary, BackingUp) for longer
    than ``older_than_s``, with how long; the oldest first."""
    clauses = ["(" + " OR ".join(f'SnapshotState = "{s.value}"' for s in TRANSITIONAL) + ")"]
    if vm:
        clauses.append(f'VmId = "{vm}"')
    now = datetime.now(UTC)
    stuck = []
    for _id, record in await running_snapshot_records(client, clauses):
        since = record.transitions[-1].at if record.transitions else record.created
        if record.state in TRANSITIONAL and since is not None:
            age = (now - since).total_seconds()
            if age > older_than_s:
                stuck.append((record, age))
    return sorted(stuck, key=lambda item: -item[1])


async def retry_backup(client: Client, snapshot_id: str) -> SnapshotRecord:
    record: SnapshotRecord = await snapshot_operation(client, snapshot_id, RETRY_BACKUP_UPDATE)
    return record


async def create_vm_snapshot(client: Client, req: VmSnapshotRequest) -> VmSnapshotRecord:
    """Start (or join) the VM snapshot's workflow and return once it is Ready."""
    req = req.model_copy(update={"vm": _routed(req.vm)})
    vm = req.vm
    record: VmSnapshotRecord = await _create(
        client,
        VM,
        VmSnapshotWorkflow.run,
        req,
        update=WAIT_CREATED_UPDATE,
        search=vm_search_attributes(req, VmSnapshotState.ALLOCATED),
        summary=f"{req.type.value} VM snapshot of {vm.name} on {vm.host}",
        details=(
            f"VM snapshot {req.snapshot_id} ({req.type.value})\nvm {vm.name}\n"
            f"host {vm.host} ({vm.hypervisor.value})"
        ),
        what=f"VM snapshot of {vm.name}",
    )
    return record
