"""Instant restore: a new VM running from a backup within seconds, copying it in meanwhile.

The backup is served read-only over NBD by an nbdkit of its own session (storage/
nbd_export.py ``start_detached``): it outlives the host worker, since the VM reads through it
until the copy is done. The VM's disk is a new local qcow2 overlay whose backing is that
export (``<backingStore type='network'>``), so the guest boots at once and writes locally.
Then libvirt's block pull (``virDomainBlockPull``, https://libvirt.org/html/libvirt-libvirt-
domain.html#virDomainBlockPull: "populate a disk image with data from its backing image
chain"; with no base, the whole chain) copies every block into the overlay while the VM
runs; once the job is gone the overlay has no backing, the persistent definition is
rewritten to say so, and the export stops. The job belongs to the domain, not to the
client that started it, so a host worker killed meanwhile finds it running (or done) when
its activity is tried again, and adopts it.

What it made is named after the new VM: in ``<home>/instant/<name>/`` (the export's PID
file and log), the export's socket in ``$TMPDIR/snapferry-instant/`` (a socket's path must be
short), and beside the snapshot's volume (``<name>-<disk>.qcow2``).
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt

from ...contracts import InstantRunRequest, InstantRunResult
from ...errors import HypervisorUnavailable, InvalidInput
from ...storage.nbd_export import is_our_nbdkit, servable_size, start_detached, stop_detached
from ...storage.reader import image_info
from .export_vm import on_export, overlay_on_export, plain_domain

TAG = "snapferry-instant:"  # the new VM's <description>: whose backup it runs from
MARK_SUFFIX = ".snapferry-instant"  # beside an overlay being made: whose it is
POLL_S = 0.5


# A unix socket's path is at most 107 bytes (sun_path): the export's lives in a short
# directory of its own, named from the work directory and the VM, so that every attempt
# (and the VM's definition) names the same one.
SOCKET_DIR = Path(tempfile.gettempdir()) / "snapferry-instant"


def _paths(work: Path, name: str) -> tuple[Path, Path, Path, Path]:
    d = work / name
    digest = hashlib.sha256(f"{work.absolute()}/{name}".encode()).hexdigest()[:24]
    return d, SOCKET_DIR / f"{digest}.sock", d / "nbdkit.pid", d / "nbdkit.log"


def _description(dom: libvirt.virDomain) -> str:
    desc = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).find("description")
    return desc.text or "" if desc is not None else ""


def _ours(conn: libvirt.virConnect, req: InstantRunRequest) -> libvirt.virDomain | None:
    """The new VM, if a first attempt made it; a VM of that name that is not ours refuses."""
    try:
        dom = conn.lookupByName(req.name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise
    if _description(dom) != TAG + req.snapshot_id:
        raise InvalidInput(f"a VM named {req.name!r} exists already: choose another --as")
    return dom


def _export_alive(work: Path, name: str) -> bool:
    _, sock, pidfile, _ = _paths(work, name)
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return False
    return is_our_nbdkit(pid, sock)


def _start_export(work: Path, name: str, manifest: str) -> Path:
    d, sock, pidfile, log = _paths(work, name)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    SOCKET_DIR.mkdir(mode=0o700, exist_ok=True)
    if not _export_alive(work, name):
        sock.unlink(missing_ok=True)
        pidfile.write_text(str(start_detached(manifest, sock, log)))
    return sock


def stop_export(work: Path, name: str) -> None:
    d, sock, pidfile, _ = _paths(work, name)
    with contextlib.suppress(OSError, ValueError):
        stop_detached(int(pidfile.read_text()), sock)
    for p in (sock, pidfile, d / "nbdkit.log"):
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        d.rmdir()


def _target(disk: ET.Element) -> str | None:
    target = disk.find("target")
    return None if target is None else target.get("dev")


def domain_xml(req: InstantRunRequest, *, overlay: Path, socket: Path, source: str | None) -> str:
    """The new VM: the original's definition where the host still has it (its name, UUID
    and MAC addresses dropped, so libvirt makes new ones; only the restored disk kept),
    else a plain one; its disk the overlay above the export."""
    if source is not None:
        dom = ET.fromstring(source)
        for tag in ("uuid", "description"):
            for el in dom.findall(tag):
                dom.remove(el)
        named = dom.find("name")
        assert named is not None
        named.text = req.name
        devices = dom.find("devices")
        assert devices is not None
        for disk in devices.findall("disk"):
            if disk.get("device", "disk") == "disk" and _target(disk) != req.volume.disk:
                devices.remove(disk)
        for iface in devices.findall("interface"):
            for mac in iface.findall("mac"):
                iface.remove(mac)
            # The original may be running: its copy comes up unplugged (same addresses
            # inside), until an operator sets the link up (virsh domif-setlink ... up).
            for link in iface.findall("link"):
                iface.remove(link)
            ET.SubElement(iface, "link", state="down")
        # What holds the original's own state or devices is not shared with its copy: its
        # UEFI variables file (the copy gets a fresh one from the template), host devices,
        # pass-through LUNs, shared file systems.
        os_el = dom.find("os")
        if os_el is not None:
            for nvram in os_el.findall("nvram"):
                os_el.remove(nvram)
        for tag in ("hostdev", "filesystem", "smartcard", "redirdev"):
            for el in devices.findall(tag):
                devices.remove(el)
        for el in devices.findall("disk"):
            if el.get("device") == "lun":
                devices.remove(el)
        # A console logged to the original's file would interleave with it: a pty instead.
        for tag in ("serial", "console"):
            for el in devices.findall(tag):
                if el.get("type") == "file":
                    el.set("type", "pty")
                    for src in el.findall("source"):
                        el.remove(src)
        disk = next(d for d in devices.findall("disk") if _target(d) == req.volume.disk)
    else:
        dom, disk = plain_domain(req.name, memory_mib=req.memory_mib, disk_target=req.volume.disk)
    ET.SubElement(dom, "description").text = TAG + req.snapshot_id
    on_export(disk, overlay=overlay, socket=socket)
    return ET.tostring(dom, encoding="unicode")


def start(conn: libvirt.virConnect, req: InstantRunRequest, *, work: Path, overlay: Path) -> None:
    """Export, overlay, definition, start: each step found done is not done again."""
    dom = _ours(conn, req)
    if dom is not None and dom.isActive():
        return
    size = servable_size(req.manifest_path)
    # An overlay is ours only with our mark beside it: a file of that name that is not
    # (another VM's disk, left after its VM was undefined) is never taken over.
    mark = Path(f"{overlay}{MARK_SUFFIX}")
    ours = mark.exists() and mark.read_text() == req.snapshot_id
    if (overlay.exists() or overlay.is_symlink()) and not ours:
        raise InvalidInput(f"{overlay} exists: choose another --as")
    made_overlay = not overlay.exists()
    sock = _start_export(work, req.name, req.manifest_path)
    try:
        if made_overlay:
            mark.write_text(req.snapshot_id)
            overlay_on_export(overlay, sock, size)
        if dom is None:
            source = None
            with contextlib.suppress(libvirt.libvirtError):
                original = conn.lookupByName(req.volume.vm.name)
                source = original.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            dom = conn.defineXML(domain_xml(req, overlay=overlay, socket=sock, source=source))
        dom.create()
    except BaseException:
        # Nothing half-made is left: no VM that would not start, no export, no overlay.
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if not dom.isActive():
                    dom.undefine()
        stop_export(work, req.name)
        if made_overlay:
            overlay.unlink(missing_ok=True)
            mark.unlink(missing_ok=True)
        raise


def _has_backing(dom: libvirt.virDomain, disk: str, flags: int = 0) -> bool:
    for d in ET.fromstring(dom.XMLDesc(flags)).iter("disk"):
        target = d.find("target")
        if target is not None and target.get("dev") == disk:
            backing = d.find("backingStore")
            return backing is not None and backing.get("type") is not None
    raise InvalidInput(f"the VM has no disk {disk}")


def _drop_persistent_backing(conn: libvirt.virConnect, dom: libvirt.virDomain, disk: str) -> None:
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    for d in root.iter("disk"):
        target = d.find("target")
        if target is not None and target.get("dev") == disk:
            for b in d.findall("backingStore"):
                d.remove(b)
    conn.defineXML(ET.tostring(root, encoding="unicode"))


def _start_pull(dom: libvirt.virDomain, disk: str, attempts: int = 3) -> None:
    """``blockPull``, tried again briefly: right after the export came back, QEMU's first
    read of it can fail the call, and a second one runs."""
    for attempt in range(1, attempts + 1):
        try:
            dom.blockPull(disk, 0, 0)
            return
        except libvirt.libvirtError:
            if attempt == attempts:
                raise
            time.sleep(attempt)


def pull(
    conn: libvirt.virConnect,
    req: InstantRunRequest,
    *,
    work: Path,
    overlay: Path,
    progress: Callable[[int, int], None],
) -> InstantRunResult:
    """Copy the backup into the overlay while the VM runs; returns once the VM no longer
    needs the backup (the export stopped)."""
    dom = _ours(conn, req)
    if dom is None:
        raise InvalidInput(f"VM {req.name!r} is gone: nothing to copy into")
    disk = req.volume.disk
    t0 = time.monotonic()
    if dom.isActive() and _has_backing(dom, disk):
        try:
            if not dom.blockJobInfo(disk, 0):
                _start_export(work, req.name, req.manifest_path)  # a host restart ended it
                _start_pull(dom, disk)
            while True:
                info = dom.blockJobInfo(disk, 0)
                if not info:
                    break
                progress(int(info.get("cur", 0)), int(info.get("end", 0)))
                time.sleep(POLL_S)
        except libvirt.libvirtError as exc:
            raise HypervisorUnavailable(
                f"copying into {overlay}: {exc.get_error_message()}"
            ) from exc
        if _has_backing(dom, disk):
            # A job that ended short (a read error from the export): tried again.
            raise HypervisorUnavailable(f"the copy into {overlay} ended before it was whole")
    elif not dom.isActive() and "backing-filename" in image_info(str(overlay), "qcow2"):
        # Stopped before the copy was done: copied offline by qemu-img rebase onto no
        # backing (the overlay's format is named; its backing's, raw, is in its header).
        _start_export(work, req.name, req.manifest_path)
        subprocess.run(
            ["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(overlay)],
            check=True,
            capture_output=True,
        )
    _drop_persistent_backing(conn, dom, disk)
    stop_export(work, req.name)
    Path(f"{overlay}{MARK_SUFFIX}").unlink(missing_ok=True)  # the VM's own disk now
    return InstantRunResult(name=req.name, overlay=str(overlay), copy_seconds=time.monotonic() - t0)
