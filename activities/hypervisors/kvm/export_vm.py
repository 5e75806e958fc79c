"""What the VMs that run on a backup share: a disk that is a local qcow2 overlay above the
backup's read-only NBD export, and a guest agent channel to see them come up.

The health check (:mod:`.boot_check`) and the instant restore (:mod:`.instant`) both start a
VM whose disk reads the backup through nbdkit and writes locally. The overlay is made with
its size given and its backing not opened (``qemu-img create -u``), its format and the
backing's (raw: the export is the disk's bytes) named, so nothing is probed. The domain
names the backing itself (``<backingStore type='network'>`` with an NBD source on a unix
socket, https://libvirt.org/formatdomain.html#hard-drives-floppy-disks-cdroms), so libvirt
does not read it from the overlay's header.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

AGENT_CHANNEL = "org.qemu.guest_agent.0"


def overlay_on_export(overlay: Path, socket: Path, size: int) -> None:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw"]
        + ["-b", f"nbd+unix:///?socket={socket}", str(overlay), str(size)],
        check=True,
        capture_output=True,
    )


def plain_domain(name: str, *, memory_mib: int, disk_target: str) -> tuple[ET.Element, ET.Element]:
    """A small VM booting from its one virtio disk (SeaBIOS), with a guest agent channel and
    no network: the domain and its disk element (no source yet)."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    devices = ET.SubElement(dom, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "target", dev=disk_target, bus="virtio")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind")
    ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
    return dom, disk


def on_export(disk: ET.Element, *, overlay: Path, socket: Path) -> None:
    """Point a disk element at the overlay, backed by the export (driver, source and
    backingStore first, as libvirt writes them)."""
    for child in list(disk):
        if child.tag in ("source", "backingStore", "driver"):
            disk.remove(child)
    disk.set("type", "file")
    disk.insert(0, ET.Element("driver", name="qemu", type="qcow2"))
    disk.insert(1, ET.Element("source", file=str(overlay)))
    backing = ET.Element("backingStore", type="network")
    ET.SubElement(backing, "format", type="raw")
    src = ET.SubElement(backing, "source", protocol="nbd")
    ET.SubElement(src, "host", transport="unix", socket=str(socket))
    disk.insert(2, backing)


def agent_error(dom: libvirt.virDomain) -> str | None:
    """None if the guest's QEMU agent answers a harmless question (its host name), else
    libvirt's reason (no channel, not connected, not answering, frozen). libvirt learns the
    agent connected a moment after the guest opened its port."""
    try:
        dom.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME, 0)
    except libvirt.libvirtError as exc:
        return exc.get_error_message() or str(exc)
    return None


def agent_answers(dom: libvirt.virDomain) -> bool:
    """The guest is up: its agent answers."""
    return agent_error(dom) is None
