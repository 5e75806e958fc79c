"""A revert into XenServer holds the VM's start off while it writes, through the real
XenAPI client and tests/xapi_sim. XAPI lets a VM start while dom0 holds its disk
read-write for an import (the sharing check on VBD.plug exempts system-domain VBDs), so
the driver puts ``start``, ``start_on``, ``resume`` and ``resume_on`` in the VM's
``blocked_operations`` for the restore (XAPI checks that map before anything else), and
takes out only the entries it put there, whatever the outcome."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from snapferry.activities.contracts import RevertRequest, VmRef, VolumeRef, new_snapshot_id
from snapferry.activities.errors import HypervisorUnavailable
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.activities.storage.secondary import SecondaryStore
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import clear_faults, create_vm, inject_fault, set_export_delay

from ..conftest import Xapi
from .test_xenserver import operator_session

pytestmark = pytest.mark.integration

HELD = ("start", "start_on", "resume", "resume_on")


@pytest.fixture
def backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The rebuilt image a revert writes (secondary storage is not what is tested here)."""
    raw = tmp_path / "restore.raw"
    raw.write_bytes(random.Random(11).randbytes(16 * MIB))
    serve_as_backup(monkeypatch, raw)
    return raw


def serve_as_backup(monkeypatch: pytest.MonkeyPatch, raw: Path) -> None:
    """Every backup a revert reads is ``raw``."""

    @contextlib.contextmanager
    def materialized(manifest: Any, on_progress: Any = None) -> Iterator[Path]:
        yield raw

    monkeypatch.setattr(SecondaryStore, "read_manifest", staticmethod(lambda path: None))
    monkeypatch.setattr(SecondaryStore, "materialized", staticmethod(materialized))


def revert_request(vm: str) -> RevertRequest:
    return RevertRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"), disk="xvda"),
        primary=None,
        manifest_path="/nowhere/manifest.json",
    )


def failure(fn: Any, *args: Any) -> list[str]:
    try:
        fn(*args)
    except XenAPI.Failure as exc:
        return [str(d) for d in exc.details]
    return []


def test_a_vm_started_during_a_revert_is_refused_and_starts_afterwards(
    xapi: Xapi, backup: Path
) -> None:
    d = XenServerDriver(xapi.settings)
    vm = create_vm(xapi.port, "blk01", [16 * MIB], power="Halted")["ref"]
    set_export_delay(xapi.port, 8 * MIB)  # the read-back takes about 2 s
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            d.revert(revert_request("blk01"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=run)
    worker.start()
    try:
        with operator_session(xapi) as x:
            time.sleep(0.8)  # the revert is writing or reading back
            assert not done.is_set()
            refused = failure(x.VM.start, vm, False, False)
            assert refused[:2] == ["OPERATION_BLOCKED", vm], refused
            assert "snapferry" in refused[2]
            host = x.host.get_all()[0]
            assert failure(x.VM.start_on, vm, host, False, False)[:1] == ["OPERATION_BLOCKED"]
            assert x.VM.get_power_state(vm) == "Halted"
            worker.join(60)
            set_export_delay(xapi.port, 0)
            assert not errors, errors
            assert x.VM.get_blocked_operations(vm) == {}
            x.VM.start(vm, False, False)
            assert x.VM.get_power_state(vm) == "Running"
    finally:
        worker.join(60)
    assert xapi.disk("blk01").read_bytes() == backup.read_bytes()


def test_an_operators_own_blocks_stay_and_a_failed_revert_unblocks(
    xapi: Xapi, backup: Path
) -> None:
    """The operator blocked ``start`` for reasons of their own: the revert leaves that
    entry as it was, and a revert that fails (the import's task fails) still takes out
    every entry it added."""
    d = XenServerDriver(xapi.settings)
    vm = create_vm(xapi.port, "blk02", [16 * MIB], power="Halted")["ref"]
    with operator_session(xapi) as x:
        x.VM.add_to_blocked_operations(vm, "start", "maintenance until Friday")
        d.revert(revert_request("blk02"))
        assert x.VM.get_blocked_operations(vm) == {"start": "maintenance until Friday"}
        inject_fault(xapi.port, "import_raw_vdi", "VDI_IO_ERROR", ["Device I/O errors"])
        with pytest.raises(HypervisorUnavailable, match="VDI_IO_ERROR"):
            d.revert(revert_request("blk02"))
        assert x.VM.get_blocked_operations(vm) == {"start": "maintenance until Friday"}


def test_a_revert_whose_unblock_failed_is_unblocked_by_its_retry(xapi: Xapi, backup: Path) -> None:
    """The connection breaks as the revert takes its entries out (the worker could as
    well have died): the revert fails, retryable, and the VM stays blocked; its retry
    finds the entries it left, keeps them while it writes, and takes them out."""
    d = XenServerDriver(xapi.settings)
    vm = create_vm(xapi.port, "blk03", [16 * MIB], power="Halted")["ref"]
    inject_fault(xapi.port, "VM.remove_from_blocked_operations", "INTERNAL_ERROR", ["x"], 99)
    with pytest.raises(HypervisorUnavailable):
        d.revert(revert_request("blk03"))
    with operator_session(xapi) as x:
        assert set(x.VM.get_blocked_operations(vm)) == set(HELD)
        clear_faults(xapi.port)
        d.revert(revert_request("blk03"))
        assert x.VM.get_blocked_operations(vm) == {}
    assert xapi.disk("blk03").read_bytes() == backup.read_bytes()


def test_a_vm_that_started_before_the_block_is_not_reverted(xapi: Xapi, backup: Path) -> None:
    """The VM runs: the revert is refused (InvalidInput) and leaves no block behind."""
    from snapferry.activities.errors import InvalidInput

    d = XenServerDriver(xapi.settings)
    vm = create_vm(xapi.port, "blk04", [16 * MIB])["ref"]  # Running
    with pytest.raises(InvalidInput, match="running"):
        d.revert(revert_request("blk04"))
    with operator_session(xapi) as x:
        assert x.VM.get_blocked_operations(vm) == {}
