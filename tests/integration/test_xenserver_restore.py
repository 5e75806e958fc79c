"""Restores into XenServer as real XAPI serves them, through the real XenAPI client and
tests/xapi_sim: the import's host by XAPI's own rule (``find_host_for_sr``), dom0's per-VDI
attach automaton (an RO datapath held by a dropped export refuses the import's RW attach
with ``Illegal_transition``), the import's ``200 OK`` before its body is read, and its
task as the only place a failure is told."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from snapferry.activities.errors import ChainBusy, HypervisorUnavailable
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import create_vm, datapaths, inject_fault, list_vdis

from ..conftest import Xapi

pytestmark = pytest.mark.integration


def driver(xapi: Xapi) -> XenServerDriver:
    return XenServerDriver(xapi.settings)


def test_twenty_restores_in_a_row_into_one_vdi_all_succeed(xapi: Xapi, tmp_path: Path) -> None:
    """Nothing attaches the VDI RO before the import attaches it RW: every restore is
    written and reads back, and dom0 never refused an attach."""
    d = driver(xapi)
    vm = create_vm(xapi.port, "again01", [64 * MIB], power="Halted")
    rng = random.Random(19)
    raw = tmp_path / "restore.raw"
    for i in range(20):
        raw.write_bytes(rng.randbytes(64 * MIB) if i % 5 == 0 else bytes([i]) * (64 * MIB))
        d._import(vm["disks"][0]["vdi"], raw)
        assert xapi.disk("again01").read_bytes() == raw.read_bytes(), f"restore {i}"
    assert datapaths(xapi.port)["refused"] == 0


def test_an_import_failure_is_the_tasks_error(xapi: Xapi, tmp_path: Path) -> None:
    """XAPI answers 200 before it reads the body; a failure after that is only in the
    import's task (and a 500 page in the body). The driver raises the task's error."""
    d = driver(xapi)
    vm = create_vm(xapi.port, "iofail01", [16 * MIB], power="Halted")
    raw = tmp_path / "restore.raw"
    raw.write_bytes(random.Random(3).randbytes(16 * MIB))
    inject_fault(xapi.port, "import_raw_vdi", "VDI_IO_ERROR", ["Device I/O errors"], at_byte=MIB)
    with pytest.raises(HypervisorUnavailable, match="VDI_IO_ERROR"):
        d._import(vm["disks"][0]["vdi"], raw)
    d._import(vm["disks"][0]["vdi"], raw)  # the fault was one-shot
    assert xapi.disk("iofail01").read_bytes() == raw.read_bytes()
    labels = [d._api("task.get_name_label", t) for t in d._api("task.get_all")]
    assert "snapferry import" not in labels  # every import's task destroyed


def test_an_import_refused_by_dom0_is_busy_and_retryable(xapi: Xapi, tmp_path: Path) -> None:
    """Another client's export holds the VDI RO: the RW attach is Illegal_transition, a
    transient state (ChainBusy), not a broken connection."""
    import http.client

    d = driver(xapi)
    vm = create_vm(xapi.port, "held01", [16 * MIB], power="Halted")
    uuid = vm["disks"][0]["vdi_uuid"]
    raw = tmp_path / "restore.raw"
    raw.write_bytes(bytes([7]) * (16 * MIB))
    other = http.client.HTTPConnection("127.0.0.1", xapi.port, timeout=30)
    other.request("GET", d.session.url("export_raw_vdi", vdi=uuid, format="raw"))
    resp = other.getresponse()
    resp.read(4096)  # it is reading: the RO datapath is held
    try:
        with pytest.raises(ChainBusy, match="Illegal_transition"):
            d._import(vm["disks"][0]["vdi"], raw)
    finally:
        other.close()


def test_the_import_host_follows_the_srs_pbd_and_a_shared_sr_is_the_masters(
    xapi: Xapi, tmp_path: Path
) -> None:
    """``find_host_for_sr``: a shared SR's VDI is imported through the master, a local SR's
    through the host of its attached PBD; no export is started to find out."""
    d = driver(xapi)
    shared = create_vm(xapi.port, "nfs01", [4 * MIB], power="Halted", shared=True)
    local = create_vm(xapi.port, "far04", [4 * MIB], power="Halted", host=2)
    raw = tmp_path / "restore.raw"
    raw.write_bytes(random.Random(8).randbytes(4 * MIB))
    master = d.session.endpoint
    assert d._data_host(shared["disks"][0]["vdi"]) == master
    member = d._data_host(local["disks"][0]["vdi"])
    assert member.port != master.port
    for vm in ("nfs01", "far04"):
        d._import(xapi.vm(vm)["disks"][0]["vdi"], raw)
        assert xapi.disk(vm).read_bytes() == raw.read_bytes()
    assert datapaths(xapi.port)["refused"] == 0
    assert len([v for v in list_vdis(xapi.port) if v["name"].startswith("nfs01")]) == 1
