"""The split snapshot on real libvirtd/QEMU and a real Temporal dev server."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.settings import Settings
from snapferry.activities.storage import checksum
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers

from .helpers import disk_source, images_identical, patch_reference, request_for

# These tests follow the full-backup mode (SNAPFERRY_KVM_INCREMENTAL=0) through its merge
# back onto the original file; test_kvm_incremental.py follows the default, which keeps one.
pytestmark = [pytest.mark.integration, pytest.mark.kvm_full_backups]


async def test_backup_equals_disk_at_snapshot_time_and_vm_keeps_later_writes(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    tmp_path: Path,
    libvirt_conn,
) -> None:
    vm = make_vm(size=64 * MIB, data_bytes=16 * MIB)
    original = disk_source(libvirt_conn, vm.name)
    # The guest writes a pattern, then we snapshot: the backup must contain that pattern.
    vm.guest_write(pattern=0xAB, offset=20 * MIB, length=MIB)
    expected = patch_reference(
        vm.reference, tmp_path / "expected.raw", pattern=0xAB, offset=20 * MIB, length=MIB
    )

    answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
    assert answer.state == SnapshotState.CREATED_ON_PRIMARY
    # The guest goes on writing after the take: the backup must NOT contain this.
    vm.guest_write(pattern=0xCD, offset=0, length=2 * MIB)

    record = await starter.wait_settled(client, answer.id)
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    assert images_identical(expected, record.backup.path)
    chunk_size, _ = checksum.parse_checksum(record.backup.checksum)
    assert checksum.file_checksum(expected, chunk_size)[0] == record.backup.checksum

    # The merge ran: the VM runs on its original file, which holds the later write too.
    assert record.primary_released
    dom = libvirt_conn.lookupByName(vm.name)
    assert dom.isActive()
    assert disk_source(libvirt_conn, vm.name) == original
    assert disk_source(libvirt_conn, vm.name, inactive=True) == original
    live_expected = patch_reference(
        expected, tmp_path / "live.raw", pattern=0xCD, offset=0, length=2 * MIB
    )
    assert images_identical(live_expected, original, fmt_b="qcow2")
    leftovers = [p.name for p in Path(original).parent.glob(Path(original).name + ".snapferry-*")]
    assert leftovers == []


async def test_answer_comes_before_the_backup_of_a_large_volume(
    client: Client, settings: Settings, make_vm, host_name: str
) -> None:
    # A backup pool throttled to 100 MB/s makes a 512 MiB copy last ~5 s, measurably longer
    # than the take; the test asserts states and their order, not wall times.
    slow = dataclasses.replace(settings, backup_rate_limit_bps=100e6)
    vm = make_vm(size=2048 * MIB, data_bytes=512 * MIB)
    async with running_workers(client, slow, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, slow))
        assert answer.state == SnapshotState.CREATED_ON_PRIMARY
        assert answer.backup is None
        seen_backing_up = await starter.get_record(client, answer.id)
        assert seen_backing_up.state in (SnapshotState.CREATED_ON_PRIMARY, SnapshotState.BACKING_UP)
        assert seen_backing_up.backup is None
        record = await starter.wait_for_state(
            client, answer.id, SnapshotState.BACKED_UP, timeout=120
        )
    states = [t.state for t in record.transitions]
    assert states == [
        SnapshotState.ALLOCATED,
        SnapshotState.CREATING,
        SnapshotState.CREATED_ON_PRIMARY,
        SnapshotState.BACKING_UP,
        SnapshotState.BACKED_UP,
    ]
    # The answer was produced at CreatedOnPrimary, before the backup had even started.
    assert [t.state for t in answer.transitions] == states[:3]
    at = {t.state: t.at for t in record.transitions}
    assert (at[SnapshotState.BACKED_UP] - at[SnapshotState.CREATED_ON_PRIMARY]).total_seconds() > (
        at[SnapshotState.CREATED_ON_PRIMARY] - at[SnapshotState.CREATING]
    ).total_seconds()
    assert record.backup is not None and record.backup.virtual_size == 2048 * MIB


async def test_stopped_vm_take_backup_and_offline_merge(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str, libvirt_conn
) -> None:
    vm = make_vm(size=32 * MIB, data_bytes=8 * MIB, start=False)
    original = disk_source(libvirt_conn, vm.name, inactive=True)
    req = request_for(vm.name, host_name, settings)
    answer = await starter.create_snapshot(client, req)
    assert answer.primary is not None and not answer.primary.vm_was_running
    record = await starter.wait_settled(client, answer.id)
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    assert images_identical(vm.reference, record.backup.path)
    assert record.primary_released
    assert disk_source(libvirt_conn, vm.name, inactive=True) == original
    libvirt_conn.lookupByName(vm.name).create()  # the VM still starts on its original disk
    assert disk_source(libvirt_conn, vm.name) == original

    # Create is idempotent per snapshot ID: asking again returns the same snapshot's record
    # and takes no second snapshot (no new overlay, no new backup).
    again = await starter.create_snapshot(client, req)
    assert again.id == record.id and again.backup == record.backup
    assert disk_source(libvirt_conn, vm.name) == original


async def test_vm_can_stop_start_and_snapshot_again_while_a_backup_runs(
    client: Client, settings: Settings, make_vm, host_name: str, tmp_path: Path, libvirt_conn
) -> None:
    slow = dataclasses.replace(settings, backup_rate_limit_bps=60e6)
    vm = make_vm(size=512 * MIB, data_bytes=256 * MIB)
    original = disk_source(libvirt_conn, vm.name)
    async with running_workers(client, slow, hosts=[host_name], backup=True):
        first = await starter.create_snapshot(client, request_for(vm.name, host_name, slow))
        dom = libvirt_conn.lookupByName(vm.name)
        dom.destroy()  # stop ...
        dom.create()  # ... and start, while the first backup runs
        vm.guest_write(pattern=0x11, offset=300 * MIB, length=MIB)
        second_expected = patch_reference(
            vm.reference, tmp_path / "second.raw", pattern=0x11, offset=300 * MIB, length=MIB
        )
        second = await starter.create_snapshot(client, request_for(vm.name, host_name, slow))
        assert (await starter.get_record(client, first.id)).state != SnapshotState.BACKED_UP
        r1 = await starter.wait_settled(client, first.id)
        r2 = await starter.wait_settled(client, second.id)
    assert r1.backup and r2.backup
    assert images_identical(vm.reference, r1.backup.path)
    assert images_identical(second_expected, r2.backup.path)
    # Both released: the chain is merged back onto the original file, VM still running.
    assert dom.isActive()
    assert disk_source(libvirt_conn, vm.name) == original
    assert images_identical(second_expected, original, fmt_b="qcow2")
