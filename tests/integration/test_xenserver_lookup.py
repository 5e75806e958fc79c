"""How the XenServer driver finds a VM: XAPI's ``VM.get_by_name_label`` answers every VM
object with a label (templates, snapshots, dom0 and same-named VMs), so the driver drops
what is no VM, refuses a label that still names several, and takes a UUID for a name.
Real XenAPI client, ``tests/xapi_sim`` in XAPI's own revert mode."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    HypervisorType,
    SnapshotRequest,
    SnapshotState,
    VmRef,
    VmSnapshotRequest,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.names import TAKE_SNAPSHOT
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from snapferry.workflows.snapshot import REVERT_UPDATE
from snapferry.workflows.vm_snapshot import REVERT_VM_SNAPSHOT_UPDATE
from tests.xapi_sim.control import create_template, create_vm, guest_write, list_vdis, list_vms

from ..conftest import Xapi
from .test_xenserver import operator_session, sha256_of

pytestmark = pytest.mark.integration

SIZE = 16 * MIB


def request(name: str, host: str, xapi: Xapi) -> SnapshotRequest:
    return SnapshotRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(
            vm=VmRef(name=name, host=host, hypervisor=HypervisorType.XENSERVER), disk="xvda"
        ),
        backup=xapi.settings.backup_defaults,
    )


def vm_request(name: str, host: str) -> VmSnapshotRequest:
    return VmSnapshotRequest(
        snapshot_id=new_snapshot_id(),
        vm=VmRef(name=name, host=host, hypervisor=HypervisorType.XENSERVER),
        type=VmSnapshotType.DISK,
    )


def vm_by_uuid(xapi: Xapi, uuid: str) -> dict[str, Any]:
    """The simulator's view of one VM object (by UUID: the names are shared here)."""
    return next(v for v in list_vms(xapi.port) if v["uuid"] == uuid)


def disk_of(xapi: Xapi, uuid: str) -> dict[str, Any]:
    """The VM's current xvda (a XAPI revert gives the VM a new VDI)."""
    return vm_by_uuid(xapi, uuid)["disks"][0]  # type: ignore[no-any-return]


def vdi_hashes(xapi: Xapi) -> dict[str, str]:
    """Every VDI on the SR: uuid -> SHA-256 of its bytes."""
    return {v["uuid"]: sha256_of(Path(v["path"])) for v in list_vdis(xapi.port)}


def fill(xapi: Xapi, vm: str, seed: int) -> random.Random:
    rng = random.Random(seed)
    for offset in range(0, SIZE, 4 * MIB):
        guest_write(xapi.port, vm, offset, rng.randbytes(MIB))
    return rng


def halt(xapi: Xapi, uuid: str) -> None:
    with operator_session(xapi) as xenapi:
        xenapi.VM.hard_shutdown(xenapi.VM.get_by_uuid(uuid))


async def take_attempts(client: Client, snapshot_id: str) -> list[int]:
    """The attempt each take activity of the snapshot's workflow ended on ([1]: no retry)."""
    handle = client.get_workflow_handle(starter.VOLUME.workflow_id(snapshot_id))
    history = await handle.fetch_history()
    takes = {
        e.event_id
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == TAKE_SNAPSHOT
    }
    return [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
        and e.activity_task_started_event_attributes.scheduled_event_id in takes
    ]


async def test_a_template_and_a_vm_snapshot_sharing_the_label_are_never_touched(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """A template created first (so XAPI's lookup lists it first) and an operator's VM
    snapshot named exactly like its VM (XAPI labels a snapshot with the name it is given)
    share the VM's label. Volume and VM snapshots and both kinds of revert go to the VM;
    the template's and the operator snapshot's disks keep every byte."""
    template = create_template(xapi.port, "xen-label", [SIZE])
    rng = random.Random(21)
    tpl_disk = Path(template["disks"][0]["path"])
    with open(tpl_disk, "r+b") as f:  # an installed template's content
        f.write(rng.randbytes(SIZE))
    vm = create_vm(xapi.port, "xen-label", [SIZE])
    rng = fill(xapi, vm["uuid"], seed=22)
    with operator_session(xapi) as xenapi:
        operator_snap = xenapi.VM.snapshot(xenapi.VM.get_by_uuid(vm["uuid"]), "xen-label")
        assert xenapi.VM.get_name_label(operator_snap) == "xen-label"
        assert len(xenapi.VM.get_by_name_label("xen-label")) == 3
    decoys = {v["uuid"] for v in list_vdis(xapi.port)} - {disk_of(xapi, vm["uuid"])["vdi_uuid"]}
    before = {k: h for k, h in vdi_hashes(xapi).items() if k in decoys}
    assert len(before) == 2  # the template's disk and the operator snapshot's

    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(client, request("xen-label", host_name, xapi))
        assert answer.state == SnapshotState.CREATED_ON_PRIMARY
        at_volume_snapshot = Path(disk_of(xapi, vm["uuid"])["path"]).read_bytes()
        record = await starter.wait_settled(client, answer.id)
        assert record.state == SnapshotState.BACKED_UP and record.backup
        ours = next(v for v in list_vdis(xapi.port) if v["name"] == f"snapferry-{answer.id}")
        assert ours["snapshot_of"] == disk_of(xapi, vm["uuid"])["vdi"]  # the VM's disk
        manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
        with SecondaryStore.materialized(manifest) as raw:
            assert raw.read_bytes() == at_volume_snapshot

        guest_write(xapi.port, vm["uuid"], 0, rng.randbytes(MIB))
        taken = await starter.create_vm_snapshot(client, vm_request("xen-label", host_name))
        assert taken.state == "Ready"
        at_vm_snapshot = Path(disk_of(xapi, vm["uuid"])["path"]).read_bytes()
        (snap_vm,) = [v for v in list_vms(xapi.port) if v["name"] == f"snapferry-vm-{taken.id}"]
        assert snap_vm["snapshot_of"] == vm["ref"]

        guest_write(xapi.port, vm["uuid"], 4 * MIB, rng.randbytes(MIB))
        halt(xapi, vm["uuid"])
        await starter.snapshot_operation(client, answer.id, REVERT_UPDATE)
        assert Path(disk_of(xapi, vm["uuid"])["path"]).read_bytes() == at_volume_snapshot
        await starter.snapshot_operation(
            client,
            taken.id,
            REVERT_VM_SNAPSHOT_UPDATE,
            kind=starter.VM,
            result_type=starter.VM.record_type,
        )
        assert Path(disk_of(xapi, vm["uuid"])["path"]).read_bytes() == at_vm_snapshot

    after = vdi_hashes(xapi)
    assert {k: after.get(k) for k in before} == before  # not a byte of a decoy changed
    assert vm_by_uuid(xapi, template["uuid"])["is_a_template"]
    with operator_session(xapi) as xenapi:
        assert xenapi.VM.get_is_a_snapshot(operator_snap)
        assert xenapi.VM.get_snapshot_of(operator_snap) == vm["ref"]


async def test_two_vms_with_one_label_are_refused_listing_both_and_a_uuid_picks_one(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """A second VM gets the first one's label after its volume was backed up. Taking a
    volume or VM snapshot, and reverting that backup, by the label are refused (one
    attempt, no retry) with both UUIDs, and change nothing; by UUID, each works."""
    first = create_vm(xapi.port, "xen-twin", [SIZE])
    fill(xapi, first["uuid"], seed=31)
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        backed = await starter.create_snapshot(client, request("xen-twin", host_name, xapi))
        assert (await starter.wait_settled(client, backed.id)).state == SnapshotState.BACKED_UP
        second = create_vm(xapi.port, "xen-twin", [SIZE], allow_duplicate=True)
        rng = fill(xapi, second["uuid"], seed=32)
        halt(xapi, first["uuid"])
        halt(xapi, second["uuid"])
        vms_before = sorted(v["uuid"] for v in list_vms(xapi.port))
        vdis_before = vdi_hashes(xapi)
        both = sorted([first["uuid"], second["uuid"]])
        listing = rf"InvalidInput: 2 VMs are named 'xen-twin'.*{both[0]} \(Halted\), {both[1]}"

        refused = request("xen-twin", host_name, xapi)
        with pytest.raises(starter.SnapferryClientError, match=listing) as info:
            await starter.create_snapshot(client, refused)
        assert "by its UUID" in str(info.value)
        assert await take_attempts(client, refused.snapshot_id) == [1]  # non-retryable
        with pytest.raises(starter.SnapferryClientError, match=listing):
            await starter.create_vm_snapshot(client, vm_request("xen-twin", host_name))
        with pytest.raises(starter.SnapferryClientError, match=listing):
            await starter.snapshot_operation(client, backed.id, REVERT_UPDATE)
        assert sorted(v["uuid"] for v in list_vms(xapi.port)) == vms_before
        assert vdi_hashes(xapi) == vdis_before  # no VDI made, destroyed or written

        # By UUID: the second VM, and only it.
        with operator_session(xapi) as xenapi:
            xenapi.VM.start(xenapi.VM.get_by_uuid(second["uuid"]), False, False)
        guest_write(xapi.port, second["uuid"], 0, rng.randbytes(MIB))
        by_uuid = await starter.create_snapshot(client, request(second["uuid"], host_name, xapi))
        assert by_uuid.state == SnapshotState.CREATED_ON_PRIMARY
        at_take = Path(disk_of(xapi, second["uuid"])["path"]).read_bytes()
        ours = next(v for v in list_vdis(xapi.port) if v["name"] == f"snapferry-{by_uuid.id}")
        assert ours["snapshot_of"] == disk_of(xapi, second["uuid"])["vdi"]
        assert (await starter.wait_settled(client, by_uuid.id)).state == SnapshotState.BACKED_UP
        taken = await starter.create_vm_snapshot(client, vm_request(second["uuid"], host_name))
        (snap_vm,) = [v for v in list_vms(xapi.port) if v["name"] == f"snapferry-vm-{taken.id}"]
        assert snap_vm["snapshot_of"] == second["ref"]
        guest_write(xapi.port, second["uuid"], 0, rng.randbytes(MIB))
        halt(xapi, second["uuid"])
        first_disk = disk_of(xapi, first["uuid"])
        await starter.snapshot_operation(client, by_uuid.id, REVERT_UPDATE)
        assert Path(disk_of(xapi, second["uuid"])["path"]).read_bytes() == at_take
        assert disk_of(xapi, first["uuid"]) == first_disk
        assert sha256_of(Path(first_disk["path"])) == vdis_before[first_disk["vdi_uuid"]]


async def test_an_unknown_uuid_is_vm_not_found_and_a_known_one_is_used(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """A name shaped like a UUID is looked up with VM.get_by_uuid: an unknown one, or that
    of a template, is a clean VmNotFound (one attempt, nothing made); a VM's works."""
    vm = create_vm(xapi.port, "xen-by-uuid", [SIZE])
    fill(xapi, vm["uuid"], seed=41)
    template = create_template(xapi.port, "xen-by-uuid-template", [SIZE])
    unknown = "0b9b8c1e-5f2a-4d7e-9c3b-2a1f0e6d5c4b"
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        vdis_before = vdi_hashes(xapi)
        missing = request(unknown, host_name, xapi)
        with pytest.raises(
            starter.SnapferryClientError, match=f"VmNotFound: no VM has UUID {unknown}"
        ):
            await starter.create_snapshot(client, missing)
        assert await take_attempts(client, missing.snapshot_id) == [1]
        with pytest.raises(starter.SnapferryClientError, match="is a template, not a VM"):
            await starter.create_snapshot(client, request(template["uuid"], host_name, xapi))
        with pytest.raises(starter.SnapferryClientError, match=f"no VM has UUID {unknown}"):
            await starter.create_vm_snapshot(client, vm_request(unknown, host_name))
        assert vdi_hashes(xapi) == vdis_before

        answer = await starter.create_snapshot(client, request(vm["uuid"], host_name, xapi))
        assert answer.state == SnapshotState.CREATED_ON_PRIMARY
        ours = next(v for v in list_vdis(xapi.port) if v["name"] == f"snapferry-{answer.id}")
        assert ours["snapshot_of"] == disk_of(xapi, vm["uuid"])["vdi"]
        assert (await starter.wait_settled(client, answer.id)).state == SnapshotState.BACKED_UP
