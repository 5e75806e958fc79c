"""Merges: block commits on a running domain (active with pivot, or of a middle run),
``qemu-img commit`` on a stopped one, and the adoption of a block job a killed worker left
running. What to merge is decided in :mod:`.release`."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import libvirt

from ...errors import ChainBusy
from ...storage.reader import ImageLayer, run_qemu_img
from .common import chain_paths, is_released, libvirt_error
from .intent import RedefinitionIntent


def _keep_size(base: ImageLayer, size: int) -> None:
    """After the top of a disk is committed into ``base``, the disk keeps the top's size.

    QEMU's commit only ever grows the base (block/commit.c: the base is truncated up to
    the top's length, never down), so a top made smaller than the layer below it (a revert
    to a snapshot from before a resize gives the disk the snapshot's size) would grow back
    and show the tail written before the revert. The live path shrinks with a block resize
    after the pivot, the offline one here."""
    if base.virtual_size > size:
        run_qemu_img("resize", "-q", "--shrink", "-f", base.format, base.path, str(size))


class MergeOps(RedefinitionIntent):
    """How one run of released layers is committed into the image below it."""

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
            raise libvirt_error(exc, vm=vm) from exc
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
            raise libvirt_error(exc, vm=vm) from exc
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
        self._record_intent(vm, disk, top=top, base=base)
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
            raise libvirt_error(exc, vm=vm) from exc
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
