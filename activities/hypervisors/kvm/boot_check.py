"""A health check: boot a throwaway VM from a backup and wait for a sign of life.

The backup is served read-only over NBD (storage/nbd_export.py: nbdkit reads the store on
demand, nothing is restored first) and the VM's disk is a local qcow2 overlay whose backing
is that export: the guest may write, its writes land in the overlay, and the backup is never
touched. The VM is transient (``virDomainCreateXML``: libvirt forgets it once destroyed),
with no network, its serial console in a file, and a virtio-serial channel for the QEMU
guest agent. The sign of life is the agent answering (``virDomainGetGuestInfo``), or a
console line the operator names. Whatever happens, the VM is destroyed and the overlay,
console file and export removed; a check run again after a crash first destroys what the
crashed one left (the VM's and the overlay's names derive from the snapshot ID).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from ...contracts import BootCheck, BootCheckOptions
from ...errors import HypervisorUnavailable
from ...storage.nbd_export import serving

POLL_S = 0.2


def check_domain_name(snapshot_id: str) -> str:
    return f"snapferry-check-{snapshot_id}"


def domain_xml(name: str, *, overlay: Path, socket: Path, console: Path, memory_mib: int) -> str:
    """The throwaway VM: the overlay above the NBD export (``<backingStore>`` given, so
    libvirt does not read it from the header, https://libvirt.org/formatdomain.html#hard-drives-floppy-disks-cdroms),
    booting from it (SeaBIOS), console to a file, agent channel, no network."""
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
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=str(overlay))
    backing = ET.SubElement(disk, "backingStore", type="network")
    ET.SubElement(backing, "format", type="raw")
    src = ET.SubElement(backing, "source", protocol="nbd")
    ET.SubElement(src, "host", transport="unix", socket=str(socket))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def clear_leftovers(conn: libvirt.virConnect, snapshot_id: str, work: Path) -> None:
    """Destroy the VM and remove the files a crashed check of this snapshot left."""
    with contextlib.suppress(libvirt.libvirtError):
        dom = conn.lookupByName(check_domain_name(snapshot_id))
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()
    for path in work.glob(f"{snapshot_id}.*"):
        path.unlink(missing_ok=True)


def _agent_answers(dom: libvirt.virDomain) -> bool:
    try:
        dom.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_HOSTNAME, 0)
    except libvirt.libvirtError:
        return False
    return True


def _console_match(console: Path, pattern: re.Pattern[str]) -> str | None:
    if not console.exists():
        return None
    text = console.read_bytes().decode(errors="replace").replace("\r", "")
    return next((line for line in text.split("\n") if pattern.search(line)), None)


def _tail(console: Path, lines: int = 5) -> str:
    if not console.exists():
        return ""
    text = console.read_bytes()[-4096:].decode(errors="replace").replace("\r", "")
    return " | ".join(line for line in text.split("\n")[-lines:] if line.strip())


def check_boot(
    conn: libvirt.virConnect,
    snapshot_id: str,
    manifest_path: str,
    options: BootCheckOptions,
    *,
    work: Path,
    beat: Callable[[], None] = lambda: None,
) -> BootCheck:
    """Boot the backup in a throwaway VM; the outcome (never raises for a guest that does
    not boot: that is a failed check, not a failed activity)."""
    work.mkdir(parents=True, exist_ok=True)
    clear_leftovers(conn, snapshot_id, work)
    overlay = work / f"{snapshot_id}.qcow2"
    console = work / f"{snapshot_id}.console"
    pattern = re.compile(options.console_line) if options.console_line else None
    at = datetime.now(UTC)
    with serving(manifest_path) as export:
        assert export.socket is not None
        # The size is given and the backing not opened (-u): qemu-img never probes it, and
        # its format is named (raw: the export is the disk's bytes).
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw"]
            + ["-b", export.uri, str(overlay), str(export.size)],
            check=True,
            capture_output=True,
        )
        name = check_domain_name(snapshot_id)
        xml = domain_xml(
            name,
            overlay=overlay,
            socket=export.socket,
            console=console,
            memory_mib=options.memory_mib,
        )
        try:
            try:
                dom = conn.createXML(xml, 0)
            except libvirt.libvirtError as exc:
                raise HypervisorUnavailable(
                    f"the check VM did not start: {exc.get_error_message()}"
                ) from exc
            t0 = time.monotonic()
            deadline = t0 + options.timeout_s
            while time.monotonic() < deadline:
                beat()
                if pattern is not None:
                    line = _console_match(console, pattern)
                    if line is not None:
                        return BootCheck(
                            ok=True,
                            at=at,
                            seconds=time.monotonic() - t0,
                            sign=f"console line {line.strip()!r}",
                        )
                elif _agent_answers(dom):
                    return BootCheck(
                        ok=True, at=at, seconds=time.monotonic() - t0, sign="the guest agent"
                    )
                if not dom.isActive():
                    return BootCheck(
                        ok=False,
                        at=at,
                        seconds=time.monotonic() - t0,
                        detail=f"the VM stopped by itself; console: {_tail(console)}",
                    )
                time.sleep(POLL_S)
            waited = (
                "a console line matching " + repr(options.console_line)
                if pattern
                else ("the guest agent")
            )
            tail = _tail(console)
            return BootCheck(
                ok=False,
                at=at,
                seconds=options.timeout_s,
                detail=f"no sign of life ({waited}) within {options.timeout_s:.0f} s"
                + (f"; console: {tail}" if tail else "; the console stayed empty"),
            )
        finally:
            clear_leftovers(conn, snapshot_id, work)
