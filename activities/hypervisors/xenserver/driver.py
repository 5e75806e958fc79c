"""The XenServer driver: take, plan and read backups, release and discard."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from ...contracts import (
    BackupPlan,
    DiscardRequest,
    PrimarySnapshot,
    Quiesce,
    VolumeRef,
)
from ...errors import (
    HypervisorUnavailable,
    SourceGone,
)
from ..base import BackupHistoryEntry, HypervisorDriver
from .common import (
    RELEASED,
    SNAPSHOT_KEY,
    TAKE_KEY,
    TAKE_TASK_KEY,
    VOLUME_PREFIX,
    _vm_locks,
)
from .export import VhdExportReader
from .restore import RestoreOps
from .vmsnap import VmSnapshotOps

log = logging.getLogger(__name__)


class XenServerDriver(RestoreOps, VmSnapshotOps, HypervisorDriver):
    """XenServer through XenAPI (see the package docstring)."""

    # -- take --------------------------------------------------------------------------------
    def take(
        self, *, volume: VolumeRef, snapshot_id: str, quiesce: Quiesce = Quiesce.NO
    ) -> PrimarySnapshot:
        vm_name = volume.vm.name
        vm = self._vm(vm_name)
        with _vm_locks[vm]:
            consistency, note = self._consistency(vm, quiesce)
            vdi = self._vdi(vm, vm_name, volume.disk)
            label = VOLUME_PREFIX + snapshot_id
            what = f"snapshot of {vm_name}/{volume.disk}"
            snap = self._snapshot_vdis(vdi).get(label)  # a retry after the label was set
            task = None
            if snap is None:
                snap, task = self._unfinished_take(vdi, snapshot_id, what)
            if snap is None:
                self._assert_chain_room(vdi, what)
                snap, task = self._snapshot_marked(vdi, snapshot_id, what)
            # Ours from here on: marked on the snapshot itself, as Xen Orchestra marks its
            # snapshots after it made them (_AbstractXapi.mjs, _snapshot), and labelled.
            # Until then the source's marks and the task stay, for a retry to finish.
            self._api("VDI.set_name_label", snap, label)
            self._api("VDI.remove_from_other_config", snap, SNAPSHOT_KEY)
            self._api("VDI.add_to_other_config", snap, SNAPSHOT_KEY, snapshot_id)
            self._unmark(snap)
            self._unmark(vdi)
            if task is not None:
                with contextlib.suppress(HypervisorUnavailable, SourceGone):
                    self._api("task.destroy", task)
            self._unmark_inherited(vdi, snapshot_id)
            size = int(self._api("VDI.get_virtual_size", snap))
            return PrimarySnapshot(
                image=str(self._api("VDI.get_uuid", snap)),
                image_format="vhd",
                overlay=None,
                virtual_size=size,
                vm_was_running=self._power(vm) == "Running",
                consistency=consistency,
                consistency_note=note,
            )

    def _snapshot_marked(self, vdi: str, snapshot_id: str, what: str) -> tuple[str, str]:
        """``Async.VDI.snapshot`` with the source marked ``TAKE_KEY = <id>`` and
        ``TAKE_TASK_KEY = <task>`` for as long as its outcome is unknown, so that a take
        that stops before it has its snapshot in hand (a crash, a broken poll) is finished
        by its retry: the task names the snapshot. The marks are inherited by any snapshot
        made of the VDI meanwhile, ours or another client's (``xapi_vdi.ml``
        ``snapshot_and_clone`` copies the other_config it read when it began); they are
        hints for the retry only, never a reason to adopt or destroy a VDI."""
        self._unmark(vdi)
        self._api("VDI.add_to_other_config", vdi, TAKE_KEY, snapshot_id)
        task = str(self._api("Async.VDI.snapshot", vdi, {}))
        since = self.session.generation
        try:
            with contextlib.suppress(HypervisorUnavailable, SourceGone):
                self._api("VDI.add_to_other_config", vdi, TAKE_TASK_KEY, task)
            snap = self._wait(task, what, keep=True, undo=self._destroy_unlabelled, since=since)
        except BaseException:
            # it failed for sure: nothing to finish (a task lost to a master change may
            # have made its snapshot: the marks stay for the retry to find it)
            if not self._task_pending(task, since):
                with contextlib.suppress(HypervisorUnavailable, SourceGone):
                    self._unmark(vdi)
            raise
        return snap, task

    def _destroy_unlabelled(self, snap: str) -> None:
        """A snapshot the take's task made although the take was cancelled: no one holds
        it, and nothing labels it ours yet."""
        self._run("VDI.destroy", snap, cancellable=False)

    def _task_pending(self, task: str, since: int | None) -> bool:
        """Whether a task still exists and has not ended (True when XAPI cannot be asked,
        or lost it with the master it ran on: the retry will look)."""
        try:
            return self._task_api("task.get_status", task, since) in ("pending", "cancelling")
        except SourceGone:
            return False
        except HypervisorUnavailable:
            return True

    def _unfinished_take(
        self, vdi: str, snapshot_id: str, what: str
    ) -> tuple[str | None, str | None]:
        """The snapshot of a take of ``snapshot_id`` that stopped before it had it in hand:
        the one its task (still on the source's marks) made, waited for if still running.
        When the task is gone (XAPI keeps an ended task 65 minutes), a snapshot that
        inherited the mark is taken only if it is the only one, belongs to no VM snapshot
        (a VM snapshot's disks have VBDs) and is no one else's: two candidates could be
        ours and another tool's, and neither is touched."""
        marks = self._api("VDI.get_other_config", vdi)
        if marks.get(TAKE_KEY) != snapshot_id:
            return None, None
        snap: str | None = None
        task = marks.get(TAKE_TASK_KEY)
        if task:
            since = self.session.generation
            try:
                snap = self._wait(task, what, keep=True, undo=self._destroy_unlabelled, since=since)
            except SourceGone:
                snap = task = None  # the task is gone; look at what inherited the mark
            except BaseException:
                if not self._task_pending(task, since):
                    self._unmark(vdi)  # that snapshot failed: take a new one
                raise
        if snap is None:
            candidates = [
                one
                for one in self._api("VDI.get_snapshots", vdi)
                if self._api("VDI.get_other_config", one).get(TAKE_KEY) == snapshot_id
                and SNAPSHOT_KEY not in self._api("VDI.get_other_config", one)
                and not self._api("VDI.get_VBDs", one)
            ]
            if len(candidates) == 1:
                snap = candidates[0]
            elif candidates:
                log.warning(
                    "%s: %d snapshots inherited the mark of take %s and its task is gone;"
                    " none is adopted (one may be another tool's)",
                    what,
                    len(candidates),
                    snapshot_id,
                )
        if snap is None:
            self._unmark(vdi)
        return snap, task

    def _unmark(self, vdi: str) -> None:
        for key in (TAKE_KEY, TAKE_TASK_KEY):
            self._api("VDI.remove_from_other_config", vdi, key)

    def _unmark_inherited(self, vdi: str, snapshot_id: str) -> None:
        """Another client's snapshot taken while this take ran (Xen Orchestra, XenCenter,
        a VM snapshot) inherited its marks: they go, so that nothing reads them later."""
        for one in self._api("VDI.get_snapshots", vdi):
            marks = self._api("VDI.get_other_config", one)
            if marks.get(TAKE_KEY) == snapshot_id and SNAPSHOT_KEY not in marks:
                with contextlib.suppress(HypervisorUnavailable, SourceGone):
                    self._unmark(one)

    # -- backup --------------------------------------------------------------------------------
    def _exists(self, vdi_uuid: str) -> bool:
        try:
            self._api("VDI.get_by_uuid", vdi_uuid)
        except SourceGone:
            return False
        return True

    def plan_backup(
        self,
        source: PrimarySnapshot,
        backups: Sequence[BackupHistoryEntry],
        *,
        delta_max: int | None = None,
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
                    self._run("VDI.destroy", ours[label])
                return
            if label in ours:
                self._api("VDI.set_name_description", ours[label], RELEASED)
            for other, ref in ours.items():
                if other == label:
                    continue
                if self._api("VDI.get_name_description", ref) == RELEASED:
                    self._run("VDI.destroy", ref)

    def discard(self, req: DiscardRequest) -> None:
        vm = self._vm(req.vm.name)
        with _vm_locks[vm]:
            for vdi in self._vdis(vm).values():
                snap = self._snapshot_vdis(vdi).get(VOLUME_PREFIX + req.snapshot_id)
                if snap is not None:
                    self._run("VDI.destroy", snap)
            self._destroy_vm_snapshot(vm, req.snapshot_id)
