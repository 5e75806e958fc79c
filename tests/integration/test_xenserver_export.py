"""Exports as real XAPI streams them when something fails after the 200: Http_svr writes a
whole ``HTTP/1.1 500 Internal Error`` page into the body (xen-api#4603), which a reader
must tell from a VHD wherever it lands, and the export's task holds the real error."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from snapferry.activities.contracts import BackupPlan, new_snapshot_id
from snapferry.activities.errors import ChainBusy, HypervisorUnavailable
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import create_vm, guest_write, inject_fault

from ..conftest import Xapi
from .test_xenserver import BLOCK
from .test_xenserver_xapi import driver, read_all, take

pytestmark = pytest.mark.integration

LONG = "Failed to attach: " + "x" * 400  # the page is >= 512 bytes past 153 characters


def test_an_error_page_instead_of_the_footer_is_the_tasks_transient_error(xapi: Xapi) -> None:
    d = driver(xapi)
    create_vm(xapi.port, "page01", [8 * MIB])
    guest_write(xapi.port, "page01", 0, b"\x01" * 4096)
    snap = take(d, "page01")
    inject_fault(xapi.port, "export_raw_vdi", "SR_BACKEND_FAILURE_46", ["", LONG, ""], at_byte=0)
    with pytest.raises(ChainBusy, match="SR_BACKEND_FAILURE_46"):
        d.open_reader(snap, BackupPlan())
    image, blocks = read_all(d.open_reader(snap, BackupPlan()))
    assert blocks == [0] and image[:4096] == b"\x01" * 4096


def test_an_error_page_on_a_block_bitmap_is_the_tasks_transient_error(xapi: Xapi) -> None:
    d = driver(xapi)
    create_vm(xapi.port, "page02", [8 * MIB])
    guest_write(xapi.port, "page02", 2 * BLOCK, b"\x02" * 4096)
    snap = take(d, "page02")
    clean = d.open_reader(snap, BackupPlan())
    bitmap_at = clean.data_extents()[0].host_offset - clean._bitmap
    clean.close()
    inject_fault(
        xapi.port, "export_raw_vdi", "VDI_IO_ERROR", ["Device I/O errors", LONG], at_byte=bitmap_at
    )
    reader = d.open_reader(snap, BackupPlan())
    with pytest.raises(HypervisorUnavailable, match="VDI_IO_ERROR"):
        read_all(reader)
    image, blocks = read_all(d.open_reader(snap, BackupPlan()))
    assert blocks == [2] and image[2 * BLOCK : 2 * BLOCK + 4096] == b"\x02" * 4096


@pytest.mark.parametrize("sr_type", ["lvm", "linstor"])
def test_a_delta_on_lvhd_and_xostor_is_accepted_whatever_the_parent_name(
    xapi: Xapi, sr_type: str
) -> None:
    """LVHD names the parent ``VHD-<uuid>``; XOSTOR ``xcp-volume-<random uuid>``, which
    carries no VDI UUID: the delta (differencing, parent uid set) is read all the same."""
    from tests.xapi_sim.control import set_sr_type

    set_sr_type(xapi.port, "local", sr_type)
    d = driver(xapi)
    create_vm(xapi.port, "sr01", [8 * MIB])
    first = take(d, "sr01")
    guest_write(xapi.port, "sr01", 3 * BLOCK, b"\x03" * 4096)
    second = take(d, "sr01")
    image, blocks = read_all(d.open_reader(second, BackupPlan(base_image=first.image, depth=1)))
    assert blocks == [3] and image[3 * BLOCK : 3 * BLOCK + 4096] == b"\x03" * 4096


def test_a_non_vhd_vdi_is_planned_full_and_a_refused_delta_is_not_retried(xapi: Xapi) -> None:
    """XCP-ng 8.3 QCOW2 (sm_config image-format): vhd-tool cannot compute differences on
    it. The plan reads the format and takes a full; a delta asked anyway fails for good
    (UnsupportedImage), never a retry for ever."""
    from snapferry.activities.errors import UnsupportedImage
    from snapferry.activities.storage.secondary import Manifest
    from tests.xapi_sim.control import set_image_format

    d = driver(xapi)
    vm = create_vm(xapi.port, "qcow01", [8 * MIB])
    set_image_format(xapi.port, vm["disks"][0]["vdi"], "qcow2")
    first = take(d, "qcow01")
    second = take(d, "qcow01")
    base = Manifest(
        snapshot_id=new_snapshot_id(),
        vm="qcow01",
        disk="xvda",
        hypervisor="xenserver",
        virtual_size=first.virtual_size,
        chunk_size=MIB,
        chunks=8,
        checksum="",
        path="",
        chunks_file="",
        source=first.image,
        source_format="vhd",
        created=datetime.now(UTC),
    )
    plan = d.plan_backup(second, [base])
    assert plan.base_image is None and "qcow2" in (plan.reason or "")
    with pytest.raises(UnsupportedImage, match="Cannot compute differences"):
        read_all(d.open_reader(second, BackupPlan(base_image=first.image, depth=1)))
