"""A small TCG domain with a qcow2 disk full of known data: the demo's VM and the tests'.

It boots no OS (it loops in the BIOS), which is all a disk-snapshot test needs; guest writes
are simulated through the QEMU monitor's ``qemu-io``, which writes through the VM's own
block layer exactly as a guest would.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import libvirt
import libvirt_qemu

from snapferry.activities.hypervisors.kvm import quiet_libvirt

quiet_libvirt()  # no raw "libvirt: ... error" line from a lookup of a VM not made yet

MIB = 1024 * 1024


def domain_xml(name: str, disk: Path, *, target: str = "vda", disk_format: str = "qcow2") -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{disk_format}'/>
      <source file='{disk}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


def write_random_image(path: Path, *, size: int, data_bytes: int, seed: int = 0) -> Path:
    """A qcow2 image whose first ``data_bytes`` are random and the rest a hole.

    Returns the raw reference file (kept next to it) so that tests can compare bytes.
    """
    raw = path.with_suffix(".reference.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        rng = __import__("random").Random(seed)
        left = data_bytes
        while left > 0:
            n = min(left, 16 * MIB)
            f.write(rng.randbytes(n))
            left -= n
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
        check=True,
    )
    return raw


@dataclass
class DemoVm:
    conn: libvirt.virConnect
    name: str
    disk: Path
    reference: Path | None

    @property
    def domain(self) -> libvirt.virDomain:
        return self.conn.lookupByName(self.name)

    def guest_write(self, *, pattern: int, offset: int, length: int, target: str = "vda") -> None:
        """Write through the running VM's block layer, as the guest would."""
        cmd = (
            f"qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "
            f'"write -P {pattern:#x} {offset} {length}"'
        )
        out = libvirt_qemu.qemuMonitorCommand(self.domain, cmd, 1)
        if out.strip():
            raise RuntimeError(f"guest write failed: {out.strip()}")

    def destroy(self) -> None:
        """Destroy and undefine the domain, then delete every file its disk chain made."""
        try:
            dom = self.domain
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        except libvirt.libvirtError:
            pass
        for p in self.disk.parent.glob(self.disk.name + "*"):
            p.unlink(missing_ok=True)
        if self.reference:
            self.reference.unlink(missing_ok=True)


def create_vm(
    conn: libvirt.virConnect,
    *,
    name: str,
    directory: Path,
    size: int,
    data_bytes: int,
    start: bool = True,
    seed: int = 0,
) -> DemoVm:
    directory.mkdir(parents=True, exist_ok=True)
    disk = directory / f"{name}-vda.qcow2"
    for stale in directory.glob(disk.name + "*"):
        stale.unlink()
    reference = write_random_image(disk, size=size, data_bytes=data_bytes, seed=seed)
    try:
        old = conn.lookupByName(name)
        if old.isActive():
            old.destroy()
        old.undefine()
    except libvirt.libvirtError:
        pass
    dom = conn.defineXML(domain_xml(name, disk))
    if start:
        dom.create()
    os.sync()
    return DemoVm(conn=conn, name=name, disk=disk, reference=reference)


def write_thin_image(path: Path, *, size: int, writes: list[tuple[int, int, int]]) -> Path:
    """A thin qcow2 image of ``size`` bytes holding only ``writes`` (offset, length,
    pattern byte), written with ``qemu-io``: nothing else is ever allocated, so a 256 GiB
    volume with 512 MiB of data takes 512 MiB. Formats are always given, never probed."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
        check=True,
        capture_output=True,
    )
    script = "".join(
        f"write -P {pattern:#x} {offset} {length}\n" for offset, length, pattern in writes
    )
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", str(path)], input=script, capture_output=True, text=True
    )
    if proc.returncode != 0 or "error" in proc.stdout.lower():
        raise RuntimeError(f"qemu-io failed: {proc.stdout} {proc.stderr}")
    return path


def create_thin_vm(
    conn: libvirt.virConnect,
    *,
    name: str,
    directory: Path,
    size: int,
    writes: list[tuple[int, int, int]],
    start: bool = True,
) -> DemoVm:
    """A domain whose disk is a large thin qcow2 (see :func:`write_thin_image`); it has no
    raw reference file (compare with ``qemu-img compare -f raw -F qcow2`` instead)."""
    directory.mkdir(parents=True, exist_ok=True)
    disk = directory / f"{name}-vda.qcow2"
    for stale in directory.glob(disk.name + "*"):
        stale.unlink()
    write_thin_image(disk, size=size, writes=writes)
    dom = conn.defineXML(domain_xml(name, disk))
    if start:
        dom.create()
    os.sync()
    return DemoVm(conn=conn, name=name, disk=disk, reference=None)
