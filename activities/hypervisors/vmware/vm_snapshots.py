"""VM snapshots: vSphere's own snapshots, named ``snapferry-vm-<id>``."""

from __future__ import annotations

from typing import Any

from ...contracts import VmSnapshotOperation, VmSnapshotTaken, VmSnapshotType
from ...errors import InvalidInput, SourceGone
from .cbt import CbtOps
from .common import VM_SNAPSHOT_PREFIX, vm_lock


class VmSnapshotOps(CbtOps):
    """Disk and DiskAndMemory VM snapshots: create, revert, delete."""

    # -- VM snapshots ------------------------------------------------------------------------
    def take_vm_snapshot(self, op: VmSnapshotOperation) -> VmSnapshotTaken:
        vm_name = op.vm.name
        with vm_lock(vm_name):
            vm = self._vm(vm_name)
            running = self._powered_on(vm)
            memory = op.type == VmSnapshotType.DISK_AND_MEMORY
            if memory and not running:
                raise InvalidInput(
                    f"VM {vm_name!r} is stopped: a DiskAndMemory snapshot needs a running VM"
                    " (take a Disk snapshot instead)"
                )
            _, consistency, note = self._take_snapshot(
                vm,
                vm_name,
                name=VM_SNAPSHOT_PREFIX + op.snapshot_id,
                description=f"snapferry VM snapshot {op.snapshot_id}",
                memory=memory,
                quiesce=op.quiesce,
                running=running,
                what=f"VM snapshot of {vm_name!r}",
            )
            return VmSnapshotTaken(
                overlays={},
                memory=None,
                vm_was_running=running,
                consistency=consistency,
                consistency_note=note,
            )

    def _vm_snapshot(self, vm: Any, op: VmSnapshotOperation) -> Any | None:
        return self._snapshot_named(vm, VM_SNAPSHOT_PREFIX + op.snapshot_id)

    def revert_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """vSphere's own revert; a Disk snapshot needs the VM stopped, as on KVM (vSphere
        would power it off silently), and a DiskAndMemory one resumes it running.

        The changeIds given out after the snapshot name other disk states once it is back
        (VMware's KB on reverting to a pre-existing snapshot with CBT: "do a full VM backup
        after a snapshot revert operation"), so Changed Block Tracking is turned off after
        the revert (before it, so that a revert whose tracking cannot be stopped is not
        done); the next take turns it on again once the VM has no snapshots, and the next
        backup is a full."""
        vm_name = op.vm.name
        with vm_lock(vm_name):
            vm = self._vm(vm_name)
            snap = self._vm_snapshot(vm, op)
            if snap is None:
                raise SourceGone(f"VM snapshot {op.snapshot_id} is gone from {vm_name!r}")
            if op.type == VmSnapshotType.DISK and self._powered_on(vm):
                raise InvalidInput(
                    f"VM {vm_name!r} is running; stop it before reverting to Disk snapshot"
                    f" {op.snapshot_id}"
                )
            tracked = self.session.call(
                lambda _si: bool(vm.config.changeTrackingEnabled), "reading changeTrackingEnabled"
            )
            if tracked:  # off first: a revert it could not follow is not done
                self._stop_tracking(vm, f"VM {vm_name!r} (reverting to {op.snapshot_id})")
            self._run(snap.RevertToSnapshot_Task, f"reverting {vm_name!r}")
            if op.type == VmSnapshotType.DISK_AND_MEMORY and not self._powered_on(vm):
                self._run(vm.PowerOnVM_Task, f"resuming {vm_name!r}")

    def delete_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        with vm_lock(op.vm.name):
            vm = self._find_vm(op.vm.name)
            snap = self._vm_snapshot(vm, op) if vm is not None else None
            if snap is not None:
                self._remove_snapshot(
                    vm, op.vm.name, snap, f"deleting VM snapshot {op.snapshot_id}"
                )
