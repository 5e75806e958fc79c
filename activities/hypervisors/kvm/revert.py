"""Revert: a stopped VM's volume made to read as a volume snapshot, from its frozen image
while that is intact on primary, else restored from its verified backup; and the revert
layer (built and verified beside the active image, then swapped in) that VM-snapshot
reverts use too."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import libvirt

from ...contracts import PrimarySnapshot, RevertRequest
from ...errors import ChainBusy, InvalidInput
from ...storage.files import fsync_replace
from ...storage.reader import ImageLayer, image_info, run_qemu_img
from .common import IMAGE_MODE, RELEASED_SUFFIX, chain_paths
from .intent import RedefinitionIntent


@dataclass(frozen=True)
class RevertLayer:
    """A verified revert layer waiting beside the active image it will replace."""

    partial: str
    active: str
    active_format: str


class RevertOps(RedefinitionIntent):
    """A disk made to read as a snapshot, never touching what the VM uses until verified."""

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
                from ...storage.backup_image import backup_image

                with backup_image(req.manifest_path) as raw:
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
