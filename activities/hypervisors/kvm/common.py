"""Names, layer markers and libvirt facts every part of the KVM driver shares."""

from __future__ import annotations

from pathlib import Path

import libvirt

from ...errors import ChainBusy, HypervisorUnavailable, VmNotFound
from ...storage.reader import ImageLayer

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


def libvirt_error(exc: libvirt.libvirtError, *, vm: str) -> Exception:
    """The typed error for a libvirt failure on ``vm``."""
    code = exc.get_error_code()
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return VmNotFound(f"VM {vm!r} does not exist on this host")
    if code in (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE, libvirt.VIR_ERR_OPERATION_INVALID):
        return ChainBusy(f"VM {vm!r}: {exc.get_error_message()}")
    return HypervisorUnavailable(f"libvirt error on VM {vm!r}: {exc.get_error_message()}")
