"""VM snapshots on XenServer as XAPI answers them, through the real XenAPI client and
tests/xapi_sim: a delete that fails half-way and its retry, and refusals that can never
succeed (an unlicensed feature) told apart from those that pass."""

from __future__ import annotations

import pytest

from snapferry.activities.contracts import (
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.errors import ChainBusy, InvalidInput
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import (
    create_vm,
    inject_fault,
    list_vdis,
    list_vms,
    set_restricted_features,
)

from ..conftest import Xapi

pytestmark = pytest.mark.integration


def op(vm: str, sid: str, kind: VmSnapshotType) -> VmSnapshotOperation:
    return VmSnapshotOperation(
        snapshot_id=sid, vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"), type=kind
    )


@pytest.mark.parametrize("kind", [VmSnapshotType.DISK, VmSnapshotType.DISK_AND_MEMORY])
def test_a_vm_snapshot_delete_that_fails_half_way_leaves_nothing_after_its_retry(
    xapi: Xapi, kind: VmSnapshotType
) -> None:
    """``VM.destroy`` never destroys VDIs (xapi_vm_helpers.ml). The second ``VDI.destroy``
    of the delete fails (transient); the retry must still find and destroy every VDI of
    the snapshot, its memory image included, then the snapshot VM."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "del01", [4 * MIB, 4 * MIB])
    sid = new_snapshot_id()
    before = {v["ref"] for v in list_vdis(xapi.port)}
    d.take_vm_snapshot(op("del01", sid, kind))
    made = {v["ref"] for v in list_vdis(xapi.port)} - before
    assert len(made) == (3 if kind == VmSnapshotType.DISK_AND_MEMORY else 2)
    inject_fault(xapi.port, "VDI.destroy", "OTHER_OPERATION_IN_PROGRESS", ["VDI"], count=1)
    with pytest.raises(ChainBusy):
        d.delete_vm_snapshot(op("del01", sid, kind))
    d.delete_vm_snapshot(op("del01", sid, kind))
    assert {v["ref"] for v in list_vdis(xapi.port)} == before
    assert not [vm for vm in list_vms(xapi.port) if vm["name"] == f"snapferry-vm-{sid}"]


def test_an_unlicensed_checkpoint_is_refused_for_good(xapi: Xapi) -> None:
    """``VM.checkpoint`` needs the licensed Checkpoint feature (xapi_vm.ml): without it
    XAPI answers LICENCE_RESTRICTION, which no retry can change."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "lic01", [4 * MIB])
    set_restricted_features(xapi.port, ["Checkpoint"])
    with pytest.raises(InvalidInput, match="LICENCE_RESTRICTION"):
        d.take_vm_snapshot(op("lic01", new_snapshot_id(), VmSnapshotType.DISK_AND_MEMORY))
    assert not [v for v in list_vdis(xapi.port) if v["is_a_snapshot"]]


@pytest.mark.parametrize(
    "code",
    [
        "LICENCE_RESTRICTION",
        "FEATURE_RESTRICTED",
        "VM_LACKS_FEATURE",
        "VM_LACKS_FEATURE_SUSPEND",
        "VM_HAS_PCI_ATTACHED",
        "VM_HAS_VGPU",
        "VM_HAS_VUSBS",
        "SR_OPERATION_NOT_SUPPORTED",
        "VDI_INCOMPATIBLE_TYPE",
        "VDI_IS_SHARABLE",
        "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION",
        "UNIMPLEMENTED_IN_SM_BACKEND",
        "OPERATION_BLOCKED",
        "VM_IS_TEMPLATE",
    ],
)
def test_refusals_that_can_never_succeed_are_not_retried(code: str) -> None:
    import XenAPI

    from snapferry.activities.hypervisors.xenserver.common import _failure_error

    error = _failure_error(XenAPI.Failure([code, "OpaqueRef:x", "why"]), "snapshot of vm/xvda")
    assert error.non_retryable, (code, type(error).__name__)
    assert code in str(error)
