"""Which disk a name means, and where the take's clone puts it, against tests/vsphere_sim
through the driver's own calls (no Temporal):

- two disks of one VM with one file stem on two datastores (``[ds1] tw01/tw01.vmdk`` and
  ``[ds2] tw01/tw01.vmdk``): each is addressable as ``<stem>.<datastore>``, the bare stem
  is refused, and takes and reverts hit the same disk whatever the device order;
- a VM whose home is on a vSAN datastore and whose disk is on VMFS: the clone's disk stays
  on VMFS (a disk locator), and a vCenter that put it on the home datastore anyway is
  refused before the answer, with nothing left after the discard.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from snapferry.activities.contracts import (
    BackupPlan,
    DiscardRequest,
    PrimarySnapshot,
    RevertRequest,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import DiskNotFound, InvalidInput, UnsupportedImage
from snapferry.activities.hypervisors.vmware import VmwareDriver
from snapferry.activities.storage.copy_engine import CopyEngine
from snapferry.activities.storage.secondary import SecondaryStore
from tests.vsphere_sim.control import (
    create_vm,
    list_vms,
    reverse_devices,
    set_datastore_type,
    set_inventory,
    soap_calls,
)

from .test_vmware_clones import volume
from .test_vmware_disk_copy import MIB, Sim, read_all, sim

__all__ = ["sim", "back_up", "entries"]

pytestmark = pytest.mark.integration


def entries(sim: Sim, snapshot_id: str) -> list[str]:
    """Everything on either datastore whose name carries the snapshot's id."""
    return sorted(
        f"{ds}/{p.name}"
        for ds in ("ds1", "ds2")
        for p in (sim.root / ds).iterdir()
        if snapshot_id in p.name
    )


def write_disk(sim: Sim, vm: str, index: int, seed: int) -> bytes:
    """Random bytes over the VM's disk ``index`` (as the guest's writes would leave it)."""
    path = Path(next(v for v in list_vms(sim.port) if v["name"] == vm)["disks"][index])
    data = random.Random(seed).randbytes(path.stat().st_size)
    path.write_bytes(data)
    return data


def disk_bytes(sim: Sim, vm: str, index: int) -> bytes:
    return Path(next(v for v in list_vms(sim.port) if v["name"] == vm)["disks"][index]).read_bytes()


def back_up(
    driver: VmwareDriver,
    store: SecondaryStore,
    vol: VolumeRef,
    sid: str,
    primary: PrimarySnapshot,
    plan: BackupPlan | None = None,
) -> str:
    """The backup activity's steps without Temporal: the driver's reader into the copy
    engine, then the store's verify and publish. Returns the manifest's path."""
    plan = plan or BackupPlan()
    reader = driver.open_reader(primary, plan)
    listed = list(reader.data_extents()) if plan.parent is not None else None
    target = store.target(vol, sid)
    try:
        outcome = CopyEngine().copy(reader, target, extents=listed)
    finally:
        reader.close()
    store.finalize(
        volume=vol,
        snapshot_id=sid,
        target=target,
        outcome=outcome,
        source=primary.image,
        source_format=primary.image_format,
        plan=plan,
        extents=[(e.start, e.length) for e in listed] if listed is not None else None,
    )
    return str(store.manifest_path(vol, sid))


# -- disk identity -------------------------------------------------------------------------


def test_two_disks_with_one_stem_on_two_datastores_are_each_addressable(
    sim: Sim, tmp_path: Path
) -> None:
    """``tw01.ds1`` and ``tw01.ds2`` each mean their own disk, before and after the device
    order changes; the bare ``tw01`` is refused, naming both, before anything is made; a
    revert of ``tw01.ds2`` writes that disk and leaves the other alone."""
    create_vm(
        sim.port, "tw01", [4 * MIB, 6 * MIB], "poweredOff", bases=["tw01", "tw01"],
        disk_ds=["ds1", "ds2"],
    )  # fmt: skip
    data = [write_disk(sim, "tw01", i, seed=70 + i) for i in (0, 1)]
    driver = VmwareDriver(sim.settings)

    with pytest.raises(InvalidInput, match=r"2 disks named 'tw01'.*tw01\.ds1.*tw01\.ds2"):
        driver.take(volume=volume("tw01", "tw01"), snapshot_id=new_snapshot_id())
    assert "CreateSnapshot_Task" not in soap_calls(sim.port)
    with pytest.raises(DiskNotFound, match=r"\['tw01.ds1', 'tw01.ds2'\]"):
        driver.take(volume=volume("tw01", "tw01.ds3"), snapshot_id=new_snapshot_id())

    store = SecondaryStore(tmp_path / "secondary")
    kept: dict[str, tuple[str, PrimarySnapshot]] = {}
    taken: list[tuple[str, str, PrimarySnapshot]] = []
    for reversed_order in (False, True):
        reverse_devices(sim.port, "tw01", reversed_order)
        for index, name in enumerate(("tw01.ds1", "tw01.ds2")):
            sid = new_snapshot_id()
            primary = driver.take(volume=volume("tw01", name), snapshot_id=sid)
            assert primary.virtual_size == len(data[index]), (name, reversed_order)
            reader = driver.open_reader(primary, BackupPlan())
            assert read_all(reader, 2 * MIB) == data[index], (name, reversed_order)
            reader.close()
            kept[name] = (sid, primary)
            taken.append((name, sid, primary))

    # The backup of tw01.ds2 reverts tw01.ds2 only, with the devices still reversed.
    sid, primary = kept["tw01.ds2"]
    manifest = back_up(driver, store, volume("tw01", "tw01.ds2"), sid, primary)
    later = [write_disk(sim, "tw01", i, seed=80 + i) for i in (0, 1)]
    for name, taken_sid, taken_primary in taken:  # the takes' CBT snapshots go at release
        driver.release(volume=volume("tw01", name), snapshot_id=taken_sid, source=taken_primary)
    driver.revert(
        RevertRequest(
            snapshot_id=sid, volume=volume("tw01", "tw01.ds2"), primary=None, manifest_path=manifest
        )
    )
    assert disk_bytes(sim, "tw01", 1) == data[1]
    assert disk_bytes(sim, "tw01", 0) == later[0]


# -- placement -----------------------------------------------------------------------------


def test_the_clones_disk_stays_on_the_source_disks_datastore(sim: Sim) -> None:
    """The VM's home is on vSAN (no -flat.vmdk over /folder), its disk on VMFS. Without a
    disk locator the clone's disk would go to the clone's home, the VM's home datastore,
    and the backup would find no file there. The clone's disk stays on ds1; its release
    leaves nothing on either datastore."""
    create_vm(sim.port, "pl01", [4 * MIB], home_ds="ds2", disk_ds=["ds1"])
    set_datastore_type(sim.port, "vsan", name="ds2")
    data = write_disk(sim, "pl01", 0, seed=71)
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    primary = driver.take(volume=volume("pl01", "pl01"), snapshot_id=sid)
    clone = sim.vm(primary.overlay)
    assert (clone["home_ds"], clone["disk_ds"]) == ("ds2", ["ds1"])
    assert primary.image.startswith("[ds1] ")
    reader = driver.open_reader(primary, BackupPlan())
    assert read_all(reader, 2 * MIB) == data
    reader.close()
    assert len(entries(sim, sid)) == 2  # the clone's folder on each datastore
    driver.release(volume=volume("pl01", "pl01"), snapshot_id=sid, source=primary)
    assert [v["name"] for v in list_vms(sim.port)] == ["pl01"] and entries(sim, sid) == []


def test_a_clone_put_on_a_datastore_without_flat_files_is_refused_before_the_answer(
    sim: Sim,
) -> None:
    """A vCenter that puts the clone's disk on the clone's home whatever the locator says
    (govmomi's reading): the disk lands on vSAN, where the backup could read nothing. The
    take refuses before it answers (permanent, naming the clone's datastore), and the
    discard that follows leaves no clone, no snapshot and no folder."""
    set_inventory(sim.port, ignore_disk_locators=True)
    create_vm(sim.port, "pl02", [4 * MIB], home_ds="ds2", disk_ds=["ds1"])
    set_datastore_type(sim.port, "vsan", name="ds2")
    driver = VmwareDriver(sim.settings)
    sid = new_snapshot_id()
    with pytest.raises(UnsupportedImage, match="the clone .* is on datastore 'ds2' of type 'vsan'"):
        driver.take(volume=volume("pl02", "pl02"), snapshot_id=sid)
    driver.discard(DiscardRequest(vm=volume("pl02", "pl02").vm, snapshot_id=sid))
    vms = list_vms(sim.port)
    assert [v["name"] for v in vms] == ["pl02"] and vms[0]["snapshots"] == []
    assert entries(sim, sid) == []
