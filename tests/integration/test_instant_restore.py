"""Instant restore: a new VM running from a backup at once, on real libvirtd/QEMU/Temporal.

``snapshot run ID --as NAME`` starts the VM on a local overlay above the backup's NBD
export and returns; the guest (a disk that really boots, ``bootable_guest.py``) comes up and
its agent answers while the backup is still being copied in; once the workflow is done the
VM runs on its own disk, byte for byte the backup, with no export left.
"""

from __future__ import annotations

import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from temporalio.client import Client

from snapferry.activities.contracts import InstantRunResult, SnapshotState
from snapferry.activities.hypervisors.kvm.export_vm import agent_answers
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workflows.instant import instant_workflow_id

from ..conftest import snapferry_cli
from .bootable_guest import define_bootable_vm, destroy_vms
from .helpers import images_identical, request_for
from .test_snapshot_serve import nbdkit_serving

pytestmark = pytest.mark.integration

FILES = {"data/report.txt": b"restored at once\n" * 1000}


ORIGINAL_MAC = "52:54:00:5f:00:01"
# A NIC on QEMU's user-mode network: nothing to set up on the host.
NIC = f"<interface type='user'><mac address='{ORIGINAL_MAC}'/><model type='virtio'/></interface>"


def define_original(conn: libvirt.virConnect, tmp_path: Path) -> str:
    console = tmp_path / "original.console"
    return define_bootable_vm(
        conn, tmp_path / "primary", FILES, prefix="sf-orig", console=console, devices=NIC
    )


def disk_backing(dom: libvirt.virDomain, flags: int = 0) -> str | None:
    disk = ET.fromstring(dom.XMLDesc(flags)).find("./devices/disk")
    assert disk is not None
    backing = disk.find("backingStore")
    return None if backing is None or backing.get("type") is None else backing.get("type")


async def test_a_vm_runs_from_the_backup_at_once_and_then_on_its_own_disk(
    client: Client,
    settings: Settings,
    workers: None,
    libvirt_conn: libvirt.virConnect,
    host_name: str,
    tmp_path: Path,
) -> None:
    original = define_original(libvirt_conn, tmp_path)
    name = f"sf-instant-{uuid.uuid4().hex[:8]}"
    try:
        taken = await starter.create_snapshot(client, request_for(original, host_name, settings))
        record = await starter.wait_settled(client, taken.id, timeout=180)
        assert record.state == SnapshotState.BACKED_UP and record.backup is not None
        manifest = record.backup.manifest_path

        t0 = time.monotonic()
        ran = await snapferry_cli("snapshot", "run", record.id, "--as", name, timeout=300)
        to_running = time.monotonic() - t0
        assert ran.returncode == 0, ran.stderr + ran.stdout
        assert f"VM {name} is running" in ran.stdout
        dom = libvirt_conn.lookupByName(name)
        assert dom.isActive()
        # The copy of the original's definition: its own MAC, its link down (the original
        # may be running), its console not the original's file.
        live = ET.fromstring(dom.XMLDesc(0))
        assert (live.findtext("description") or "").startswith("snapferry-instant:")
        mac = live.find("./devices/interface/mac")
        link = live.find("./devices/interface/link")
        assert mac is not None and mac.get("address") != ORIGINAL_MAC
        assert link is not None and link.get("state") == "down"
        assert not (tmp_path / "original.console").exists()
        deadline = time.monotonic() + 120
        while not agent_answers(dom):
            assert time.monotonic() < deadline, "the instant VM never booted"
            time.sleep(0.2)
        booted = time.monotonic() - t0

        handle = client.get_workflow_handle(instant_workflow_id(name), result_type=InstantRunResult)
        result = await handle.result()
        overlay = Path(result.overlay)
        assert dom.isActive() and agent_answers(dom)  # ran on through the copy
        assert disk_backing(dom) is None
        assert disk_backing(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) is None
        info = subprocess.run(
            ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(overlay)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "backing-filename" not in info.stdout
        assert nbdkit_serving(manifest) == []
        # Powered off (QEMU writes its cached qcow2 metadata out as it stops), the disk is
        # the backup, byte for byte, and starts again on its own.
        dom.destroy()
        assert images_identical(record.backup.path, overlay, fmt_b="qcow2")
        dom.create()
        deadline = time.monotonic() + 120
        while not agent_answers(dom):
            assert time.monotonic() < deadline, "the restored VM did not boot on its own disk"
            time.sleep(0.2)
        assert not (settings.home / "instant" / name).exists()

        # Refused, with nothing made: the name again, and an existing VM's name.
        again = await snapferry_cli("snapshot", "run", record.id, "--as", name)
        assert again.returncode == 1 and "exists already" in again.stderr
        files = {p: p.stat().st_mtime_ns for p in overlay.parent.iterdir()}
        taken_name = await snapferry_cli("snapshot", "run", record.id, "--as", original)
        assert taken_name.returncode == 1 and "exists already" in taken_name.stderr
        # A disk file of that name, left after its VM went: never taken over.
        libvirt_conn.lookupByName(original).undefine()
        orphan = await snapferry_cli("snapshot", "run", record.id, "--as", original)
        assert orphan.returncode == 1 and f"{original}-vda.qcow2 exists" in orphan.stderr
        assert {p: p.stat().st_mtime_ns for p in overlay.parent.iterdir()} == files
        assert nbdkit_serving(manifest) == []
        print(
            f"\ninstant restore: running {to_running:.1f} s after snapshot run, agent"
            f" answering after {booted:.1f} s, copied in {result.copy_seconds:.1f} s"
        )
    finally:
        destroy_vms(libvirt_conn, name, original)


COPY_IN_A_PROCESS = """
import sys
from snapferry.activities.contracts import InstantRunRequest
from snapferry.activities.hypervisors.kvm import KvmDriver
from snapferry.activities.settings import Settings
req = InstantRunRequest.model_validate_json(sys.argv[1])
KvmDriver(Settings.from_env()).copy_instant(req, work=__import__("pathlib").Path(sys.argv[2]),
                                            progress=lambda d, e: None)
"""


async def test_a_copy_whose_worker_was_killed_is_adopted_and_finished(
    client: Client,
    settings: Settings,
    workers: None,
    libvirt_conn: libvirt.virConnect,
    host_name: str,
    tmp_path: Path,
) -> None:
    """The VM keeps running on the export after the copying worker dies (kill -9); libvirt
    goes on with the block job, and the copy run again adopts it and finishes."""
    import os
    import signal
    import sys

    from snapferry.activities.contracts import InstantRunRequest
    from snapferry.activities.hypervisors.kvm import KvmDriver

    original = define_original(libvirt_conn, tmp_path)
    name = f"sf-instant-{uuid.uuid4().hex[:8]}"
    try:
        taken = await starter.create_snapshot(client, request_for(original, host_name, settings))
        record = await starter.wait_settled(client, taken.id, timeout=180)
        assert record.backup is not None and record.primary is not None
        req = InstantRunRequest(
            snapshot_id=record.id,
            volume=request_for(original, host_name, settings).volume,
            manifest_path=record.backup.manifest_path,
            primary_dir=str(Path(record.primary.image).parent),
            name=name,
        )
        driver = KvmDriver(settings)
        work = tmp_path / ("a-work-directory-deep-enough-" * 3) / "instant"  # long paths
        driver.run_instant(req, work=work)
        dom = libvirt_conn.lookupByName(name)
        copier = subprocess.Popen(
            [sys.executable, "-c", COPY_IN_A_PROCESS, req.model_dump_json(), str(work)],
            env=dict(os.environ),
        )
        try:
            deadline = time.monotonic() + 60
            while not dom.blockJobInfo("vda", 0):
                assert copier.poll() is None and time.monotonic() < deadline, "no block job"
                time.sleep(0.02)
            os.kill(copier.pid, signal.SIGKILL)
        finally:
            copier.wait()
        assert dom.isActive()  # on the export still, which outlived the copier
        result = driver.copy_instant(req, work=work, progress=lambda d, e: None)
        assert (
            disk_backing(dom) is None and disk_backing(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) is None
        )
        assert nbdkit_serving(record.backup.manifest_path) == []
        dom.destroy()
        assert images_identical(record.backup.path, result.overlay, fmt_b="qcow2")
    finally:
        destroy_vms(libvirt_conn, name, original)
