"""Small helpers shared by the integration tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from snapferry.activities.contracts import (
    SnapshotRecord,
    SnapshotRequest,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.settings import Settings


def request_for(vm_name: str, host: str, settings: Settings, disk: str = "vda") -> SnapshotRequest:
    return SnapshotRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(vm=VmRef(name=vm_name, host=host), disk=disk),
        backup=settings.backup_defaults,
    )


def images_identical(
    a: Path | str, b: Path | str, *, fmt_a: str = "raw", fmt_b: str = "raw"
) -> bool:
    """``qemu-img compare`` in strict mode: same content, byte for byte."""
    proc = subprocess.run(
        ["qemu-img", "compare", "-q", "-U", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def patch_reference(src: Path, dst: Path, *, pattern: int, offset: int, length: int) -> Path:
    """A copy of a raw reference with one guest write applied: the expected disk content."""
    if src != dst:
        shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(bytes([pattern]) * length)
    return dst


async def cli_create(vm: str, disk: str, host: str, hypervisor: str) -> SnapshotRecord:
    """``snapferry snapshot create ... --json`` as an operator runs it; the parsed answer."""
    from ..conftest import snapferry_cli

    made = await snapferry_cli(
        *("snapshot", "create", "--vm", vm, "--disk", disk, "--host", host),
        *("--hypervisor", hypervisor, "--json"),
    )
    assert made.returncode == 0, made.stderr
    return SnapshotRecord.model_validate_json(made.stdout)


def chain_of(image: Path | str, fmt: str = "qcow2") -> list[str]:
    """The files of a disk chain, active first (formats recorded, never probed)."""
    from snapferry.activities.storage.reader import image_chain

    return [layer.path for layer in image_chain(str(image), fmt)]


def disk_source(conn, name: str, *, inactive: bool = False) -> str:  # type: ignore[no-untyped-def]
    """The file a domain's first disk points at (live, or the persistent definition)."""
    import xml.etree.ElementTree as ET

    import libvirt

    dom = conn.lookupByName(name)
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
    src = ET.fromstring(xml).find("./devices/disk/source")
    assert src is not None
    return src.get("file", "")


def disk_driver(conn, name: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The persistent definition's (source file, driver type) of the first disk."""
    import xml.etree.ElementTree as ET

    import libvirt

    xml = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    disk = ET.fromstring(xml).find("./devices/disk")
    assert disk is not None
    src, drv = disk.find("source"), disk.find("driver")
    assert src is not None and drv is not None
    return src.get("file", ""), drv.get("type", "")
