"""Simulated VM snapshots: the snapshot tree, what the disk chain shows of them, and
CreateSnapshot_Task, RevertToSnapshot_Task, RemoveSnapshot_Task, ConsolidateVMDisks_Task.

Snapshots are *full copies* of each disk taken at snapshot time (vSphere writes redo logs
instead; the observable bytes are the same).

What the API *shows* of the disk chain is modelled as vSphere shows it: after a snapshot
a disk's backing is a delta ``<base>-00000N.vmdk`` whose ``backing.parent`` leads to the
base disk; a revert starts a new delta on the snapshot's file; removing snapshots
consolidates the chain, back to the base once none is left (see ``DiskChains``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from pyVmomi import vim, vmodl

from .datastores import sparse_copy
from .objects import now

if TYPE_CHECKING:
    from .vms import Vm


class DiskChains:
    """The names vSphere shows for one VM's disk files: a tree of descriptors per disk.

    vSphere API reference, VirtualDiskFlatVer2BackingInfo.parent: "The parent of this
    virtual disk file, if this is a delta disk backing. This will be unset if this is not a
    delta disk backing. [...] A delta disk backing can be added to a disk either implicitly
    during snapshot operations". The delta is named ``<base>-00000N.vmdk`` (the pattern
    libguestfs/virt-v2v strips in v2v/vCenter.ml, ``snapshot_re``). A snapshot freezes the
    file that was current; a revert starts a new delta on the snapshot's frozen file and
    drops the old current one; a removal consolidates: a file no snapshot needs merges
    with its only child, so the chain is the base again once no snapshot is left.

    Only names are modelled: the bytes stay full copies (``Inventory.disk_file``), and no
    ``-delta.vmdk`` extent is written to the datastore.
    """

    def __init__(self, bases: list[str]) -> None:
        self.bases = list(bases)
        self.parent: dict[str, str | None] = {f"{b}.vmdk": None for b in bases}
        self.top = [f"{b}.vmdk" for b in bases]

    def _new_delta(self, disk: int, parent: str) -> str:
        """The lowest unused number, so that a consolidated disk starts at -000001 again."""
        n = 1
        while (name := f"{self.bases[disk]}-{n:06d}.vmdk") in self.parent:
            n += 1
        self.parent[name] = parent
        return name

    def snapshot(self) -> list[str]:
        """Freeze every current file and put a new delta on top; returns the frozen files."""
        frozen = list(self.top)
        self.top = [self._new_delta(i, f) for i, f in enumerate(frozen)]
        return frozen

    def revert(self, frozen: list[str], still_frozen: set[str]) -> None:
        for i, old in enumerate(self.top):
            if old not in still_frozen and self.parent.get(old) is not None:
                del self.parent[old]  # the discarded current state
            self.top[i] = self._new_delta(i, frozen[i])

    def consolidate(self, frozen: list[list[str]]) -> None:
        """Merge away every file no snapshot needs, until nothing changes."""
        changed = True
        while changed:
            changed = False
            needed = {f for files in frozen for f in files} | set(self.top)
            for name, parent in list(self.parent.items()):
                children = [c for c, p in self.parent.items() if p == name]
                if name in needed or (parent is None and len(children) != 1):
                    continue
                if not children:  # a dead branch (its state was reverted away)
                    del self.parent[name]
                elif len(children) == 1:  # merge the only child into this file
                    child = children[0]
                    for c, p in list(self.parent.items()):
                        if p == child:
                            self.parent[c] = name
                    del self.parent[child]
                    self.top = [name if t == child else t for t in self.top]
                    for files in frozen:
                        files[:] = [name if f == child else f for f in files]
                else:
                    continue
                changed = True
                break

    def chain(self, disk: int) -> list[str]:
        """Current file first, base last."""
        out = [self.top[disk]]
        while (p := self.parent[out[-1]]) is not None:
            out.append(p)
        return out


@dataclass
class Snap:
    """A snapshot: its place in the tree and whether it captured a running VM (memory)."""

    moid: str
    vm: str
    id: int
    name: str
    description: str
    created: datetime
    memory: bool
    quiesced: bool
    parent: str | None = None
    children: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)  # per disk: the file it froze


class Snapshots:
    """The snapshots' part of the Inventory (see inventory.py)."""

    def _init_snapshots(self) -> None:
        self.snaps: dict[str, Snap] = {}
        # Test control: seconds CreateSnapshot_Task or RemoveSnapshot_Task stay running.
        self.task_delays: dict[str, float] = {}
        # Test control: RemoveSnapshot_Task takes the snapshot out of the tree but leaves
        # its redo logs ("the virtual disk associated with this snapshot will be merged with
        # other disk if possible", RemoveSnapshot_Task's consolidate, vSphere API
        # reference), as under a backup proxy's hot-add lock: the disk stays on its delta
        # and runtime.consolidationNeeded is true until ConsolidateVMDisks_Task.
        self.leave_deltas = False
        self.consolidate_fails = 0  # the next n ConsolidateVMDisks_Task fail (FileLocked)

    def _snapshot_info(self, vm: Vm) -> vim.vm.SnapshotInfo | None:
        def tree(snap: Snap) -> vim.vm.SnapshotTree:
            return vim.vm.SnapshotTree(
                snapshot=vim.vm.Snapshot(snap.moid),
                vm=vim.VirtualMachine(vm.moid),
                name=snap.name,
                description=snap.description,
                id=snap.id,
                createTime=snap.created,
                state="poweredOn" if snap.memory else "poweredOff",
                quiesced=snap.quiesced,
                childSnapshotList=[tree(self.snaps[c]) for c in snap.children],
            )

        roots = [s for s in self.snaps.values() if s.vm == vm.moid and s.parent is None]
        if not roots:
            return None  # vSphere leaves vm.snapshot unset when there are no snapshots
        current = vim.vm.Snapshot(vm.current) if vm.current else None
        return vim.vm.SnapshotInfo(
            currentSnapshot=current, rootSnapshotList=[tree(r) for r in roots]
        )

    def create_snapshot(
        self, vm: Vm, name: str, description: str | None, memory: bool, quiesce: bool
    ) -> vim.vm.Snapshot:
        self._check_datastore(vm.name)
        # CreateSnapshot_Task, quiesce: "If TRUE and the virtual machine is powered on when
        # the snapshot is taken, VMware Tools is used to quiesce the file system in the
        # virtual machine. [...] If the virtual machine is powered off or VMware Tools are
        # not available, the quiesce flag is ignored" (vSphere API reference). Ignored means
        # taken anyway, crash-consistent: SnapshotTree.quiesced ("Flag to indicate whether
        # or not the snapshot was created with the quiesce option") says which it was.
        quiesced = bool(quiesce) and vm.tools_running()
        if quiesced and vm.quiesce_fails > 0:
            # Test control: Tools could not quiesce. ApplicationQuiesceFault: "creating a
            # quiesced snapshot failed because the (user-supplied) custom pre-freeze script
            # in the virtual machine exited with a non-zero return code"; FilesystemQuiesceFault:
            # the freeze outlasted its time limit, and "we roll back the entire snapshot
            # create operation" (both SnapshotFaults, vSphere API reference). Nothing is
            # left of the snapshot, for either.
            vm.quiesce_fails -= 1
            fault = getattr(vim.fault, vm.quiesce_fault)
            raise fault(msg=f"An error occurred while quiescing the virtual machine {vm.name}")
        snap = Snap(
            self.new_moid("snapshot"),
            vm.moid,
            vm.next_snap_id,
            name,
            description or "",
            now(),
            memory=bool(memory) and vm.power == "poweredOn",
            quiesced=quiesced,
            parent=vm.current,
        )
        vm.next_snap_id += 1
        self.cbt.snapshot_taken(vm, snap.moid, self._config(vm))
        for i in range(len(vm.disks)):
            if not vm.disk_mode.startswith("independent"):
                sparse_copy(self.disk_file(vm, i), self.disk_file(vm, i, snap))
        snap.frozen = vm.chains.snapshot()
        if vm.current:
            self.snaps[vm.current].children.append(snap.moid)
        self.snaps[snap.moid] = snap
        vm.current = snap.moid
        return vim.vm.Snapshot(snap.moid)

    def revert(self, snap: Snap, suppress_power_on: bool) -> None:
        vm = self.vms[snap.vm]
        self._check_datastore(vm.name)
        for i in range(len(vm.disks)):
            if not vm.disk_mode.startswith("independent"):
                sparse_copy(self.disk_file(vm, i, snap), self.disk_file(vm, i))
        frozen = {f for s in self.snaps.values() if s.vm == vm.moid for f in s.frozen}
        vm.chains.revert(snap.frozen, frozen)
        self.cbt.reverted(vm, snap.moid)
        vm.power = "poweredOn" if snap.memory and not suppress_power_on else "poweredOff"
        vm.current = snap.moid

    def remove_snapshot(self, snap: Snap, remove_children: bool) -> None:
        if snap.moid not in self.snaps:  # removed meanwhile (by a task started before)
            raise vmodl.fault.ManagedObjectNotFound(
                obj=vim.vm.Snapshot(snap.moid), msg=f"object {snap.moid} not found"
            )
        vm = self.vms[snap.vm]
        self._check_datastore(vm.name)
        siblings = self.snaps[snap.parent].children if snap.parent else None
        if siblings is not None:
            siblings.remove(snap.moid)
        doomed = [snap]
        if remove_children:
            for s in doomed:  # grows while iterating: the whole subtree
                doomed.extend(self.snaps[c] for c in s.children)
        else:
            for child in snap.children:
                self.snaps[child].parent = snap.parent
                if siblings is not None:
                    siblings.append(child)
        self.cbt.stunned(vm)
        for s in doomed:
            del self.snaps[s.moid]
            self.cbt.snapshot_removed(s.moid)
            for i in range(len(vm.disks)):
                self.disk_file(vm, i, s).unlink(missing_ok=True)
        if vm.current in {s.moid for s in doomed}:
            vm.current = snap.parent
        # Removing a snapshot consolidates its delta into the chain (vSphere's "delete
        # snapshot" merges it); with no snapshot left, every disk is its base file again.
        if self.leave_deltas:
            vm.consolidation_needed = True
            return
        vm.chains.consolidate([s.frozen for s in self.snaps.values() if s.vm == vm.moid])

    def consolidate_disks(self, vm: Vm) -> None:
        """VirtualMachine.ConsolidateVMDisks_Task: "Consolidate the virtual disk files of the
        virtual machine by finding hierarchies of redo logs that can be combined without
        violating data dependency" (vSphere API reference). A lock (a backup proxy's
        hot-add) makes it fail with FileLocked, the disk staying on its delta."""
        self._check_datastore(vm.name)
        if self.consolidate_fails > 0:
            self.consolidate_fails -= 1
            raise vim.fault.FileLocked(
                file=f"[{vm.disk_ds[0]}] {vm.dir}/{vm.chains.top[0]}",
                msg="Unable to access file since it is locked",
            )
        vm.chains.consolidate([s.frozen for s in self.snaps.values() if s.vm == vm.moid])
        vm.consolidation_needed = False
