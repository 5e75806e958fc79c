"""VMware through the real pyvmomi against tests/vsphere_sim (a separate process that speaks
SOAP and the datastore HTTP protocol, and keeps disk bytes): full-clone takes, ranged
exports into the copy engine, VM snapshots, failures, credentials."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    HypervisorType,
    SnapshotRecord,
    SnapshotRequest,
    SnapshotState,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.storage.backup_image import backup_image
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from tests.vsphere_sim.control import create_vm, guest_write

from ..conftest import Vsphere
from .helpers import cli_create

pytestmark = pytest.mark.integration


def vmware_request(vm: str, disk: str, host: str, vsphere: Vsphere) -> SnapshotRequest:
    return SnapshotRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(vm=VmRef(name=vm, host=host, hypervisor=HypervisorType.VMWARE), disk=disk),
        backup=vsphere.settings.backup_defaults,
    )


def fill(vsphere: Vsphere, vm: str, *, size: int, seed: int) -> None:
    """Random guest data in the first half of disk 0, written by the 'guest'."""
    rng = random.Random(seed)
    for offset in range(0, size // 2, MIB):
        guest_write(vsphere.port, vm, offset, rng.randbytes(MIB))


def disk_chain(vsphere: Vsphere, vm: str, disk: int = 0) -> list[str]:
    """The disk's backing chain as the simulator shows it over SOAP: current file first."""
    from tests.vsphere_sim.control import list_vms

    return next(v for v in list_vms(vsphere.port) if v["name"] == vm)["chains"][disk]


def power(vsphere: Vsphere, vm: str, on: bool) -> None:
    si = vsphere.connect()
    target = si.RetrieveContent().searchIndex.FindByInventoryPath(f"dc1/vm/{vm}")
    task = target.PowerOnVM_Task() if on else target.PowerOffVM_Task()
    while task.info.state not in ("success", "error"):
        time.sleep(0.05)
    assert task.info.state == "success", task.info.error


async def test_split_snapshot_full_clone_backup_equals_the_disk_at_take(
    client: Client, vsphere: Vsphere, host_name: str, tmp_path: Path
) -> None:
    size = 32 * MIB
    create_vm(vsphere.port, "web01", [size, 8 * MIB])
    fill(vsphere, "web01", size=size, seed=1)
    slow = dataclasses.replace(vsphere.settings, backup_rate_limit_bps=16e6)
    async with running_workers(client, slow, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(
            client, vmware_request("web01", "web01", host_name, vsphere)
        )
        at_take = vsphere.disk("web01").read_bytes()  # the guest has not written since
        assert answer.state == SnapshotState.CREATED_ON_PRIMARY and answer.primary
        clone = answer.primary.overlay
        assert clone in vsphere.vm_names() and vsphere.snapshot_names("web01") == []
        guest_write(vsphere.port, "web01", 0, b"\xee" * MIB)  # after the take
        # The VM is free while its clone is backed up: off and on again.
        power(vsphere, "web01", False)
        power(vsphere, "web01", True)
        assert (await starter.get_record(client, answer.id)).state == SnapshotState.BACKING_UP
        record = await starter.wait_settled(client, answer.id)
    assert record.state == SnapshotState.BACKED_UP and record.backup and record.primary_released
    assert Path(record.backup.path).read_bytes() == at_take
    assert vsphere.disk("web01").read_bytes()[:MIB] == b"\xee" * MIB  # the VM kept its write
    assert clone not in vsphere.vm_names()  # the clone is destroyed after the backup
    assert vsphere.vm_names() == {"web01"}


async def kill_9_mid_export_then_resume(
    client: Client,
    vsphere: Vsphere,
    host_name: str,
    tmp_path: Path,
    *,
    vm: str,
    size: int,
    seed: int,
) -> tuple[SnapshotRecord, bytes]:
    """A VM with ``size`` bytes of random data; its backup worker (a process, throttled) is
    killed with SIGKILL mid-export and a second one finishes. Returns the settled record
    and the disk's bytes at the take."""
    import asyncio
    import os
    import signal

    from .test_durability import start_backup_worker, stop_workers, wait_for_progress

    create_vm(vsphere.port, vm, [size])
    fill(vsphere, vm, size=2 * size, seed=seed)  # random data over the whole disk
    worker_a = start_backup_worker(tmp_path / "worker-a.log", rate_mbps=24)
    worker_b = None
    try:
        async with running_workers(client, vsphere.settings, hosts=[host_name]):
            answer = await starter.create_snapshot(
                client, vmware_request(vm, vm, host_name, vsphere)
            )
            at_take = vsphere.disk(vm).read_bytes()
            await wait_for_progress(client, answer.id, 0.4)
            os.kill(worker_a.pid, signal.SIGKILL)
            worker_a.wait()
            worker_b = start_backup_worker(tmp_path / "worker-b.log", rate_mbps=1000)
            record = await asyncio.wait_for(starter.wait_settled(client, answer.id), 120)
    finally:
        stop_workers(worker_a, worker_b)
    return record, at_take


async def test_kill_9_during_export_resumes_and_leaves_no_clone(
    client: Client, vsphere: Vsphere, host_name: str, tmp_path: Path
) -> None:
    size = 96 * MIB
    record, at_take = await kill_9_mid_export_then_resume(
        client, vsphere, host_name, tmp_path, vm="db01", size=size, seed=2
    )
    assert record.state == SnapshotState.BACKED_UP and record.backup
    assert record.backup.attempts >= 2 and record.backup.resumed_from > 0
    assert record.backup.bytes_copied == size - record.backup.resumed_from  # ranged resume
    assert Path(record.backup.path).read_bytes() == at_take
    assert vsphere.vm_names() == {"db01"} and vsphere.snapshot_names("db01") == []
    print(
        f"\nVMware kill -9: resumed from {record.backup.resumed_from / MIB:.0f} MiB of"
        f" {size / MIB:.0f} MiB over datastore HTTP Range"
    )


async def test_datastore_gone_alerts_keeps_the_snapshot_and_retry_completes(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    from tests.vsphere_sim.control import set_datastore_gone

    size = 32 * MIB
    create_vm(vsphere.port, "app01", [size])
    fill(vsphere, "app01", size=size, seed=3)
    slow = dataclasses.replace(vsphere.settings, backup_rate_limit_bps=8e6)
    async with running_workers(client, slow, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(
            client, vmware_request("app01", "app01", host_name, vsphere)
        )
        at_take = vsphere.disk("app01").read_bytes()
        set_datastore_gone(vsphere.port, True)
        failed = await starter.wait_settled(client, answer.id)
        assert failed.state == SnapshotState.CREATED_ON_PRIMARY
        assert "SourceGone" in (failed.backup_error or "") and failed.backup is None
        assert failed.primary is not None and not failed.primary_released
        log = vsphere.settings.alert_log.read_text()
        assert "SNAPSHOT.BACKUP.FAILED" in log and answer.id in log
        set_datastore_gone(vsphere.port, False)
        # The clone is the snapshot's primary copy: kept, so nothing is lost.
        assert answer.primary and answer.primary.overlay in vsphere.vm_names()
        await starter.retry_backup(client, answer.id)
        done = await starter.wait_settled(client, answer.id)
    assert done.state == SnapshotState.BACKED_UP and done.backup
    assert Path(done.backup.path).read_bytes() == at_take
    assert vsphere.vm_names() == {"app01"}


async def test_delete_during_backup_cancels_and_destroys_the_clone(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    from snapferry.workflows.snapshot import DELETE_UPDATE

    create_vm(vsphere.port, "web02", [32 * MIB])
    fill(vsphere, "web02", size=32 * MIB, seed=4)
    slow = dataclasses.replace(vsphere.settings, backup_rate_limit_bps=4e6)
    async with running_workers(client, slow, hosts=[host_name], backup=True):
        # Through the CLI, as an operator would: the same command with --hypervisor vmware.
        answer = await cli_create("web02", "web02", host_name, "vmware")
        assert answer.state == SnapshotState.CREATED_ON_PRIMARY and answer.hypervisor == "vmware"
        assert (await starter.get_record(client, answer.id)).state == SnapshotState.BACKING_UP
        gone = await starter.snapshot_operation(client, answer.id, DELETE_UPDATE)
    assert gone.state == SnapshotState.DESTROYED
    store = vsphere.settings.secondary / "snapshots" / "web02" / "web02"
    assert not store.exists() or list(store.iterdir()) == []
    assert vsphere.vm_names() == {"web02"}  # no clone left behind


async def test_bad_credentials_and_unknown_vm_fail_clearly_and_once(
    client: Client, vsphere: Vsphere, host_name: str, tmp_path: Path, monkeypatch
) -> None:
    from snapferry.activities.contracts import VmSnapshotRequest, VmSnapshotType
    from snapferry.activities.names import TAKE_SNAPSHOT
    from snapferry.activities.settings import VcenterConfig

    create_vm(vsphere.port, "web03", [8 * MIB])
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        for vm, disk, refusal in [
            ("nosuch", "nosuch", "'nosuch' does not exist"),
            ("web03", "vda", "has no disk 'vda'"),
        ]:
            refused = vmware_request(vm, disk, host_name, vsphere)
            with pytest.raises(starter.SnapferryClientError, match=refusal):
                await starter.create_snapshot(client, refused)
            # The caller hears of the failure at once; the workflow then discards what the
            # take may have left, under the VM's lock. Let it finish on these workers, or
            # its retried discard would hold web03's lock as the next take begins (a
            # ChainBusy retry, correct, but not the single try this test counts).
            await client.get_workflow_handle(f"volume-snapshot-{refused.snapshot_id}").result()
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not the password")
    monkeypatch.setenv("SNAPFERRY_VCENTER_PASSWORD_FILE", str(wrong))
    bad = dataclasses.replace(vsphere.settings, vcenter=VcenterConfig.from_env())
    async with running_workers(client, bad, hosts=[host_name], backup=True):
        req = vmware_request("web03", "web03", host_name, vsphere)
        with pytest.raises(starter.SnapferryClientError, match="rejected"):
            await starter.create_snapshot(client, req)
        handle = client.get_workflow_handle(f"volume-snapshot-{req.snapshot_id}")
        history = await handle.fetch_history()
        attempts = [
            e.activity_task_started_event_attributes.attempt
            for e in history.events
            if e.HasField("activity_task_started_event_attributes")
        ]
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        assert scheduled[0] == TAKE_SNAPSHOT and attempts[0] == 1  # non-retryable: one try
        vm_req = VmSnapshotRequest(
            snapshot_id=new_snapshot_id(),
            vm=VmRef(name="web03", host=host_name, hypervisor=HypervisorType.VMWARE),
            type=VmSnapshotType.DISK,
        )
        with pytest.raises(starter.SnapferryClientError, match="rejected"):
            await starter.create_vm_snapshot(client, vm_req)
    # The password never reached a payload, a history or the alert log.
    assert "sim pass w0rd" not in history.to_json()
    assert "sim pass w0rd" not in vsphere.settings.alert_log.read_text()
    assert vsphere.snapshot_names("web03") == [] and vsphere.vm_names() == {"web03"}


@pytest.mark.parametrize(
    "store", ["files", pytest.param("repository", marks=pytest.mark.backup_store("repository"))]
)
async def test_vm_and_volume_snapshots_coexist_four_levels_deep(
    store: str, client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """Four levels of each kind, interleaved, each volume snapshot taken while the VM
    snapshots make the disk a delta chain (vSphere shows ``app02-00000N.vmdk``
    with ``parent`` down to ``app02.vmdk``), each backup byte-identical; reverts of both VM
    snapshot types; deletes of both kinds in the middle; a volume revert refused (with why)
    while vSphere snapshots stand on the disk, then done from secondary; a new volume from a
    backup."""
    from snapferry.activities.contracts import RestoreResult, VmSnapshotRequest, VmSnapshotType
    from snapferry.workflows.snapshot import CREATE_VOLUME_UPDATE, DELETE_UPDATE, REVERT_UPDATE
    from snapferry.workflows.vm_snapshot import DELETE_VM_SNAPSHOT_UPDATE, REVERT_VM_SNAPSHOT_UPDATE

    size = 16 * MIB
    create_vm(vsphere.port, "app02", [size])
    fill(vsphere, "app02", size=size, seed=5)
    vm = VmRef(name="app02", host=host_name, hypervisor=HypervisorType.VMWARE)
    disk = vsphere.disk("app02")
    vm_snaps: dict[str, tuple[bytes, VmSnapshotType]] = {}
    vol_snaps: dict[str, bytes] = {}

    async def vm_op(sid: str, update: str):  # type: ignore[no-untyped-def]
        return await starter.snapshot_operation(
            client, sid, update, kind=starter.VM, result_type=starter.VM.record_type
        )

    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        for level in range(4):
            kind = VmSnapshotType.DISK if level % 2 == 0 else VmSnapshotType.DISK_AND_MEMORY
            guest_write(vsphere.port, "app02", level * MIB, bytes([0x10 + level]) * MIB)
            taken = await starter.create_vm_snapshot(
                client, VmSnapshotRequest(snapshot_id=new_snapshot_id(), vm=vm, type=kind)
            )
            assert taken.state == "Ready"
            vm_snaps[taken.id] = (disk.read_bytes(), kind)
            # As on vSphere, the disk is now a delta on the base: the volume snapshot below
            # is taken while VM snapshots stand on the disk, and still finds --disk app02.
            chain = disk_chain(vsphere, "app02")
            assert len(chain) == level + 2 and chain[0] == f"app02-{level + 1:06d}.vmdk"
            assert chain[-1] == "app02.vmdk"
            guest_write(vsphere.port, "app02", level * MIB + 4096, bytes([0x20 + level]) * 4096)
            answer = await starter.create_snapshot(
                client, vmware_request("app02", "app02", host_name, vsphere)
            )
            vol_snaps[answer.id] = disk.read_bytes()
        assert len(vsphere.snapshot_names("app02")) == 4  # only the VM snapshots stay
        for sid, content in vol_snaps.items():
            record = await starter.wait_settled(client, sid)
            assert record.backup is not None
            with backup_image(record.backup.manifest_path) as raw:
                assert raw.read_bytes() == content

        l1, l2, l3, l4 = list(vm_snaps)
        v1, v2, v3, v4 = list(vol_snaps)
        # DiskAndMemory revert of a running VM: it resumes, on the snapshot's bytes.
        await vm_op(l2, REVERT_VM_SNAPSHOT_UPDATE)
        assert disk.read_bytes() == vm_snaps[l2][0]
        with pytest.raises(starter.SnapferryClientError, match="is running; stop it"):
            await vm_op(l1, REVERT_VM_SNAPSHOT_UPDATE)
        power(vsphere, "app02", False)
        await vm_op(l1, REVERT_VM_SNAPSHOT_UPDATE)
        assert disk.read_bytes() == vm_snaps[l1][0]
        await vm_op(l4, REVERT_VM_SNAPSHOT_UPDATE)  # back up the tree, running again
        assert disk.read_bytes() == vm_snaps[l4][0]
        # Deletes in the middle, of both kinds.
        assert (await starter.snapshot_operation(client, v2, DELETE_UPDATE)).state == "Destroyed"
        assert (await vm_op(l3, DELETE_VM_SNAPSHOT_UPDATE)).state == "Removed"
        assert len(vsphere.snapshot_names("app02")) == 3
        power(vsphere, "app02", False)
        with pytest.raises(starter.SnapferryClientError, match="has vSphere snapshots"):
            await starter.snapshot_operation(client, v1, REVERT_UPDATE)
        for sid in (l1, l2, l4):
            assert (await vm_op(sid, DELETE_VM_SNAPSHOT_UPDATE)).state == "Removed"
        reverted = await starter.snapshot_operation(client, v3, REVERT_UPDATE)
        assert reverted.reverts == 1 and disk.read_bytes() == vol_snaps[v3]
        made: RestoreResult = await starter.snapshot_operation(
            client, v4, CREATE_VOLUME_UPDATE, "app02-restored", result_type=RestoreResult
        )
        assert made.path == "[ds1] app02/app02-restored.vmdk"
        restored = vsphere.root / "ds1" / "app02" / "app02-restored-flat.vmdk"
        assert restored.read_bytes() == vol_snaps[v4]
        with pytest.raises(starter.SnapferryClientError, match="already exists"):
            await starter.snapshot_operation(
                client, v4, CREATE_VOLUME_UPDATE, "app02-restored", result_type=RestoreResult
            )
        for sid in (v1, v3, v4):
            await starter.snapshot_operation(client, sid, DELETE_UPDATE)
    assert vsphere.vm_names() == {"app02"} and vsphere.snapshot_names("app02") == []
    assert disk_chain(vsphere, "app02") == ["app02.vmdk"]  # consolidated
