"""VM snapshot contracts: CloudStack's VM snapshot types and states, what a VM snapshot left
on primary, its record, the workflow's input and the host activities' operation.

``activities.contracts`` re-exports all of it; import from there.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import Field

from .contracts_base import Consistency, HypervisorType, Model, Quiesce, SafeName, SnapshotId, VmRef


class VmSnapshotType(StrEnum):
    """CloudStack's VM snapshot types: disks only, or disks plus the guest's memory."""

    DISK = "Disk"
    DISK_AND_MEMORY = "DiskAndMemory"


class VmSnapshotState(StrEnum):
    """CloudStack's ``VMSnapshot.State`` names."""

    ALLOCATED = "Allocated"
    CREATING = "Creating"
    READY = "Ready"
    REVERTING = "Reverting"
    EXPUNGING = "Expunging"
    REMOVED = "Removed"
    ERROR = "Error"


class VmStateChange(Model):
    state: VmSnapshotState
    at: datetime


class VmSnapshotTaken(Model):
    """What a VM snapshot left on primary: one frozen point per disk, maybe a memory file.

    ``overlays`` maps each disk to the overlay created above its frozen image; the frozen
    image itself is found through the overlay's backing file when it is needed, so that the
    record never holds a path that a chain consolidation could make stale.
    """

    overlays: dict[str, str]
    memory: str | None = None
    vm_was_running: bool
    consistency: Consistency = Consistency.CRASH
    consistency_note: str | None = None


class VmSnapshotRecord(Model):
    """What callers see of a VM snapshot: ``vm-snapshot show --json`` prints exactly this."""

    id: SnapshotId
    state: VmSnapshotState
    vm: str
    host: str
    hypervisor: HypervisorType
    type: VmSnapshotType
    name: str | None = None
    created: datetime | None = None
    taken: VmSnapshotTaken | None = None
    consistency: Consistency | None = None
    transitions: list[VmStateChange] = Field(default_factory=list)
    error: str | None = None
    reverts: int = 0


class VmSnapshotRequest(Model):
    """Input of the VmSnapshot workflow; also what ``vm-snapshot create`` sends."""

    snapshot_id: SnapshotId
    vm: VmRef
    type: VmSnapshotType = VmSnapshotType.DISK
    name: SafeName | None = Field(None, description="A display name, as in CloudStack")
    quiesce: Quiesce = Quiesce.NO
    carried: VmSnapshotRecord | None = Field(
        None, description="Set only by continue-as-new: the record to carry over"
    )


class VmSnapshotOperation(Model):
    """Input of the host activities that take, revert and delete a VM snapshot."""

    snapshot_id: SnapshotId
    vm: VmRef
    type: VmSnapshotType
    taken: VmSnapshotTaken | None = None
    quiesce: Quiesce = Quiesce.NO
    operation_id: str | None = Field(
        None, description="The update that asked for it (see RevertRequest.operation_id)"
    )
