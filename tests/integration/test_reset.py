"""``temporal workflow reset`` of a snapshot, the operator's replay tool:
to the first workflow task, to the last, or to just after the take, on a snapshot that is
live (BackedUp) and on one that was deleted. None takes a second snapshot, none runs a
second backup for a round, and the record stays what it was."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.hypervisors.kvm import KvmDriver
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workflows.snapshot import DELETE_UPDATE

from ..spies import record_snapshot_ids
from .helpers import disk_source, request_for

pytestmark = pytest.mark.integration

TEMPORAL = str(Path(sys.executable).parent / "temporal")


async def temporal(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run,
        [TEMPORAL, *args, "--address", settings.temporal_address],
        capture_output=True,
        text=True,
    )


async def event_after_take(client: Client, workflow_id: str) -> int:
    """The WorkflowTaskCompleted that follows the take's completion."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    taken = False
    for event in history.events:
        if event.HasField("activity_task_completed_event_attributes"):
            taken = True
        if taken and event.HasField("workflow_task_completed_event_attributes"):
            return int(event.event_id)
    raise AssertionError("no workflow task after the take")


async def runs_of(client: Client, workflow_id: str) -> int:
    return len([wf async for wf in client.list_workflows(f'WorkflowId = "{workflow_id}"')])


RESETS = ["FirstWorkflowTask", "LastWorkflowTask", "after-take"]
# Where a reset run of a deleted snapshot stops (rightly or wrongly): nothing follows.
SETTLED_STATES = (SnapshotState.DESTROYED, SnapshotState.CREATED_ON_PRIMARY, SnapshotState.ERROR)


@pytest.mark.parametrize("how", RESETS)
@pytest.mark.parametrize("deleted", [False, True], ids=["live", "deleted"])
@pytest.mark.kvm_full_backups  # asserts the merge back onto the original file
async def test_a_reset_never_takes_or_backs_up_twice_and_keeps_the_record(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    libvirt_conn,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    deleted: bool,
) -> None:
    takes = record_snapshot_ids(monkeypatch, KvmDriver, "take")
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
    before = await starter.wait_settled(client, answer.id)
    assert before.state == SnapshotState.BACKED_UP and before.backup is not None
    backup = Path(before.backup.path)
    stored = backup.read_bytes()
    workflow_id = f"volume-snapshot-{answer.id}"
    if deleted:
        await starter.snapshot_operation(client, answer.id, DELETE_UPDATE)
        assert not backup.exists()
    after_take = await event_after_take(client, workflow_id)
    how_args = ["--event-id", str(after_take)] if how == "after-take" else ["--type", how]
    done = await temporal(
        settings, "workflow", "reset", "-w", workflow_id, *how_args, "--reason", "test"
    )
    assert done.returncode == 0, done.stderr

    expected = SnapshotState.DESTROYED if deleted else SnapshotState.BACKED_UP
    record = None
    for _ in range(150):
        record = await starter.get_record(client, answer.id)
        if record.state == expected and (deleted or record.primary_released):
            break
        await asyncio.sleep(0.2)
    assert record is not None and record.state == expected, record
    await asyncio.sleep(1)  # anything a reset run would do wrongly has had time to happen

    assert takes == [answer.id], "the volume was snapshotted again"
    assert await runs_of(client, f"backup-{answer.id}-1") == 1, "a second backup ran"
    assert await runs_of(client, f"backup-{answer.id}-2") == 0
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
    assert not list(vm.disk.parent.glob(vm.disk.name + ".snapferry-*"))
    if deleted:
        assert not backup.exists() and not list(backup.parent.glob("*"))
    else:
        assert record.backup is not None and record.backup.checksum == before.backup.checksum
        assert backup.read_bytes() == stored


async def first_workflow_task_after(client: Client, workflow_id: str, update: str) -> int:
    """The last WorkflowTaskCompleted before ``update`` was accepted: resetting there
    makes Temporal reapply the update."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    last = 0
    for event in history.events:
        if event.HasField("workflow_task_completed_event_attributes"):
            last = int(event.event_id)
        attrs = event.workflow_execution_update_accepted_event_attributes
        if event.HasField("workflow_execution_update_accepted_event_attributes") and (
            attrs.accepted_request.input.name == update
        ):
            return last
    raise AssertionError(f"no {update} in the history")


async def test_a_reset_does_not_revert_a_second_time(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    libvirt_conn,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Temporal reapplies the updates after the reset point. A revert done again would
    throw away what the guest wrote after the first one: it is done once."""
    from snapferry.workflows.snapshot import REVERT_UPDATE

    from .helpers import images_identical, patch_reference

    reverts = record_snapshot_ids(monkeypatch, KvmDriver, "revert")
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
    await starter.wait_settled(client, answer.id)
    vm.domain.destroy()
    await starter.snapshot_operation(client, answer.id, REVERT_UPDATE)
    # The VM runs again and writes after the revert.
    vm.domain.create()
    vm.guest_write(pattern=0x5C, offset=2 * MIB, length=MIB)
    vm.domain.destroy()
    expected = patch_reference(
        vm.reference, tmp_path / "expected.raw", pattern=0x5C, offset=2 * MIB, length=MIB
    )
    workflow_id = f"volume-snapshot-{answer.id}"
    before_revert = await first_workflow_task_after(client, workflow_id, REVERT_UPDATE)
    done = await temporal(
        settings, "workflow", "reset", "-w", workflow_id, "-e", str(before_revert),
        "--reason", "test",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for _ in range(100):
        record = await starter.get_record(client, answer.id)
        if record.reverts == 1:
            break
        await asyncio.sleep(0.2)
    assert record.reverts == 1  # the reapplied update ran, and answered
    await asyncio.sleep(1)
    assert reverts == [answer.id], "the disk was reverted a second time"
    assert images_identical(expected, disk_source(libvirt_conn, vm.name), fmt_b="qcow2")


@pytest.mark.parametrize("how", RESETS)
@pytest.mark.parametrize("removed", [False, True], ids=["ready", "removed"])
@pytest.mark.kvm_full_backups  # asserts the merge back onto the original file
async def test_a_reset_of_a_vm_snapshot_never_takes_it_twice(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    libvirt_conn,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    removed: bool,
) -> None:
    from snapferry.activities.contracts import (
        VmRef,
        VmSnapshotRequest,
        VmSnapshotState,
        new_snapshot_id,
    )
    from snapferry.workflows.vm_snapshot import DELETE_VM_SNAPSHOT_UPDATE

    takes = record_snapshot_ids(monkeypatch, KvmDriver, "take_vm_snapshot")
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    req = VmSnapshotRequest(snapshot_id=new_snapshot_id(), vm=VmRef(name=vm.name, host=host_name))
    first = await starter.create_vm_snapshot(client, req)
    assert first.state == VmSnapshotState.READY
    if removed:
        await starter.snapshot_operation(
            client, req.snapshot_id, DELETE_VM_SNAPSHOT_UPDATE, kind=starter.VM,
            result_type=type(first),
        )  # fmt: skip
    workflow_id = f"vm-snapshot-{req.snapshot_id}"
    after_take = await event_after_take(client, workflow_id)
    how_args = ["--event-id", str(after_take)] if how == "after-take" else ["--type", how]
    done = await temporal(
        settings, "workflow", "reset", "-w", workflow_id, *how_args, "--reason", "test"
    )
    assert done.returncode == 0, done.stderr
    expected = VmSnapshotState.REMOVED if removed else VmSnapshotState.READY
    record = None
    for _ in range(100):
        record = await starter.get_record(client, req.snapshot_id, starter.VM)
        if record.state == expected:
            break
        await asyncio.sleep(0.2)
    assert record is not None and record.state == expected, record
    await asyncio.sleep(1)
    assert takes == [req.snapshot_id], "the VM was snapshotted again"
    if not removed:
        assert record.taken == first.taken
    layers = list(vm.disk.parent.glob(vm.disk.name + ".snapferry-*.qcow2"))  # no markers
    assert (layers == []) if removed else (len(layers) == 1)


@pytest.mark.parametrize("how", RESETS)
@pytest.mark.kvm_full_backups  # asserts the merge back onto the original file
async def test_a_reset_of_a_snapshot_deleted_during_its_backup_stays_destroyed(
    client: Client,
    settings: Settings,
    make_vm,
    host_name: str,
    libvirt_conn,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """Deleted while its backup ran (the backup cancelled, its primary copy merged away):
    a reset run finds that round's backup cancelled, and must not take that for a failed
    backup waiting for a retry (CreatedOnPrimary, naming a merged-away overlay)."""
    from snapferry.workers.worker import running_workers

    from ..conftest import with_settings

    takes = record_snapshot_ids(monkeypatch, KvmDriver, "take")
    slow = with_settings(settings, backup_rate_limit_bps=2e6)  # 16 MiB: about 8 s
    vm = make_vm(size=32 * MIB, data_bytes=16 * MIB)
    async with running_workers(client, slow, hosts=[host_name], backup=True, concurrency=2):
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, slow))
        await starter.wait_for_state(client, answer.id, SnapshotState.BACKING_UP)
        await asyncio.sleep(1)
        deleted = await starter.snapshot_operation(client, answer.id, DELETE_UPDATE)
        assert deleted.state == SnapshotState.DESTROYED and deleted.backup is None
        workflow_id = f"volume-snapshot-{answer.id}"
        after_take = await event_after_take(client, workflow_id)
        how_args = ["--event-id", str(after_take)] if how == "after-take" else ["--type", how]
        done = await temporal(
            settings, "workflow", "reset", "-w", workflow_id, *how_args, "--reason", "test"
        )
        assert done.returncode == 0, done.stderr
        record = None
        for _ in range(150):
            record = await starter.get_record(client, answer.id)
            if record.state in SETTLED_STATES:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # anything a reset run would do wrongly has had time to happen
        record = await starter.get_record(client, answer.id)
    assert record is not None and record.state == SnapshotState.DESTROYED, record
    assert takes == [answer.id], "the volume was snapshotted again"
    assert await runs_of(client, f"backup-{answer.id}-1") == 1, "a second backup ran"
    assert await runs_of(client, f"backup-{answer.id}-2") == 0
    assert disk_source(libvirt_conn, vm.name) == str(vm.disk)
    assert not list(vm.disk.parent.glob(vm.disk.name + ".snapferry-*"))
    store = slow.secondary / "snapshots" / vm.name / "vda"
    assert not list(store.glob(f"{answer.id}*"))
