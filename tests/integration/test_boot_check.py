"""Health checks: a throwaway VM booted from a backup, on real libvirtd/QEMU and Temporal.

The VMs' disks really boot (``bootable_guest.py``: SeaBIOS, SYSLINUX's MBR and loader,
Debian's kernel, busybox and ``qemu-ga``). ``snapshot check`` of a good backup sees the guest
agent answer, or the console line asked for; a backup whose boot sector was damaged boots
nothing, and the check says so, keeps it on the record and raises an alert. The backup is
only read, and no VM, overlay, console file or nbdkit is left behind.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import libvirt
import pytest
from temporalio.client import Client

from snapferry.activities.contracts import BootCheck, SnapshotRecord, SnapshotState
from snapferry.activities.settings import Settings
from snapferry.workers import starter

from ..conftest import snapferry_cli
from .bootable_guest import BOOTED, define_bootable_vm, destroy_vms
from .helpers import request_for
from .test_snapshot_serve import appliance_env, nbdkit_serving  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

FILES = {"data/report.txt": b"quarterly numbers\n" * 100, "etc/hostname": b"bootable\n"}


def check_leftovers(conn: libvirt.virConnect, settings: Settings, record: SnapshotRecord) -> None:
    assert record.backup is not None
    assert not [d.name() for d in conn.listAllDomains() if d.name().startswith("snapferry-check")]
    boot_checks = settings.home / "boot-checks"
    assert not boot_checks.exists() or not list(boot_checks.iterdir())
    assert nbdkit_serving(record.backup.manifest_path) == []


async def test_a_backup_that_boots_passes_and_one_with_a_damaged_boot_sector_fails(
    client: Client,
    settings: Settings,
    workers: None,
    libvirt_conn: libvirt.virConnect,
    host_name: str,
    tmp_path: Path,
) -> None:
    names = [
        define_bootable_vm(libvirt_conn, tmp_path / "primary", FILES),
        define_bootable_vm(libvirt_conn, tmp_path / "primary", FILES, damaged=True),
    ]
    try:
        # The good one asks for a check after its backup (as a policy's --check-boot does).
        asks = request_for(names[0], host_name, settings).model_copy(update={"check_boot": True})
        good, bad = [
            await starter.wait_settled(
                client, (await starter.create_snapshot(client, req)).id, timeout=180
            )
            for req in (asks, request_for(names[1], host_name, settings))
        ]
        assert good.state == bad.state == SnapshotState.BACKED_UP
        assert good.backup is not None
        deadline = time.monotonic() + 180
        while (await starter.get_record(client, good.id)).verified_boot is None:
            assert time.monotonic() < deadline, "no check after the backup"
            await asyncio.sleep(1)
        after_backup = (await starter.get_record(client, good.id)).verified_boot
        assert after_backup is not None and after_backup.ok, after_backup
        assert after_backup.sign == "the guest agent"
        check_leftovers(libvirt_conn, settings, good)
        store = Path(good.backup.manifest_path).parent
        store_before = {p: p.stat().st_mtime_ns for p in store.iterdir()}

        # By hand, its console answers too, when a line is what the operator asks for.
        passed = await snapferry_cli(
            *("snapshot", "check", good.id, "--console-line", f"^{BOOTED}$", "--json"),
            timeout=400,
        )
        assert passed.returncode == 0, passed.stderr + passed.stdout
        check = BootCheck.model_validate_json(passed.stdout)
        assert check.ok and check.sign == f"console line '{BOOTED}'"
        record = await starter.get_record(client, good.id)
        assert record.verified_boot == check
        check_leftovers(libvirt_conn, settings, good)

        # The damaged one boots nothing: the check fails, is recorded, and alerts.
        failed = await snapferry_cli("snapshot", "check", bad.id, "--timeout", "15s", "--json")
        assert failed.returncode == 1, failed.stderr + failed.stdout
        no = BootCheck.model_validate_json(failed.stdout)
        assert not no.ok and "no sign of life" in no.detail
        shown = await snapferry_cli("snapshot", "show", bad.id)
        assert "did NOT boot" in shown.stdout
        assert "SNAPSHOT.BOOT_CHECK.FAILED" in settings.alert_log.read_text()
        check_leftovers(libvirt_conn, settings, bad)

        # A file written before the snapshot reads back from the good backup.
        out = tmp_path / "restored"
        got = await snapferry_cli(
            *("snapshot", "restore-file", good.id, "/data/report.txt", "--to", str(out)),
            *("--filesystem", "/dev/sda2"),  # the boot partition is the other one
            timeout=300,
        )
        assert got.returncode == 0, got.stderr
        assert (out / "report.txt").read_bytes() == FILES["data/report.txt"]

        # Only read: the store's files are as they were.
        assert {p: p.stat().st_mtime_ns for p in store.iterdir()} == store_before
        print(
            f"\nhealth check: {after_backup.seconds:.1f} s to the agent,"
            f" {json.loads(passed.stdout)['seconds']:.1f} s to the console line"
        )
    finally:
        destroy_vms(libvirt_conn, *names)


async def test_a_check_of_a_snapshot_without_a_backup_is_refused(
    client: Client, settings: Settings, workers: None, host_name: str, make_vm
) -> None:
    vm = make_vm(size=8 * 1024 * 1024, data_bytes=1024 * 1024)
    taken = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
    record = await starter.wait_settled(client, taken.id, timeout=120)
    await starter.snapshot_operation(client, record.id, "delete_snapshot")
    refused = await snapferry_cli("snapshot", "check", record.id)
    assert refused.returncode == 1
    assert "Destroyed" in refused.stderr
    bad_regex = await snapferry_cli("snapshot", "check", record.id, "--console-line", "(")
    assert bad_regex.returncode == 1 and "is not a regular expression" in bad_regex.stderr
