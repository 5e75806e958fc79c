"""Take: one disk's external disk-only snapshot; and the frozen image as a backup's source
(full or delta, while its layer is intact)."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import libvirt

from ...contracts import BackupPlan, Consistency, PrimarySnapshot, Quiesce, VolumeRef
from ...errors import SourceGone
from ...storage.reader import QemuImageReader, image_chain, image_info
from ..base import BackupHistoryEntry
from ..quiesce import stopped_vm, without_quiesce
from .common import (
    RELEASED_SUFFIX,
    chain_paths,
    is_base,
    libvirt_error,
    overlay_path,
    snapshot_of_overlay,
)
from .intent import RedefinitionIntent
from .quiesce import guest_ready, thaw_if_frozen

_SNAPSHOT_FLAGS = (
    libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
    | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
)


class _FreezeFailed(Exception):
    """libvirt's quiesced snapshot failed at the freeze: it made nothing, and thawed."""

    def __init__(self, exc: libvirt.libvirtError) -> None:
        super().__init__(
            f"the guest's file systems could not be frozen ({exc.get_error_message()})"
        )


class _ThawFailed(Exception):
    """libvirt's quiesced snapshot was made, frozen, and then its thaw failed: libvirt
    reports the call failed (qemu_snapshot.c: a thaw error on an otherwise successful
    snapshot fails it) although every disk has its new overlay."""


def _is_agent_failure(exc: libvirt.libvirtError) -> bool:
    """The agent's part failed, not the snapshot's: libvirt gave up on an agent that does
    not answer, or the agent failed its ``guest-fsfreeze-*`` command (qemu_agent.c,
    qemuAgentCheckError: "unable to execute QEMU agent command 'guest-fsfreeze-freeze'").
    Only those: a path or a lock holder in the message must not count."""
    message = exc.get_error_message() or ""
    return (
        exc.get_error_code()
        in (
            libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
            libvirt.VIR_ERR_AGENT_UNSYNCED,
        )
        or "agent command 'guest-fsfreeze" in message
    )


def retried_consistency(quiesce: Quiesce, *, running: bool) -> tuple[Consistency, str | None]:
    """A retried take that finds its first attempt's overlay in the chain: a ``yes`` take
    only ever makes a quiesced one (or none); a ``try`` may have fallen back, and the
    attempt that knew is gone, so it says the less."""
    if quiesce == Quiesce.NO:
        return Consistency.CRASH, None
    if not running:
        return stopped_vm(quiesce)
    if quiesce == Quiesce.YES:
        return Consistency.APPLICATION, None
    return Consistency.CRASH, (
        "crash-consistent: a retried take cannot tell whether its first attempt froze the guest"
    )


class TakeOps(RedefinitionIntent):
    """Volume snapshots taken, and read back by their backups."""

    def _create_consistent(
        self,
        dom: libvirt.virDomain,
        vm: str,
        overlays: dict[str, str],
        memory: str | None,
        quiesce: Quiesce,
        *,
        running: bool,
    ) -> tuple[Consistency, str | None]:
        """:meth:`_create_external`, the guest frozen for it when ``quiesce`` asks and the
        agent answers (see :mod:`.quiesce`); the snapshot's consistency, and why when a
        ``try`` fell back."""
        if memory is not None and quiesce != Quiesce.NO and running:
            # libvirt quiesces disk-only snapshots only (qemu_snapshot.c requires DISK_ONLY
            # with QUIESCE); the saved memory holds what the disks do not, on resume.
            consistency, note = without_quiesce(
                quiesce,
                "libvirt quiesces disk-only snapshots; a DiskAndMemory snapshot holds the"
                " guest's memory instead, consistent when it is resumed",
            )
            self._create_external(dom, vm, overlays, memory)
            return consistency, note
        freeze, consistency, note = guest_ready(dom, vm, quiesce, running=running)
        if not freeze:
            self._create_external(dom, vm, overlays, memory)
            return consistency, note
        try:
            self._create_external(dom, vm, overlays, memory, quiesce=True)
        except _ThawFailed as failed:
            with contextlib.suppress(libvirt.libvirtError):
                dom.fsThaw()  # once more: the guest must not stay frozen
            return Consistency.APPLICATION, (
                f"frozen for the snapshot; the guest's thaw then reported an error ({failed})"
                " and it was thawed again"
            )
        except _FreezeFailed as failed:
            # yes: refused (libvirt's atomic snapshot made nothing, and thawed); try: taken
            # again without the freeze, and the record says why.
            consistency, note = without_quiesce(quiesce, f"VM {vm!r}: {failed}")
            self._create_external(dom, vm, overlays, memory)
            return consistency, note
        return Consistency.APPLICATION, None

    def _create_external(
        self,
        dom: libvirt.virDomain,
        vm: str,
        overlays: dict[str, str],
        memory: str | None,
        *,
        quiesce: bool = False,
    ) -> None:
        """One atomic libvirt external snapshot: the named disks get the named overlays
        (every other disk is left alone), and with ``memory`` the guest's RAM is saved there
        in libvirt's save-image format, which ``restoreFlags`` can resume later. With
        ``quiesce`` libvirt freezes the guest's file systems for it through the agent."""
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
        if quiesce:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        try:
            dom.snapshotCreateXML(ET.tostring(spec, encoding="unicode"), flags)
        except libvirt.libvirtError as exc:
            if quiesce and _is_agent_failure(exc):
                if all(self._active_source(dom, vm, d)[0] == o for d, o in overlays.items()):
                    raise _ThawFailed(exc.get_error_message()) from exc
                raise _FreezeFailed(exc) from exc
            raise libvirt_error(exc, vm=vm) from exc

    def take(
        self, *, volume: VolumeRef, snapshot_id: str, quiesce: Quiesce = Quiesce.NO
    ) -> PrimarySnapshot:
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
                consistency, note = self._create_consistent(
                    dom, vm, {disk: overlay}, None, quiesce, running=running
                )
                return PrimarySnapshot(
                    image=active,
                    image_format=fmt,
                    overlay=overlay,
                    virtual_size=size,
                    vm_was_running=running,
                    consistency=consistency,
                    consistency_note=note,
                )
            # A retried activity finds the overlay its first attempt made in the chain.
            if overlay not in chain_paths(self._chain(dom, vm, disk)):
                consistency, note = self._create_consistent(
                    dom, vm, {disk: overlay}, None, quiesce, running=running
                )
            else:
                consistency, note = retried_consistency(quiesce, running=running)
                if quiesce != Quiesce.NO and running:
                    thaw_if_frozen(dom)
            layers = self._chain(dom, vm, disk)
            frozen = layers[chain_paths(layers).index(overlay) + 1]
            return PrimarySnapshot(
                image=frozen.path,
                image_format=frozen.format,
                overlay=overlay,
                virtual_size=frozen.virtual_size,
                vm_was_running=running,
                consistency=consistency,
                consistency_note=note,
            )

    def check_volume(self, volume: VolumeRef) -> None:
        """The domain exists and has this file-backed disk (read-only: no lock needed)."""
        vm = volume.vm.name
        self._active_source(self._domain(vm), vm, volume.disk)

    # -- backup source ---------------------------------------------------------------------
    def plan_backup(
        self,
        source: PrimarySnapshot,
        backups: Sequence[BackupHistoryEntry],
        *,
        delta_max: int | None = None,
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
