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
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from ...contracts import BootCheck, BootCheckOptions
from ...errors import HypervisorUnavailable
from ...storage.nbd_export import serving
from .export_vm import agent_answers, on_export, overlay_on_export, plain_domain

POLL_S = 0.2


def check_domain_name(snapshot_id: str) -> str:
    return f"snapferry-check-{snapshot_id}"


def domain_xml(name: str, *, overlay: Path, socket: Path, console: Path, memory_mib: int) -> str:
    """The throwaway VM: the overlay above the NBD export, its console to a file; it is
    destroyed if it powers off, reboots or crashes."""
    dom, disk = plain_domain(name, memory_mib=memory_mib, disk_target="vda")
    on_export(disk, overlay=overlay, socket=socket)
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = dom.find("devices")
    assert devices is not None
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
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


def _active(dom: libvirt.virDomain) -> bool:
    """A transient domain that stopped is gone: libvirt answers "Domain not found"."""
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


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
        overlay_on_export(overlay, export.socket, export.size)
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
                elif agent_answers(dom):
                    return BootCheck(
                        ok=True, at=at, seconds=time.monotonic() - t0, sign="the guest agent"
                    )
                if not _active(dom):
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
