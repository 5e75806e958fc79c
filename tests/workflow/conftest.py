"""Workflow tests: the real workflows, mock activities registered under the real names.

They run on the time-skipping test server, where CloudStack's retry intervals of minutes pass
instantly; the real dev server is exercised by tests/integration.
"""

from __future__ import annotations

import inspect
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio
from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from snapferry.activities.contracts import (
    Alert,
    BackupResult,
    CopyRequest,
    DeleteBackupRequest,
    DiscardRequest,
    PrimarySnapshot,
    ReleaseRequest,
    RevertRequest,
    SnapshotRequest,
    TakeRequest,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotTaken,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.names import (
    BACKUP_SNAPSHOT,
    DELETE_BACKUP,
    DELETE_VM_SNAPSHOT,
    DISCARD_SNAPSHOT,
    RAISE_ALERT,
    RELEASE_PRIMARY,
    REVERT_VM_SNAPSHOT,
    REVERT_VOLUME,
    TAKE_SNAPSHOT,
    TAKE_VM_SNAPSHOT,
    VM_SNAPSHOT_DELETED,
)
from snapferry.workers.converter import DATA_CONVERTER
from snapferry.workflows.routing import (
    ALERT_QUEUE,
    BACKUP_QUEUE,
    CONTROL_QUEUE,
    SEARCH_ATTRIBUTES,
    host_queue,
)
from snapferry.workflows.snapshot import BackupSnapshotWorkflow, VolumeSnapshotWorkflow
from snapferry.workflows.vm_snapshot import VmSnapshotWorkflow

HOST = "hv1"


@pytest_asyncio.fixture
async def env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=DATA_CONVERTER,
        test_server_existing_path=str(Path(sys.executable).parent / "temporal-test-server"),
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in SEARCH_ATTRIBUTES
            },
        )
    )
    try:
        yield env
    finally:
        await env.shutdown()


def make_request(**backup: Any) -> SnapshotRequest:
    return SnapshotRequest.model_validate(
        {
            "snapshot_id": new_snapshot_id(),
            "volume": VolumeRef(vm=VmRef(name="vm1", host=HOST), disk="vda").model_dump(),
            "backup": backup,
        }
    )


PRIMARY = PrimarySnapshot(
    image="/primary/vm1-vda.qcow2",
    image_format="qcow2",
    overlay="/primary/vm1-vda.qcow2.snapferry-x.qcow2",
    virtual_size=1 << 30,
    vm_was_running=True,
)


class Mocks:
    """Activity mocks that record their calls; ``backup_outcomes`` scripts each attempt."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.take_error: Exception | None = None
        self.backup_outcomes: list[Callable[[CopyRequest], BackupResult]] = []
        # activity name -> the error it raises (VM-snapshot ops, release, delete, alert)
        self.vm_errors: dict[str, Exception] = {}

    def activities_for(self, queue: str) -> list[Callable]:
        @activity.defn(name=TAKE_SNAPSHOT)
        async def take(req: TakeRequest) -> PrimarySnapshot:
            self.calls.append((TAKE_SNAPSHOT, req))
            if self.take_error:
                raise self.take_error
            return PRIMARY

        @activity.defn(name=RELEASE_PRIMARY)
        async def release(req: ReleaseRequest) -> None:
            self.calls.append((RELEASE_PRIMARY, req))
            self._maybe_fail(RELEASE_PRIMARY)

        @activity.defn(name=DISCARD_SNAPSHOT)
        async def discard(req: DiscardRequest) -> None:
            self.calls.append((DISCARD_SNAPSHOT, req))
            self._maybe_fail(DISCARD_SNAPSHOT)

        @activity.defn(name=BACKUP_SNAPSHOT)
        async def backup(req: CopyRequest) -> BackupResult:
            self.calls.append((BACKUP_SNAPSHOT, req))
            if self.backup_outcomes:
                outcome = self.backup_outcomes.pop(0)(req)
                if inspect.isawaitable(outcome):  # an outcome may take (real) time
                    outcome = await outcome
                return outcome
            return ok_result(req)

        @activity.defn(name=RAISE_ALERT)
        async def alert(a: Alert) -> None:
            self.calls.append((RAISE_ALERT, a))
            self._maybe_fail(RAISE_ALERT)

        @activity.defn(name=DELETE_BACKUP)
        async def delete(req: DeleteBackupRequest) -> None:
            self.calls.append((DELETE_BACKUP, req))
            self._maybe_fail(DELETE_BACKUP)

        @activity.defn(name=REVERT_VOLUME)
        async def revert(req: RevertRequest) -> None:
            self.calls.append((REVERT_VOLUME, req))

        def vm_activity(name: str) -> Callable:
            @activity.defn(name=name)
            async def run(op: VmSnapshotOperation) -> VmSnapshotTaken | None:
                self.calls.append((name, op))
                if name in self.vm_errors:
                    raise self.vm_errors[name]
                if name == VM_SNAPSHOT_DELETED:
                    return False  # type: ignore[return-value]
                if name != TAKE_VM_SNAPSHOT:
                    return None
                return VmSnapshotTaken(
                    overlays={"vda": f"/primary/vm1-vda.qcow2.snapferry-{op.snapshot_id}.qcow2"},
                    memory=None,
                    vm_was_running=True,
                )

            return run

        vm_ops = [
            vm_activity(n)
            for n in (TAKE_VM_SNAPSHOT, VM_SNAPSHOT_DELETED, REVERT_VM_SNAPSHOT, DELETE_VM_SNAPSHOT)
        ]
        return {
            host_queue(HOST): [take, release, revert, discard, *vm_ops],
            BACKUP_QUEUE: [backup, delete],
            ALERT_QUEUE: [alert],
            CONTROL_QUEUE: [],
        }[queue]

    def _maybe_fail(self, name: str) -> None:
        if name in self.vm_errors:
            raise self.vm_errors[name]

    def named(self, name: str) -> list[Any]:
        return [arg for n, arg in self.calls if n == name]


def ok_result(req: CopyRequest) -> BackupResult:
    return BackupResult(
        path=f"/secondary/{req.snapshot_id}.raw",
        manifest_path=f"/secondary/{req.snapshot_id}.manifest.json",
        checksum="sha256-chain:8388608:" + "ab" * 32,
        virtual_size=req.source.virtual_size,
        bytes_copied=req.source.virtual_size,
        resumed_from=0,
        attempts=1,
    )


@pytest_asyncio.fixture
async def mocks(env: WorkflowEnvironment) -> AsyncIterator[Mocks]:
    m = Mocks()
    workflows = [VolumeSnapshotWorkflow, BackupSnapshotWorkflow, VmSnapshotWorkflow]
    workers = [
        Worker(
            env.client,
            task_queue=q,
            workflows=workflows if q in (CONTROL_QUEUE, BACKUP_QUEUE) else [],
            activities=m.activities_for(q),
        )
        for q in (CONTROL_QUEUE, BACKUP_QUEUE, ALERT_QUEUE, host_queue(HOST))
    ]
    import asyncio

    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield m
    finally:
        for w in workers:
            await w.shutdown()
        await asyncio.gather(*tasks, return_exceptions=True)


def unique() -> str:
    return uuid.uuid4().hex[:8]
