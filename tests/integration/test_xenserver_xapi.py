"""The XenServer driver against what real XAPI does, through the real XenAPI client
and tests/xapi_sim, which answers as xen-api's source says: differencing VHD deltas chosen by
allocation, no Content-Length, errors after the 200 in the export's task, 302s to the host
of a local SR, VBD.device "" until boot, VM.revert shutting a running VM down itself, and a
checkpoint's memory in its suspend_VDI."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    BackupPlan,
    PrimarySnapshot,
    SnapshotState,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import HypervisorUnavailable, SourceGone
from snapferry.activities.hypervisors.xenserver import VhdExportReader, XenServerDriver
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from tests.xapi_sim.control import (
    create_vm,
    guest_write,
    inject_fault,
    list_vdis,
    set_export_delay,
)

from ..conftest import Xapi
from .test_xenserver import BLOCK, snapshot_power, xen_request

pytestmark = pytest.mark.integration


def driver(xapi: Xapi) -> XenServerDriver:
    return XenServerDriver(xapi.settings)


def volume(vm: str, disk: str = "xvda") -> VolumeRef:
    return VolumeRef(vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"), disk=disk)


def read_all(reader: VhdExportReader) -> tuple[bytes, list[int]]:
    """The guest image a reader describes (zeros where it has no extent) and its blocks."""
    image = bytearray(reader.virtual_size)
    starts = []
    for extent in reader.data_extents():
        view = memoryview(image)[extent.start : extent.start + extent.length]
        reader.read_range(extent, extent.start, view)
        starts.append(extent.start // BLOCK)
    reader.close()
    return bytes(image), starts


def take(d: XenServerDriver, vm: str, disk: str = "xvda") -> PrimarySnapshot:
    return d.take(volume=volume(vm, disk), snapshot_id=new_snapshot_id())


async def test_a_full_and_four_deltas_restore_byte_identical_at_every_point(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """Every backup after the first is a differencing VHD (type 4), and the driver
    reads it. One full and four deltas, each rebuilt from its chain, equal
    the VDI at its snapshot time; the last is reverted into the VM and reads back equal. A
    block rewritten with its own bytes is still in the delta (XAPI picks by allocation)."""
    from snapferry.workflows.snapshot import REVERT_UPDATE

    size = 32 * MIB
    create_vm(xapi.port, "chain01", [size])
    rng = random.Random(21)
    for offset in range(0, size, 4 * MIB):
        guest_write(xapi.port, "chain01", offset, rng.randbytes(MIB))
    assert xapi.settings.xen is not None
    deep = dataclasses.replace(xapi.settings, delta_max=16)
    at: dict[str, bytes] = {}
    async with running_workers(client, deep, hosts=[host_name], backup=True):
        for i in range(5):
            if i:
                guest_write(xapi.port, "chain01", i * 3 * BLOCK + 4096, rng.randbytes(300_000))
                same = xapi.disk("chain01").read_bytes()[8 * MIB : 8 * MIB + 4096]
                guest_write(xapi.port, "chain01", 8 * MIB, same)  # block 4: same bytes
            answer = await starter.create_snapshot(client, xen_request("chain01", host_name, xapi))
            at[answer.id] = xapi.disk("chain01").read_bytes()
            record = await starter.wait_settled(client, answer.id)
            assert record.state == SnapshotState.BACKED_UP and record.backup, record
        ids = list(at)
        manifests = [
            SecondaryStore.read_manifest(Path(r.backup.manifest_path))
            for r in [await starter.get_record(client, sid) for sid in ids]
            if r.backup
        ]
        assert [m.depth for m in manifests] == [0, 1, 2, 3, 4]
        assert [m.parent for m in manifests] == [None, *ids[:4]]
        for sid, m in zip(ids, manifests, strict=True):
            with SecondaryStore.materialized(m) as raw:
                assert raw.read_bytes() == at[sid], f"chain of {sid} does not rebuild"
        for i, m in enumerate(manifests[1:], start=1):  # the written block and block 4
            assert m.data_bytes == 2 * BLOCK, (i, m.data_bytes)
        await snapshot_power(xapi, "chain01", on=False)
        await starter.snapshot_operation(client, ids[2], REVERT_UPDATE)
        assert xapi.disk("chain01").read_bytes() == at[ids[2]]


def test_a_delta_export_is_differencing_and_names_its_base(xapi: Xapi) -> None:
    d = driver(xapi)
    create_vm(xapi.port, "diff01", [16 * MIB])
    guest_write(xapi.port, "diff01", 0, b"\x01" * 5000)
    first = take(d, "diff01")
    guest_write(xapi.port, "diff01", 5 * BLOCK, b"\x02" * 5000)
    second = take(d, "diff01")
    reader = d.open_reader(second, BackupPlan(base_image=first.image, depth=1))
    leaf = next(v for v in list_vdis(xapi.port) if v["uuid"] == first.image)["vhd_uid"]
    assert reader.parent_uid.hex() == leaf
    image, blocks = read_all(reader)
    assert blocks == [5]
    assert image[5 * BLOCK : 5 * BLOCK + 5000] == b"\x02" * 5000
    full, blocks = read_all(d.open_reader(second, BackupPlan()))
    assert blocks == [0, 5] and full[:5000] == b"\x01" * 5000


def test_close_does_not_read_the_rest_of_an_export_without_content_length(xapi: Xapi) -> None:
    """The body has no length; close() does not read it to the end."""
    d = driver(xapi)
    create_vm(xapi.port, "slow01", [64 * MIB])
    for offset in range(0, 64 * MIB, BLOCK):
        guest_write(xapi.port, "slow01", offset, b"\x33" * 512)
    snap = take(d, "slow01")
    set_export_delay(xapi.port, 2 * MIB)  # the rest of the export would take ~30 s
    try:
        reader = d.open_reader(snap, BackupPlan())
        first = reader.data_extents()[0]
        buf = bytearray(4096)
        reader.read_range(first, first.start, memoryview(buf))
        t0 = time.monotonic()
        reader.close()
        assert time.monotonic() - t0 < 3
    finally:
        set_export_delay(xapi.port, 0)


def test_a_short_body_reads_the_tasks_error(xapi: Xapi) -> None:
    """XAPI fails after its 200; the export's task says why."""
    d = driver(xapi)
    create_vm(xapi.port, "short01", [16 * MIB])
    guest_write(xapi.port, "short01", 3 * BLOCK, b"\x44" * 9000)
    snap = take(d, "short01")
    inject_fault(xapi.port, "export_raw_vdi", "VDI_IO_ERROR", ["Device I/O errors"], at_byte=6000)
    reader = d.open_reader(snap, BackupPlan())
    with pytest.raises(HypervisorUnavailable, match="VDI_IO_ERROR"):
        read_all(reader)
    reader.close()
    # the fault was one-shot: the retry reads everything
    image, blocks = read_all(d.open_reader(snap, BackupPlan()))
    assert blocks == [3] and image[3 * BLOCK : 3 * BLOCK + 9000] == b"\x44" * 9000
    # a base that is gone is only known after the 200: the task's UUID_INVALID, permanent
    gone = "00000000-0000-4000-8000-00000000000f"
    with pytest.raises(SourceGone, match="UUID_INVALID"):
        d.open_reader(snap, BackupPlan(base_image=gone, depth=1))
    # a VDI that is gone is a 500 before any header
    with pytest.raises(SourceGone, match="HTTP 500"):
        d.open_reader(snap.model_copy(update={"image": gone}), BackupPlan())
    labels = [d._api("task.get_name_label", t) for t in d._api("task.get_all")]
    assert "snapferry export" not in labels  # every export's task destroyed


def test_a_vdi_on_another_hosts_local_sr_is_exported_through_the_redirect(xapi: Xapi) -> None:
    d = driver(xapi)
    create_vm(xapi.port, "far02", [8 * MIB], host=2)
    guest_write(xapi.port, "far02", BLOCK + 7, b"far away")
    snap = take(d, "far02")
    image, blocks = read_all(d.open_reader(snap, BackupPlan()))
    assert blocks == [1] and image[BLOCK + 7 : BLOCK + 15] == b"far away"


def test_a_vm_that_never_booted_has_its_disks_by_userdevice(xapi: Xapi) -> None:
    """VBD.device is "" until the VM boots; keyed by it, both disks would collapse
    into one "" key and neither would be found."""
    d = driver(xapi)
    create_vm(xapi.port, "cold02", [4 * MIB, 6 * MIB], power="Halted")
    assert [disk["device"] for disk in xapi.vm("cold02")["disks"]] == ["", ""]
    second = take(d, "cold02", "xvdb")
    assert second.virtual_size == 6 * MIB and not second.vm_was_running
    assert take(d, "cold02", "xvda").virtual_size == 4 * MIB
    assert take(d, "cold02", "1").virtual_size == 6 * MIB


def test_a_disk_and_memory_revert_of_a_running_vm(xapi: Xapi) -> None:
    """XAPI's VM.revert hard-shuts a running VM down itself (message_forwarding.ml); a
    checkpoint revert leaves it Suspended, and the driver resumes it."""
    d = driver(xapi)
    create_vm(xapi.port, "mem01", [4 * MIB])
    guest_write(xapi.port, "mem01", 0, b"before")
    op = VmSnapshotOperation(
        snapshot_id=new_snapshot_id(),
        vm=VmRef(name="mem01", host="xen-host", hypervisor="xenserver"),
        type=VmSnapshotType.DISK_AND_MEMORY,
    )
    d.take_vm_snapshot(op)
    guest_write(xapi.port, "mem01", 0, b"after!")
    d.revert_vm_snapshot(op)
    assert xapi.vm("mem01")["power"] == "Running"
    assert xapi.disk("mem01").read_bytes()[:6] == b"before"


def test_deleting_a_checkpoint_leaves_no_vdi(xapi: Xapi) -> None:
    """A DiskAndMemory snapshot's memory image (its suspend_VDI) goes too."""
    d = driver(xapi)
    create_vm(xapi.port, "mem02", [4 * MIB, 2 * MIB])
    before = {v["uuid"] for v in list_vdis(xapi.port)}
    op = VmSnapshotOperation(
        snapshot_id=new_snapshot_id(),
        vm=VmRef(name="mem02", host="xen-host", hypervisor="xenserver"),
        type=VmSnapshotType.DISK_AND_MEMORY,
    )
    d.take_vm_snapshot(op)
    made = [v for v in list_vdis(xapi.port) if v["uuid"] not in before]
    assert sorted(v["type"] for v in made) == ["suspend", "user", "user"]
    d.delete_vm_snapshot(op)
    assert {v["uuid"] for v in list_vdis(xapi.port)} == before


def test_an_expired_session_on_the_export_logs_in_again(xapi: Xapi) -> None:
    """A 401 on HTTP: XenAPI re-logs in only on XML-RPC calls, so the reader does it."""
    d = driver(xapi)
    create_vm(xapi.port, "late01", [4 * MIB])
    guest_write(xapi.port, "late01", 0, b"late")
    snap = take(d, "late01")
    old = d.session.session_ref()
    inject_fault(xapi.port, "export_raw_vdi:401", "SESSION_INVALID", [])
    image, blocks = read_all(d.open_reader(snap, BackupPlan()))
    assert blocks == [0] and image[:4] == b"late"
    assert d.session.session_ref() != old  # a new session, logged in for the GET


def test_a_pool_member_answering_host_is_slave_sends_the_driver_to_the_master(
    xapi: Xapi,
) -> None:
    """After a master failover the configured host is a member; its login answers
    HOST_IS_SLAVE [master address], which the driver follows."""
    from .test_xenserver import operator_session

    with operator_session(xapi) as xenapi:
        member = next(
            h for h in xenapi.host.get_all() if xenapi.host.get_name_label(h) == "xapi-sim-2"
        )
        address = xenapi.host.get_address(member)
    assert xapi.settings.xen is not None
    moved = dataclasses.replace(
        xapi.settings, xen=dataclasses.replace(xapi.settings.xen, url=f"http://{address}")
    )
    d = XenServerDriver(moved)
    create_vm(xapi.port, "fail01", [4 * MIB])
    guest_write(xapi.port, "fail01", 0, b"master")
    snap = take(d, "fail01")
    assert d.session.master_url == f"http://127.0.0.1:{xapi.port}"
    image, _ = read_all(d.open_reader(snap, BackupPlan()))
    assert image[:6] == b"master"


def test_a_restore_into_a_vdi_on_another_hosts_local_sr_follows_the_redirect(
    xapi: Xapi, tmp_path: Path
) -> None:
    """import_raw_vdi redirects as the export does; the PUT goes to the member directly."""
    d = driver(xapi)
    vm = create_vm(xapi.port, "far03", [4 * MIB], power="Halted", host=2)
    raw = tmp_path / "restore.raw"
    raw.write_bytes(random.Random(5).randbytes(4 * MIB))
    d._import(vm["disks"][0]["vdi"], raw)
    assert xapi.disk("far03").read_bytes() == raw.read_bytes()


def test_a_take_interrupted_before_its_label_is_found_by_the_retry(xapi: Xapi) -> None:
    """The label is set after Async.VDI.snapshot; a take that stops in
    between leaves an unlabelled snapshot, which a retry looking for the label would never
    find (a second snapshot, the first leaked). The source's other_config mark, which the snapshot
    inherits, finds it."""
    from snapferry.activities.errors import SnapferryError

    d = driver(xapi)
    create_vm(xapi.port, "label01", [4 * MIB])
    sid = new_snapshot_id()
    inject_fault(xapi.port, "VDI.set_name_label", "INTERNAL_ERROR", ["crash"], count=1)
    with pytest.raises(SnapferryError, match="INTERNAL_ERROR"):
        d.take(volume=volume("label01"), snapshot_id=sid)
    again = d.take(volume=volume("label01"), snapshot_id=sid)
    snaps = [v for v in list_vdis(xapi.port) if v["is_a_snapshot"]]
    assert [v["uuid"] for v in snaps] == [again.image]
    assert snaps[0]["name"] == f"snapferry-{sid}"
    source = xapi.vm("label01")["disks"][0]["vdi"]
    assert "snapferry-take" not in d._api("VDI.get_other_config", source)


def test_concurrent_xapi_calls_of_one_worker_overlap(xapi: Xapi) -> None:
    """No process-wide lock serialises a worker's XAPI calls. Each thread
    has its own XML-RPC proxy on the one shared session, so two slow calls are served at
    once (the simulator counts the calls in flight), and the session is logged in once."""
    import threading

    from snapferry.activities.hypervisors.xenserver import XapiSession
    from tests.xapi_sim.control import max_calls_in_flight, set_call_latency

    assert xapi.settings.xen is not None
    session = XapiSession(xapi.settings.xen)
    refs = {session.session_ref()}
    set_call_latency(xapi.port, 0.5)
    try:
        results: list[object] = []

        def call() -> None:
            results.append(session.call(lambda x: x.VM.get_all(), "listing VMs"))
            refs.add(session.session_ref())

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(results) == 3 and all(results)
        assert max_calls_in_flight(xapi.port) >= 2, "the calls were serialised"
        assert len(refs) == 1  # one session for every thread
    finally:
        set_call_latency(xapi.port, 0)
