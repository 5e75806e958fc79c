"""Release: a snapshot's overlay kept as the next delta's base or marked released, then the
disk's chain consolidated (every run of released layers that nothing reads through merged,
see :mod:`.merge`); and the discard of what a failed take left."""

from __future__ import annotations

import glob
from pathlib import Path

import libvirt

from ...contracts import DiscardRequest, PrimarySnapshot, VolumeRef
from ...errors import VmNotFound
from .common import (
    BASE_SUFFIX,
    MARKERS,
    OVERLAY_TAG,
    RELEASED_SUFFIX,
    VM_SUFFIX,
    chain_paths,
    is_base,
    is_released,
    marked,
    may_be_read,
    memory_paths,
    overlay_path,
)
from .merge import MergeOps


class ReleaseOps(MergeOps):
    """Which layers may go, and when; :class:`MergeOps` merges them."""

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

    @classmethod
    def _remove_merged_leftovers(cls, chain: list[str]) -> None:
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
                    cls._forget(layer)
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
