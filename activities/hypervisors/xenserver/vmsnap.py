"""VM snapshots: ``VM.snapshot``/``VM.checkpoint``, ``VM.revert``, and their delete."""

from __future__ import annotations

from ...contracts import (
    Consistency,
    Quiesce,
    VmSnapshotOperation,
    VmSnapshotTaken,
    VmSnapshotType,
)
from ...errors import (
    InvalidInput,
    SourceGone,
)
from ..quiesce import stopped_vm, without_quiesce
from .chain import ChainCheck
from .common import (
    NULL_REF,
    QUIESCE_REMOVED,
    VM_PREFIX,
    _vm_locks,
)


class VmSnapshotOps(ChainCheck):
    # -- VM snapshots --------------------------------------------------------------------------
    def _vm_snapshot(self, vm: str | None, snapshot_id: str) -> str | None:
        """Our snapshot VM ``snapferry-vm-<id>`` (of ``vm`` when given): only a VM snapshot,
        never a VM or template that happens to carry the label."""
        label = VM_PREFIX + snapshot_id
        found = []
        for ref in self._api("VM.get_by_name_label", label):
            rec = self._api("VM.get_record", ref)
            if rec.get("is_a_snapshot") and vm in (None, rec.get("snapshot_of")):
                found.append(str(ref))
        if len(found) > 1:
            raise InvalidInput(f"{len(found)} VM snapshots are labelled {label!r}: {found}")
        return found[0] if found else None

    def _consistency(self, vm: str, quiesce: Quiesce) -> tuple[Consistency, str | None]:
        """What a snapshot of ``vm`` taken now holds, decided before anything is taken (a
        refused ``yes`` takes nothing): a halted VM's disks are what its guest last wrote;
        any other VM cannot be quiesced (``QUIESCE_REMOVED``)."""
        if self._power(vm) == "Halted":
            return stopped_vm(quiesce)
        return without_quiesce(quiesce, QUIESCE_REMOVED)

    def take_vm_snapshot(self, op: VmSnapshotOperation) -> VmSnapshotTaken:
        vm_name = op.vm.name
        vm = self._vm(vm_name)
        with _vm_locks[vm]:
            consistency, note = self._consistency(vm, op.quiesce)
            running = self._power(vm) == "Running"
            memory = op.type == VmSnapshotType.DISK_AND_MEMORY
            if memory and not running:
                raise InvalidInput(
                    f"VM {vm_name!r} is stopped: a DiskAndMemory snapshot needs a running VM"
                    " (take a Disk snapshot instead)"
                )
            label = VM_PREFIX + op.snapshot_id
            if self._vm_snapshot(vm, op.snapshot_id) is None:
                for vdi in self._vdis(vm).values():  # VM.snapshot snapshots every disk
                    self._assert_chain_room(vdi, f"VM snapshot of {vm_name}")
                if memory:
                    self._run("VM.checkpoint", vm, label)
                else:
                    self._run("VM.snapshot", vm, label)
            return VmSnapshotTaken(
                overlays={},
                memory=None,
                vm_was_running=running,
                consistency=consistency,
                consistency_note=note,
            )

    def revert_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        vm_name = op.vm.name
        vm = self._vm(vm_name)
        with _vm_locks[vm]:
            snap = self._vm_snapshot(vm, op.snapshot_id)
            if snap is None:
                raise SourceGone(f"VM snapshot {op.snapshot_id} is gone from {vm_name!r}")
            if op.type == VmSnapshotType.DISK and self._power(vm) != "Halted":
                raise InvalidInput(
                    f"VM {vm_name!r} is running; stop it before reverting to Disk snapshot"
                    f" {op.snapshot_id}"
                )
            # A running VM is hard-shut down by XAPI's VM.revert itself ("first of all,
            # destroy the domain if needed", message_forwarding.ml): a checkpoint replaces
            # its memory anyway, so nothing is lost that the revert would keep.
            self._run("VM.revert", snap)
            # XAPI leaves a VM reverted to a checkpoint Suspended (its memory restored):
            # resume it, so that it ends running as on the other hypervisors.
            state = self._power(vm)
            if op.type == VmSnapshotType.DISK_AND_MEMORY and state == "Suspended":
                self._run("VM.resume", vm, False, False)
            elif op.type == VmSnapshotType.DISK_AND_MEMORY and state == "Halted":
                self._run("VM.start", vm, False, False)

    def delete_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """By the snapshot's own label: it is deleted even when its VM is gone or renamed."""
        snap = self._vm_snapshot(None, op.snapshot_id)
        if snap is None:
            return
        with _vm_locks[str(self._api("VM.get_snapshot_of", snap))]:
            self._destroy_vm_snapshot(None, op.snapshot_id)

    def _destroy_vm_snapshot(self, vm: str | None, snapshot_id: str) -> None:
        """The snapshot VDIs its VBDs hold, its memory image, then the snapshot VM: VDIs
        first, because the snapshot VM is the only thing that leads to them. VM.destroy
        leaves every VDI (xapi_vm_helpers.ml), so a VM destroyed first would orphan the
        VDIs that a failed VDI.destroy left. Each VDI.destroy takes its VBDs with it and
        nulls the suspend_VDI that named it (xapi_vdi.ml), so a retry finds the rest."""
        snap = self._vm_snapshot(vm, snapshot_id)
        if snap is None:
            return
        vdis = list(self._vdis(snap).values())
        # A checkpoint's memory image (RAM-sized) is its suspend_VDI; VM.destroy leaves it,
        # as it leaves every VDI (CloudStack's CitrixDeleteVMSnapshotCommandWrapper too
        # destroys it).
        memory = self._api("VM.get_suspend_VDI", snap)
        if memory and memory != NULL_REF:
            vdis.append(memory)
        for vdi in vdis:
            self._run("VDI.destroy", vdi)
        self._api("VM.destroy", snap)
