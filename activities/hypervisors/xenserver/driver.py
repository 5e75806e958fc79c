"""The XenServer driver: take, plan and read backups, release and discard."""

from __future__ import annotations

import contextlib

from ...contracts import (
    BackupPlan,
    DiscardRequest,
    PrimarySnapshot,
    VolumeRef,
)
from ...errors import (
    HypervisorUnavailable,
    SourceGone,
)
from ...storage.secondary import Manifest
from ..base import HypervisorDriver
from .common import (
    RELEASED,
    TAKE_KEY,
    VOLUME_PREFIX,
    _vm_locks,
)
from .export import VhdExportReader
from .restore import RestoreOps
from .vmsnap import VmSnapshotOps


class XenServerDriver(RestoreOps, VmSnapshotOps, HypervisorDriver):
    """XenServer through XenAPI (see the package docstring)."""

    # -- take --------------------------------------------------------------------------------
    def take(self, *, volume: VolumeRef, snapshot_id: str) -> PrimarySnapshot:
        vm_name = volume.vm.name
        vm = self._vm(vm_name)
        with _vm_locks[vm]:
            vdi = self._vdi(vm, vm_name, volume.disk)
            label = VOLUME_PREFIX + snapshot_id
            snap = self._snapshot_vdis(vdi).get(label)  # a retry finds it
            if snap is None:
                # Mark the source first: the snapshot inherits its other_config at the
                # instant it is made, so a take that stops before the label is set still
                # finds its snapshot on the retry (see _snapshot_vdis).
                self._api("VDI.remove_from_other_config", vdi, TAKE_KEY)
                self._api("VDI.add_to_other_config", vdi, TAKE_KEY, snapshot_id)
                try:
                    task = self._api("Async.VDI.snapshot", vdi, {})
                    snap = self._wait(task, f"snapshot of {vm_name}/{volume.disk}")
                finally:
                    with contextlib.suppress(HypervisorUnavailable, SourceGone):
                        self._api("VDI.remove_from_other_config", vdi, TAKE_KEY)
                self._api("VDI.set_name_label", snap, label)
            size = int(self._api("VDI.get_virtual_size", snap))
            return PrimarySnapshot(
                image=str(self._api("VDI.get_uuid", snap)),
                image_format="vhd",
                overlay=None,
                virtual_size=size,
                vm_was_running=self._power(vm) == "Running",
            )

    # -- backup --------------------------------------------------------------------------------
    def _exists(self, vdi_uuid: str) -> bool:
        try:
            self._api("VDI.get_by_uuid", vdi_uuid)
        except SourceGone:
            return False
        return True

    def plan_backup(
        self, source: PrimarySnapshot, backups: list[Manifest], *, delta_max: int | None = None
    ) -> BackupPlan:
        """A delta on the newest backup while its VDI is on primary and the chain is short
        enough (``snapshot.delta.max``), else a full, saying why."""
        if not backups:
            return BackupPlan(reason="the volume's first backup")
        newest = backups[-1]
        limit = self.delta_max if delta_max is None else delta_max
        if newest.depth + 1 > limit:
            return BackupPlan(
                reason=f"{newest.depth} deltas since the last full (delta max {limit})"
            )
        if not self._exists(newest.source):
            return BackupPlan(
                reason=f"the base snapshot {newest.snapshot_id}'s VDI is no longer on primary"
            )
        for uuid in (source.image, newest.source):
            image_format = self._image_format(uuid)
            if image_format != "vhd":
                # vhd-tool computes differences only between VHDs (vhd_tool_wrapper.ml,
                # send): a delta would fail after the 200, every time.
                return BackupPlan(
                    reason=f"VDI {uuid} is {image_format}, not VHD: no delta is possible"
                )
        return BackupPlan(
            parent=newest.snapshot_id, base_image=newest.source, depth=newest.depth + 1
        )

    def _image_format(self, uuid: str) -> str:
        """``sm_config['image-format']`` (XCP-ng 8.3: ``vhd``, ``qcow2``), else SM's
        ``vdi_type`` (``vhd``, ``aio``/``raw`` for a raw VDI); ``vhd`` when neither says."""
        ref = self._api("VDI.get_by_uuid", uuid)
        config = self._api("VDI.get_sm_config", ref) or {}
        value = str(config.get("image-format") or config.get("vdi_type") or "vhd").lower()
        return value

    def open_reader(self, source: PrimarySnapshot, plan: BackupPlan) -> VhdExportReader:
        return VhdExportReader(self.session, source.image, plan.base_image)

    # -- release / discard -----------------------------------------------------------------
    def release(
        self,
        *,
        volume: VolumeRef,
        snapshot_id: str,
        source: PrimarySnapshot,
        backed_up: bool = True,
    ) -> None:
        """Keep this (the newest backed-up) snapshot as the next delta base; destroy every
        other snapshot of the volume that was released before. A snapshot deleted without
        a backup can be no one's base: only its own VDI goes, and the base stays."""
        vm_name = volume.vm.name
        vm = self._vm(vm_name)
        with _vm_locks[vm]:
            vdi = self._vdi(vm, vm_name, volume.disk)
            ours = self._snapshot_vdis(vdi)
            label = VOLUME_PREFIX + snapshot_id
            if not backed_up:
                if label in ours:
                    self._api("VDI.destroy", ours[label])
                return
            if label in ours:
                self._api("VDI.set_name_description", ours[label], RELEASED)
            for other, ref in ours.items():
                if other == label:
                    continue
                if self._api("VDI.get_name_description", ref) == RELEASED:
                    self._api("VDI.destroy", ref)

    def discard(self, req: DiscardRequest) -> None:
        vm = self._vm(req.vm.name)
        with _vm_locks[vm]:
            for vdi in self._vdis(vm).values():
                snap = self._snapshot_vdis(vdi).get(VOLUME_PREFIX + req.snapshot_id)
                if snap is not None:
                    self._api("VDI.destroy", snap)
            self._destroy_vm_snapshot(vm, req.snapshot_id)
