"""Payload contracts shared by workflows, activities and callers.

They are pydantic v2 models sent with Temporal's pydantic data converter, and their JSON
Schemas are exported by ``snapferry schema`` so that management code in any language can call
the workflows by name. State names are CloudStack's own, so an integration maps one to one.

Names that become file names on primary or secondary storage (VM, disk, snapshot ID) are
validated at the edge, so that no path traversal can reach a driver or the store.

The contracts are split by concern: the names, IDs and references every contract uses
(``contracts_base``), VM snapshots (``vm_snapshot_contracts``) and the repository's jobs
(``repository_contracts``); this module holds the volume snapshot's, and re-exports the
others, so every contract is imported from here.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator, model_validator

from .contracts_base import (
    Consistency,
    HypervisorType,
    Quiesce,
    SafeName,
    SnapshotId,
    VmRef,
    VolumeRef,
    new_snapshot_id,
    validate_name,
    validate_snapshot_id,
)
from .contracts_base import Model as _Model
from .repository_contracts import (
    RepositoryJobKind,
    RepositoryJobRequest,
    RepositoryJobResult,
)
from .vm_snapshot_contracts import (
    VmSnapshotOperation,
    VmSnapshotRecord,
    VmSnapshotRequest,
    VmSnapshotState,
    VmSnapshotTaken,
    VmSnapshotType,
    VmStateChange,
)


class SnapshotState(StrEnum):
    """CloudStack's ``Snapshot.State`` names (the subset snapferry moves through)."""

    ALLOCATED = "Allocated"
    CREATING = "Creating"
    CREATED_ON_PRIMARY = "CreatedOnPrimary"
    BACKING_UP = "BackingUp"
    BACKED_UP = "BackedUp"
    HIDDEN = "Hidden"
    DESTROYING = "Destroying"
    DESTROYED = "Destroyed"
    ERROR = "Error"


class BackupOptions(_Model):
    """CloudStack's ``backup.retry`` and ``backup.retry.interval``, plus liveness.

    Liveness comes from the heartbeat timeout, not a wall-clock limit, so a large volume
    never times out; ``max_duration_s`` is only a last-resort bound.
    """

    retry_attempts: int = Field(3, ge=0, le=100, description="Retries after the first try")
    retry_interval_s: float = Field(300.0, gt=0, description="Wait before the first retry")
    heartbeat_timeout_s: float = Field(
        20.0,
        gt=0,
        description="Seconds without a heartbeat before a crashed attempt is retried (after"
        " a short backoff, not retry_interval_s); what a healthy store allows",
    )
    max_duration_s: float = Field(7 * 24 * 3600.0, gt=0)
    take_heartbeat_timeout_s: float = Field(
        60.0,
        gt=0,
        description="VMware: seconds without a heartbeat before a take attempt (it heartbeats"
        " while it polls the full clone) is retried; the take has no other bound but a day",
    )
    progress_interval_s: float = Field(
        2.0, gt=0, description="How often progress reaches the workflow (Web UI details)"
    )
    full: bool = Field(
        False, description="Back up in full even where a delta is possible (`--full`)"
    )
    delta_max: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="snapshot.delta.max for this snapshot (a policy's own): deltas before a"
        " new full; 0 = always full. None: the worker's SNAPFERRY_SNAPSHOT_DELTA_MAX",
    )
    rate_limit_mbps: float | None = Field(
        None,
        gt=0,
        description="At most this many MB/s read from primary by this snapshot's backup (a"
        " policy's own); the lower of it and the worker's SNAPFERRY_BACKUP_RATE_LIMIT_MBPS",
    )


class PrimarySnapshot(_Model):
    """Where the snapshot lives on primary storage, as the take left it.

    ``image`` is the frozen image whose guest-visible content is the snapshot (it may have a
    backing chain); ``overlay`` is the layer the VM writes to meanwhile, if the mechanism
    needs one.
    """

    image: str
    image_format: str
    overlay: str | None = None
    virtual_size: int = Field(ge=0)
    vm_was_running: bool
    handle: str | None = Field(
        None,
        description="The hypervisor's own id of the object that holds the snapshot, which"
        " survives renames and moves (VMware: the clone's managed object id)",
    )
    change_id: str | None = Field(
        None,
        description="The disk's change-tracking ID at the snapshot (VMware CBT's changeId),"
        " which the next backup asks for the areas changed since",
    )
    consistency: Consistency = Consistency.CRASH
    consistency_note: str | None = Field(
        None, description="Why it is what it is when that was not asked (quiesce=try)"
    )


class BackupPlan(_Model):
    """Full or incremental: chosen once per backup (kept beside its ``.partial`` files, so a
    resumed attempt copies against the same base), by the driver. XenServer and KVM make
    deltas; VMware always plans a full backup."""

    parent: SnapshotId | None = Field(None, description="Snapshot whose backup this extends")
    base_image: str | None = Field(
        None,
        description="What the delta is taken against on primary: the parent's VDI"
        " (XenServer), the parent's kept overlay (KVM)",
    )
    depth: int = Field(0, ge=0, description="Deltas since the last full backup (0 = full)")
    reason: str | None = Field(
        None, description="Why a full backup, when a delta was not possible or not wanted"
    )


class BackupResult(_Model):
    path: str
    manifest_path: str
    checksum: str
    virtual_size: int
    bytes_copied: int = Field(description="Bytes read and written by the final attempt")
    resumed_from: int = Field(description="Offset the final attempt resumed from")
    attempts: int
    verify_bytes_read: int = Field(
        0, description="Bytes the final attempt's verify read back from the medium"
    )
    verify_seconds: float = Field(0.0, description="How long that verify took")
    bytes_stored: int = Field(
        0, description="Bytes of data the backup holds on secondary (holes and zeros excluded)"
    )
    parent: SnapshotId | None = Field(None, description="A delta's parent backup; None: a full")
    depth: int = Field(0, ge=0, description="Deltas down to the full backup (0 = full)")
    full_reason: str | None = Field(None, description="Why this backup is a full one")

    @property
    def kind(self) -> str:
        return "delta" if self.parent is not None else "full"


class BackupProgress(_Model):
    snapshot_id: SnapshotId
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_per_second: float = 0.0
    attempt: int = 1
    phase: str = Field("copy", description="copy, or verify (bytes_done then counts verified)")

    @property
    def percent(self) -> float:
        return 100.0 * self.bytes_done / self.bytes_total if self.bytes_total else 0.0


class StateChange(_Model):
    state: SnapshotState
    at: datetime


class BootCheck(_Model):
    """A health check's outcome: a throwaway VM started on the backup (never written: a
    copy-on-write overlay above its read-only NBD export) showed a sign of life, or not."""

    ok: bool
    at: datetime
    seconds: float = Field(
        0.0, ge=0, description="From the VM's start to the sign (or the timeout)"
    )
    sign: str | None = Field(None, description="What answered: the guest agent, or the line")
    detail: str = ""


class BootCheckOptions(_Model):
    """What a health check waits for, and how long."""

    timeout_s: float = Field(300.0, gt=0, le=3600)
    console_line: str | None = Field(
        None,
        description="A regular expression a serial console line must match; without it,"
        " the QEMU guest agent answering is the sign of life",
    )
    memory_mib: int = Field(512, ge=64, le=65536)

    @field_validator("console_line")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{value!r} is not a regular expression: {err}") from None
        return value


class BootCheckRequest(_Model):
    snapshot_id: SnapshotId
    volume: VolumeRef
    manifest_path: str
    options: BootCheckOptions = Field(default_factory=BootCheckOptions)


class InstantRunRequest(_Model):
    """Run a new VM from a backup at once (a local overlay on its NBD export), and copy the
    backup into that overlay while it runs."""

    snapshot_id: SnapshotId
    volume: VolumeRef
    manifest_path: str
    primary_dir: str = Field(description="Where the new VM's disk goes (beside the volume's)")
    name: SafeName = Field(description="The new VM's name; refused if a VM has it")
    memory_mib: int = Field(512, ge=64, le=1048576, description="Without the original VM")


class InstantRunResult(_Model):
    name: str
    overlay: str = Field(description="The new VM's disk, on its own once the copy is done")
    copy_seconds: float = 0.0


class SnapshotRecord(_Model):
    """What callers see of a volume snapshot: ``show --json`` prints exactly this."""

    id: SnapshotId
    state: SnapshotState
    vm: str
    disk: str
    host: str
    hypervisor: HypervisorType
    created: datetime | None = None
    primary: PrimarySnapshot | None = None
    consistency: Consistency | None = Field(
        None, description="application or crash, once taken (see Quiesce)"
    )
    verified_boot: BootCheck | None = Field(
        None, description="The last health check: a throwaway VM booted from the backup"
    )
    primary_released: bool = Field(
        False, description="True once the primary copy was merged away after a verified backup"
    )
    backup: BackupResult | None = None
    backup_error: str | None = None
    backup_attempts: int = 0
    transitions: list[StateChange] = Field(
        default_factory=list, description="Every state the snapshot went through, in order"
    )
    backup_workflow_id: str | None = Field(
        None, description="The current BackupSnapshot child; query it for progress"
    )
    error: str | None = None
    delete_error: str | None = Field(
        None,
        description="Why the last delete failed (the snapshot is then Error; only a delete"
        " can be sent again)",
    )
    restored: list[str] = Field(
        default_factory=list, description="Volumes and templates created from this snapshot"
    )
    reverts: int = Field(0, description="How many times a volume was reverted to it")


class SnapshotRequest(_Model):
    """Input of the VolumeSnapshot workflow; also what ``snapshot create`` sends."""

    snapshot_id: SnapshotId
    volume: VolumeRef
    backup: BackupOptions = Field(default_factory=BackupOptions)
    quiesce: Quiesce = Quiesce.NO
    check_boot: bool = Field(
        False, description="Once backed up, boot a throwaway VM from the backup (KVM)"
    )
    carried: SnapshotRecord | None = Field(
        None, description="Set only by continue-as-new: the record to carry over"
    )
    policy_id: SafeName | None = Field(None, description="The recurring policy that took it")

    @model_validator(mode="after")
    def _check_boot_on_kvm(self) -> SnapshotRequest:
        refuse_check_boot_off_kvm(self.check_boot, self.volume)
        return self


def refuse_check_boot_off_kvm(check_boot: bool, volume: VolumeRef) -> None:
    """A health check boots the backup under libvirt/QEMU on a KVM host: asked for another
    hypervisor's VM it is refused when asked, not failed after every backup."""
    hypervisor = volume.vm.hypervisor
    if check_boot and hypervisor != HypervisorType.KVM:
        raise ValueError(f"check_boot: boot checks run on KVM hosts; {hypervisor.value} has none")


class PolicyInterval(StrEnum):
    """CloudStack's recurring snapshot intervals."""

    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"


def _timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{value!r} is not a known timezone (e.g. 'UTC', 'Europe/Berlin')"
        ) from None
    return value


class SnapshotPolicy(_Model):
    """A recurring snapshot policy: when (interval + time of day, in a timezone) and how
    many snapshots it keeps (CloudStack's default maximum is 8 per interval)."""

    policy_id: SafeName
    volume: VolumeRef
    interval: PolicyInterval
    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"
    keep: int = Field(8, ge=1, le=1000)
    minute: int = Field(0, ge=0, le=59)
    hour: int = Field(0, ge=0, le=23, description="daily, weekly, monthly")
    day_of_week: int = Field(0, ge=0, le=6, description="weekly: 0 = Sunday")
    day_of_month: int = Field(1, ge=1, le=28, description="monthly")
    backup: BackupOptions = Field(default_factory=BackupOptions)
    quiesce: Quiesce = Quiesce.NO
    check_boot: bool = Field(False, description="A health check after each backup (KVM)")

    @model_validator(mode="after")
    def _check_boot_on_kvm(self) -> SnapshotPolicy:
        refuse_check_boot_off_kvm(self.check_boot, self.volume)
        return self


class RetentionRequest(_Model):
    policy_id: SafeName
    keep: int = Field(ge=1)


class RestoreKind(StrEnum):
    VOLUME = "volume"
    TEMPLATE = "template"


class RestoreRequest(_Model):
    """Materialise a backup as a new qcow2 volume (on primary) or template (on secondary)."""

    snapshot_id: SnapshotId
    volume: VolumeRef
    kind: RestoreKind
    name: SafeName
    manifest_path: str
    primary_dir: str = Field(description="Where new volumes go: the snapshot's primary pool")


class RestoreResult(_Model):
    path: str
    virtual_size: int
    format: str = "qcow2"


class RevertRequest(_Model):
    """Revert a (stopped) VM's disk to a snapshot, from primary if it is still there."""

    snapshot_id: SnapshotId
    volume: VolumeRef
    primary: PrimarySnapshot | None
    manifest_path: str | None
    operation_id: str | None = Field(
        None,
        description="The update that asked for it: a revert re-delivered with the same ID"
        " (Temporal reapplies updates after a reset) is not done twice",
    )


class DeleteBackupRequest(_Model):
    """Delete everything a snapshot's backups left on secondary storage."""

    snapshot_id: SnapshotId
    volume: VolumeRef


class DeleteBackupOutcome(_Model):
    """What a delete did on secondary, chain-aware as in CloudStack.

    ``hidden``: later deltas still need this backup, so it stays (marked hidden) until they
    are gone. ``purged``: hidden ancestors this delete left without dependants; they were
    deleted too, and their snapshots are now Destroyed."""

    hidden: bool = False
    purged: list[SnapshotId] = Field(default_factory=list)


class BackupRequest(_Model):
    """Input of the BackupSnapshot child workflow."""

    snapshot_id: SnapshotId
    volume: VolumeRef
    source: PrimarySnapshot
    options: BackupOptions
    round: int = Field(1, ge=1, description="1 for the first backup, +1 per operator retry")


class CopyRequest(_Model):
    """Input of the backup activity; the copy engine resumes from its heartbeat details."""

    snapshot_id: SnapshotId
    volume: VolumeRef
    source: PrimarySnapshot
    progress_interval_s: float = 2.0
    retry_interval_s: float | None = Field(
        None,
        description="CloudStack's backup.retry.interval: a failed attempt asks Temporal for"
        " this delay (doubled per attempt) while crashes retry after the policy's short"
        " interval. None: the workflow's retry policy alone spaces the retries",
    )
    backup_started: datetime | None = Field(
        None,
        description="When the backup (its first attempt) began: progress signals thin out"
        " with the backup's age, not the attempt's, so retries cannot multiply them",
    )
    full: bool = Field(False, description="A full backup was asked for (`--full`)")
    delta_max: int | None = Field(None, description="This snapshot's snapshot.delta.max")
    rate_limit_mbps: float | None = Field(
        None, gt=0, description="This snapshot's read-rate limit (BackupOptions)"
    )


class TakeRequest(_Model):
    snapshot_id: SnapshotId
    volume: VolumeRef
    quiesce: Quiesce = Quiesce.NO


class DiscardRequest(_Model):
    """Undo what a take that failed for good may have left on primary."""

    snapshot_id: SnapshotId
    vm: VmRef
    vm_snapshot: bool | None = Field(
        None,
        description="The kind of take that failed (a caller may give a VM snapshot and a"
        " volume snapshot one ID: only this kind's leftovers go); None, from a workflow"
        " started by an older version, means either kind",
    )


class ReleaseRequest(_Model):
    """Free the primary copy of a snapshot: after its verified backup, or on its delete."""

    snapshot_id: SnapshotId
    volume: VolumeRef
    source: PrimarySnapshot
    backed_up: bool = Field(
        True,
        description="False when a snapshot is deleted (with or without a backup): its"
        " primary copy then goes, instead of being kept as the next delta's base (a KVM"
        " layer, a XenServer VDI)",
    )


class AlertSeverity(StrEnum):
    WARNING = "WARNING"
    ERROR = "ERROR"


class Alert(_Model):
    """One event for the operator: a line in management-server.log and a webhook POST."""

    event: str = Field(description="Machine-readable kind, e.g. SNAPSHOT.BACKUP.FAILED")
    severity: AlertSeverity = AlertSeverity.ERROR
    snapshot_id: SnapshotId | None = None
    vm: str | None = None
    disk: str | None = None
    message: str


# Every contract, whichever module defines it: import them from here.
__all__ = [
    "Alert",
    "AlertSeverity",
    "BackupOptions",
    "BackupPlan",
    "BackupProgress",
    "BackupRequest",
    "BackupResult",
    "BootCheck",
    "BootCheckOptions",
    "BootCheckRequest",
    "Consistency",
    "CopyRequest",
    "DeleteBackupOutcome",
    "DeleteBackupRequest",
    "DiscardRequest",
    "HypervisorType",
    "InstantRunRequest",
    "InstantRunResult",
    "new_snapshot_id",
    "PolicyInterval",
    "PrimarySnapshot",
    "Quiesce",
    "ReleaseRequest",
    "RepositoryJobKind",
    "RepositoryJobRequest",
    "RepositoryJobResult",
    "RestoreKind",
    "RestoreRequest",
    "RestoreResult",
    "RetentionRequest",
    "RevertRequest",
    "SafeName",
    "SnapshotId",
    "SnapshotPolicy",
    "SnapshotRecord",
    "SnapshotRequest",
    "SnapshotState",
    "StateChange",
    "TakeRequest",
    "validate_name",
    "validate_snapshot_id",
    "VmRef",
    "VmSnapshotOperation",
    "VmSnapshotRecord",
    "VmSnapshotRequest",
    "VmSnapshotState",
    "VmSnapshotTaken",
    "VmSnapshotType",
    "VmStateChange",
    "VolumeRef",
]
