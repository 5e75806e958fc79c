"""Sizes as SM gives them, through the real XenAPI client and tests/xapi_sim: a VDI grown by
``VDI.resize`` since its backup (deltas across the resize, reverts of an older, smaller
backup into it), and a new VDI that the SR rounds up to whole 2 MiB blocks
(``vhdutil.validate_and_round_vhd_size``)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from temporalio.client import Client

from snapferry.activities.contracts import RestoreResult, SnapshotState
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from tests.xapi_sim.control import create_vm, guest_write, list_vdis

from ..conftest import Xapi
from .test_xenserver import operator_session, snapshot_power, xen_request

pytestmark = pytest.mark.integration


def resize(xapi: Xapi, vm: str, size: int) -> int:
    """``VDI.resize`` of the VM's first disk as an operator would; the size SM gave it."""
    with operator_session(xapi) as xenapi:
        vdi = xapi.vm(vm)["disks"][0]["vdi"]
        xenapi.VDI.resize(vdi, str(size))
        return int(xenapi.VDI.get_virtual_size(vdi))


async def test_a_disk_grown_since_its_backup_backs_up_and_reverts_exactly(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """A backup of 8 MiB, then the VDI grows to 13 MiB (SM makes it 14) and the guest writes
    into the new tail. The next backup is a delta across the resize; the chain rebuilds it
    exactly. Reverting the older, smaller backup writes it and zeros over the whole grown
    tail (what the guest wrote there came after that snapshot), and reads back as that."""
    from snapferry.workflows.snapshot import REVERT_UPDATE

    create_vm(xapi.port, "grow01", [8 * MIB])
    rng = random.Random(31)
    guest_write(xapi.port, "grow01", 0, rng.randbytes(3 * MIB))
    deep = dataclasses.replace(xapi.settings, delta_max=16)
    async with running_workers(client, deep, hosts=[host_name], backup=True):
        small = await starter.create_snapshot(client, xen_request("grow01", host_name, xapi))
        small_bytes = xapi.disk("grow01").read_bytes()
        assert (await starter.wait_settled(client, small.id)).state == SnapshotState.BACKED_UP
        await snapshot_power(xapi, "grow01", on=False)
        assert resize(xapi, "grow01", 13 * MIB) == 14 * MIB
        await snapshot_power(xapi, "grow01", on=True)
        guest_write(xapi.port, "grow01", 12 * MIB + 5, rng.randbytes(MIB))
        guest_write(xapi.port, "grow01", MIB, rng.randbytes(4096))
        big = await starter.create_snapshot(client, xen_request("grow01", host_name, xapi))
        big_bytes = xapi.disk("grow01").read_bytes()
        done = await starter.wait_settled(client, big.id)
        assert done.state == SnapshotState.BACKED_UP and done.backup
        manifest = SecondaryStore.read_manifest(Path(done.backup.manifest_path))
        assert manifest.parent == small.id and manifest.virtual_size == 14 * MIB
        with SecondaryStore.materialized(manifest) as raw:
            assert raw.read_bytes() == big_bytes
        await snapshot_power(xapi, "grow01", on=False)
        await starter.snapshot_operation(client, small.id, REVERT_UPDATE)
        disk = xapi.disk("grow01").read_bytes()
        assert len(disk) == 14 * MIB
        assert disk == small_bytes + bytes(6 * MIB)
        await starter.snapshot_operation(client, big.id, REVERT_UPDATE)
        assert xapi.disk("grow01").read_bytes() == big_bytes


async def test_a_new_volume_on_a_rounded_up_vdi_is_the_backup_then_zeros(
    client: Client, xapi: Xapi, host_name: str
) -> None:
    """A disk of 5 MiB + 512 bytes (made elsewhere, e.g. imported raw) restored as a new
    volume: SM makes the new VDI 6 MiB. The restore writes the backup and reads it back;
    the answer gives the VDI's real size, and its tail beyond the backup is zeros."""
    from snapferry.workflows.snapshot import CREATE_VOLUME_UPDATE

    size = 5 * MIB + 512
    create_vm(xapi.port, "odd01", [size])
    guest_write(xapi.port, "odd01", size - 4096, random.Random(5).randbytes(4096))
    async with running_workers(client, xapi.settings, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(client, xen_request("odd01", host_name, xapi))
        at = xapi.disk("odd01").read_bytes()
        assert len(at) == size
        assert (await starter.wait_settled(client, answer.id)).state == SnapshotState.BACKED_UP
        made: RestoreResult = await starter.snapshot_operation(
            client, answer.id, CREATE_VOLUME_UPDATE, "odd01-restored", result_type=RestoreResult
        )
    restored = next(v for v in list_vdis(xapi.port) if v["uuid"] in made.path)
    assert restored["size"] == 6 * MIB == made.virtual_size
    assert Path(restored["path"]).read_bytes() == at + bytes(6 * MIB - size)


def test_a_vdi_resize_is_rounded_and_never_shrinks(xapi: Xapi) -> None:
    """The simulator's VDI.resize answers as SM's: rounded to 2 MiB, a smaller size is
    SR_BACKEND_FAILURE_79, a running VM's disk is VDI_IN_USE."""
    import XenAPI

    create_vm(xapi.port, "rsz01", [4 * MIB])
    with operator_session(xapi) as xenapi:
        vdi = xapi.vm("rsz01")["disks"][0]["vdi"]
        with pytest.raises(XenAPI.Failure, match="VDI_IN_USE"):
            xenapi.VDI.resize(vdi, str(8 * MIB))
        xenapi.VM.hard_shutdown(xapi.vm("rsz01")["ref"])
        xenapi.VDI.resize(vdi, str(4 * MIB + 1))
        assert xenapi.VDI.get_virtual_size(vdi) == str(6 * MIB)
        with pytest.raises(XenAPI.Failure, match="SR_BACKEND_FAILURE_79"):
            xenapi.VDI.resize(vdi, str(4 * MIB))
    assert Path(xapi.vm("rsz01")["disks"][0]["path"]).stat().st_size == 6 * MIB
