"""Changed Block Tracking (CBT): incremental VMware backups, the path VADP products use.

- **Enable.** A take turns CBT on with ``ReconfigVM_Task`` (``VirtualMachineConfigSpec
  .changeTrackingEnabled``) when the VM supports it (``capability.changeTrackingSupported``,
  virtual hardware 7 and later) and has no snapshot: VMware does not support enabling CBT on
  a VM with snapshots (KB 1031873; Veritas article 100033474). It takes effect after a
  stun/unstun cycle (KB 1020128), which the take's own snapshot provides; the first backup
  after it is a full.
- **Record.** The changeId of the disk at the take's snapshot is read from the snapshot's
  own hardware (``VirtualMachineSnapshot.config``, the disk's ``backing.changeId``), not the
  live VM's (which moves on), and kept as ``PrimarySnapshot.change_id``.
- **Query.** While CBT is on, the take keeps its temporary vSphere snapshot until release
  (a full asks it for the disk's allocated areas, ``changeId="*"``):
  ``QueryChangedDiskAreas`` needs the snapshot of a running VM ("using the 'current'
  snapshot will only work for virtual machines that are powered off"). The delta's reader
  asks it for the areas changed since the parent backup's changeId, in a loop from each
  answer's ``startOffset + length`` to the disk's capacity, and reads only those from the
  clone. The answer "may contain false positives" but no change is missed.
- **Fall back.** A changeId that CBT cannot serve (FileFault, NotFound: CBT was reset, turned
  off or its tracking files lost) makes the reader raise ``SourceGone``, and the backup
  becomes a full that says why. A disk resized since the newest backup gets a full too: an
  extension keeps its tracking, unreliable on older hosts ("some changed blocks might not
  be captured by a backup", VMware KB 2090639, whose workaround is a CBT reset). A revert
  (of a VM snapshot, or of a volume from its backup, which writes the disk past CBT) resets
  CBT, so the changeIds given out before it mean nothing after it: "do a full VM backup
  after a snapshot revert operation" (VMware's KB on reverting to a pre-existing snapshot
  with CBT).

Privileges: VirtualMachine.Config.ChangeTracking (to enable it) and
VirtualMachine.Provisioning.DiskRandomRead (``QueryChangedDiskAreas``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pyVmomi import vim, vmodl

from ...contracts import BackupPlan, PrimarySnapshot
from ...errors import SnapferryError, SourceGone
from ..base import BackupHistoryEntry
from .common import CLONE_TAG, VOLUME_SNAPSHOT_PREFIX, flat_path
from .ops import VsphereOps

log = logging.getLogger(__name__)

MAX_QUERIES = 1 << 20  # a disk answered in more pieces than this is a broken answer


def change_uuid(change_id: str) -> str:
    """``52 2d .. 7b/17`` -> ``52 2d .. 7b``: the disk's tracking UUID, which a CBT reset
    replaces (a changeId is ``<UUID>/<sequence>``)."""
    return change_id.rpartition("/")[0]


def change_seq(change_id: str) -> int | None:
    tail = change_id.rpartition("/")[2]
    return int(tail) if tail.isdigit() else None


def merged(areas: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Sorted ``(start, length)`` areas within ``[0, size)``, overlapping and touching ones
    joined (answers split at their page ends, and may overlap)."""
    out: list[list[int]] = []
    for start, length in sorted(areas):
        end = min(start + length, size)
        start = max(start, 0)
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b - a) for a, b in out]


class CbtOps(VsphereOps):
    """Enable CBT, read changeIds, plan deltas, and list a delta's changed areas."""

    def _tracking_on(self, vm: Any, what: str) -> bool:
        """Whether CBT is on for ``vm`` now; if it is not, turn it on when that is allowed
        (supported, no snapshot on the VM) and answer False: nothing tracked before it."""
        enabled = self.session.call(
            lambda _si: bool(vm.config.changeTrackingEnabled), "reading changeTrackingEnabled"
        )
        if enabled:
            return True
        capability = self.session.call(lambda _si: vm.capability, "reading the VM's capability")
        if not getattr(capability, "changeTrackingSupported", False):
            log.info("%s does not support Changed Block Tracking: its backups are full", what)
            return False
        if self.session.call(lambda _si: vm.snapshot, "reading snapshots") is not None:
            log.warning(
                "%s has snapshots, and VMware does not support enabling Changed Block Tracking"
                " then: its backups stay full until they are gone",
                what,
            )
            return False
        try:
            self._set_tracking(vm, True, what)
        except SnapferryError as exc:  # a missing privilege costs incrementals, not the take
            log.warning("could not enable Changed Block Tracking on %s: %s", what, exc)
        return False

    def _set_tracking(self, vm: Any, on: bool, what: str) -> None:
        spec = vim.vm.ConfigSpec(changeTrackingEnabled=on)
        verb = "enabling" if on else "disabling"
        self._run(lambda: vm.ReconfigVM_Task(spec=spec), f"{verb} Changed Block Tracking on {what}")

    def _stop_tracking(self, vm: Any, what: str) -> None:
        """Before a revert writes the disk: CBT off, and off it stays until the next take
        turns it on again, so the next backup is a full of fresh tracking. Turned straight
        back on it would not do: a host resets the tracking only with its -ctk files gone
        and a stun cycle (VMware KB 2139574), and the old changeIds could go on, naming
        disk states the revert replaced. A disable that fails refuses the revert before
        anything is written (naming what failed, a missing
        VirtualMachine.Config.ChangeTracking privilege say): an incremental after it could
        miss what the revert rewrote."""
        self._set_tracking(vm, False, what)

    def _change_id_at(self, snap: Any, key: int) -> str | None:
        """The disk's changeId at ``snap``, from the snapshot's own hardware."""

        def read(_si: Any) -> str | None:
            config = snap.config
            if config is None or not config.changeTrackingEnabled:
                return None
            for device in config.hardware.device:
                if isinstance(device, vim.vm.device.VirtualDisk) and device.key == key:
                    return getattr(device.backing, "changeId", None) or None
            return None

        return self.session.call(read, "reading the snapshot's changeId")

    # -- plan --------------------------------------------------------------------------------
    def plan_backup(
        self,
        source: PrimarySnapshot,
        backups: Sequence[BackupHistoryEntry],
        *,
        delta_max: int | None = None,
    ) -> BackupPlan:
        """A delta against the newest backup while CBT has tracked the disk since it (its
        changeId and this snapshot's share the disk's tracking UUID, and this one is later)
        and the chain of deltas is short enough (``snapshot.delta.max``); else a full, with
        the reason."""
        limit = self.settings.delta_max if delta_max is None else delta_max
        if not backups:
            return BackupPlan(reason="the volume's first backup")
        if source.change_id is None:
            return BackupPlan(
                reason="Changed Block Tracking was not on for the disk at this snapshot (no"
                " changeId: just enabled, unsupported by the VM, or the VM had snapshots)"
            )
        newest = backups[-1]
        if newest.change_id is None:
            return BackupPlan(
                reason=f"the newest backup ({newest.snapshot_id}) has no CBT changeId: it was"
                " taken before Changed Block Tracking was on"
            )
        if limit == 0:
            return BackupPlan(reason="delta max is 0: every backup is a full one")
        if newest.depth + 1 > limit:
            return BackupPlan(
                reason=f"{newest.depth} deltas since the last full (delta max {limit})"
            )
        if newest.virtual_size != source.virtual_size:
            # An extension keeps the tracking, which on older hosts misses changes after it
            # (VMware KB 2090639: "some changed blocks might not be captured by a backup");
            # a full is what the KB's workaround, a CBT reset, gives.
            return BackupPlan(
                reason=f"the disk was resized since the newest backup"
                f" ({newest.virtual_size} -> {source.virtual_size} bytes)"
            )
        if change_uuid(newest.change_id) != change_uuid(source.change_id):
            return BackupPlan(
                reason=f"Changed Block Tracking was reset since the newest backup"
                f" ({newest.snapshot_id}): changeId {source.change_id!r} is of another"
                f" tracking than {newest.change_id!r} (a revert, CBT turned off and on, or its"
                " tracking files lost)"
            )
        now, then = change_seq(source.change_id), change_seq(newest.change_id)
        if now is None or then is None or now <= then:
            return BackupPlan(
                reason=f"the disk's changeId went back from {newest.change_id!r} to"
                f" {source.change_id!r} (a revert to an older snapshot)"
            )
        return BackupPlan(
            parent=newest.snapshot_id, base_image=newest.change_id, depth=newest.depth + 1
        )

    # -- changed areas -----------------------------------------------------------------------
    def _take_snapshot_of(self, source: PrimarySnapshot) -> tuple[Any, Any]:
        """The source VM and the take's kept vSphere snapshot, found from the clone: its
        name ends in the snapshot's ID (``clone_name``), and it sits in the source VM's
        folder. ``SourceGone`` if either is gone."""
        sid = (source.overlay or "").rpartition(CLONE_TAG)[2]
        name = VOLUME_SNAPSHOT_PREFIX + sid
        clone = self._vm_by_moref(source.handle, source.overlay or "") if source.handle else None
        if not sid or clone is None:
            raise SourceGone(f"the clone {source.overlay!r} of the snapshot is gone")

        def find(si: Any) -> tuple[Any, Any] | None:
            pc = vmodl.query.PropertyCollector
            vms = [c for c in clone.parent.childEntity or [] if isinstance(c, vim.VirtualMachine)]
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=v, skip=False) for v in vms],
                propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["snapshot"])],
            )
            contents = (
                si.RetrieveContent().propertyCollector.RetrieveContents([spec]) if vms else []
            )
            for content in contents:
                for prop in content.propSet:
                    stack = list(prop.val.rootSnapshotList or []) if prop.val else []
                    while stack:
                        node = stack.pop()
                        if node.name == name:
                            return content.obj, node.snapshot
                        stack.extend(node.childSnapshotList or [])
            return None

        found = self.session.call(find, f"finding vSphere snapshot {name!r}")
        if found is None:
            raise SourceGone(
                f"the take's vSphere snapshot {name!r} is gone: Changed Block Tracking cannot"
                " say what changed at it"
            )
        return found

    def _changed_areas(self, source: PrimarySnapshot, plan: BackupPlan) -> list[tuple[int, int]]:
        """``QueryChangedDiskAreas`` of the disk at the take's snapshot since the parent's
        changeId. A changeId CBT cannot serve (FileFault, NotFound) is ``SourceGone``: the
        delta's base is gone, and the backup becomes a full. So is an InvalidArgument (a
        runtime fault, beyond the declared two: a real vCenter 7.0U3 answered an incremental
        query "A specified parameter was not correct: startOffset" while CBT was not
        active, github.com/vexxhost/migratekit/issues/24): asked again it answers the same. So is a
        login without the call's privilege (NoPermission,
        VirtualMachine.Provisioning.DiskRandomRead): a full of the whole disk can still be
        read, and its reason names the privilege."""
        assert plan.base_image is not None and source.change_id is not None
        vm, snap = self._take_snapshot_of(source)
        key = self._disk_key_at(snap, source.change_id)
        since = plan.base_image
        try:
            return self._query_areas(vm, snap, key, source.virtual_size, since)
        except SnapferryError as exc:
            fault = exc.__cause__
            if isinstance(fault, vim.fault.FileFault | vim.fault.NotFound):
                raise SourceGone(
                    f"Changed Block Tracking cannot list the changes since changeId"
                    f" {since!r} (of backup {plan.parent}): {getattr(fault, 'msg', exc)}"
                    " (CBT was reset: a revert, CBT turned off, or its tracking files lost)"
                ) from exc
            if isinstance(fault, vmodl.fault.InvalidArgument):
                raise SourceGone(
                    f"Changed Block Tracking cannot list the changes since changeId"
                    f" {since!r} (of backup {plan.parent}): InvalidArgument"
                    f" {getattr(fault, 'invalidProperty', None)!r}:"
                    f" {getattr(fault, 'msg', None) or exc} (asked again, it answers the same)"
                ) from exc
            if isinstance(fault, vim.fault.NoPermission):
                raise SourceGone(
                    f"Changed Block Tracking cannot be asked what changed since backup"
                    f" {plan.parent}: {exc}"
                ) from exc
            raise

    def _allocated_areas(self, source: PrimarySnapshot) -> list[tuple[int, int]] | None:
        """For a full: the disk's allocated areas at the take's snapshot,
        ``QueryChangedDiskAreas`` with ``changeId="*"``, which answers "all allocated areas
        of the disk" (the VDDK guide's baseline backup that saves only "the allocated
        portions of a virtual disk", which "substantially reduces the amount of data to
        save, especially for thin provisioned and sparse virtual disks"). None reads the
        whole disk: no snapshot kept to ask (CBT not on before the take: the take that
        turns it on, or hardware below version 7), or a call that fails (a missing
        privilege; a datastore that cannot answer, as the VDDK guide warns off VMFS: "it
        could fail, or returns a single extent covering the entire disk"). The areas are
        read from the clone, a full copy of the disk at that snapshot."""
        try:
            vm, snap = self._take_snapshot_of(source)
            key = self._clone_disk_key(source)
            return self._query_areas(vm, snap, key, source.virtual_size, "*")
        except SnapferryError as exc:
            log.info(
                "%s: reading the whole disk, not only its allocated areas: %s", source.image, exc
            )
            return None

    def _query_areas(
        self, vm: Any, snap: Any, key: int, size: int, since: str
    ) -> list[tuple[int, int]]:
        """``QueryChangedDiskAreas`` asked again from each answer's ``startOffset + length``
        until the disk's capacity, the areas merged."""
        areas: list[tuple[int, int]] = []
        offset, asked = 0, 0
        while offset < size:
            asked += 1
            if asked > MAX_QUERIES:
                raise SourceGone("QueryChangedDiskAreas never reached the end of the disk")

            def query(_si: Any, at: int = offset) -> Any:
                return vm.QueryChangedDiskAreas(
                    snapshot=snap, deviceKey=key, startOffset=at, changeId=since
                )

            info = self.session.call(query, "QueryChangedDiskAreas")
            areas += [(a.start, a.length) for a in info.changedArea or []]
            end = int(info.startOffset) + int(info.length)
            if end <= offset:
                raise SourceGone(f"QueryChangedDiskAreas answered no progress at {offset}")
            offset = end
        return merged(areas, size)

    def _clone_disk_key(self, source: PrimarySnapshot) -> int:
        """The device key of the clone's disk the backup reads (``source.image``): a
        clone's disk keeps its source disk's key, which the snapshot's answers are for."""
        clone = self._vm_by_moref(source.handle, source.overlay or "") if source.handle else None
        if clone is None:
            raise SourceGone(f"the clone {source.overlay!r} of the snapshot is gone")
        for device in self._disk_devices(clone):
            ds, path = flat_path(device.backing.fileName)
            if f"[{ds}] {path}" == source.image:
                return int(device.key)
        raise SourceGone(f"the clone {source.overlay!r} has no disk {source.image!r}")

    def _disk_key_at(self, snap: Any, change_id: str) -> int:
        """The device key of the disk whose changeId at ``snap`` is ``change_id`` (a clone's
        disk keeps its source's key, but the snapshot says it for sure)."""

        def read(_si: Any) -> int | None:
            for device in snap.config.hardware.device:
                if isinstance(device, vim.vm.device.VirtualDisk) and (
                    getattr(device.backing, "changeId", None) == change_id
                ):
                    return int(device.key)
            return None

        key = self.session.call(read, "reading the snapshot's disks")
        if key is None:
            raise SourceGone(f"no disk of the take's snapshot has changeId {change_id!r}")
        return key
