"""A real host worker process killed by SIGKILL in the middle of a live block commit:
libvirt's job outlives the worker, and the VM snapshot whose layer that job commits into is
deleted before the job ends.

Only the killed worker is slowed (its commits get libvirt's bandwidth limit, 1 MiB/s, as
``virsh blockjob --bandwidth`` sets it), from a ``sitecustomize`` on its own
``PYTHONPATH``: the code under test is unchanged.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest
from temporalio.client import Client

from snapferry.activities.contracts import (
    SnapshotState,
    VmRef,
    VmSnapshotRecord,
    VmSnapshotRequest,
    VmSnapshotState,
    VmSnapshotType,
    new_snapshot_id,
)
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from snapferry.workflows.vm_snapshot import DELETE_VM_SNAPSHOT_UPDATE

from .helpers import chain_of, disk_source, request_for
from .test_durability import stop_workers
from .test_kvm_chain_crashes import GuestDisk, assert_converged

pytestmark = pytest.mark.integration

SLOW_COMMITS = """
import libvirt

_commit = libvirt.virDomain.blockCommit


def slow_commit(self, disk, base, top, bandwidth=0, flags=0):
    # 1 MiB/s for every commit this process starts (virDomainBlockCommit's bandwidth).
    flags &= ~libvirt.VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES
    return _commit(self, disk, base, top, 1, flags)


libvirt.virDomain.blockCommit = slow_commit
"""


def start_host_worker(host: str, log: Path, *, pythonpath: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "snapferry.workers.cli", "worker", "--host", host],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


async def wait_for_block_job(dom: libvirt.virDomain, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not dom.blockJobInfo("vda", 0):
        assert time.monotonic() < deadline, "no block job started"
        await asyncio.sleep(0.02)


async def test_a_vm_snapshot_deleted_under_a_killed_workers_middle_commit_keeps_the_vm_whole(
    client: Client,
    settings: Settings,
    make_vm,
    host_name: str,
    libvirt_conn,
    tmp_path: Path,
) -> None:
    vm = make_vm(size=32 * MIB, data_bytes=4 * MIB)
    guest = GuestDisk(vm, tmp_path)
    dom = libvirt_conn.lookupByName(vm.name)
    slow = tmp_path / "slow-commits"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_COMMITS)
    first = start_host_worker(host_name, tmp_path / "host-1.log", pythonpath=str(slow))
    second = None
    try:
        async with running_workers(client, settings, hosts=[], backup=True, concurrency=1):
            v = await starter.create_vm_snapshot(
                client,
                VmSnapshotRequest(
                    snapshot_id=new_snapshot_id(),
                    vm=VmRef(name=vm.name, host=host_name),
                    type=VmSnapshotType.DISK,
                ),
            )
            s1 = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
            assert (await starter.wait_settled(client, s1.id)).state == SnapshotState.BACKED_UP
            guest.write(pattern=0x5D, offset=8 * MIB, length=12 * MIB)  # 12 s at 1 MiB/s
            s2 = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
            # S2 becomes the base and releases S1, whose layer is committed into V's.
            await wait_for_block_job(dom)
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            assert dom.blockJobInfo("vda", 0)  # the job outlives the worker
            second = start_host_worker(host_name, tmp_path / "host-2.log")
            deleted: VmSnapshotRecord = await starter.snapshot_operation(
                client,
                v.id,
                DELETE_VM_SNAPSHOT_UPDATE,
                result_type=VmSnapshotRecord,
                kind=starter.VM,
            )
            assert deleted.state == VmSnapshotState.REMOVED
            s2_record = await asyncio.wait_for(starter.wait_settled(client, s2.id), 180)
            assert s2_record.state == SnapshotState.BACKED_UP
    finally:
        stop_workers(first, second)
    assert not dom.blockJobInfo("vda", 0)
    assert chain_of(disk_source(libvirt_conn, vm.name))[-1] == str(vm.disk)
    assert_converged(dom, guest)
