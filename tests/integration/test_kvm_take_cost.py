"""A KVM take costs the same on a VM with forty snapshots waiting for their backups as on a
new one: it reads the active image once (its virtual size), asks libvirt for one external
snapshot, and never walks the chain below. Real libvirtd and QEMU, through
:class:`KvmDriver`; the qemu-img runs are counted at the one place they are started."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapferry.activities.contracts import VmRef, VolumeRef, new_snapshot_id
from snapferry.activities.hypervisors.kvm import KvmDriver
from snapferry.activities.settings import Settings
from snapferry.activities.storage import reader
from snapferry.workers.demo_vm import MIB

from .helpers import chain_of, disk_source

pytestmark = pytest.mark.integration

DEPTH = 40


def test_a_take_on_a_deep_chain_runs_one_qemu_img_and_freezes_the_active_image(
    settings: Settings, make_vm, host_name: str, libvirt_conn, monkeypatch
) -> None:
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    driver = KvmDriver(settings)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    for _ in range(DEPTH):
        driver.take(volume=volume, snapshot_id=new_snapshot_id())
    active = disk_source(libvirt_conn, vm.name)
    runs: list[tuple[str, ...]] = []
    real = reader.run_qemu_img

    def counted(*args: str, **kwargs):  # type: ignore[no-untyped-def]
        runs.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(reader, "run_qemu_img", counted)
    sid = new_snapshot_id()
    snap = driver.take(volume=volume, snapshot_id=sid)
    assert len(runs) == 1, runs  # the active image's size; before: two walks of 41 layers
    assert runs[0][0] == "info" and runs[0][-1] == active
    monkeypatch.undo()
    # What it answered is what a chain walk would have found.
    chain = chain_of(disk_source(libvirt_conn, vm.name))
    assert len(chain) == DEPTH + 2 and chain[0] == snap.overlay and chain[1] == snap.image
    assert snap.image == active and snap.image_format == "qcow2"
    assert snap.virtual_size == 8 * MIB and snap.vm_was_running
    assert Path(snap.overlay or "").name.endswith(f"{sid}.qcow2")


def test_a_take_run_again_answers_the_same_snapshot_without_a_second_layer(
    settings: Settings, make_vm, host_name: str, libvirt_conn
) -> None:
    """An activity retried after its first attempt took the snapshot (the worker died before
    it reported) finds the overlay in the chain and answers what the first attempt froze."""
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    driver = KvmDriver(settings)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    driver.take(volume=volume, snapshot_id=new_snapshot_id())
    sid = new_snapshot_id()
    first = driver.take(volume=volume, snapshot_id=sid)
    later = driver.take(volume=volume, snapshot_id=new_snapshot_id())  # a take on top of it
    again = driver.take(volume=volume, snapshot_id=sid)
    assert again == first
    chain = chain_of(disk_source(libvirt_conn, vm.name))
    assert chain[:3] == [later.overlay, first.overlay, first.image] and len(chain) == 4
