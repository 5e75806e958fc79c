"""KVM through libvirt-python: external disk-only snapshots, merged back after the backup.

Take (running or stopped VM alike): a libvirt external disk-only snapshot
(``DISK_ONLY | NO_METADATA | ATOMIC``) of one disk, with the overlay named explicitly. The
image the VM wrote to until then is frozen; its guest view *is* the snapshot, read by the
copy engine. On a stopped domain libvirt creates the overlay with qemu-img and rewrites the
persistent definition, so the same mechanism works whether the VM runs or not, and the VM can
be started and stopped between take and release.

Release: after a verified backup the snapshot's overlay is *kept* as the next delta's base
(marked ``.base``; see "Incremental backups" below), and the previous base is released. A
snapshot deleted, a VM snapshot deleted, or any backup with incrementals off
(``SNAPFERRY_KVM_INCREMENTAL=0``) marks its overlay released. Then the disk chain is
consolidated: every run of released layers is committed down into the image below it, when
nothing still reads through it. A run at the top is an active block commit with pivot on a
running domain (``qemu-img commit`` and a redefinition on a stopped one); a run in the middle
is a non-active block commit (``qemu-img commit -b`` and ``rebase -u`` of the layer above,
stopped). When every snapshot is released and deleted the domain is back on its original file.

Incremental backups (keep one layer): the base snapshot B's overlay holds exactly the
clusters written since B, and every later layer sits above it. So the frozen image of the
next snapshot S reads, through ``qemu-img map``, each range at the chain depth it comes
from: a range from above B's frozen image changed since B (to data, or to zeros), one from
it or below did not. That is S's delta against B's backup on secondary. Nothing is missed:
every write since B, running or stopped, a revert's new layer, a ``qemu-img`` write into the
disk, lands in a layer above that boundary; and nothing merges a layer away from under it
while B is the base. Three layer markers make that true:

- ``.base``: B, the newest backed-up snapshot; its overlay and frozen image stay as they are.
- ``.vm``: a VM snapshot's overlay; nothing reads through it but its own revert.
- no marker: a volume snapshot whose backup has not finished (or a layer of an older
  version): its backup may be reading through every layer below it, so no run below it is
  merged (only runs above it, as before).

The change granularity is the overlay's qcow2 cluster (64 KiB): a 4 KiB guest write costs
64 KiB in the delta. The VM runs one layer deeper than with full backups.

Operations on one domain are serialised by a per-domain ``flock`` on the host
(:mod:`..domain_lock`), so two worker processes for the same host (say ``snapferry up`` beside
the systemd unit) can never rewrite one disk chain at once.

Formats are never probed: the active image's format is libvirt's ``<driver type>``, and every
layer below it is opened with the format its child records (:func:`image_chain`).

The driver is laid out by concern: :mod:`.common` (names, layer markers),
:mod:`.connection` (libvirt, the domain's disks, the lock), :mod:`.intent` (the
redefinition intent), :mod:`.take` (take and backup source), :mod:`.release` (what may be
merged, and when) and :mod:`.merge` (block commits, job adoption), :mod:`.revert` (revert
layers, revert from primary or backup) and :mod:`.vm_snapshots`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...contracts import BootCheck, BootCheckRequest, InstantRunRequest, InstantRunResult
from . import instant
from .boot_check import check_boot
from .common import (
    BASE_SUFFIX,
    IMAGE_MODE,
    MARKERS,
    OVERLAY_TAG,
    RELEASED_SUFFIX,
    VM_SNAPSHOT_TAG,
    VM_SUFFIX,
    chain_paths,
    is_base,
    is_released,
    marked,
    may_be_read,
    memory_path,
    memory_paths,
    overlay_path,
    quiet_libvirt,
    snapshot_of_overlay,
)
from .revert import RevertLayer
from .vm_snapshots import VmSnapshotOps

__all__ = [
    "BASE_SUFFIX",
    "IMAGE_MODE",
    "MARKERS",
    "OVERLAY_TAG",
    "RELEASED_SUFFIX",
    "VM_SNAPSHOT_TAG",
    "VM_SUFFIX",
    "KvmDriver",
    "RevertLayer",
    "chain_paths",
    "is_base",
    "is_released",
    "marked",
    "may_be_read",
    "memory_path",
    "memory_paths",
    "overlay_path",
    "quiet_libvirt",
    "snapshot_of_overlay",
]


class KvmDriver(VmSnapshotOps):
    """The HypervisorDriver for libvirt/QEMU (registry name ``kvm``): volume snapshots
    (:class:`.take.TakeOps`, :class:`.release.ReleaseOps`, :class:`.revert.RevertOps`)
    and VM snapshots (:class:`.vm_snapshots.VmSnapshotOps`), on one connection."""

    def instant_overlay(self, req: InstantRunRequest) -> Path:
        return Path(req.primary_dir) / f"{req.name}-{req.volume.disk}.qcow2"

    def run_instant(self, req: InstantRunRequest, *, work: Path) -> None:
        """Start a new VM on the backup at once (see :mod:`.instant`)."""
        instant.start(self._connection(), req, work=work, overlay=self.instant_overlay(req))

    def copy_instant(
        self, req: InstantRunRequest, *, work: Path, progress: Callable[[int, int], None]
    ) -> InstantRunResult:
        """Copy the backup into the running VM's disk until it needs the backup no more."""
        return instant.pull(
            self._connection(),
            req,
            work=work,
            overlay=self.instant_overlay(req),
            progress=progress,
        )

    def check_boot(self, req: BootCheckRequest, *, work: Path) -> BootCheck:
        """Boot the backup in a throwaway VM on this host (see :mod:`.boot_check`)."""
        return check_boot(
            self._connection(), req.snapshot_id, req.manifest_path, req.options, work=work
        )
