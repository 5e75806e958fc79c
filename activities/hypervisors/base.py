"""The driver interface every hypervisor implements (Cinder-style thin vendor layer).

Workflows never see a driver: activities call these three primitives, and the copy engine
does the rest. ``take`` runs on the hypervisor host's own worker; ``open_reader`` runs on a
backup worker; ``release`` runs on the host again, only after the backup was verified.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

from ..contracts import (
    BackupPlan,
    DiscardRequest,
    PrimarySnapshot,
    Quiesce,
    RestoreRequest,
    RestoreResult,
    RevertRequest,
    VmSnapshotOperation,
    VmSnapshotTaken,
    VolumeRef,
)
from ..storage.reader import SnapshotReader


class BackupHistoryEntry(Protocol):
    """What a driver may read of a finished backup when it plans the next one: the same in
    both stores on secondary (a plain file's manifest and a repository backup's)."""

    @property
    def snapshot_id(self) -> str: ...

    @property
    def depth(self) -> int:
        """Incrementals since the last full backup (0: a full)."""
        ...

    @property
    def source(self) -> str:
        """The snapshot's image on primary, as the take named it."""
        ...

    @property
    def change_id(self) -> str | None:
        """The source's change-tracking ID at the snapshot, where the hypervisor has one."""
        ...

    @property
    def virtual_size(self) -> int:
        """The disk's size in bytes at the snapshot."""
        ...


class HypervisorDriver(ABC):
    @abstractmethod
    def take(
        self, *, volume: VolumeRef, snapshot_id: str, quiesce: Quiesce = Quiesce.NO
    ) -> PrimarySnapshot:
        """Create the snapshot on primary storage, fast, whatever the volume's size.

        ``quiesce`` asks the guest to flush and freeze its file systems around it (see
        :mod:`.quiesce` for what happens when it cannot be), and the answer says which
        ``consistency`` the snapshot has.

        Must be idempotent for one ``snapshot_id``: a retried activity returns what the
        first attempt made instead of making a second snapshot.
        """

    def plan_backup(
        self,
        source: PrimarySnapshot,
        backups: Sequence[BackupHistoryEntry],
        *,
        delta_max: int | None = None,
    ) -> BackupPlan:
        """Full or incremental, given the volume's finished, visible backups (oldest first)
        and this snapshot's ``snapshot.delta.max`` (None: the worker's). The default is a
        full backup; a driver with deltas (XenServer, KVM) picks a base, or says why not."""
        return BackupPlan(reason="this hypervisor's backups are always full")

    @abstractmethod
    def open_reader(self, source: PrimarySnapshot, plan: BackupPlan) -> SnapshotReader:
        """A reader of the snapshot's guest-visible bytes, for the copy engine. For a delta
        plan, its data extents are the ranges that changed since ``plan.base_image``."""

    def check_volume(self, volume: VolumeRef) -> None:
        """Raise VmNotFound or DiskNotFound (non-retryable, naming it) when the volume does
        not exist on this host, before anything recurring is set up for it. The default
        checks nothing: a driver whose lookup is cheap overrides it."""
        return None

    def source_intact(self, source: PrimarySnapshot) -> bool:
        """Whether ``source`` still holds the snapshot's bytes, checked again when a backup
        is about to be published (a stale attempt may have read while a delete merged its
        layer away). True where nothing can change a snapshot's bytes under its backup."""
        return True

    @abstractmethod
    def release(
        self,
        *,
        volume: VolumeRef,
        snapshot_id: str,
        source: PrimarySnapshot,
        backed_up: bool = True,
    ) -> None:
        """Give primary storage back once the backup is safe (merge, delete a clone...;
        a driver with deltas may keep this snapshot as the next delta's base instead), or
        on the delete of the snapshot (``backed_up=False``: whatever it was kept for, it
        goes). Idempotent."""

    @abstractmethod
    def discard(self, req: DiscardRequest) -> None:
        """After a take failed for good, remove what its attempts may have made, found by
        the snapshot's ID. Idempotent, and a no-op when nothing was made."""

    def create_volume(self, req: RestoreRequest, raw_backup: str) -> RestoreResult | None:
        """Put a new volume made from a verified raw backup on this hypervisor's primary
        storage. ``None`` (the default) means a file-backed qcow2 in the snapshot's primary
        pool, which the restore activity writes itself (KVM)."""
        return None

    @abstractmethod
    def revert(self, req: RevertRequest) -> None:
        """Make the (stopped) VM's disk read as the snapshot; verified before it is used."""

    # -- VM snapshots: every disk at one point (and RAM for DiskAndMemory) -----------------
    @abstractmethod
    def take_vm_snapshot(self, op: VmSnapshotOperation) -> VmSnapshotTaken:
        """Idempotent for one ``snapshot_id``, like :meth:`take`."""

    @abstractmethod
    def revert_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """Every disk back to the snapshot; other snapshots (of either kind) survive."""

    @abstractmethod
    def delete_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """Give the snapshot's primary space back without touching any other snapshot."""
