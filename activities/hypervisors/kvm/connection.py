"""The driver's libvirt connection, its view of a domain's disks, and the domain lock."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET

import libvirt

from ...errors import DiskNotFound, HypervisorUnavailable, InvalidInput
from ...settings import Settings
from ...storage.reader import ImageLayer, image_chain
from ..base import HypervisorDriver
from ..domain_lock import domain_lock
from .common import libvirt_error


class KvmConnection(HypervisorDriver):
    """What every KVM operation stands on: libvirt, the domain's file-backed disks and
    their chains, the per-domain lock, and a stopped domain's disk redefinition."""

    def __init__(self, settings: Settings) -> None:
        self.uri = settings.libvirt_uri
        self.lock_dir = settings.lock_dir
        self.lock_timeout_s = settings.domain_lock_timeout_s
        self.incremental = settings.kvm_incremental
        self.delta_max = settings.delta_max
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()

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
            raise libvirt_error(exc, vm=vm) from exc

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

    def _file_disks(self, dom: libvirt.virDomain, vm: str) -> dict[str, str]:
        """Every file-backed disk of the VM, with its active image."""
        return {d: self._active_source(dom, vm, d)[0] for d in self._disks(dom)}

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
            raise libvirt_error(exc, vm=vm) from exc
