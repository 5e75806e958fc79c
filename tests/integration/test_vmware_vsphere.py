"""VMware against what real vSphere does and tests/vsphere_sim now models: vSAN
datastores without -flat.vmdk, /folder without Range, clones that take long and report
progress, several VMs at once on one vCenter worker, a clone listed before it is complete."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotRequest, SnapshotState
from snapferry.activities.names import TAKE_SNAPSHOT
from snapferry.activities.settings import Settings
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from tests.vsphere_sim.control import (
    create_vm,
    list_tasks,
    list_vms,
    set_datastore_type,
    set_ignore_range,
    set_inventory,
    set_task_delay,
)

from ..conftest import Vsphere
from .test_vmware import fill, kill_9_mid_export_then_resume, vmware_request

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def host_worker(client: Client, settings: Settings, host: str) -> AsyncIterator[None]:
    """Only a host worker (the VMware driver's activities), to be stopped on its own while
    the workflow and backup workers go on."""
    from concurrent.futures import ThreadPoolExecutor

    from temporalio.worker import Worker

    from snapferry.activities.host import HostActivities
    from snapferry.workers.routing import routed_host
    from snapferry.workflows.routing import host_queue

    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="host")
    worker = Worker(
        client,
        task_queue=host_queue(routed_host(host)),
        activities=HostActivities(settings).all,
        activity_executor=pool,
        max_concurrent_activities=4,
    )
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        await worker.shutdown()
        await asyncio.gather(task, return_exceptions=True)
        pool.shutdown(wait=False, cancel_futures=True)


def with_take_heartbeat(req: SnapshotRequest, seconds: float) -> SnapshotRequest:
    """The take's heartbeat timeout, scaled down so that a test runs in seconds."""
    backup = req.backup.model_copy(update={"take_heartbeat_timeout_s": seconds})
    return req.model_copy(update={"backup": backup})


async def take_events(client: Client, snapshot_id: str) -> tuple[list, list]:
    """The take's scheduled and started events (the started one carries the attempt and
    the last failure of the attempts before it)."""
    history = await client.get_workflow_handle(f"volume-snapshot-{snapshot_id}").fetch_history()
    scheduled: list[HistoryEvent] = [
        e
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == TAKE_SNAPSHOT
    ]
    ids = {e.event_id for e in scheduled}
    started = [
        e
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
        and e.activity_task_started_event_attributes.scheduled_event_id in ids
    ]
    return scheduled, started


async def test_vsan_datastore_is_refused_before_the_answer(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """vSAN has no -flat.vmdk (/folder answers 404): the take refuses, non-retryably, before
    anything is made, instead of answering and then failing the backup with SourceGone."""
    create_vm(vsphere.port, "vs01", [8 * MIB])
    set_datastore_type(vsphere.port, "vsan")
    req = vmware_request("vs01", "vs01", host_name, vsphere)
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        with pytest.raises(starter.SnapferryClientError, match="of type 'vsan'"):
            await starter.create_snapshot(client, req)
        record = await starter.get_record(client, req.snapshot_id)
        _, started = await take_events(client, req.snapshot_id)
    assert record.state == SnapshotState.ERROR and record.primary is None
    assert "UnsupportedImage" in (record.error or "") and "vSAN and vVols" in record.error
    assert [e.activity_task_started_event_attributes.attempt for e in started] == [1]
    # Nothing was taken: no clone, no temporary snapshot.
    assert vsphere.vm_names() == {"vs01"} and vsphere.snapshot_names("vs01") == []


async def test_kill_9_resumes_against_a_server_without_ranges(
    client: Client, vsphere: Vsphere, host_name: str, tmp_path: Path
) -> None:
    """/folder answers a ranged GET with a plain 200 (as direct ESXi may): the backup reads
    the one response forward, and the resumed attempt reads and drops up to its checkpoint
    (and says so), instead of failing every attempt on the 200."""
    size = 96 * MIB
    set_ignore_range(vsphere.port, True)
    record, at_take = await kill_9_mid_export_then_resume(
        client, vsphere, host_name, tmp_path, vm="nr01", size=size, seed=21
    )
    assert record.state == SnapshotState.BACKED_UP and record.backup
    assert record.backup.attempts >= 2 and record.backup.resumed_from > 0
    assert record.backup.bytes_copied == size - record.backup.resumed_from
    assert Path(record.backup.path).read_bytes() == at_take
    log_b = (tmp_path / "worker-b.log").read_text()
    assert "ignored Range" in log_b
    assert f"dropped {record.backup.resumed_from} of {record.backup.resumed_from} bytes" in log_b
    assert vsphere.vm_names() == {"nr01"} and vsphere.snapshot_names("nr01") == []


async def test_a_clone_longer_than_the_take_bound_heartbeats_through(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """Scaled down: a take heartbeat timeout of 2 s stands in for the old 5-minute bound,
    and the clone takes 6 s. The take heartbeats while it polls the clone task, so its first
    attempt completes; it is bounded by the heartbeat timeout, with a day as a last resort."""
    create_vm(vsphere.port, "big01", [16 * MIB])
    fill(vsphere, "big01", size=16 * MIB, seed=22)
    set_task_delay(vsphere.port, 6.0)
    req = with_take_heartbeat(vmware_request("big01", "big01", host_name, vsphere), 2.0)
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        t0 = time.monotonic()
        answer = await starter.create_snapshot(client, req)
        took = time.monotonic() - t0
        at_take = vsphere.disk("big01").read_bytes()
        scheduled, started = await take_events(client, answer.id)
        record = await starter.wait_settled(client, answer.id)
    assert took >= 6.0
    attrs = scheduled[0].activity_task_scheduled_event_attributes
    assert attrs.heartbeat_timeout.ToTimedelta().total_seconds() == 2.0
    assert attrs.start_to_close_timeout.ToTimedelta().total_seconds() == 24 * 3600
    assert [e.activity_task_started_event_attributes.attempt for e in started] == [1]
    assert record.state == SnapshotState.BACKED_UP and record.backup
    assert Path(record.backup.path).read_bytes() == at_take
    assert vsphere.vm_names() == {"big01"}
    # The clone task was polled with backoff (50 ms up to a quarter of the 2 s heartbeat
    # timeout: about 20 reads in 6 s), not every 50 ms (about 120).
    (clone_task,) = [t for t in list_tasks(vsphere.port) if t["descriptionId"].endswith("clone")]
    assert 5 <= clone_task["reads"] <= 40, clone_task


async def test_two_vms_at_once_and_a_busy_vm_fails_fast(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """Two VMs' takes run side by side on one vCenter worker; a second take of a VM whose
    clone is running does not queue on the VM's lock (holding a slot): it fails fast with
    the retryable ChainBusy and succeeds on a later attempt."""
    for vm, seed in (("va01", 23), ("vb01", 24)):
        create_vm(vsphere.port, vm, [8 * MIB])
        fill(vsphere, vm, size=8 * MIB, seed=seed)
    set_task_delay(vsphere.port, 5.0)
    a1 = vmware_request("va01", "va01", host_name, vsphere)
    b1 = vmware_request("vb01", "vb01", host_name, vsphere)
    a2 = vmware_request("va01", "va01", host_name, vsphere)
    disks = {vm: vsphere.disk(vm).read_bytes() for vm in ("va01", "vb01")}
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        t0 = time.monotonic()
        first = asyncio.gather(
            starter.create_snapshot(client, a1), starter.create_snapshot(client, b1)
        )
        await asyncio.sleep(1.0)  # a1's clone is running: va01 is busy
        second = asyncio.create_task(starter.create_snapshot(client, a2))
        answers = await first
        both = time.monotonic() - t0
        answers.append(await second)
        records = [await starter.wait_settled(client, a.id) for a in answers]
        _, started_a2 = await take_events(client, a2.snapshot_id)
    assert both < 9.0, f"two 5 s clones took {both:.1f} s: not side by side"
    for record, vm in zip(records, ("va01", "vb01", "va01"), strict=True):
        assert record.state == SnapshotState.BACKED_UP and record.backup
        manifest = SecondaryStore.read_manifest(Path(record.backup.manifest_path))
        with SecondaryStore.materialized(manifest) as raw:  # a full, or full + CBT delta
            assert Path(raw).read_bytes() == disks[vm]
    attrs = started_a2[-1].activity_task_started_event_attributes
    assert attrs.attempt >= 2
    assert "ChainBusy" in str(attrs.last_failure) or "is running on this worker" in str(
        attrs.last_failure.message
    )
    assert vsphere.vm_names() == {"va01", "vb01"}


async def test_a_retried_take_waits_for_a_clone_listed_before_it_is_complete(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """The host worker goes away while the clone runs; vCenter goes on with the clone and
    already lists it. The retried take on a new worker must wait for that clone task, not
    take the half-copied clone for finished."""
    create_vm(vsphere.port, "lc01", [16 * MIB])
    fill(vsphere, "lc01", size=16 * MIB, seed=25)
    at_take = vsphere.disk("lc01").read_bytes()
    set_task_delay(vsphere.port, 6.0)
    req = with_take_heartbeat(vmware_request("lc01", "lc01", host_name, vsphere), 2.0)
    clone = f"lc01-snapferry-{req.snapshot_id}"
    settings = vsphere.settings
    async with running_workers(client, settings, backup=True):  # workflows and backups
        async with host_worker(client, settings, host_name):
            pending = asyncio.create_task(starter.create_snapshot(client, req))
            for _ in range(100):
                vms = {v["name"]: v for v in list_vms(vsphere.port)}
                if clone in vms:
                    break
                await asyncio.sleep(0.1)
            assert clone in vms and not vms[clone]["complete"]  # listed, still copying
        # The first host worker is gone; its attempt is given up, the clone task goes on.
        async with host_worker(client, settings, host_name):
            answer = await asyncio.wait_for(pending, 60)
            record = await starter.wait_settled(client, answer.id)
            _, started = await take_events(client, answer.id)
    assert started[-1].activity_task_started_event_attributes.attempt >= 2
    assert record.state == SnapshotState.BACKED_UP and record.backup
    assert Path(record.backup.path).read_bytes() == at_take
    assert vsphere.vm_names() == {"lc01"} and vsphere.snapshot_names("lc01") == []


async def test_vms_in_sub_folders_by_name_moref_and_uuid_with_only_capacity_in_kb(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """A VM in a sub-folder (not at ``dc1/vm/<name>``) is found by name across the VM
    folders, by its managed object id and by its instance UUID; its clone goes to its own
    folder. The inventory sets only capacityInKB, as older ones do."""
    set_inventory(vsphere.port, capacity_in_bytes=False)
    moid = create_vm(vsphere.port, "sf01", [12 * MIB], folder="prod/web")
    fill(vsphere, "sf01", size=12 * MIB, seed=26)
    at_take = vsphere.disk("sf01").read_bytes()
    instance_uuid = next(v for v in list_vms(vsphere.port) if v["name"] == "sf01")["instance_uuid"]
    si = vsphere.connect()
    assert si.RetrieveContent().searchIndex.FindByInventoryPath("dc1/vm/sf01") is None
    in_folder = si.RetrieveContent().searchIndex.FindByInventoryPath("dc1/vm/prod/web/sf01")
    assert in_folder.config.hardware.device[1].capacityInBytes is None  # only capacityInKB
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        for name in ("sf01", moid, instance_uuid):
            req = vmware_request(name, "sf01", host_name, vsphere)
            answer = await starter.create_snapshot(client, req)
            assert answer.primary and answer.primary.virtual_size == 12 * MIB
            clone = si.RetrieveContent().searchIndex.FindByInventoryPath(
                f"dc1/vm/prod/web/{answer.primary.overlay}"
            )
            assert clone is not None  # in the VM's own folder
            record = await starter.wait_settled(client, answer.id)
            assert record.state == SnapshotState.BACKED_UP and record.backup
            assert Path(record.backup.path).read_bytes() == at_take
    assert vsphere.vm_names() == {"sf01"} and vsphere.snapshot_names("sf01") == []


async def test_a_standalone_esxi_host_is_refused_clearly(
    client: Client, vsphere: Vsphere, host_name: str
) -> None:
    """A standalone ESXi host has no CloneVM_Task: the take says so at once, once, and
    leaves nothing, instead of retrying a NotSupported fault."""
    set_inventory(vsphere.port, api_type="HostAgent")
    create_vm(vsphere.port, "es01", [8 * MIB])
    req = vmware_request("es01", "es01", host_name, vsphere)
    async with running_workers(client, vsphere.settings, hosts=[host_name], backup=True):
        with pytest.raises(starter.SnapferryClientError, match="only vCenter clones VMs"):
            await starter.create_snapshot(client, req)
        _, started = await take_events(client, req.snapshot_id)
    assert [e.activity_task_started_event_attributes.attempt for e in started] == [1]
    assert vsphere.vm_names() == {"es01"} and vsphere.snapshot_names("es01") == []
