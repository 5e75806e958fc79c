"""Quiesced snapshots on XenServer, through the real XenAPI client and tests/xapi_sim.

XAPI has no quiesced snapshot any more: ``VM.snapshot_with_quiesce`` (VSS) is ``Removed``
since Citrix Hypervisor 8.1 (xen-api ``ocaml/idl/datamodel_vm.ml`` l.411-417, release
``quebec``, API 2.14 in ``datamodel_types.ml`` l.323-326), and ``xapi_vm_lifecycle.ml``
l.617-623 refuses it with ``VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED`` on every VM. So
``yes`` is refused before anything is taken, ``try`` falls back to a crash-consistent
snapshot that says why, and a halted VM is application-consistent as it is."""

from __future__ import annotations

import pytest

from snapferry.activities.contracts import (
    Consistency,
    Quiesce,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import QuiesceUnavailable
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import async_calls, create_vm, list_vdis, list_vms

from ..conftest import Xapi

pytestmark = pytest.mark.integration

REMOVED = "VM.snapshot_with_quiesce"


def vm_ref(vm: str) -> VmRef:
    return VmRef(name=vm, host="xen-host", hypervisor="xenserver")


def vm_op(
    vm: str, quiesce: Quiesce, kind: VmSnapshotType = VmSnapshotType.DISK
) -> VmSnapshotOperation:
    return VmSnapshotOperation(
        snapshot_id=new_snapshot_id(), vm=vm_ref(vm), type=kind, quiesce=quiesce
    )


def snapshots(xapi: Xapi) -> list[str]:
    vdis = [v["ref"] for v in list_vdis(xapi.port) if v["is_a_snapshot"]]
    return vdis + [v["ref"] for v in list_vms(xapi.port) if v.get("is_a_snapshot")]


def test_a_quiesced_take_of_a_running_vm_is_refused_and_takes_nothing(xapi: Xapi) -> None:
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "qy01", [4 * MIB])
    with pytest.raises(QuiesceUnavailable, match=REMOVED) as refused:
        d.take(
            volume=VolumeRef(vm=vm_ref("qy01"), disk="xvda"),
            snapshot_id=new_snapshot_id(),
            quiesce=Quiesce.YES,
        )
    assert "Citrix Hypervisor 8.1" in str(refused.value)
    with pytest.raises(QuiesceUnavailable, match=REMOVED):
        d.take_vm_snapshot(vm_op("qy01", Quiesce.YES))
    assert snapshots(xapi) == []
    assert not async_calls(xapi.port)


@pytest.mark.parametrize("kind", [VmSnapshotType.DISK, VmSnapshotType.DISK_AND_MEMORY])
def test_a_try_falls_back_to_crash_consistent_and_says_why(
    xapi: Xapi, kind: VmSnapshotType
) -> None:
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "qt01", [4 * MIB])
    taken = d.take_vm_snapshot(vm_op("qt01", Quiesce.TRY, kind))
    assert taken.consistency == Consistency.CRASH
    assert taken.consistency_note and REMOVED in taken.consistency_note
    primary = d.take(
        volume=VolumeRef(vm=vm_ref("qt01"), disk="xvda"),
        snapshot_id=new_snapshot_id(),
        quiesce=Quiesce.TRY,
    )
    assert primary.consistency == Consistency.CRASH
    assert primary.consistency_note and REMOVED in primary.consistency_note


@pytest.mark.parametrize("quiesce", [Quiesce.YES, Quiesce.TRY])
def test_a_halted_vm_is_application_consistent_without_asking_the_guest(
    xapi: Xapi, quiesce: Quiesce
) -> None:
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "qs01", [4 * MIB], power="Halted")
    taken = d.take_vm_snapshot(vm_op("qs01", quiesce))
    assert taken.consistency == Consistency.APPLICATION
    assert taken.consistency_note and "stopped" in taken.consistency_note
    primary = d.take(
        volume=VolumeRef(vm=vm_ref("qs01"), disk="xvda"),
        snapshot_id=new_snapshot_id(),
        quiesce=quiesce,
    )
    assert primary.consistency == Consistency.APPLICATION
    assert primary.consistency_note and "stopped" in primary.consistency_note


def test_without_quiesce_a_take_is_crash_consistent_and_says_nothing(xapi: Xapi) -> None:
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "qn01", [4 * MIB])
    create_vm(xapi.port, "qn02", [4 * MIB], power="Halted")
    for vm in ("qn01", "qn02"):
        taken = d.take_vm_snapshot(vm_op(vm, Quiesce.NO))
        primary = d.take(
            volume=VolumeRef(vm=vm_ref(vm), disk="xvda"), snapshot_id=new_snapshot_id()
        )
        assert (taken.consistency, taken.consistency_note) == (Consistency.CRASH, None)
        assert (primary.consistency, primary.consistency_note) == (Consistency.CRASH, None)
