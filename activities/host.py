"""Activities that run on a hypervisor host's own task queue: every hypervisor operation.

Like CloudStack's agent, each host runs one worker polling ``snapferry-host-<name>``; the
workflow routes every hypervisor operation for a VM to the queue of the host that owns it.
"""

from __future__ import annotations

from temporalio import activity

from .contracts import (
    DiscardRequest,
    PrimarySnapshot,
    ReleaseRequest,
    RevertRequest,
    TakeRequest,
    VmSnapshotOperation,
    VmSnapshotTaken,
)
from .errors import converts_errors
from .hypervisors import Drivers
from .hypervisors.base import HypervisorDriver
from .names import (
    DELETE_VM_SNAPSHOT,
    DISCARD_SNAPSHOT,
    RELEASE_PRIMARY,
    REVERT_VM_SNAPSHOT,
    REVERT_VOLUME,
    TAKE_SNAPSHOT,
    TAKE_VM_SNAPSHOT,
)
from .settings import Settings


class HostActivities:
    def __init__(self, settings: Settings) -> None:
        self.drivers = Drivers(settings)

    def driver(self, req: TakeRequest | ReleaseRequest) -> HypervisorDriver:
        return self.drivers.get(req.volume.vm.hypervisor)

    @activity.defn(name=TAKE_SNAPSHOT)
    @converts_errors
    def take_snapshot(self, req: TakeRequest) -> PrimarySnapshot:
        return self.driver(req).take(volume=req.volume, snapshot_id=req.snapshot_id)

    @activity.defn(name=REVERT_VOLUME)
    @converts_errors
    def revert_volume(self, req: RevertRequest) -> None:
        self.drivers.get(req.volume.vm.hypervisor).revert(req)

    @activity.defn(name=RELEASE_PRIMARY)
    @converts_errors
    def release_primary(self, req: ReleaseRequest) -> None:
        self.driver(req).release(
            volume=req.volume,
            snapshot_id=req.snapshot_id,
            source=req.source,
            backed_up=req.backed_up,
        )

    @activity.defn(name=DISCARD_SNAPSHOT)
    @converts_errors
    def discard_snapshot(self, req: DiscardRequest) -> None:
        self.drivers.get(req.vm.hypervisor).discard(req)

    @activity.defn(name=TAKE_VM_SNAPSHOT)
    @converts_errors
    def take_vm_snapshot(self, op: VmSnapshotOperation) -> VmSnapshotTaken:
        return self.drivers.get(op.vm.hypervisor).take_vm_snapshot(op)

    @activity.defn(name=REVERT_VM_SNAPSHOT)
    @converts_errors
    def revert_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        self.drivers.get(op.vm.hypervisor).revert_vm_snapshot(op)

    @activity.defn(name=DELETE_VM_SNAPSHOT)
    @converts_errors
    def delete_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        self.drivers.get(op.vm.hypervisor).delete_vm_snapshot(op)

    @property
    def all(self) -> list:  # type: ignore[type-arg]
        """Every activity a host worker serves."""
        return [
            self.take_snapshot,
            self.release_primary,
            self.revert_volume,
            self.discard_snapshot,
            self.take_vm_snapshot,
            self.revert_vm_snapshot,
            self.delete_vm_snapshot,
        ]
