"""Changed Block Tracking (CBT) as the vSphere API shows it: per-disk changeIds, the areas
written between two of them, and ``VirtualMachine.QueryChangedDiskAreas``.

Sources, cited at each behaviour below:

- vSphere Web Services API reference: ``VirtualMachine.QueryChangedDiskAreas``,
  ``DiskChangeInfo``, ``DiskChangeExtent``, ``VirtualMachineConfigSpec.changeTrackingEnabled``,
  ``VirtualMachineCapability.changeTrackingSupported``, ``VirtualDiskFlatVer2BackingInfo
  .changeId``, ``VirtualMachineSnapshot.config``.
- VMware KB 1020128 (Changed Block Tracking on virtual machines), and the VDDK programming
  guide (GUID-A2102D6D, "Changed Block Tracking on Virtual Disks"; "Troubleshooting
  Changed Block Tracking").
- VMware's KB "Reverting to a pre-existing snapshot under specific conditions can cause
  incremental backups based on CBT to become inconsistent" (as summarised by
  gestaltit.com, "Pre-existing Snapshot Could Cause Inconsistent Incrementals Using vSphere
  CBT"): its workaround is "to do a full VM backup after a snapshot revert operation".
- govmomi's simulator (simulator/virtual_machine.go) models ``changeTrackingEnabled`` (a
  reconfigure sets it, at once) and, in versions after 0.24.2, ``capability
  .changeTrackingSupported`` (true for flat, sparse and RDM disks, changeTrackingSupported),
  but no changeId and no QueryChangedDiskAreas (tests/integration/test_vmware_govmomi.py
  checks the driver against it).

Not modelled: storage vMotion (KB 1020128 does not say it resets CBT), disk extension (it
does not reset CBT: the tracking carries on, and on ESXi 4.x and early 5.x an extension past
a 128 GB boundary leaves it "unreliable ... some changed blocks might not be captured by a
backup", VMware KB 2090639, whose workaround is a manual CBT reset), the ``.ctk`` files,
and how a real host rounds areas to its tracking block size (the reference only says the
answer "may contain false positives"; here the areas are the written bytes rounded out to
512-byte sectors).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyVmomi import vim, vmodl

if TYPE_CHECKING:
    from .inventory import Inventory
    from .vms import Vm

SECTOR = 512
# How much of the disk one QueryChangedDiskAreas answer covers. The API reference documents
# the loop ("callers will make multiple calls to this function, starting with startOffset 0
# and then examine the 'length' property in the returned DiskChangeInfo structure,
# repeatedly calling queryChangedDiskAreas until a map for the entire virtual disk has been
# obtained") but not the size of one answer; a PowerCLI transcript of a backup shows an
# answer with Length 2147483648 (pastebin.com/W8fwZsbS). 2 GiB here, a test control
# (``/sim/cbt {"page": n}``), so that a client that reads one answer only misses changes.
DEFAULT_PAGE = 2 << 30


def new_disk_uuid() -> str:
    """A changeId is ``<disk tracking UUID>/<sequence>``, the UUID written as VMware writes
    UUIDs: "52 2d 7b 8f ac 61 51 cc-77 4c 7b ec 91 50 bb 7b/1" (a changeId passed to
    QueryChangedDiskAreas in the PowerCLI transcript above)."""
    h = uuid.uuid4().hex
    pairs = [h[i : i + 2] for i in range(0, 32, 2)]
    return " ".join(pairs[:8]) + "-" + " ".join(pairs[8:])


@dataclass
class DiskTrack:
    """One disk's tracking: its UUID, the sequence of its current changeId, and every area
    written since tracking began, tagged with the sequence current at the write."""

    uuid: str = field(default_factory=new_disk_uuid)
    seq: int = 1
    writes: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, start, length)

    def change_id(self) -> str:
        return f"{self.uuid}/{self.seq}"


@dataclass
class VmTrack:
    # VirtualMachineCapability.changeTrackingSupported: "Indicates whether or not a virtual
    # machine supports Changed Block Tracking"; CBT needs virtual hardware version 7 or later
    # (KB 1020128). A test control (``/sim/cbt {"vm": .., "supported": false}``).
    supported: bool = True
    requested: bool = False  # what the last ReconfigVM_Task asked for
    active: bool = False  # in effect: config.changeTrackingEnabled shows this
    disks: dict[int, DiskTrack] = field(default_factory=dict)  # by device key


class ChangeTracking:
    """The CBT state of every VM, fed by the inventory's hooks."""

    def __init__(self) -> None:
        self.vms: dict[str, VmTrack] = {}
        self.snap_config: dict[str, vim.vm.ConfigInfo] = {}  # snapshot moid -> config at it
        self.snap_ids: dict[str, dict[int, str]] = {}  # snapshot moid -> key -> changeId
        self.page = DEFAULT_PAGE
        self.queries = 0  # test control: QueryChangedDiskAreas calls answered
        # Test control: whether the login holds VirtualMachine.Provisioning.DiskRandomRead,
        # the privilege QueryChangedDiskAreas requires ("Required privileges:
        # VirtualMachine.Provisioning.DiskRandomRead", vSphere API reference). Without it
        # the call is refused at once with NoPermission, whose privilegeId names it. The
        # simulator checks no other privilege.
        self.disk_random_read = True
        # Test control: whether the login holds VirtualMachine.Config.ChangeTracking, the
        # privilege to turn Changed Block Tracking on or off (vSphere Security guide,
        # "Virtual Machine Configuration Privileges": "Toggle disk change tracking ...
        # VirtualMachine.Config.ChangeTracking"). Without it a ReconfigVM_Task that sets
        # changeTrackingEnabled is refused with NoPermission naming it.
        self.change_tracking = True
        # Test control: the invalidProperty of an InvalidArgument the next
        # QueryChangedDiskAreas of a delta (a changeId other than "*") answers, once. A real
        # vCenter 7.0U3 answered an incremental query "A specified parameter was not correct:
        # startOffset" while CBT was not active (github.com/vexxhost/migratekit/issues/24): a
        # runtime fault (vmodl.fault.InvalidArgument), which any method can raise, beyond the call's
        # declared FileFault and NotFound (pyVmomi's typeinfo of queryChangedDiskAreas).
        self.invalid_argument: str | None = None

    def track(self, vm: Vm) -> VmTrack:
        return self.vms.setdefault(vm.moid, VmTrack())

    # ----- configuration ------------------------------------------------------------

    def reconfigure(self, vm: Vm, spec: vim.vm.ConfigSpec) -> None:
        """ReconfigVM_Task with ``changeTrackingEnabled`` (the only change modelled; any other
        answers NotSupported). VirtualMachineConfigSpec.changeTrackingEnabled: "Setting this
        flag to true will enable the changed block tracking for this VM". It takes effect
        after a stun/unstun cycle (power on, resume, snapshot create or delete, migrate: KB
        1020128), and the property stays false until then and on a VM below hardware
        version 7 (VDDK guide, "Troubleshooting Changed Block Tracking": "make sure that
        virtual machine compatibility is hardware version 7 or higher, and that the virtual
        machine has undergone a stun-unstun cycle since reconfiguration"). A powered-off VM
        has nothing to stun: its next power-on is the cycle, and nothing writes before it,
        so it is in effect at once here. Disabling drops the tracking: enabled again, every
        disk starts with a new UUID, so an older changeId is unknown (FileFault below)."""
        for prop in type(spec)._GetPropertyList():
            value = getattr(spec, prop.name)
            if prop.name != "changeTrackingEnabled" and value not in (None, []):
                raise vmodl.fault.NotSupported(msg=f"simulator: ReconfigVM_Task {prop.name}")
        if spec.changeTrackingEnabled is None:
            return
        if not self.change_tracking:
            raise vim.fault.NoPermission(
                object=vim.VirtualMachine(vm.moid),
                privilegeId="VirtualMachine.Config.ChangeTracking",
                msg="Permission to perform this operation was denied.",
            )
        t = self.track(vm)
        t.requested = bool(spec.changeTrackingEnabled)
        if not t.requested:
            t.active, t.disks = False, {}
        elif vm.power != "poweredOn":
            self.stunned(vm)

    def stunned(self, vm: Vm) -> None:
        """A stun/unstun cycle (snapshot create or remove, power on; KB 1020128): a requested
        CBT takes effect, with fresh tracking of every disk."""
        t = self.track(vm)
        if t.requested and t.supported and not t.active:
            t.active = True
            t.disks = {key: DiskTrack() for key in vm.keys}

    def capability(self, vm: Vm) -> vim.vm.Capability:
        return vim.vm.Capability(changeTrackingSupported=self.track(vm).supported)

    def show(self, vm: Vm, config: vim.vm.ConfigInfo) -> vim.vm.ConfigInfo:
        """``config.changeTrackingEnabled``, and each disk's current ``backing.changeId``
        (VirtualDiskFlatVer2BackingInfo.changeId: "The change ID of the virtual disk for the
        corresponding snapshot or virtual machine. This can be used to track incremental
        changes to a virtual disk"; unset while CBT is off)."""
        t = self.track(vm)
        config.changeTrackingEnabled = t.active
        for device in config.hardware.device:
            track = t.disks.get(device.key) if t.active else None
            backing = getattr(device, "backing", None)
            if track is not None and isinstance(
                backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo
            ):
                backing.changeId = track.change_id()
        return config

    # ----- events --------------------------------------------------------------------

    def written(self, vm: Vm, disk: int, offset: int, length: int) -> None:
        """A guest write: tracked while CBT is in effect ("The mechanism cannot report
        changes made to virtual disk before changed block tracking was enabled", VDDK
        guide). Writes that do not go through the VM (a datastore PUT of the flat file) are
        not seen: CBT tracks the VM's own I/O (an inference, nothing says otherwise)."""
        t = self.track(vm)
        track = t.disks.get(vm.keys[disk]) if t.active else None
        if track is not None and length > 0:
            track.writes.append((track.seq, offset, length))

    def snapshot_taken(self, vm: Vm, snap: str, config: vim.vm.ConfigInfo) -> None:
        """CreateSnapshot_Task is a stun/unstun cycle (KB 1020128), so a CBT asked for takes
        effect first, and the snapshot's disks carry the changeId of that point
        (QueryChangedDiskAreas, changeId: "A typical use case would be a backup application
        obtaining a changeId from a virtual disk's backing info when performing a backup").
        Later writes belong to the next changeId. ``config`` is the VM's configuration at
        the snapshot (VirtualMachineSnapshot.config, "Information about the configuration of
        the virtual machine when this snapshot was taken")."""
        self.stunned(vm)
        t = self.track(vm)
        ids: dict[int, str] = {}
        if t.active:
            for key, track in t.disks.items():
                ids[key] = track.change_id()
                track.seq += 1
        self.snap_ids[snap] = ids
        self.snap_config[snap] = self.show_snapshot(config, ids, t.active)

    @staticmethod
    def show_snapshot(
        config: vim.vm.ConfigInfo, ids: dict[int, str], active: bool
    ) -> vim.vm.ConfigInfo:
        config.changeTrackingEnabled = active
        for device in config.hardware.device:
            backing = getattr(device, "backing", None)
            if device.key in ids and isinstance(
                backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo
            ):
                backing.changeId = ids[device.key]
        return config

    def reverted(self, vm: Vm, snap: str) -> None:
        """A revert puts each disk's tracking back to the snapshot's changeId: the writes
        made after it are gone with the state they made, and the sequence goes on from the
        snapshot's, so a changeId handed out after the snapshot names a different point
        afterwards. QueryChangedDiskAreas with such a changeId answers without a fault, and
        misses what the revert itself changed: the KB on reverting to a pre-existing
        snapshot ("the workaround for this issue is to do a full VM backup after a snapshot
        revert operation"); since vSphere 6.5 the call "no longer returns an error if the
        CBT data is corrupt" (Veritas Backup Exec article 100033474)."""
        t = self.track(vm)
        for key, cid in self.snap_ids.get(snap, {}).items():
            track = t.disks.get(key)
            if track is None or not cid.startswith(track.uuid + "/"):
                continue
            at = int(cid.rpartition("/")[2])
            track.writes = [w for w in track.writes if w[0] <= at]
            track.seq = at + 1

    def snapshot_removed(self, snap: str) -> None:
        self.snap_config.pop(snap, None)
        self.snap_ids.pop(snap, None)

    def forget(self, vm: Vm) -> None:
        self.vms.pop(vm.moid, None)

    def reset(self, vm: Vm) -> None:
        """Test control: a CBT reset (CBT turned off with the -ctk files removed and on
        again, VMware KB 2139574; the -ctk files lost): every disk gets a new tracking
        UUID."""
        t = self.track(vm)
        t.disks = {key: DiskTrack() for key in vm.keys} if t.active else {}

    # ----- QueryChangedDiskAreas -------------------------------------------------------

    def query(
        self,
        inv: Inventory,
        vm: Vm,
        snap: Any,
        device_key: int,
        start: int,
        change_id: str,
    ) -> vim.VirtualMachine.DiskChangeInfo:
        """VirtualMachine.QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId):
        "Get a list of areas of a virtual disk belonging to this VM that have been modified
        since a well-defined point in the past", for the disk as it is in ``snapshot``.

        - ``snapshot`` unset means the current state, which "will only work for virtual
          machines that are powered off" (not modelled: NotSupported).
        - ``changeId`` "*" returns "all allocated areas of the disk" (here: the data, not
          the holes, of the snapshot's flat file; the VDDK guide's first full backup).
        - The answer is a DiskChangeInfo: "a subset of the disk identified by startOffset
          and length. All areas that have been modified within this interval are listed
          under changedArea" (DiskChangeExtent ``start``/``length``, in bytes), which
          "Might be empty". One answer covers ``page`` bytes from ``startOffset`` (see
          DEFAULT_PAGE); the caller asks again from ``startOffset + length``.
        - A disk without CBT in effect, a changeId of another tracking UUID (a reset) or
          one later than the snapshot: FileFault (the call's documented faults are
          FileFault, NotFound, "if the changeId is invalid", and InvalidArgument), as
          hosts before vSphere 6.5 answer a changeId they cannot serve (Backup Exec
          article 100033474). A deviceKey that is no disk of the VM: InvalidArgument.
        """
        if not self.disk_random_read:
            raise vim.fault.NoPermission(
                object=vim.VirtualMachine(vm.moid),
                privilegeId="VirtualMachine.Provisioning.DiskRandomRead",
                msg="Permission to perform this operation was denied.",
            )
        if snap is None:
            raise vmodl.fault.NotSupported(msg="simulator: QueryChangedDiskAreas needs snapshot")
        rec = inv.resolve(snap, vim.vm.Snapshot)
        if rec.vm != vm.moid:
            raise vmodl.fault.InvalidArgument(invalidProperty="snapshot")
        if device_key not in vm.keys:
            raise vmodl.fault.InvalidArgument(invalidProperty="deviceKey")
        capacity = vm.disks[vm.keys.index(device_key)]
        if start < 0 or start > capacity:
            raise vmodl.fault.InvalidArgument(invalidProperty="startOffset")
        if self.invalid_argument and change_id != "*":
            prop, self.invalid_argument = self.invalid_argument, None
            raise vmodl.fault.InvalidArgument(
                invalidProperty=prop, msg=f"A specified parameter was not correct: {prop}"
            )
        self.queries += 1
        end = min(capacity, start + self.page)
        if change_id == "*":
            areas = allocated(inv.disk_file(vm, vm.keys.index(device_key), rec), start, end)
        else:
            areas = self._changed(vm, rec.moid, device_key, change_id, start, end)
        return vim.VirtualMachine.DiskChangeInfo(
            startOffset=start,
            length=end - start,
            changedArea=[
                vim.VirtualMachine.DiskChangeInfo.DiskChangeExtent(start=s, length=n)
                for s, n in areas
            ],
        )

    def _changed(
        self, vm: Vm, snap: str, key: int, change_id: str, start: int, end: int
    ) -> list[tuple[int, int]]:
        t = self.track(vm)
        track = t.disks.get(key) if t.active else None
        at = self.snap_ids.get(snap, {}).get(key)
        disk = f"[{vm.disk_ds[vm.keys.index(key)]}] {vm.dir}/{vm.bases[vm.keys.index(key)]}.vmdk"
        uid, _, seq = change_id.rpartition("/")
        if track is None or at is None or uid != track.uuid or not seq.isdigit():
            raise vim.fault.FileFault(
                file=disk, msg=f"Error caused by file {disk}: changeId {change_id!r} is unknown"
            )
        since, upto = int(seq), int(at.rpartition("/")[2])
        if since > upto:
            raise vim.fault.FileFault(
                file=disk, msg=f"Error caused by file {disk}: changeId {change_id!r} is later"
            )
        spans = sorted(
            (max(s, start), min(s + n, end))
            for tag, s, n in track.writes
            if since < tag <= upto and s < end and s + n > start
        )
        return merge([(a // SECTOR * SECTOR, -(-b // SECTOR) * SECTOR) for a, b in spans], end)

    def control(self, inv: Inventory, req: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``/sim/cbt``: ``page``, ``disk_random_read``, ``change_tracking``,
        ``invalid_argument``; for ``vm``: ``supported``, ``reset``.
        Answers the state."""
        if "page" in req:
            self.page = int(req["page"])
        if "disk_random_read" in req:
            self.disk_random_read = bool(req["disk_random_read"])
        if "change_tracking" in req:
            self.change_tracking = bool(req["change_tracking"])
        if "invalid_argument" in req:
            self.invalid_argument = req["invalid_argument"] or None
        out: dict[str, Any] = {
            "page": self.page,
            "queries": self.queries,
            "disk_random_read": self.disk_random_read,
            "change_tracking": self.change_tracking,
        }
        if "vm" in req:
            vm = inv.vm_by_name(req["vm"])
            if vm is None:
                return 404, {"error": "no such vm"}
            t = self.track(vm)
            if "supported" in req:
                t.supported = bool(req["supported"])
            if req.get("reset"):
                self.reset(vm)
            out |= {
                "requested": t.requested,
                "active": t.active,
                "change_ids": {str(k): d.change_id() for k, d in t.disks.items()},
            }
        return 200, out


def merge(spans: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    """Sorted (start, end) spans -> (start, length) areas, overlapping ones joined."""
    out: list[list[int]] = []
    for a, b in spans:
        b = min(b, end)
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        elif b > a:
            out.append([a, b])
    return [(a, b - a) for a, b in out]


def allocated(path: Any, start: int, end: int) -> list[tuple[int, int]]:
    """The data (not the holes) of a sparse file between ``start`` and ``end``."""
    out: list[tuple[int, int]] = []
    with open(path, "rb") as f:
        fd, pos = f.fileno(), start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            out.append((data, hole - data))
            pos = hole
    return out
