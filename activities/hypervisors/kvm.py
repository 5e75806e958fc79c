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
(:mod:`.domain_lock`), so two worker processes for the same host (say ``snapferry up`` beside
the systemd unit) can never rewrite one disk chain at once.

Formats are never probed: the active image's format is libvirt's ``<driver type>``, and every
layer below it is opened with the format its child records (:func:`image_chain`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt

from ..contracts import (
    BackupPlan,
    DiscardRequest,
    PrimarySnapshot,
    RevertRequest,
    VmSnapshotOperation,
    VmSnapshotTaken,
    VmSnapshotType,
    VolumeRef,
)
from ..errors import (
    ChainBusy,
    DiskNotFound,
    HypervisorUnavailable,
    InvalidInput,
    SourceGone,
    VmNotFound,
)
from ..settings import Settings
from ..storage.files import atomic_write, fsync_replace
from ..storage.reader import ImageLayer, QemuImageReader, image_chain, image_info, run_qemu_img
from ..storage.secondary import Manifest
from .base import HypervisorDriver
from .domain_lock import domain_lock
from .domain_lock import lock_path as domain_lock_path

OVERLAY_TAG = ".snapferry-"
IMAGE_MODE = 0o600  # disk images hold tenant data: owner only, whatever the umask
RELEASED_SUFFIX = ".released"  # the layer's snapshot needs it no more: it may be merged
BASE_SUFFIX = ".base"  # the next delta's base: writes since this snapshot are above it
VM_SUFFIX = ".vm"  # a VM snapshot's overlay: no backup reads through it
MARKERS = (RELEASED_SUFFIX, BASE_SUFFIX, VM_SUFFIX)


def marked(layer: str, suffix: str) -> bool:
    return Path(layer + suffix).exists()


def is_released(layer: str) -> bool:
    return snapshot_of_overlay(layer) is not None and marked(layer, RELEASED_SUFFIX)


def is_base(layer: str) -> bool:
    return marked(layer, BASE_SUFFIX) and not marked(layer, RELEASED_SUFFIX)


def may_be_read(layer: str) -> bool:
    """An overlay whose snapshot's backup may be reading every layer below it: a volume
    snapshot not yet backed up, or a layer no marker speaks for (made by an older version)."""
    return snapshot_of_overlay(layer) is not None and not any(marked(layer, m) for m in MARKERS)


def quiet_libvirt() -> None:
    """Replace libvirt's default error handler, process-wide (see :func:`_quiet`); every
    process that talks to libvirt (host workers, the demo) calls it, by importing this."""
    libvirt.registerErrorHandler(_quiet, None)


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default error handler prints every error to stderr ("libvirt: QEMU Driver
    error : Domain not found ...") before the exception is raised; every libvirtError is
    caught and turned into a typed error here, so nothing raw should reach an operator."""


quiet_libvirt()

_SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
)


VM_SNAPSHOT_TAG = "vm-"  # in a VM snapshot's overlay name: the two kinds never share a file


def overlay_path(active: str, snapshot_id: str, *, vm_snapshot: bool = False) -> str:
    """The overlay a take creates: next to the active image, named after the snapshot and
    its kind, so that a VM snapshot and a volume snapshot given one UUID by a caller are
    two layers (one file for both would hand one's frozen image to the other)."""
    root = active.split(OVERLAY_TAG, 1)[0]
    kind = VM_SNAPSHOT_TAG if vm_snapshot else ""
    return f"{root}{OVERLAY_TAG}{kind}{snapshot_id}.qcow2"


def memory_path(active: str, snapshot_id: str) -> str:
    """Where a DiskAndMemory VM snapshot saves the guest's RAM: beside the first disk."""
    return overlay_path(active, snapshot_id, vm_snapshot=True).removesuffix(".qcow2") + ".mem"


def memory_paths(active: str, snapshot_id: str) -> list[str]:
    """Where a VM snapshot's RAM is now, and where an older version put it (without the
    kind in its name)."""
    older = overlay_path(active, snapshot_id).removesuffix(".qcow2") + ".mem"
    return [memory_path(active, snapshot_id), older]


def snapshot_of_overlay(path: str) -> str | None:
    name = Path(path).name
    if OVERLAY_TAG not in name or not name.endswith(".qcow2"):
        return None
    return name.split(OVERLAY_TAG, 1)[1][: -len(".qcow2")]


def chain_paths(layers: list[ImageLayer]) -> list[str]:
    return [layer.path for layer in layers]


@dataclass(frozen=True)
class RevertLayer:
    """A verified revert layer waiting beside the active image it will replace."""

    partial: str
    active: str
    active_format: str


def _libvirt_error(exc: libvirt.libvirtError, *, vm: str) -> Exception:
    code = exc.get_error_code()
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return VmNotFound(f"VM {vm!r} does not exist on this host")
    if code in (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE, libvirt.VIR_ERR_OPERATION_INVALID):
        return ChainBusy(f"VM {vm!r}: {exc.get_error_message()}")
    return HypervisorUnavailable(f"libvirt error on VM {vm!r}: {exc.get_error_message()}")


def _stamp(path: str) -> list[int]:
    """What changes when anyone writes a file: its modification time and size."""
    st = os.stat(path)
    return [st.st_mtime_ns, st.st_size]


def _keep_size(base: ImageLayer, size: int) -> None:
    """After the top of a disk is committed into ``base``, the disk keeps the top's size.

    QEMU's commit only ever grows the base (block/commit.c: the base is truncated up to
    the top's length, never down), so a top made smaller than the layer below it (a revert
    to a snapshot from before a resize gives the disk the snapshot's size) would grow back
    and show the tail written before the revert. The live path shrinks with a block resize
    after the pivot, the offline one here."""
    if base.virtual_size > size:
        run_qemu_img("resize", "-q", "--shrink", "-f", base.format, base.path, str(size))


def _with_disk_sources(definition: str, sources: dict[str, str]) -> str:
    """A domain definition whose named disks read from the given qcow2 files (a revert's
    new layers), with no recorded ``<backingStore>`` (libvirt re-detects the chain)."""
    root = ET.fromstring(definition)
    for el in root.findall("./devices/disk"):
        target = el.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in sources:
            continue
        src, drv = el.find("source"), el.find("driver")
        if src is not None:
            src.set("file", sources[dev])
        if drv is not None:
            drv.set("type", "qcow2")
        for backing in el.findall("backingStore"):
            el.remove(backing)
    return ET.tostring(root, encoding="unicode")


class KvmDriver(HypervisorDriver):
    def __init__(self, settings: Settings) -> None:
        self.uri = settings.libvirt_uri
        self.lock_dir = settings.lock_dir
        self.lock_timeout_s = settings.domain_lock_timeout_s
        self.incremental = settings.kvm_incremental
        self.delta_max = settings.delta_max
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()

    # -- connection ------------------------------------------------------------------------
    def _connection(self) -> libvirt.virConnect:
        with self._conn_lock:
            if self._conn is None or not self._conn.isAlive():
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise HypervisorUnavailable(
                        f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}"
                    ) from exc
            return self._conn

    def _domain(self, vm: str) -> libvirt.virDomain:
        try:
            return self._connection().lookupByName(vm)
        except libvirt.libvirtError as exc:
            raise _libvirt_error(exc, vm=vm) from exc

    @staticmethod
    def _refuse_managed_save(dom: libvirt.virDomain, vm: str, what: str) -> None:
        """A stopped domain with a managed-save image is not stopped: ``virsh start``
        restores the guest's RAM with the definition saved inside the image (libvirt's
        qemuDomainObjRestore), so a disk changed meanwhile is either ignored by the
        restored guest or pulled from under the RAM that has it cached."""
        if not dom.isActive() and dom.hasManagedSaveImage(0):
            raise InvalidInput(
                f"VM {vm!r} has a managed save image (virsh managedsave): {what} would not"
                " match the saved guest; start the VM (it resumes from the image) or remove"
                " the image (virsh managedsave-remove) first"
            )

    @staticmethod
    def _disks(dom: libvirt.virDomain, *, inactive: bool = False) -> dict[str, ET.Element]:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        root = ET.fromstring(dom.XMLDesc(flags))
        disks = {}
        for disk in root.findall("./devices/disk"):
            target = disk.find("target")
            if target is not None and disk.get("device", "disk") == "disk":
                disks[target.get("dev", "")] = disk
        return disks

    def _active_source(self, dom: libvirt.virDomain, vm: str, disk: str) -> tuple[str, str]:
        disks = self._disks(dom)
        if disk not in disks:
            raise DiskNotFound(f"VM {vm!r} has no disk {disk!r} (it has {sorted(disks)})")
        el = disks[disk]
        source = el.find("source")
        if el.get("type") != "file" or source is None or not source.get("file"):
            raise InvalidInput(f"VM {vm!r} disk {disk!r} is not a file-backed disk")
        driver = el.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        return source.get("file", ""), fmt

    def _chain(self, dom: libvirt.virDomain, vm: str, disk: str) -> list[ImageLayer]:
        """The disk's chain, active layer first, every format known (none probed)."""
        return image_chain(*self._active_source(dom, vm, disk))

    def _lock(self, vm: str):  # type: ignore[no-untyped-def]
        return domain_lock(self.lock_dir, vm, timeout_s=self.lock_timeout_s)

    @contextlib.contextmanager
    def _locked_domain(self, vm: str) -> Iterator[libvirt.virDomain]:
        """The VM's domain, under its lock, with any definition change a killed worker left
        half done put right first (:meth:`_finish_interrupted_redefinition`), so that no
        operation starts from a definition that could lose the guest's writes."""
        with self._lock(vm):
            dom = self._domain(vm)
            self._finish_interrupted_redefinition(dom, vm)
            yield dom

    # -- the redefinition intent -----------------------------------------------------------
    def _intent_path(self, vm: str) -> Path:
        return domain_lock_path(self.lock_dir, vm).with_suffix(".redefine.json")

    def _finish_interrupted_redefinition(self, dom: libvirt.virDomain, vm: str) -> None:
        """Settle an offline top merge that was interrupted after it pointed the persistent
        definition at ``base`` and before it checked that nobody had started the VM on
        ``top`` meanwhile (:meth:`_commit_offline`).

        The intent records each file's modification stamp right after the commit, when both
        read the same; whichever changed since is where the guest wrote after it:

        - ``top`` gone: the merge finished.
        - Only ``top`` changed (the VM ran on it), or it runs on ``top`` now: the
          persistent definition goes back to ``top`` (the next release merges again).
        - ``top`` unchanged: ``base`` is the disk (the VM never ran, or ran on ``base``
          as defined); ``top`` is a merged leftover.
        - Both changed: the VM ran on each in turn, so each holds writes the other lacks.
          That is refused, for good, naming both files, until an operator chooses.

        A managed-saved domain is left alone: its saved definition (inside the image) names
        the layer it will resume on, which it tells once it runs.
        """
        path = self._intent_path(vm)
        if not path.exists() or (not dom.isActive() and dom.hasManagedSaveImage(0)):
            return
        intent = json.loads(path.read_text())
        disk, top, top_fmt = intent["disk"], intent["top"], intent["top_format"]
        base = intent["base"]
        if Path(top).exists() and disk in self._disks(dom):
            top_changed = _stamp(top) != intent["top_stamp"]
            running_on_top = bool(dom.isActive()) and self._active_source(dom, vm, disk)[0] == top
            if top_changed and not running_on_top and _stamp(base) != intent["base_stamp"]:
                raise InvalidInput(
                    f"VM {vm!r} disk {disk!r} ran on {top} and then on {base} after an"
                    f" interrupted merge: each holds guest writes the other lacks. Compare"
                    f" them, point the disk at the one to keep (virsh edit), then remove"
                    f" {path}"
                )
            if top_changed or running_on_top:
                self._redefine_disk(dom, vm, disk, source=top, fmt=top_fmt)
        path.unlink()

    # -- take ------------------------------------------------------------------------------
    def _create_external(
        self, dom: libvirt.virDomain, vm: str, overlays: dict[str, str], memory: str | None
    ) -> None:
        """One atomic libvirt external snapshot: the named disks get the named overlays
        (every other disk is left alone), and with ``memory`` the guest's RAM is saved there
        in libvirt's save-image format, which ``restoreFlags`` can resume later."""
        spec = ET.Element("domainsnapshot")
        if memory is not None:
            ET.SubElement(spec, "memory", snapshot="external", file=memory)
        disks_el = ET.SubElement(spec, "disks")
        for name in self._disks(dom):
            if name in overlays:
                d = ET.SubElement(disks_el, "disk", name=name, snapshot="external")
                ET.SubElement(d, "driver", type="qcow2")
                ET.SubElement(d, "source", file=overlays[name])
            else:
                ET.SubElement(disks_el, "disk", name=name, snapshot="no")
        flags = _SNAPSHOT_FLAGS
        if memory is not None:
            flags &= ~libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
        try:
            dom.snapshotCreateXML(ET.tostring(spec, encoding="unicode"), flags)
        except libvirt.libvirtError as exc:
            raise _libvirt_error(exc, vm=vm) from exc

    def take(self, *, volume: VolumeRef, snapshot_id: str) -> PrimarySnapshot:
        vm, disk = volume.vm.name, volume.disk
        with self._locked_domain(vm) as dom:
            self._refuse_managed_save(dom, vm, "a snapshot")
            running = bool(dom.isActive())
            active, fmt = self._active_source(dom, vm, disk)
            overlay = overlay_path(active, snapshot_id)
            if not Path(overlay).exists():
                # The first attempt: the active image is what freezes. Only it is read
                # (one qemu-img info, whatever the chain's depth, so that a VM whose
                # snapshots wait for their backups answers as fast as a new one, and a
                # burst of takes is not a burst of chain walks); the frozen image's chain
                # is walked, every format checked, when its backup is planned.
                size = int(image_info(active, fmt)["virtual-size"])
                self._create_external(dom, vm, {disk: overlay}, None)
                return PrimarySnapshot(
                    image=active,
                    image_format=fmt,
                    overlay=overlay,
                    virtual_size=size,
                    vm_was_running=running,
                )
            # A retried activity finds the overlay its first attempt made in the chain.
            if overlay not in chain_paths(self._chain(dom, vm, disk)):
                self._create_external(dom, vm, {disk: overlay}, None)
            layers = self._chain(dom, vm, disk)
            frozen = layers[chain_paths(layers).index(overlay) + 1]
            return PrimarySnapshot(
                image=frozen.path,
                image_format=frozen.format,
                overlay=overlay,
                virtual_size=frozen.virtual_size,
                vm_was_running=running,
            )

    def check_volume(self, volume: VolumeRef) -> None:
        """The domain exists and has this file-backed disk (read-only: no lock needed)."""
        vm = volume.vm.name
        self._active_source(self._domain(vm), vm, volume.disk)

    # -- backup source ---------------------------------------------------------------------
    def plan_backup(
        self, source: PrimarySnapshot, backups: list[Manifest], *, delta_max: int | None = None
    ) -> BackupPlan:
        """A delta against the base snapshot (the ``.base`` layer in this snapshot's chain)
        while its backup is visible on secondary and the chain of deltas is short enough
        (``snapshot.delta.max``); else a full, saying why. Any doubt means a full."""
        limit = self.delta_max if delta_max is None else delta_max
        if not self.incremental:
            return BackupPlan(reason="KVM incremental backups are off (SNAPFERRY_KVM_INCREMENTAL)")
        if not backups:
            return BackupPlan(reason="the volume's first backup")
        if limit == 0:
            return BackupPlan(reason="delta max is 0: every backup is a full one")
        chain = chain_paths(image_chain(source.image, source.image_format))
        base = next((layer for layer in chain if is_base(layer)), None)
        if base is None:
            return BackupPlan(
                reason="change tracking lost: no layer on primary holds what changed since"
                " the last backup (the base snapshot was deleted, or its layer merged or"
                " removed outside snapferry)"
            )
        parent = snapshot_of_overlay(base)
        manifest = next((m for m in backups if m.snapshot_id == parent), None)
        if manifest is None:
            return BackupPlan(reason=f"the base snapshot {parent}'s backup was deleted")
        if manifest.depth + 1 > limit:
            return BackupPlan(
                reason=f"{manifest.depth} deltas since the last full (delta max {limit})"
            )
        return BackupPlan(parent=parent, base_image=base, depth=manifest.depth + 1)

    def source_intact(self, source: PrimarySnapshot) -> bool:
        """The overlay exists and is not marked released: no merge has touched the frozen
        image (``.released`` is written before any merge)."""
        return source.overlay is None or (
            Path(source.overlay).exists() and not Path(source.overlay + RELEASED_SUFFIX).exists()
        )

    def open_reader(self, source: PrimarySnapshot, plan: BackupPlan) -> QemuImageReader:
        """The frozen image, only while it still is the snapshot: its overlay must exist
        and be unreleased (see :meth:`_intact_frozen`). A backup run again after the layer
        was merged away (a reset of a deleted snapshot, say) would otherwise copy today's
        bytes under the snapshot's name. A delta reads only what changed above its base
        layer; that layer gone raises :class:`SourceGone`, and the backup starts over full."""
        if source.overlay is not None and not self.source_intact(source):
            raise SourceGone(
                f"the snapshot's layer {Path(source.overlay).name} was merged away or deleted:"
                " its point in time is no longer on primary, so it cannot be backed up again"
            )
        return QemuImageReader(source.image, source.image_format, changed_above=plan.base_image)

    # -- release ---------------------------------------------------------------------------
    def release(
        self,
        *,
        volume: VolumeRef,
        snapshot_id: str,
        source: PrimarySnapshot,
        backed_up: bool = True,
    ) -> None:
        if source.overlay is None:
            return
        vm, disk = volume.vm.name, volume.disk
        keep = backed_up and self.incremental
        if not keep:
            self._mark_released(source.overlay)
        try:
            with self._locked_domain(vm) as dom:
                if keep:
                    self._keep_as_base(dom, vm, disk, source.overlay)
                else:
                    self._consolidate(dom, vm, disk)
        except VmNotFound:
            if backed_up:
                raise
            # A delete after the VM itself was deleted: nothing left to give back.

    @staticmethod
    def _mark_released(overlay: str) -> None:
        """Mark a layer released *before* the domain lock, libvirt or the chain are needed.

        The mark alone is always safe to write (it only allows merges, and only merges of
        layers no unreleased snapshot needs), and once written, any later release on this
        disk finishes the job: a release that fails for good (the lock held for minutes,
        libvirtd down) can never leave an unmarked layer that nothing owns, blocking every
        merge below it. Only an existing layer is marked: a retry after the merge finished
        must not leave a marker that a later take with this name would inherit."""
        if Path(overlay).exists():
            Path(overlay + RELEASED_SUFFIX).touch()

    def _keep_as_base(self, dom: libvirt.virDomain, vm: str, disk: str, overlay: str) -> None:
        """After a verified backup: this snapshot becomes the next delta's base, unless a
        newer one already is (backups can finish out of order); the base it replaces is
        released. The new mark is written before the old one is released, so that a crash
        in between leaves two bases (the newer one wins) and never a merge of the newest."""
        chain = chain_paths(self._chain(dom, vm, disk))
        if overlay in chain and not marked(overlay, RELEASED_SUFFIX):
            at = chain.index(overlay)
            if any(is_base(layer) for layer in chain[:at]):
                Path(overlay + RELEASED_SUFFIX).touch()
            else:
                Path(overlay + BASE_SUFFIX).touch()
                for older in chain[at + 1 :]:
                    if is_base(older):
                        Path(older + RELEASED_SUFFIX).touch()
                        # Replaced, not deleted: only a delete leaves both marks behind.
                        Path(older + BASE_SUFFIX).unlink(missing_ok=True)
        self._consolidate(dom, vm, disk)

    def _release_overlay(self, dom: libvirt.virDomain, vm: str, disk: str, overlay: str) -> None:
        """Mark one snapshot's overlay released, then consolidate what the marks allow.

        Volume snapshots call this when deleted (or after a backup, incrementals off); VM
        snapshots when deleted. A layer that an unreleased snapshot still needs (a VM
        snapshot, the base, a volume snapshot whose backup is in flight) is never
        rewritten."""
        self._mark_released(overlay)
        self._consolidate(dom, vm, disk)

    def _consolidate(self, dom: libvirt.virDomain, vm: str, disk: str) -> None:
        """Merge every run of released layers that nothing reads through, one at a time
        (each merge changes the chain, which is read again).

        Every round first settles a block job that is still running on the disk (a killed
        worker's, see :meth:`_settle_block_job`), so that no plan is ever made from qcow2
        headers a job is still changing."""
        for _ in range(256):
            if not dom.isActive() and dom.hasManagedSaveImage(0):
                # The saved guest's definition (inside the image) may name layers the
                # persistent one does not: nothing is merged or removed until it runs.
                return
            self._settle_block_job(dom, vm, disk)
            layers = self._chain(dom, vm, disk)
            chain = chain_paths(layers)
            self._remove_merged_leftovers(chain)
            run = self._mergeable_run(chain)
            if run is None:
                return
            top, below = run
            if top > 0 and dom.isActive() and layers[below].virtual_size > layers[top].virtual_size:
                # A middle merge must shrink the base to the merged layer's size, or the
                # layer above reads the base's old tail where it read zeros; a backing file
                # in use cannot be resized, so this run waits for the VM to stop.
                return
            if top == 0 and dom.isActive():
                self._commit_live(dom, vm, disk, chain[below], size=layers[0].virtual_size)
            elif top == 0:
                if not self._commit_offline(dom, vm, disk, top=layers[0], base=layers[below]):
                    return  # started meanwhile: its layers stay, the next release merges live
            elif dom.isActive():
                self._commit_middle_live(dom, vm, disk, top=chain[top], base=chain[below])
            else:
                # libvirt starts a domain on the <backingStore> its definition records
                # (formatdomain: honoured on input since 5.10), and its own offline
                # snapshot wrote the chain there: drop it *before* the headers change, so
                # that at every step (a crash included) the chain comes from the headers.
                self._redefine_disk(dom, vm, disk, source=layers[0].path, fmt=layers[0].format)
                if not self._commit_middle_offline(
                    dom, above=layers[top - 1], top=layers[top], base=layers[below]
                ):
                    return
            for layer in chain[top:below]:
                self._forget(layer)

    @staticmethod
    def _forget(layer: str) -> None:
        Path(layer).unlink(missing_ok=True)
        for marker in MARKERS:
            Path(layer + marker).unlink(missing_ok=True)

    @staticmethod
    def _remove_merged_leftovers(chain: list[str]) -> None:
        """Delete this disk's released overlays no longer in its chain: a crash after a
        pivot but before the unlinks would otherwise leave them behind for good; and the
        markers of layers that are gone.

        Only overlays named after *this* disk are looked at: a primary pool directory holds
        many VMs' disks, and another disk's released layers are still in *its* chain."""
        root = Path(chain[0].split(OVERLAY_TAG, 1)[0])
        for suffix in MARKERS:
            pattern = f"{glob.escape(root.name)}{OVERLAY_TAG}*.qcow2{suffix}"
            for marker in root.parent.glob(pattern):
                layer = str(marker)[: -len(suffix)]
                if layer in chain:
                    continue
                if suffix == RELEASED_SUFFIX:
                    KvmDriver._forget(layer)
                elif not Path(layer).exists():
                    marker.unlink(missing_ok=True)

    @staticmethod
    def _mergeable_run(chain: list[str]) -> tuple[int, int] | None:
        """The first run ``chain[top:below]`` of released overlays that can be committed
        into ``chain[below]``, or None.

        Layer ``i`` (0 = active) is the overlay created by some snapshot S; the layer below
        it is S's frozen image. Committing ``chain[top:below]`` into ``chain[below]``
        rewrites the frozen images ``chain[top+1..below]``, every one of them a released
        snapshot's, and removes ``chain[top]``, whose guest view lives on in ``chain[below]``
        (the snapshot above keeps its content, under another file name). A run at the top
        can always go. A run below an overlay that a backup may be reading through
        (:func:`may_be_read`) waits: that backup reads these very files.
        """
        i = 0
        while i < len(chain) - 1:
            if not is_released(chain[i]):
                i += 1
                continue
            top = i
            while i < len(chain) - 1 and is_released(chain[i]):
                i += 1
            if top == 0 or not any(may_be_read(layer) for layer in chain[:top]):
                return top, i
        return None

    def _running_job_target(self, dom: libvirt.virDomain, disk: str) -> tuple[str, str] | None:
        """The running block job's kind and destination, from the live XML's ``<mirror>``
        (libvirt's formatdomain docs: an active commit shows ``job='active-commit'`` and the
        base as its source), or None when no job runs."""
        mirror = self._disks(dom).get(disk, ET.Element("disk")).find("mirror")
        if mirror is None:
            return None
        src = mirror.find("source")
        target = mirror.get("file") or (src.get("file") if src is not None else None)
        return mirror.get("job") or "", target or ""

    def _settle_block_job(self, dom: libvirt.virDomain, vm: str, disk: str) -> None:
        """Bring a block job found running on ``disk`` to its end before anything is planned.

        A host worker killed mid-merge leaves libvirt's job running: the job belongs to the
        domain, not to the client that started it (virDomainBlockCommit). Planning from
        the headers while it runs would plan from a chain it is still changing, and could
        delete the layer it commits into. So:

        - a non-active commit ends by itself (virDomainBlockCommit: the image above
          ``top`` is re-pointed at ``base`` when it completes): wait for it, then the
          caller reads the chain it left;
        - an active commit is pivoted when every layer above its target is released, which
          is exactly what a snapferry release starts (a take is refused while a job runs,
          so nothing new can have been stacked above it); that merge is then complete;
        - anything else (a copy, a pull, a backup, an active commit of a layer someone
          still needs) is not ours to finish: ChainBusy, retried later.
        """
        try:
            # A stopped domain has no jobs (libvirt refuses the question itself).
            info = dom.blockJobInfo(disk, 0) if dom.isActive() else None
            if not info:
                return
            kind = info.get("type")
            if kind == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT:
                # Bounded like the lock: a throttled or paused job is not held the lock for.
                deadline = time.monotonic() + self.lock_timeout_s
                while dom.blockJobInfo(disk, 0):
                    if time.monotonic() > deadline:
                        raise ChainBusy(
                            f"VM {vm!r} disk {disk!r}: a block commit still runs after"
                            f" {self.lock_timeout_s:g} s; retrying later"
                        )
                    time.sleep(0.02)
                return
            job = self._running_job_target(dom, disk)
            if kind == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT and job is not None:
                chain = chain_paths(self._chain(dom, vm, disk))
                target = job[1]
                if target in chain[1:] and all(
                    is_released(layer) for layer in chain[: chain.index(target)]
                ):
                    self._pivot_when_ready(dom, vm, disk)
                    return
        except libvirt.libvirtError as exc:
            raise _libvirt_error(exc, vm=vm) from exc
        raise ChainBusy(
            f"VM {vm!r} disk {disk!r}: another block job runs ({job}) over layers snapferry"
            " has not released; not finishing it"
        )

    def _pivot_when_ready(self, dom: libvirt.virDomain, vm: str, disk: str) -> None:
        """Wait for the active commit to mirror everything, pivot, wait for the job to go."""
        while True:
            info = dom.blockJobInfo(disk, 0)
            if info and info["end"] > 0 and info["cur"] == info["end"]:
                break
            if not info:
                raise ChainBusy(f"VM {vm!r} disk {disk!r}: block commit vanished")
            time.sleep(0.02)
        dom.blockJobAbort(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        while dom.blockJobInfo(disk, 0):
            time.sleep(0.02)

    def _commit_live(
        self, dom: libvirt.virDomain, vm: str, disk: str, base: str, *, size: int
    ) -> None:
        """A running VM's active commit of the top run into ``base``, pivoted, the disk kept
        at the top's ``size`` (:func:`_keep_size`). No job runs when this starts
        (:meth:`_settle_block_job` ran first, under the domain lock)."""
        try:
            dom.blockCommit(disk, base, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
            self._pivot_when_ready(dom, vm, disk)
            if dom.blockInfo(disk, 0)[0] > size:
                dom.blockResize(disk, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        except libvirt.libvirtError as exc:
            raise _libvirt_error(exc, vm=vm) from exc
        active, _ = self._active_source(dom, vm, disk)
        if active != base:
            raise ChainBusy(f"VM {vm!r} disk {disk!r}: pivot left the disk on {active}")

    def _commit_offline(
        self, dom: libvirt.virDomain, vm: str, disk: str, *, top: ImageLayer, base: ImageLayer
    ) -> bool:
        """Merge a stopped VM's released layers with ``qemu-img commit``; False if the VM
        was started meanwhile (by anyone: snapferry never blocks a start).

        ``-b`` leaves ``top`` intact, so a VM that started on the old chain still reads the
        right data. The definition is switched to ``base`` first and the VM's state checked
        after: if it runs on ``top``, the definition is pointed back at it and nothing is
        deleted; if it started later, it started on ``base``, and the old layers can go.
        """
        run_qemu_img("commit", "-q", "-f", top.format, "-b", base.path, top.path)
        _keep_size(base, top.virtual_size)
        # The intent is durable before the definition changes: a worker killed between
        # the redefinition and the check below leaves it for the next operation to settle.
        intent: dict[str, object] = {"disk": disk, "top": top.path, "top_format": top.format}
        intent |= {
            "base": base.path,
            "top_stamp": _stamp(top.path),
            "base_stamp": _stamp(base.path),
        }
        atomic_write(self._intent_path(vm), json.dumps(intent))
        self._redefine_disk(dom, vm, disk, source=base.path, fmt=base.format)
        started_on_top = False
        if dom.isActive():
            live, live_fmt = self._active_source(dom, vm, disk)
            if live != base.path:
                self._redefine_disk(dom, vm, disk, source=live, fmt=live_fmt)
                started_on_top = True
        self._intent_path(vm).unlink()
        return not started_on_top

    def _commit_middle_live(
        self, dom: libvirt.virDomain, vm: str, disk: str, *, top: str, base: str
    ) -> None:
        """A running VM's non-active block commit of ``top`` (and the layers down to
        ``base``) into ``base``. libvirt's docs (virDomainBlockCommit): when ``top`` is not
        the active layer the job ends by itself, and the image above ``top`` is re-pointed
        at ``base``. No job runs when this starts (:meth:`_settle_block_job`)."""
        try:
            dom.blockCommit(disk, base, top, 0, 0)
            while dom.blockJobInfo(disk, 0):
                time.sleep(0.02)
        except libvirt.libvirtError as exc:
            raise _libvirt_error(exc, vm=vm) from exc
        if top in chain_paths(self._chain(dom, vm, disk)):
            raise ChainBusy(f"VM {vm!r} disk {disk!r}: the commit of {top} did not finish")

    @staticmethod
    def _commit_middle_offline(
        dom: libvirt.virDomain, *, above: ImageLayer, top: ImageLayer, base: ImageLayer
    ) -> bool:
        """A stopped VM's middle merge: ``qemu-img commit -b`` (which implies ``-d``:
        ``top`` keeps its data, docs/tools/qemu-img.rst), then ``rebase -u`` of the layer
        above onto ``base``, whose guest view is ``top``'s now. False when the VM was
        started meanwhile: it reads through ``top``, which is intact; qemu-img's image
        lock refuses the rebase of an image a running QEMU holds."""
        run_qemu_img("commit", "-q", "-f", top.format, "-b", base.path, top.path)
        if dom.isActive():
            return False
        _keep_size(base, top.virtual_size)
        run_qemu_img(
            "rebase",
            "-q",
            "-u",
            "-f",
            above.format,
            "-b",
            base.path,
            "-F",
            base.format,
            above.path,
        )
        return True

    def _redefine_disk(
        self, dom: libvirt.virDomain, vm: str, disk: str, *, source: str, fmt: str
    ) -> None:
        """Point a stopped domain's disk at ``source`` of format ``fmt`` (known from the
        chain, never probed: a raw disk whose guest wrote a qcow2 header must stay raw),
        its chain left for libvirt to re-detect at start from the recorded formats."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        root = ET.fromstring(dom.XMLDesc(flags))
        for el in root.findall("./devices/disk"):
            target = el.find("target")
            if target is None or target.get("dev") != disk:
                continue
            src = el.find("source")
            if src is not None:
                src.set("file", source)
            for backing in el.findall("backingStore"):
                el.remove(backing)
            drv = el.find("driver")
            if drv is not None:
                drv.set("type", fmt)
        try:
            self._connection().defineXML(ET.tostring(root, encoding="unicode"))
        except libvirt.libvirtError as exc:
            raise _libvirt_error(exc, vm=vm) from exc

    # -- revert ----------------------------------------------------------------------------
    def revert(self, req: RevertRequest) -> None:
        """Revert a stopped VM's volume to a volume snapshot: from its frozen image while it
        is on primary, else from its verified backup. Reverting a running VM is refused: the
        guest would see its disk change under it."""
        vm, disk = req.volume.vm.name, req.volume.disk
        with self._locked_domain(vm) as dom:
            if dom.isActive():
                raise InvalidInput(f"VM {vm!r} is running; stop it before reverting {disk!r}")
            self._refuse_managed_save(dom, vm, "a revert")
            frozen = self._intact_frozen(dom, vm, disk, req.primary)
            if frozen is not None:
                self._revert_disk(
                    dom, vm, disk, req.snapshot_id, source=frozen.path, source_fmt=frozen.format
                )
            elif req.manifest_path is not None:
                from ..storage.secondary import SecondaryStore

                manifest = SecondaryStore.read_manifest(Path(req.manifest_path))
                with SecondaryStore.materialized(manifest) as raw:
                    self._revert_disk(
                        dom, vm, disk, req.snapshot_id, source=str(raw), source_fmt="raw"
                    )
            else:
                raise InvalidInput(
                    f"snapshot {req.snapshot_id} has no copy left to revert to: its frozen"
                    " image is no longer intact on primary and it has no backup"
                )

    def _intact_frozen(
        self, dom: libvirt.virDomain, vm: str, disk: str, primary: PrimarySnapshot | None
    ) -> ImageLayer | None:
        """The snapshot's frozen image, only while it still holds the snapshot's bytes.

        It is found through the overlay (the layer right below it), not by the recorded
        path: a file can exist under that name and yet have been merged into, and a merge
        of the released layers below can have moved the frozen view into another file. A
        frozen image's view changes only when its own snapshot's overlay is marked released
        (see :meth:`_mergeable_run`), and the marker is written *before* the merge; so an
        overlay that is gone from the chain, or marked released, means the frozen image may
        no longer be the snapshot, and the verified backup must be used instead."""
        if primary is None or primary.overlay is None:
            return None
        layers = self._chain(dom, vm, disk)
        paths = chain_paths(layers)
        overlay = primary.overlay
        if overlay not in paths[:-1] or Path(overlay + RELEASED_SUFFIX).exists():
            return None
        return layers[paths.index(overlay) + 1]

    def _revert_disk(
        self, dom: libvirt.virDomain, vm: str, disk: str, tag: str, *, source: str, source_fmt: str
    ) -> None:
        """Make a stopped VM's disk read as ``source`` (:meth:`_build_revert_layer`, then
        :meth:`_swap_in_revert_layer`)."""
        layer = self._build_revert_layer(dom, vm, disk, tag, source=source, source_fmt=source_fmt)
        try:
            self._swap_in_revert_layer(dom, vm, disk, layer)
        finally:
            Path(layer.partial).unlink(missing_ok=True)

    def _build_revert_layer(
        self, dom: libvirt.virDomain, vm: str, disk: str, tag: str, *, source: str, source_fmt: str
    ) -> RevertLayer:
        """The layer that makes the disk read as ``source``, built beside the active image
        and verified, touching nothing the VM uses (so it can be built while the VM still
        runs, and a failure here changes nothing).

        The new layer keeps the active image's backing file, so the frozen images of every
        other snapshot (volume or VM, older or newer) stay below it untouched, and a backup
        reading one of them is not disturbed. When ``source`` *is* that backing file (the
        newest snapshot), the new layer is an empty overlay: O(1). Otherwise it holds a full
        copy of the snapshot's content, which costs primary space until the chain is merged.
        """
        active, fmt = self._active_source(dom, vm, disk)
        chain = self._chain(dom, vm, disk)
        partial = f"{active}.revert-{tag}.partial"
        Path(partial).unlink(missing_ok=True)
        size = str(image_info(source, source_fmt)["virtual-size"])
        create = ["create", "-q", "-f", "qcow2"]
        if len(chain) > 1:
            create += ["-b", chain[1].path, "-F", chain[1].format]
        try:
            run_qemu_img(*create, partial, size)
            os.chmod(partial, IMAGE_MODE)
            if len(chain) < 2 or source != chain[1].path:
                run_qemu_img(
                    "convert", "-q", "-n", "-f", source_fmt, "-O", "qcow2", source, partial
                )
                run_qemu_img("compare", "-q", "-f", source_fmt, "-F", "qcow2", source, partial)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return RevertLayer(partial=partial, active=active, active_format=fmt)

    def _swap_in_revert_layer(
        self, dom: libvirt.virDomain, vm: str, disk: str, layer: RevertLayer, *, define: bool = True
    ) -> str:
        """Put a built revert layer in the active image's place; the disk's new source.

        A qcow2 active image is replaced under its own name. A raw one (a disk with no
        snapferry layer) cannot be: the definition would call a qcow2 file raw until it is
        redefined, and a failure in between lets the guest shred the qcow2 metadata. So the
        layer gets a name of its own, the definition is pointed at it, and only then is the
        raw file removed. ``define=False`` (a transient domain, which has no persistent
        definition) leaves the definition to the caller."""
        if define and dom.isActive():  # started meanwhile: it runs on the old image; keep it
            raise ChainBusy(f"VM {vm!r} was started during the revert; nothing changed")
        # qemu-img does not fsync: without this a crash after the rename could leave
        # the VM's disk named as the new layer but holding none of its bytes.
        if layer.active_format == "qcow2":
            fsync_replace(layer.partial, layer.active)
            return layer.active
        target = layer.partial.removesuffix(".partial") + ".qcow2"  # this revert's own name
        fsync_replace(layer.partial, target)
        if define:
            try:
                self._redefine_disk(dom, vm, disk, source=target, fmt="qcow2")
            except BaseException:
                Path(target).unlink(missing_ok=True)
                raise
        Path(layer.active).unlink(missing_ok=True)
        return target

    # -- failed takes ----------------------------------------------------------------------
    def discard(self, req: DiscardRequest) -> None:
        """A take can fail after libvirt made the overlay (say, reading its chain failed on
        every retry). The overlay's name follows from the snapshot ID, so it is found, released
        and merged like any other; a DiskAndMemory take's memory file is removed."""
        vm = req.vm.name
        kinds = [False, True] if req.vm_snapshot is None else [req.vm_snapshot]

        def overlays(active: str) -> list[str]:  # the failed take's kind only (or either)
            made = [overlay_path(active, req.snapshot_id, vm_snapshot=k) for k in kinds]
            older_vm_take = overlay_path(active, req.snapshot_id)  # no kind in its name
            if req.vm_snapshot and marked(older_vm_take, VM_SUFFIX):
                made.append(older_vm_take)
            return made

        # The marks first, outside the lock (see _mark_released): a discard that fails
        # for good still leaves the layers to the next release on each disk.
        for active in self._file_disks(self._domain(vm), vm).values():
            for overlay in overlays(active):
                self._mark_released(overlay)
        with self._locked_domain(vm) as dom:
            actives = self._file_disks(dom, vm)
            for disk, active in actives.items():
                if any(marked(o, RELEASED_SUFFIX) for o in overlays(active)):
                    self._consolidate(dom, vm, disk)
            for active in actives.values() if req.vm_snapshot is not False else ():
                for memory in memory_paths(active, req.snapshot_id):
                    Path(memory).unlink(missing_ok=True)

    # -- VM snapshots ----------------------------------------------------------------------
    def _file_disks(self, dom: libvirt.virDomain, vm: str) -> dict[str, str]:
        """Every file-backed disk of the VM, with its active image."""
        return {d: self._active_source(dom, vm, d)[0] for d in self._disks(dom)}

    def take_vm_snapshot(self, op: VmSnapshotOperation) -> VmSnapshotTaken:
        """An external snapshot of every disk at once (plus RAM for DiskAndMemory).

        The overlays are never merged while the VM snapshot exists: it holds them unreleased,
        like a volume snapshot whose backup has not finished, so every later volume-snapshot
        merge stops above its frozen images."""
        vm = op.vm.name
        with self._locked_domain(vm) as dom:
            self._refuse_managed_save(dom, vm, "a VM snapshot")
            running = bool(dom.isActive())
            with_memory = op.type == VmSnapshotType.DISK_AND_MEMORY
            actives = self._file_disks(dom, vm)
            overlays = {
                d: overlay_path(a, op.snapshot_id, vm_snapshot=True) for d, a in actives.items()
            }
            older = {d: overlay_path(a, op.snapshot_id) for d, a in actives.items()}
            if any(marked(o, VM_SUFFIX) for o in older.values()):
                overlays = older  # a retry of a take an older version started
            first = next(iter(actives.values()))
            memory = memory_path(first, op.snapshot_id) if with_memory else None
            present = [d for d in actives if overlays[d] in chain_paths(self._chain(dom, vm, d))]
            if not present:  # a retry finds what its first (atomic) attempt made
                if with_memory and not running:
                    raise InvalidInput(
                        f"VM {vm!r} is stopped: a DiskAndMemory snapshot needs a running VM"
                        " (take a Disk snapshot instead)"
                    )
                self._create_external(dom, vm, overlays, memory)
            for overlay in overlays.values():
                Path(overlay + VM_SUFFIX).touch()  # no backup reads through it
            return VmSnapshotTaken(overlays=overlays, memory=memory, vm_was_running=running)

    def revert_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """Every disk back to the VM snapshot; with memory, the VM resumes from it, running.

        A Disk snapshot needs the VM stopped (the guest would see its disks change under
        it). A DiskAndMemory revert replaces the running state by definition, so a running
        VM is powered off, then restored from the saved memory with its disks on the
        reverted images (never on the frozen images the save file names).

        Every layer that can fail to build (a full copy needs primary space) is built and
        verified first, while the VM still runs; only then is it powered off, the layers
        swapped in and the guest restored. A transient domain (what CloudStack's agent
        runs) vanishes from libvirt when powered off, so its definition is taken before,
        and the restore brings it back with the new disks."""
        assert op.taken is not None
        vm = op.vm.name
        with self._locked_domain(vm) as dom:
            if op.taken.memory and not Path(op.taken.memory).exists():
                raise InvalidInput(f"VM snapshot {op.snapshot_id}: its memory file is gone")
            running = bool(dom.isActive())
            if running and op.taken.memory is None:
                raise InvalidInput(
                    f"VM {vm!r} is running; stop it before reverting to Disk snapshot"
                    f" {op.snapshot_id}"
                )
            self._refuse_managed_save(dom, vm, "a revert")
            persistent = bool(dom.isPersistent())
            sources = {d: self._frozen_below(dom, vm, d, o) for d, o in op.taken.overlays.items()}
            built: dict[str, RevertLayer] = {}
            try:
                for disk, frozen in sources.items():
                    built[disk] = self._build_revert_layer(
                        dom, vm, disk, op.snapshot_id, source=frozen.path, source_fmt=frozen.format
                    )
                if running:
                    dom.destroy()
                swapped = {
                    disk: self._swap_in_revert_layer(dom, vm, disk, layer, define=persistent)
                    for disk, layer in built.items()
                }
            except libvirt.libvirtError as exc:
                raise _libvirt_error(exc, vm=vm) from exc
            finally:
                for layer in built.values():
                    Path(layer.partial).unlink(missing_ok=True)
            if op.taken.memory is not None:
                try:
                    # The image's own definition, with the reverted disks: libvirt checks
                    # a restore's XML for ABI stability against the one in the image
                    # (qemuSaveImageUpdateDef), which an inactive or live definition (an
                    # expanded CPU, say) can fail; a transient domain has no other left.
                    definition = self._connection().saveImageGetXMLDesc(
                        op.taken.memory, libvirt.VIR_DOMAIN_XML_SECURE
                    )
                    self._connection().restoreFlags(
                        op.taken.memory,
                        _with_disk_sources(definition, swapped),
                        libvirt.VIR_DOMAIN_SAVE_RUNNING,
                    )
                except libvirt.libvirtError as exc:
                    raise _libvirt_error(exc, vm=vm) from exc

    def delete_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        """Release the VM snapshot's overlays (merging what that allows) and its memory."""
        vm = op.vm.name
        if op.taken is None:
            return
        for overlay in op.taken.overlays.values():
            self._mark_released(overlay)
        try:
            with self._locked_domain(vm) as dom:
                for disk in op.taken.overlays:
                    self._consolidate(dom, vm, disk)
        except VmNotFound:
            # The domain is gone; its disk files may not be (undefine keeps them, and they
            # can be defined again): the layers stay, marked, for a later release to merge.
            pass
        if op.taken.memory:
            Path(op.taken.memory).unlink(missing_ok=True)

    def _frozen_below(self, dom: libvirt.virDomain, vm: str, disk: str, overlay: str) -> ImageLayer:
        """The image a snapshot froze: whatever its overlay is backed by now."""
        layers = self._chain(dom, vm, disk)
        chain = chain_paths(layers)
        if overlay not in chain or overlay == chain[-1]:
            raise InvalidInput(
                f"VM {vm!r} disk {disk!r}: the snapshot's layer {Path(overlay).name} is no"
                " longer in the disk's chain"
            )
        return layers[chain.index(overlay) + 1]
