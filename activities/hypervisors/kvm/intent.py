"""The redefinition intent: what an offline top merge records before it points a stopped
domain's definition at the merged base, and how the next operation under the domain lock
settles one that a killed worker left half done."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import libvirt

from ...errors import InvalidInput
from ...storage.files import atomic_write
from ...storage.reader import ImageLayer
from ..domain_lock import lock_path as domain_lock_path
from .connection import KvmConnection


def _stamp(path: str) -> list[int]:
    """What changes when anyone writes a file: its modification time and size."""
    st = os.stat(path)
    return [st.st_mtime_ns, st.st_size]


class RedefinitionIntent(KvmConnection):
    """The domain under its lock, with an interrupted redefinition settled first."""

    @contextlib.contextmanager
    def _locked_domain(self, vm: str) -> Iterator[libvirt.virDomain]:
        """The VM's domain, under its lock, with any definition change a killed worker left
        half done put right first (:meth:`_finish_interrupted_redefinition`), so that no
        operation starts from a definition that could lose the guest's writes."""
        with self._lock(vm):
            dom = self._domain(vm)
            self._finish_interrupted_redefinition(dom, vm)
            yield dom

    def _intent_path(self, vm: str) -> Path:
        return domain_lock_path(self.lock_dir, vm).with_suffix(".redefine.json")

    def _record_intent(self, vm: str, disk: str, *, top: ImageLayer, base: ImageLayer) -> None:
        """Write, durably, what :meth:`_finish_interrupted_redefinition` needs to settle an
        offline top merge of ``top`` into ``base``: both files, ``top``'s format, and each
        file's stamp right after the commit, when both read the same."""
        intent: dict[str, object] = {"disk": disk, "top": top.path, "top_format": top.format}
        intent |= {
            "base": base.path,
            "top_stamp": _stamp(top.path),
            "base_stamp": _stamp(base.path),
        }
        atomic_write(self._intent_path(vm), json.dumps(intent))

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
