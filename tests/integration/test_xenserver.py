"""XenServer through the real XenAPI client against tests/xapi_sim (a separate process with
XAPI's XML-RPC envelope, tasks and error codes, and its VHD export/import endpoints)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    HypervisorType,
    SnapshotRequest,
    SnapshotState,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.storage.backup_image import backup_image
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from tests.xapi_sim.control import create_vm, guest_write

from ..conftest import XAPI_PASSWORD, Xapi
from .helpers import cli_create

pytestmark = pytest.mark.integration

BLOCK = 2 * MIB  # a VHD block: the grain of a delta


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MIB):
            digest.update(block)
    return digest.hexdigest()


def xen_request(vm: str, host: str, xapi: Xapi, disk: str = "xvda") -> SnapshotRequest:
    return SnapshotRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(
            vm=VmRef(name=vm, host=host, hypervisor=HypervisorType.XENSERVER), disk=disk
        ),
        backup=xapi.settings.backup_defaults,
    )


async def test_full_and_deltas_restore_exactly_and_roll_over(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """Six snapshots with delta.max = 3: full, 3 deltas, full, delta. Each backup, rebuilt
    from its chain, equals the VDI at its snapshot time; each delta carries only the blocks
    that changed (1 % of the volume changed -> at most 3 % of a full)."""
    size = 256 * MIB
    create_vm(xapi.port, "xen01", [size])
    rng = random.Random(7)
    for offset in range(0, size, 8 * MIB):  # data over the whole disk
        guest_write(xapi.port, "xen01", offset, rng.randbytes(MIB))
    expected: dict[str, str] = {}  # SHA-256 of the VDI at each snapshot time
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        for i in range(6):
            if i:  # change 1 % of the volume, contiguous, between snapshots
                change = size // 100
                offset = rng.randrange(0, size - change, BLOCK)
                guest_write(xapi.port, "xen01", offset, rng.randbytes(change))
            answer = await starter.create_snapshot(client, xen_request("xen01", host_name, xapi))
            assert answer.state == SnapshotState.CREATED_ON_PRIMARY
            expected[answer.id] = sha256_of(xapi.disk("xen01"))
            record = await starter.wait_settled(client, answer.id)
            assert record.state == SnapshotState.BACKED_UP and record.backup
    store = SecondaryStore(xapi.settings.secondary)
    manifests = {
        m.snapshot_id: m
        for m in store.completed(
            VolumeRef(vm=VmRef(name="xen01", host=host_name, hypervisor="xenserver"), disk="xvda")
        )
    }
    ids = list(expected)
    assert [manifests[i].depth for i in ids] == [0, 1, 2, 3, 0, 1]  # rolls over after 3
    assert [manifests[i].parent for i in ids] == [None, ids[0], ids[1], ids[2], None, ids[4]]
    full = manifests[ids[0]].data_bytes
    for sid in ids:
        with SecondaryStore.materialized(manifests[sid]) as raw:
            assert sha256_of(raw) == expected[sid], f"chain of {sid} does not rebuild"
        m = manifests[sid]
        if m.parent is not None:
            ratio = m.data_bytes / full
            assert ratio <= 0.03, f"delta {sid} carries {ratio:.1%} of a full backup"
            print(f"delta depth {m.depth}: {m.data_bytes / MIB:.0f} MiB = {ratio:.2%} of full")
    # Only the newest backed-up snapshot stays on primary, as the next delta's base.
    left = [v for v in xapi.snapshot_vdis() if v["name"].startswith("snapferry-")]
    assert [v["name"] for v in left] == [f"snapferry-{ids[-1]}"]


def fill(xapi: Xapi, vm: str, size: int, seed: int) -> random.Random:
    rng = random.Random(seed)
    for offset in range(0, size, 4 * MIB):
        guest_write(xapi.port, vm, offset, rng.randbytes(MIB))
    return rng


def xen_volume(vm: str, host: str) -> VolumeRef:
    return VolumeRef(vm=VmRef(name=vm, host=host, hypervisor="xenserver"), disk="xvda")


async def backed_up_snapshot(client: Client, xapi: Xapi, vm: str, host: str) -> Any:
    """A snapshot of the VM's xvda, waited for until settled (the base of later deltas)."""
    answer = await starter.create_snapshot(client, xen_request(vm, host, xapi))
    await starter.wait_settled(client, answer.id)
    return answer


async def test_kill_9_during_a_delta_export_resumes_and_the_chain_stays_valid(
    client: Client, xapi: Xapi, host_name: str, tmp_path: Path
) -> None:
    import asyncio
    import os
    import signal

    from tests.xapi_sim.control import set_export_delay

    from .test_durability import start_backup_worker, stop_workers, wait_for_progress

    size = 128 * MIB
    create_vm(xapi.port, "xen02", [size])
    rng = fill(xapi, "xen02", size, seed=8)
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        first = await backed_up_snapshot(client, xapi, "xen02", host_name)
    guest_write(xapi.port, "xen02", 32 * MIB, rng.randbytes(48 * MIB))  # a 48 MiB delta
    set_export_delay(xapi.port, 12 * 1000 * 1000)
    worker_a = start_backup_worker(tmp_path / "worker-a.log", rate_mbps=1000)
    worker_b = None
    try:
        async with running_workers(client, xapi.settings, hosts=[host_name]):
            second = await starter.create_snapshot(client, xen_request("xen02", host_name, xapi))
            at_second = xapi.disk("xen02").read_bytes()
            await wait_for_progress(client, second.id, 0.45)
            os.kill(worker_a.pid, signal.SIGKILL)
            worker_a.wait()
            set_export_delay(xapi.port, 0)
            worker_b = start_backup_worker(tmp_path / "worker-b.log", rate_mbps=1000)
            record = await asyncio.wait_for(starter.wait_settled(client, second.id), 120)
    finally:
        stop_workers(worker_a, worker_b)
    assert record.state == SnapshotState.BACKED_UP and record.backup
    assert record.backup.attempts >= 2 and record.backup.resumed_from > 0
    manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
    assert manifest.parent == first.id and manifest.depth == 1  # the same base after resume
    assert manifest.data_bytes == 48 * MIB
    with SecondaryStore.materialized(manifest) as raw:
        assert raw.read_bytes() == at_second
    print(
        f"\nXenServer kill -9 mid-delta: resumed from {record.backup.resumed_from / MIB:.0f}"
        f" MiB of {size / MIB:.0f}; delta {manifest.data_bytes / MIB:.0f} MiB"
    )


async def test_xapi_faults_retry_or_alert_as_they_should(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    from tests.xapi_sim.control import clear_faults, expire_sessions, inject_fault

    create_vm(xapi.port, "xen03", [16 * MIB])
    fill(xapi, "xen03", 16 * MIB, seed=9)
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        # VDI_IN_USE is transient: the take retries with backoff and succeeds.
        inject_fault(xapi.port, "VDI.snapshot", "VDI_IN_USE", ["OpaqueRef:x", "snapshot"], 2)
        busy = await starter.create_snapshot(client, xen_request("xen03", host_name, xapi))
        assert busy.state == SnapshotState.CREATED_ON_PRIMARY
        assert (await starter.wait_settled(client, busy.id)).state == SnapshotState.BACKED_UP
        # An expired session: XenAPI logs in again by itself, nothing fails.
        expire_sessions(xapi.port)
        relogged = await starter.create_snapshot(client, xen_request("xen03", host_name, xapi))
        assert relogged.state == SnapshotState.CREATED_ON_PRIMARY
        await starter.wait_settled(client, relogged.id)
        # HANDLE_INVALID is permanent: one attempt, Error, an alert.
        inject_fault(xapi.port, "VDI.snapshot", "HANDLE_INVALID", ["VDI", "OpaqueRef:gone"], 5)
        with pytest.raises(starter.SnapferryClientError, match="HANDLE_INVALID"):
            await starter.create_snapshot(client, xen_request("xen03", host_name, xapi))
        clear_faults(xapi.port)
        # Exports failing past the retries: an alert; the snapshot is kept, retry completes.
        inject_fault(xapi.port, "export_raw_vdi", "INTERNAL_ERROR", [], 20)
        kept = await starter.create_snapshot(client, xen_request("xen03", host_name, xapi))
        failed = await starter.wait_settled(client, kept.id)
        assert failed.state == SnapshotState.CREATED_ON_PRIMARY and failed.backup_error
        log = xapi.settings.alert_log.read_text()
        assert "SNAPSHOT.TAKE.FAILED" in log and "SNAPSHOT.BACKUP.FAILED" in log
        clear_faults(xapi.port)
        await starter.retry_backup(client, kept.id)
        assert (await starter.wait_settled(client, kept.id)).state == SnapshotState.BACKED_UP
    assert XAPI_PASSWORD not in log


async def test_deleting_a_base_hides_it_until_its_deltas_are_gone(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    from snapferry.workflows.snapshot import DELETE_UPDATE, REVERT_UPDATE

    size = 16 * MIB
    create_vm(xapi.port, "xen04", [size])
    rng = fill(xapi, "xen04", size, seed=10)
    ids: list[str] = []
    contents: dict[str, bytes] = {}
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        for _ in range(3):  # full A, delta B (on A), delta C (on B)
            guest_write(xapi.port, "xen04", rng.randrange(0, size - MIB, BLOCK), rng.randbytes(MIB))
            answer = await starter.create_snapshot(client, xen_request("xen04", host_name, xapi))
            contents[answer.id] = xapi.disk("xen04").read_bytes()
            await starter.wait_settled(client, answer.id)
            ids.append(answer.id)
        a, b, c = ids
        store = xapi.settings.secondary / "snapshots" / "xen04" / "xvda"

        async def delete(sid: str) -> str:
            record = await starter.snapshot_operation(client, sid, DELETE_UPDATE)
            return str(record.state)

        assert await delete(b) == "Hidden"  # C is a delta on B
        assert await delete(a) == "Hidden"  # B (hidden) is a delta on A
        with pytest.raises(starter.SnapferryClientError, match="Hidden"):
            await delete(a)
        hidden = await starter.list_snapshots(client, vm="xen04", state="Hidden")
        assert {r["id"] for r in hidden} == {a, b}
        # C still restores exactly through its hidden ancestors.
        await snapshot_power(xapi, "xen04", on=False)
        await starter.snapshot_operation(client, c, REVERT_UPDATE)
        assert xapi.disk("xen04").read_bytes() == contents[c]
        assert await delete(c) == "Destroyed"  # ... and purges B and A with it
        for sid in (a, b):
            for _ in range(100):
                if (await starter.get_record(client, sid)).state == SnapshotState.DESTROYED:
                    break
                import asyncio

                await asyncio.sleep(0.1)
            assert (await starter.get_record(client, sid)).state == SnapshotState.DESTROYED
    assert not store.exists() or sorted(p.name for p in store.iterdir()) == []


@contextlib.contextmanager
def operator_session(xapi: Xapi) -> Iterator[Any]:
    """A XenAPI session of the test's own, as an operator's tools would open one."""
    import XenAPI

    session = XenAPI.Session(f"http://127.0.0.1:{xapi.port}")
    session.xenapi.login_with_password("root", XAPI_PASSWORD, "2.21", "operator")
    try:
        yield session.xenapi
    finally:
        session.xenapi.session.logout()


async def snapshot_power(xapi: Xapi, vm: str, *, on: bool) -> None:
    """Power a VM on or off as its owner would, through XenAPI."""
    with operator_session(xapi) as xenapi:
        ref = xenapi.VM.get_by_name_label(vm)[0]
        if on:
            xenapi.VM.start(ref, False, False)
        else:
            xenapi.VM.hard_shutdown(ref)


@pytest.mark.parametrize(
    "store", ["files", pytest.param("repository", marks=pytest.mark.backup_store("repository"))]
)
async def test_vm_and_volume_snapshots_coexist_four_levels_deep(
    store: str, client: Client, xapi: Xapi, host_name: str
) -> None:
    """Four levels of each kind, interleaved, with XAPI's own revert semantics (the VM gets
    new VDIs; a checkpoint comes back Suspended and is resumed): reverts of both VM snapshot
    types, deletes of both kinds in the middle, backups that stay deltas across reverts, a
    volume revert from a chain and a new volume from a backup."""
    from snapferry.activities.contracts import RestoreResult, VmSnapshotRequest, VmSnapshotType
    from snapferry.workflows.snapshot import CREATE_VOLUME_UPDATE, DELETE_UPDATE, REVERT_UPDATE
    from snapferry.workflows.vm_snapshot import DELETE_VM_SNAPSHOT_UPDATE, REVERT_VM_SNAPSHOT_UPDATE

    size = 16 * MIB
    create_vm(xapi.port, "xen05", [size])
    rng = fill(xapi, "xen05", size, seed=11)
    vm = VmRef(name="xen05", host=host_name, hypervisor=HypervisorType.XENSERVER)
    vm_snaps: dict[str, bytes] = {}
    vol_snaps: dict[str, bytes] = {}

    async def vm_op(sid: str, update: str):  # type: ignore[no-untyped-def]
        return await starter.snapshot_operation(
            client, sid, update, kind=starter.VM, result_type=starter.VM.record_type
        )

    assert xapi.settings.xen is not None
    # No rollover here: v5 must be a delta across the reverts.
    deep = dataclasses.replace(xapi.settings, delta_max=16)
    async with running_workers(client, deep, hosts=[host_name], backup=True):
        for level in range(4):
            kind = VmSnapshotType.DISK if level % 2 == 0 else VmSnapshotType.DISK_AND_MEMORY
            guest_write(xapi.port, "xen05", level * BLOCK, rng.randbytes(MIB))
            taken = await starter.create_vm_snapshot(
                client, VmSnapshotRequest(snapshot_id=new_snapshot_id(), vm=vm, type=kind)
            )
            assert taken.state == "Ready"
            vm_snaps[taken.id] = xapi.disk("xen05").read_bytes()
            guest_write(xapi.port, "xen05", level * BLOCK + MIB, rng.randbytes(4096))
            answer = await starter.create_snapshot(client, xen_request("xen05", host_name, xapi))
            vol_snaps[answer.id] = xapi.disk("xen05").read_bytes()
            await starter.wait_settled(client, answer.id)
        l1, l2, l3, l4 = list(vm_snaps)
        v1, v2, v3, v4 = list(vol_snaps)
        await vm_op(l2, REVERT_VM_SNAPSHOT_UPDATE)  # a checkpoint: resumed, running
        assert xapi.vm("xen05")["power"] == "Running"
        assert xapi.disk("xen05").read_bytes() == vm_snaps[l2]
        with pytest.raises(starter.SnapferryClientError, match="is running; stop it"):
            await vm_op(l1, REVERT_VM_SNAPSHOT_UPDATE)
        await snapshot_power(xapi, "xen05", on=False)
        await vm_op(l1, REVERT_VM_SNAPSHOT_UPDATE)
        assert xapi.disk("xen05").read_bytes() == vm_snaps[l1]
        await snapshot_power(xapi, "xen05", on=True)
        # A volume snapshot after the reverts: still a delta, still exact.
        guest_write(xapi.port, "xen05", 5 * BLOCK, rng.randbytes(MIB))
        v5 = (await starter.create_snapshot(client, xen_request("xen05", host_name, xapi))).id
        vol_snaps[v5] = xapi.disk("xen05").read_bytes()
        done = await starter.wait_settled(client, v5)
        assert done.backup
        assert done.backup.parent == v4 and done.backup.depth == 4
        with backup_image(done.backup.manifest_path) as raw:
            assert raw.read_bytes() == vol_snaps[v5]
        assert (await vm_op(l3, DELETE_VM_SNAPSHOT_UPDATE)).state == "Removed"
        # A plain-file delta needs its parent (Hidden); a repository backup stands alone.
        deleted = (await starter.snapshot_operation(client, v2, DELETE_UPDATE)).state
        assert deleted == ("Hidden" if store == "files" else "Destroyed")
        await snapshot_power(xapi, "xen05", on=False)
        await starter.snapshot_operation(client, v3, REVERT_UPDATE)  # through hidden v2
        assert xapi.disk("xen05").read_bytes() == vol_snaps[v3]
        made: RestoreResult = await starter.snapshot_operation(
            client, v4, CREATE_VOLUME_UPDATE, "xen05-restored", result_type=RestoreResult
        )
        restored = next(v for v in xapi.snapshot_vdis() + all_vdis(xapi) if v["uuid"] in made.path)
        assert Path(restored["path"]).read_bytes() == vol_snaps[v4]
        for sid in (l1, l2, l4):
            assert (await vm_op(sid, DELETE_VM_SNAPSHOT_UPDATE)).state == "Removed"
        for sid in (v1, v3, v4, v5):
            await starter.snapshot_operation(client, sid, DELETE_UPDATE)
    names = [v["name"] for v in xapi.snapshot_vdis()]
    assert not [n for n in names if n.startswith("snapferry-vm-")]
    assert not [vm for vm in all_vms(xapi) if vm["name"].startswith("snapferry-vm-")]


def all_vdis(xapi: Xapi) -> list[dict]:
    from tests.xapi_sim.control import list_vdis

    return list_vdis(xapi.port)


def all_vms(xapi: Xapi) -> list[dict]:
    from tests.xapi_sim.control import list_vms

    return list_vms(xapi.port)


async def test_a_base_gone_from_primary_means_a_new_full_through_the_cli(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """The plan's second condition: a delta needs its base VDI on primary. When an operator
    destroys it, the next backup is a full, and still exact."""
    size = 16 * MIB
    create_vm(xapi.port, "xen06", [size])
    rng = fill(xapi, "xen06", size, seed=12)
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        first = await backed_up_snapshot(client, xapi, "xen06", host_name)
        with operator_session(xapi) as xenapi:  # the retained delta base, destroyed
            xenapi.VDI.destroy(xenapi.VDI.get_by_uuid(first.primary.image if first.primary else ""))
        guest_write(xapi.port, "xen06", 0, rng.randbytes(MIB))
        second = await cli_create("xen06", "xvda", host_name, "xenserver")
        at_second = xapi.disk("xen06").read_bytes()
        record = await starter.wait_settled(client, second.id)
    assert record.backup
    manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
    assert manifest.parent is None and manifest.depth == 0 and manifest.extents is None
    assert Path(manifest.path).read_bytes() == at_second


async def test_deleting_an_unbacked_snapshot_keeps_the_delta_base(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """A snapshot whose backup failed, then deleted, can be no one's base: its own VDI
    goes, the retained base stays, and the next backup is still a delta on it."""
    from snapferry.workflows.snapshot import DELETE_UPDATE
    from tests.xapi_sim.control import clear_faults, inject_fault

    create_vm(xapi.port, "xen07", [16 * MIB])
    rng = fill(xapi, "xen07", 16 * MIB, seed=13)
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        base = await backed_up_snapshot(client, xapi, "xen07", host_name)
        inject_fault(xapi.port, "export_raw_vdi", "INTERNAL_ERROR", [], 20)
        failed = await backed_up_snapshot(client, xapi, "xen07", host_name)
        assert (await starter.get_record(client, failed.id)).backup_error
        clear_faults(xapi.port)
        await starter.snapshot_operation(client, failed.id, DELETE_UPDATE)
        names = {v["name"] for v in xapi.snapshot_vdis()}
        assert f"snapferry-{failed.id}" not in names and f"snapferry-{base.id}" in names
        guest_write(xapi.port, "xen07", 0, rng.randbytes(MIB))
        after = await backed_up_snapshot(client, xapi, "xen07", host_name)
        record = await starter.get_record(client, after.id)
    assert record.backup
    manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
    assert manifest.parent == base.id and manifest.depth == 1
