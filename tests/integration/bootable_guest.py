"""A disk that really boots: BIOS, boot sector, boot loader, kernel, and a guest agent.

Built from Debian packages, offline, in seconds, with no loop device or mount:

- an MBR with SYSLINUX's boot code (``/usr/lib/SYSLINUX/mbr.bin``, package ``syslinux``)
  and two partitions (``sfdisk``);
- partition 1, FAT (``mkfs.vfat``), bootable: SYSLINUX installed into it by
  ``syslinux --install`` (its ``ldlinux.sys`` and ``ldlinux.c32``), ``syslinux.cfg``, Debian's
  cloud kernel and an initramfs of busybox, the virtio modules and ``qemu-ga``, copied in
  with ``mcopy`` (mtools) — the FAT variant of the SYSLINUX family, since ``extlinux`` needs
  the file system mounted;
- partition 2, ext4 made from a directory of known files (``mkfs.ext4 -d``).

The guest's ``/init`` mounts partition 2, prints ``BOOTED`` on the serial console and starts
the guest agent, so a health check has two signs of life to wait for: the line, and the agent
answering. A damaged boot sector boots nothing: the BIOS finds no bootable disk.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import libvirt

from . import agent_guest as ag
from .guest import CMDLINE, ERROR_TAG, build_initramfs, find_kernel, init_preamble

MBR = Path("/usr/lib/SYSLINUX/mbr.bin")
MIB = 1024 * 1024
BOOT_START = MIB
BOOT_SIZE = 40 * MIB
BOOTED = "SNAPFERRY GUEST BOOTED"

INIT = (
    init_preamble(ag.AGENT_MODULES)
    + f"""i=0
while [ ! -b /dev/vda2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o ro /dev/vda2 /mnt || echo "{ERROR_TAG} mount /dev/vda2"
echo "{BOOTED}"
port=""
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename $p)
done
if [ -n "$port" ]; then
  while [ ! -c "$port" ]; do sleep 0.1; done
  /usr/sbin/qemu-ga -d -m virtio-serial -p "$port" -t /run -f /run/qga.pid
fi
while :; do sleep 3600; done
"""
)

SYSLINUX_CFG = f"""DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND {CMDLINE}
"""


def _run(*cmd: str, **kw) -> None:  # type: ignore[no-untyped-def]
    subprocess.run(list(cmd), check=True, capture_output=True, **kw)


def build_bootable_disk(path: Path, files: dict[str, bytes], *, size: int = 64 * MIB) -> Path:
    """A raw disk of ``size`` bytes that boots under SeaBIOS, with ``files`` (path: bytes)
    on its ext4 partition."""
    work = path.with_name(path.name + ".build")
    work.mkdir()
    try:
        kernel, version = find_kernel()
        initrd = build_initramfs(
            work / "initrd.gz", version, init=INIT, modules=ag.AGENT_MODULES, files=ag.agent_files()
        )
        (work / "syslinux.cfg").write_text(SYSLINUX_CFG)
        boot = work / "boot.img"
        with open(boot, "wb") as f:
            f.truncate(BOOT_SIZE)
        _run("mkfs.vfat", "-n", "SFBOOT", str(boot))
        _run("syslinux", "--install", str(boot))
        for name, src in (("vmlinuz", kernel), ("initrd.gz", initrd)):
            _run("mcopy", "-i", str(boot), str(src), f"::/{name}")
        _run("mcopy", "-i", str(boot), str(work / "syslinux.cfg"), "::/syslinux.cfg")

        tree = work / "tree"
        for rel, data in files.items():
            target = tree / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        tree.mkdir(exist_ok=True)
        root_start = BOOT_START + BOOT_SIZE
        root = work / "root.img"
        with open(root, "wb") as f:
            f.truncate(size - root_start - MIB)  # the last MiB stays free
        _run("mkfs.ext4", "-q", "-F", "-L", "sfroot", "-d", str(tree), str(root))

        with open(path, "wb") as f:
            f.truncate(size)
        table = (
            "label: dos\n"
            f"start={BOOT_START // 512}, size={BOOT_SIZE // 512}, type=6, bootable\n"
            f"start={root_start // 512}, size={root.stat().st_size // 512}, type=83\n"
        )
        _run("sfdisk", "-q", str(path), input=table.encode())
        with open(path, "r+b") as disk:
            disk.write(MBR.read_bytes()[:440])  # the boot code; the table follows at 446
            for offset, image in ((BOOT_START, boot), (root_start, root)):
                disk.seek(offset)
                with open(image, "rb") as src:
                    while chunk := src.read(4 * MIB):
                        if chunk.count(0) == len(chunk):
                            disk.seek(len(chunk), os.SEEK_CUR)  # a hole stays a hole
                        else:
                            disk.write(chunk)
            disk.flush()
            os.fsync(disk.fileno())
        return path
    finally:
        for p in sorted(work.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        work.rmdir()


def damage_boot_sector(path: Path) -> None:
    """Zero the MBR's boot code and signature: the BIOS then finds nothing to boot."""
    with open(path, "r+b") as disk:
        disk.write(b"\0" * 440)
        disk.seek(510)
        disk.write(b"\0\0")


def define_bootable_vm(
    conn: libvirt.virConnect,
    directory: Path,
    files: dict[str, bytes],
    *,
    prefix: str = "sf-boot",
    damaged: bool = False,
    console: Path | None = None,
    devices: str = "",
) -> str:
    """A stopped VM on a qcow2 copy of a bootable disk (its boot sector zeroed if asked),
    with a guest agent channel, its serial console to ``console`` if given, and the
    libvirt device elements in ``devices``."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True, exist_ok=True)
    raw = build_bootable_disk(directory / f"{name}.raw", files)
    if damaged:
        damage_boot_sector(raw)
    disk = directory / f"{name}-vda.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True
    )
    raw.unlink()
    serial = (
        f"<serial type='file'><source path='{console}'/><target port='0'/></serial>"
        if console is not None
        else ""
    )
    conn.defineXML(
        f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>
  <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
  <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>{serial}{devices}
  <channel type='unix'><source mode='bind'/>
  <target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>"""
    )
    return name


def destroy_vms(conn: libvirt.virConnect, *names: str) -> None:
    """Destroy and undefine the named VMs that exist."""
    for name in names:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            continue
        if dom.isActive():
            dom.destroy()
        dom.undefine()
