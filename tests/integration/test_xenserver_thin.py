"""A new volume restored into XenServer stays thin, through the real XenAPI client and
tests/xapi_sim: a raw import writes every byte, and tapdisk allocates every block written
(zeros too), so the new VDI is sent as a VHD of the backup's data blocks
(``import_raw_vdi?format=vhd``), which vhd-tool writes alone into the pre-zeroed VDI. An
in-place revert is sent as a VHD too, carrying zeros where the disk held data the backup
does not have. On an SR whose VDIs are not taken as pre-zeroed (legacy LVM) that import is
impossible, and the whole disk is written raw."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from snapferry.activities.contracts import (
    RestoreKind,
    RestoreRequest,
    VmRef,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import HypervisorUnavailable
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import (
    create_vm,
    guest_write,
    inject_fault,
    list_tasks,
    list_vdis,
    set_sr_type,
)

from ..conftest import Xapi
from .test_xenserver_blocked import revert_request, serve_as_backup

pytestmark = pytest.mark.integration

BLOCK = 2 * MIB


def request(vm: str, name: str) -> RestoreRequest:
    return RestoreRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"), disk="xvda"),
        kind=RestoreKind.VOLUME,
        name=name,
        manifest_path="/unused",
        primary_dir="/unused",
    )


def sparse_backup(path: Path, size: int, blocks: dict[int, bytes]) -> bytes:
    """A sparse raw image of ``size`` bytes with data at the start of some blocks."""
    with open(path, "wb") as f:
        f.truncate(size)
        for index, data in blocks.items():
            f.seek(index * BLOCK + 4096)
            f.write(data)
    return path.read_bytes()


def new_vdi(xapi: Xapi, name: str) -> dict:
    (vdi,) = [v for v in list_vdis(xapi.port) if v["name"] == name]
    return vdi


def test_a_new_volume_holds_only_the_backups_data_blocks(xapi: Xapi, tmp_path: Path) -> None:
    """64 MiB with data in two blocks: the new VDI reads as the backup, and only those two
    2 MiB blocks are allocated in its VHD (a raw import would allocate all 32)."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "thin01", [64 * MIB], power="Halted")
    rng = random.Random(9)
    image = sparse_backup(
        tmp_path / "b.raw", 64 * MIB, {1: rng.randbytes(70000), 20: rng.randbytes(5000)}
    )
    result = d.create_volume(request("thin01", "thin01-restored"), str(tmp_path / "b.raw"))
    vdi = new_vdi(xapi, "thin01-restored")
    assert result.path == f"xapi:VDI/{vdi['uuid']}" and result.virtual_size == 64 * MIB
    assert Path(vdi["path"]).read_bytes() == image
    assert vdi["allocated"] == [1, 20]
    assert list_tasks(xapi.port) == []


def test_a_new_volume_of_an_odd_size_reads_back_as_the_backup(xapi: Xapi, tmp_path: Path) -> None:
    """A backup that ends mid-block, on a VDI SM rounded up to whole 2 MiB blocks: the VHD
    carries the last, partial block, and the tail reads as zeros."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "thin02", [8 * MIB], power="Halted")
    size = 5 * MIB + 1536
    image = sparse_backup(tmp_path / "b.raw", size, {2: b"\x5a" * (MIB - 2560)})
    result = d.create_volume(request("thin02", "thin02-restored"), str(tmp_path / "b.raw"))
    vdi = new_vdi(xapi, "thin02-restored")
    assert result.virtual_size == 6 * MIB
    assert Path(vdi["path"]).read_bytes() == image + bytes(6 * MIB - size)
    assert vdi["allocated"] == [2]


def test_a_new_volume_on_a_legacy_lvm_sr_is_written_whole(xapi: Xapi, tmp_path: Path) -> None:
    """A legacy LVM SR (no ``use_vhd``) does not pre-zero new VDIs
    (``must_write_zeroes_into_new_vdi``), and vhd-tool refuses a VHD import there: the
    driver writes the whole disk raw."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "thick01", [16 * MIB], power="Halted")
    set_sr_type(xapi.port, "local", "lvm", sm_config={})
    image = sparse_backup(tmp_path / "b.raw", 16 * MIB, {3: b"\x11" * 9000})
    d.create_volume(request("thick01", "thick01-restored"), str(tmp_path / "b.raw"))
    vdi = new_vdi(xapi, "thick01-restored")
    assert Path(vdi["path"]).read_bytes() == image
    assert vdi["allocated"] == list(range(8))


def test_a_vhd_import_that_fails_is_the_tasks_error_and_leaves_no_volume(
    xapi: Xapi, tmp_path: Path
) -> None:
    """vhd-tool fails after the 200 (VDI_IO_ERROR in the import's task): the error is the
    task's, retryable, and the half-written VDI is destroyed."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "thin03", [16 * MIB], power="Halted")
    sparse_backup(tmp_path / "b.raw", 16 * MIB, {0: b"\x22" * 4096, 6: b"\x33" * 4096})
    inject_fault(xapi.port, "import_raw_vdi", "VDI_IO_ERROR", ["Device I/O errors"], at_byte=MIB)
    with pytest.raises(HypervisorUnavailable, match="VDI_IO_ERROR"):
        d.create_volume(request("thin03", "thin03-restored"), str(tmp_path / "b.raw"))
    assert not [v for v in list_vdis(xapi.port) if v["name"] == "thin03-restored"]
    assert list_tasks(xapi.port) == []


@pytest.fixture
def backup_of(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Makes a revert write ``raw`` (secondary storage is not what is tested here)."""
    return lambda raw: serve_as_backup(monkeypatch, raw)


def halted_with_data(xapi: Xapi, vm: str, size: int, blocks: list[int]) -> None:
    """A VM whose disk the guest wrote in ``blocks``, then shut down."""
    from .test_xenserver import operator_session

    create_vm(xapi.port, vm, [size])
    for index in blocks:
        guest_write(xapi.port, vm, index * BLOCK + 100, b"written by the guest since")
    with operator_session(xapi) as xenapi:
        xenapi.VM.hard_shutdown(xenapi.VM.get_by_name_label(vm)[0])


def test_an_in_place_revert_writes_the_backups_blocks_and_zeros_only_where_the_disk_held_data(
    xapi: Xapi, tmp_path: Path, backup_of: Callable[[Path], None]
) -> None:
    """64 MiB, the backup holding data in blocks 1 and 5, the disk (since) in 5 and 30:
    the VDI reads back as the backup, and only blocks 1, 5 and 30 are allocated (30 written
    with zeros: it held data the backup does not have); a raw import would allocate all 32."""
    d = XenServerDriver(xapi.settings)
    halted_with_data(xapi, "thin04", 64 * MIB, [5, 30])
    rng = random.Random(4)
    image = sparse_backup(tmp_path / "b.raw", 64 * MIB, {1: rng.randbytes(9000), 5: b"\x7e" * 300})
    backup_of(tmp_path / "b.raw")
    d.revert(revert_request("thin04"))
    disk = xapi.disk("thin04")
    assert disk.read_bytes() == image
    (current,) = [v for v in list_vdis(xapi.port) if Path(v["path"]) == disk]
    assert current["allocated"] == [1, 5, 30]
    assert list_tasks(xapi.port) == []


def test_an_in_place_revert_on_a_legacy_lvm_sr_is_written_whole(
    xapi: Xapi, tmp_path: Path, backup_of: Callable[[Path], None]
) -> None:
    """No VHD import where XAPI does not take the VDI as pre-zeroed (vhd-tool refuses it):
    the revert is raw, every block written."""
    d = XenServerDriver(xapi.settings)
    halted_with_data(xapi, "thick02", 16 * MIB, [2])
    set_sr_type(xapi.port, "local", "lvm", sm_config={})
    image = sparse_backup(tmp_path / "b.raw", 16 * MIB, {6: b"\x42" * 5000})
    backup_of(tmp_path / "b.raw")
    d.revert(revert_request("thick02"))
    disk = xapi.disk("thick02")
    assert disk.read_bytes() == image
    (current,) = [v for v in list_vdis(xapi.port) if Path(v["path"]) == disk]
    assert current["allocated"] == list(range(8))
