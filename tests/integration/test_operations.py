"""Operations on existing snapshots, on real libvirtd/QEMU: verify, restore as volume and
template, revert, cancel and delete, each with its bad-input cases, through the real CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers

from ..conftest import snapferry_cli
from .helpers import disk_source, images_identical, request_for

pytestmark = pytest.mark.integration


async def test_verify_restore_revert_and_delete(
    client: Client, settings: Settings, workers: None, make_vm, host_name: str, libvirt_conn
) -> None:
    vm = make_vm(size=32 * MIB, data_bytes=8 * MIB)
    answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
    record = await starter.wait_settled(client, answer.id)
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    sid = record.id

    # verify: passes, then catches a flipped byte, then passes again once repaired.
    ok = await snapferry_cli("backup", "verify", sid)
    assert ok.returncode == 0 and record.backup.checksum in ok.stdout
    raw = Path(record.backup.path)
    original = raw.read_bytes()[:1]
    with open(raw, "r+b") as f:
        f.write(bytes([original[0] ^ 0xFF]))
    bad = await snapferry_cli("backup", "verify", sid, timeout=60)
    assert bad.returncode == 1 and "BackupCorrupt" in bad.stderr
    with open(raw, "r+b") as f:
        f.write(original)

    # a new volume and a template, each byte-identical to the snapshot.
    made = await snapferry_cli("snapshot", "to-volume", sid, "--name", "restored1", "--json")
    assert made.returncode == 0, made.stderr
    volume = Path(json.loads(made.stdout)["path"])
    assert volume.parent == vm.disk.parent
    assert images_identical(vm.reference, volume, fmt_b="qcow2")
    again = await snapferry_cli("snapshot", "to-volume", sid, "--name", "restored1")
    assert again.returncode == 1 and "already exists" in again.stderr
    evil = await snapferry_cli("snapshot", "to-volume", sid, "--name", "../../etc/x")
    assert evil.returncode == 1 and "not a valid name" in evil.stderr
    tpl = await snapferry_cli("snapshot", "to-template", sid, "--name", "tpl1", "--json")
    template = Path(json.loads(tpl.stdout)["path"])
    assert template == settings.secondary / "templates" / "tpl1.qcow2"
    assert images_identical(vm.reference, template, fmt_b="qcow2")
    assert json.loads(template.with_suffix(".template.json").read_text())["from_snapshot"] == sid
    volume.unlink()

    # revert: refused while running; after a stop, the disk reads as at snapshot time.
    vm.guest_write(pattern=0x77, offset=0, length=4 * MIB)
    running = await snapferry_cli("snapshot", "revert", sid)
    assert running.returncode == 1 and "is running; stop it" in running.stderr
    libvirt_conn.lookupByName(vm.name).destroy()
    # The VM writes into the layer kept above the snapshot (the next delta's base).
    active = disk_source(libvirt_conn, vm.name, inactive=True)
    assert not images_identical(vm.reference, active, fmt_b="qcow2")
    reverted = await snapferry_cli("snapshot", "revert", sid, "--json")
    assert reverted.returncode == 0, reverted.stderr
    assert json.loads(reverted.stdout)["reverts"] == 1
    assert images_identical(vm.reference, active, fmt_b="qcow2")
    libvirt_conn.lookupByName(vm.name).create()  # and the VM starts on it

    # delete: everything on secondary goes, the record says Destroyed, and it stays so.
    store = settings.secondary / "snapshots" / vm.name / "vda"
    assert sorted(p.suffix for p in store.iterdir()) == [".chunks", ".json", ".raw"]
    gone = await snapferry_cli("snapshot", "delete", sid, "--json")
    assert gone.returncode == 0 and json.loads(gone.stdout)["state"] == "Destroyed"
    assert list(store.iterdir()) == []
    assert (await starter.get_record(client, sid)).state == SnapshotState.DESTROYED
    twice = await snapferry_cli("snapshot", "delete", sid)
    assert twice.returncode == 1 and "Destroyed" in twice.stderr
    rows = await starter.list_snapshots(client, vm=vm.name, state="Destroyed")
    assert [r["id"] for r in rows] == [sid]


async def test_cancel_a_running_backup_cleans_up_and_retry_completes(
    client: Client, settings: Settings, make_vm, host_name: str
) -> None:
    slow = dataclasses.replace(settings, backup_rate_limit_bps=30e6)
    vm = make_vm(size=256 * MIB, data_bytes=192 * MIB)
    store = settings.secondary / "snapshots" / vm.name / "vda"
    async with running_workers(client, slow, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, slow))
        for _ in range(100):
            if list(store.glob("*.partial")):
                break
            await asyncio.sleep(0.1)
        cancelled = await snapferry_cli("backup", "cancel", answer.id)
        assert cancelled.returncode == 0, cancelled.stderr
        record = await starter.wait_settled(client, answer.id)
        assert record.state == SnapshotState.CREATED_ON_PRIMARY
        assert record.backup_error == "backup cancelled by an operator"
        assert list(store.glob("*.partial")) == []  # nothing half-written stays
        nothing = await snapferry_cli("backup", "cancel", answer.id)
        assert nothing.returncode == 1 and "no backup is running" in nothing.stderr

        retried = await snapferry_cli("backup", "retry", answer.id)
        assert retried.returncode == 0, retried.stderr
        done = await starter.wait_settled(client, answer.id, timeout=120)
    assert done.state == SnapshotState.BACKED_UP and done.backup is not None
    assert images_identical(vm.reference, done.backup.path)


async def test_records_and_policies_survive_worker_and_server_restarts(
    client: Client, settings: Settings, dev_server, make_vm, host_name: str, libvirt_conn
) -> None:
    from snapferry.workers.policies import create_policy, list_policies

    from .test_policies import policy

    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    async with running_workers(client, settings, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
        await starter.wait_settled(client, answer.id)
        made = await snapferry_cli("snapshot", "to-volume", answer.id, "--name", "kept1")
        assert made.returncode == 0, made.stderr
        vm_snap = await snapferry_cli(
            "vm-snapshot", "create", "--vm", vm.name, "--host", host_name, "--json"
        )
        vm_sid = json.loads(vm_snap.stdout)["id"]
        libvirt_conn.lookupByName(vm.name).destroy()
        assert (await snapferry_cli("snapshot", "revert", answer.id)).returncode == 0
        assert (await snapferry_cli("vm-snapshot", "revert", vm_sid)).returncode == 0
        await create_policy(client, policy(vm.name, host_name, settings, interval="daily"))
        # Records that ended before the restart: a deleted snapshot of each kind.
        ended = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
        await starter.wait_settled(client, ended.id)
        tpl = await snapferry_cli("snapshot", "to-template", ended.id, "--name", "kept-tpl")
        assert tpl.returncode == 0, tpl.stderr
        assert (await snapferry_cli("backup", "verify", ended.id)).returncode == 0
        assert (await snapferry_cli("snapshot", "delete", ended.id)).returncode == 0
        vm_ended = json.loads(
            (
                await snapferry_cli(
                    "vm-snapshot", "create", "--vm", vm.name, "--host", host_name, "--json"
                )
            ).stdout
        )["id"]
        assert (await snapferry_cli("vm-snapshot", "delete", vm_ended)).returncode == 0
        records = {
            sid: await starter.get_record(client, sid, kind)
            for sid, kind in ((ended.id, starter.VOLUME), (vm_ended, starter.VM))
        }
        before = await starter.get_record(client, answer.id)
        vm_before = await starter.get_record(client, vm_sid, starter.VM)
    # Workers gone, then the server restarted on the same SQLite file.
    dev_server.stop()
    dev_server.start()
    async with running_workers(client, settings, hosts=[host_name], backup=True):
        after = await starter.get_record(client, answer.id)
        assert after == before
        for sid, record in records.items():
            kind = starter.VOLUME if sid == ended.id else starter.VM
            assert await starter.get_record(client, sid, kind) == record
        assert records[ended.id].state == "Destroyed" and records[vm_ended].state == "Removed"
        assert records[ended.id].restored == [str(settings.secondary / "templates/kept-tpl.qcow2")]
        vm_after = await starter.get_record(client, vm_sid, starter.VM)
        assert vm_after == vm_before and vm_after.reverts == 1 and vm_after.state == "Ready"
        assert after.reverts == 1 and after.restored == [str(vm.disk.parent / "kept1.qcow2")]
        assert [r["policy"]["policy_id"] for r in await list_policies(client)] == [
            f"{vm.name}-vda-daily"
        ]
        gone = await snapferry_cli("snapshot", "delete", answer.id, "--json")
        assert json.loads(gone.stdout)["state"] == "Destroyed"
        vm_gone = await snapferry_cli("vm-snapshot", "delete", vm_sid, "--json")
        assert json.loads(vm_gone.stdout)["state"] == "Removed"
    (vm.disk.parent / "kept1.qcow2").unlink()
