"""Data safety on the real stack (real libvirtd/QEMU, the real Temporal dev server): no guest
data taken for image metadata, no silent wrong revert, no foreign block job pivoted, crash-
safe reverts, private files, and operations that follow a migrated VM."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import libvirt
import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    RestoreResult,
    SnapshotState,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import ChainBusy, InvalidInput
from snapferry.activities.hypervisors.kvm import RELEASED_SUFFIX, KvmDriver
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB, DemoVm, domain_xml
from snapferry.workers.worker import running_workers
from snapferry.workflows.snapshot import CREATE_TEMPLATE_UPDATE, CREATE_VOLUME_UPDATE, REVERT_UPDATE

from ..inotify import watch_opens
from ..spies import record_fsyncs_and_renames
from ..unit.test_no_format_probe import forged_raw_disk
from .helpers import chain_of, disk_driver, disk_source, images_identical, request_for

pytestmark = pytest.mark.integration


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def active_image(dom: libvirt.virDomain) -> str:
    return disk_source(dom.connect(), dom.name())


@pytest.fixture
def raw_vm(libvirt_conn, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A stopped VM on a raw disk whose guest wrote a qcow2 image naming another tenant's
    disk as its backing file; and that other tenant's disk."""
    primary = tmp_path / "primary"
    primary.mkdir()
    victim = primary / "other-tenant.raw"
    victim.write_bytes(b"OTHER-TENANT-DATA" * (4 * MIB // 17))
    name = f"sf-test-{uuid.uuid4().hex[:8]}"
    disk = forged_raw_disk(primary, victim=victim, size=16 * MIB)
    disk = disk.rename(primary / f"{name}-vda.raw")
    libvirt_conn.defineXML(domain_xml(name, disk, disk_format="raw"))
    vm = DemoVm(conn=libvirt_conn, name=name, disk=disk, reference=None)
    try:
        yield vm, victim
    finally:
        vm.destroy()


@pytest.mark.kvm_full_backups  # asserts the merge back onto the original file
async def test_a_guest_written_qcow2_header_is_backed_up_as_raw_and_the_disk_stays_raw(
    client: Client, settings: Settings, workers: None, raw_vm, host_name: str, tmp_path: Path
) -> None:
    vm, victim = raw_vm
    expected = tmp_path / "expected.raw"
    expected.write_bytes(vm.disk.read_bytes())
    with watch_opens(victim) as watch:
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
        assert answer.primary is not None and answer.primary.image_format == "raw"
        record = await starter.wait_settled(client, answer.id)
    assert record.state == SnapshotState.BACKED_UP and record.backup is not None
    assert record.primary_released  # the offline merge ran, and the definition was rewritten
    assert watch.opens == 0, "snapferry opened the file the guest's forged header names"
    assert Path(record.backup.path).read_bytes() == expected.read_bytes()
    # The merge redefined the stopped VM: its disk must still be read as raw, or its next
    # boot would read the other tenant's disk through the forged header.
    assert disk_driver(vm.conn, vm.name) == (str(vm.disk), "raw")
    assert vm.disk.read_bytes() == expected.read_bytes()


@pytest.mark.kvm_full_backups  # asserts the merge back onto the original file
@pytest.mark.parametrize(
    "store", ["files", pytest.param("repository", marks=pytest.mark.backup_store("repository"))]
)
async def test_a_revert_after_a_failed_merge_and_a_newer_release_uses_the_backup(
    store: str,
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    tmp_path: Path,
    libvirt_conn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    real_commit = KvmDriver._commit_live

    def failing_commit(self, dom, vm_name, disk, base, **_kw):  # type: ignore[no-untyped-def]
        raise InvalidInput(f"VM {vm_name!r}: injected merge failure")

    monkeypatch.setattr(KvmDriver, "_commit_live", failing_commit)
    first = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
    await starter.wait_for_state(client, first.id, SnapshotState.BACKED_UP, timeout=120)
    for _ in range(600):  # the release fails once, for good, and says so
        if "SNAPSHOT.RELEASE.FAILED" in _read(settings.alert_log):
            break
        await asyncio.sleep(0.1)
    first_rec = await starter.get_record(client, first.id)
    assert first_rec.state == SnapshotState.BACKED_UP and not first_rec.primary_released
    assert first_rec.primary is not None and first_rec.backup is not None
    assert (settings.repository in Path(first_rec.backup.manifest_path).parents) == (
        store == "repository"
    )
    monkeypatch.setattr(KvmDriver, "_commit_live", real_commit)

    # The guest writes; a newer snapshot's release then merges everything into the disk
    # file that is also the first snapshot's frozen image.
    vm.guest_write(pattern=0x77, offset=2 * MIB, length=MIB)
    second = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
    second_rec = await starter.wait_settled(client, second.id)
    assert second_rec.primary_released
    dom = libvirt_conn.lookupByName(vm.name)
    assert active_image(dom) == first_rec.primary.image  # merged all the way down
    assert not images_identical(vm.reference, first_rec.primary.image, fmt_b="qcow2")

    dom.destroy()
    await starter.snapshot_operation(client, first.id, REVERT_UPDATE)
    assert images_identical(vm.reference, active_image(dom), fmt_b="qcow2")


def test_a_foreign_block_job_is_never_pivoted(
    settings: Settings, make_vm, host_name: str, libvirt_conn
) -> None:
    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    driver = KvmDriver(settings)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    one = driver.take(volume=volume, snapshot_id=new_snapshot_id())
    driver.take(volume=volume, snapshot_id=new_snapshot_id())
    dom = libvirt_conn.lookupByName(vm.name)
    top = active_image(dom)
    assert chain_of(top)[1:] == [one.overlay, str(vm.disk)]
    # Someone else's active commit onto the middle layer, left ready: the layer it
    # commits is still needed (nothing released it), so it is not snapferry's to pivot.
    dom.blockCommit("vda", one.overlay, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    try:
        with pytest.raises(ChainBusy, match="another block job"):
            driver._settle_block_job(dom, vm.name, "vda")
        assert active_image(dom) == top and dom.blockJobInfo("vda", 0)
        # A job that commits only released layers (a killed release's) is finished.
        Path(top + RELEASED_SUFFIX).touch()
        driver._settle_block_job(dom, vm.name, "vda")
        assert active_image(dom) == one.overlay and not dom.blockJobInfo("vda", 0)
    finally:
        if dom.blockJobInfo("vda", 0):
            dom.blockJobAbort("vda", 0)


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_second_worker_process_for_the_host_waits_for_the_domain_lock(
    settings: Settings, make_vm, host_name: str, libvirt_conn, tmp_path: Path
) -> None:
    """Another snapferry process on the host holds the VM's lock (mid-merge, say): a take
    fails with the retryable ChainBusy and changes nothing; once it lets go, the take runs."""
    import dataclasses
    import subprocess
    import sys

    from snapferry.activities.hypervisors.domain_lock import lock_path

    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    local = dataclasses.replace(settings, lock_dir=tmp_path / "locks", domain_lock_timeout_s=0.5)
    (tmp_path / "locks").mkdir()
    driver = KvmDriver(local)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock_path(local.lock_dir, vm.name))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ChainBusy, match="another snapferry process"):
            driver.take(volume=volume, snapshot_id=new_snapshot_id())
        assert chain_of(active_image(libvirt_conn.lookupByName(vm.name))) == [str(vm.disk)]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    taken = driver.take(volume=volume, snapshot_id=new_snapshot_id())
    assert taken.image == str(vm.disk)


def test_a_revert_reaches_the_medium_before_its_rename(
    settings: Settings, make_vm, host_name: str, libvirt_conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu-img does not fsync: the new layer is fsynced, renamed, then its directory."""
    from snapferry.activities.contracts import RevertRequest

    vm = make_vm(size=8 * MIB, data_bytes=MIB, start=False)
    driver = KvmDriver(settings)
    volume = VolumeRef(vm=VmRef(name=vm.name, host=host_name), disk="vda")
    sid = new_snapshot_id()
    taken = driver.take(volume=volume, snapshot_id=sid)
    driver.take(volume=volume, snapshot_id=new_snapshot_id())  # revert copies, not O(1)
    active = active_image(libvirt_conn.lookupByName(vm.name))
    events = record_fsyncs_and_renames(monkeypatch)
    driver.revert(RevertRequest(snapshot_id=sid, volume=volume, primary=taken, manifest_path=None))
    partial = f"{active}.revert-{sid}.partial"
    at = events.index(("replace", active))
    assert events[at - 1] == ("fsync", partial)
    assert events[at + 1] == ("fsync", str(Path(active).parent))
    assert Path(active).stat().st_mode & 0o777 == 0o600
    assert images_identical(vm.reference, active, fmt_b="qcow2")


async def test_what_snapferry_writes_is_owner_only_whatever_the_umask(
    client: Client,
    settings: Settings,
    workers: None,
    make_vm,
    host_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Also: a restored volume or template reaches the medium before its final name."""
    events = record_fsyncs_and_renames(monkeypatch)
    old = os.umask(0o022)
    try:
        vm = make_vm(size=8 * MIB, data_bytes=MIB)
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
        record = await starter.wait_settled(client, answer.id)
        assert record.backup is not None
        volume = await starter.snapshot_operation(
            client, answer.id, CREATE_VOLUME_UPDATE, "restored-vol", result_type=RestoreResult
        )
        template = await starter.snapshot_operation(
            client, answer.id, CREATE_TEMPLATE_UPDATE, "tmpl", result_type=RestoreResult
        )
    finally:
        os.umask(old)
    backup = Path(record.backup.path)
    written = [
        backup,
        backup.with_suffix(".chunks"),
        Path(record.backup.manifest_path),
        Path(volume.path),
        Path(template.path),
        Path(template.path).with_suffix(".template.json"),
    ]
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {"0o600"}, modes
    dirs = [backup.parent, backup.parent.parent, settings.secondary / "templates"]
    assert {oct(d.stat().st_mode & 0o777) for d in dirs} == {"0o700"}
    for restored in (Path(volume.path), Path(template.path)):
        at = events.index(("replace", str(restored)))
        assert events[at - 1] == ("fsync", f"{restored}.partial")
        assert events[at + 1] == ("fsync", str(restored.parent))


@pytest.mark.kvm_full_backups  # asserts the merge back onto the original file
async def test_after_a_migration_the_release_runs_on_the_new_host(
    client: Client, settings: Settings, make_vm, host_name: str, libvirt_conn
) -> None:
    """The snapshot is taken on host A; the VM then moves to host B and A's worker is gone.
    ``snapferry vm moved`` tells its snapshots, and the release after the backup runs on B."""
    from ..conftest import snapferry_cli

    vm = make_vm(size=8 * MIB, data_bytes=MIB)
    new_host = f"{host_name}b"
    async with running_workers(client, settings, hosts=[host_name]):  # no backup pool yet
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
        moved = await snapferry_cli("vm", "moved", "--vm", vm.name, "--host", new_host)
        assert moved.returncode == 0, moved.stderr
        assert "1 live snapshot(s)" in moved.stdout
        refused = await snapferry_cli("vm", "moved", "--vm", vm.name, "--host", "../etc")
        assert refused.returncode != 0 and "'../etc' is not a valid name" in refused.stderr
    # Host A's worker is gone; the backup pool and host B's worker come up.
    async with running_workers(client, settings, hosts=[new_host], backup=True):
        record = await starter.wait_settled(client, answer.id, timeout=120)
    assert record.state == SnapshotState.BACKED_UP and record.primary_released
    assert record.host == new_host
    assert active_image(libvirt_conn.lookupByName(vm.name)) == str(vm.disk)
