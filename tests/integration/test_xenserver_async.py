"""Long XAPI calls on XenServer go through ``Async.*`` tasks, as Xen Orchestra and
CloudStack's XenServer plugin make them, through the real XenAPI client and tests/xapi_sim:
the activity heartbeats while a task runs, a failed task is the error the synchronous call
gives, a cancelled activity cancels its task, and no task is left behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from temporalio.exceptions import CancelledError
from temporalio.testing import ActivityEnvironment

from snapferry.activities.contracts import (
    DiscardRequest,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)
from snapferry.activities.errors import ChainBusy, HypervisorUnavailable, InvalidInput
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.activities.hypervisors.xenserver import core as xen_core
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import (
    async_calls,
    create_vm,
    inject_fault,
    list_tasks,
    list_vms,
    set_task_delay,
    stall_tasks,
)

from ..conftest import Xapi
from .test_xenserver import operator_session

pytestmark = pytest.mark.integration

HEARTBEAT_TIMEOUT_S = 1.0


def op(vm: str, sid: str, kind: VmSnapshotType = VmSnapshotType.DISK) -> VmSnapshotOperation:
    return VmSnapshotOperation(
        snapshot_id=sid, vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"), type=kind
    )


def volume(vm: str) -> VolumeRef:
    return VolumeRef(vm=VmRef(name=vm, host="xen-host", hypervisor="xenserver"), disk="xvda")


def activity_env(beats: list[float]) -> ActivityEnvironment:
    """An activity with a heartbeat timeout of a second, recording when it heartbeats."""
    env = ActivityEnvironment()
    env.info = replace(env.info, heartbeat_timeout=timedelta(seconds=HEARTBEAT_TIMEOUT_S))
    env.on_heartbeat = lambda *_: beats.append(time.monotonic())
    return env


def snapshot_vms(xapi: Xapi, sid: str) -> list[dict[str, Any]]:
    return [v for v in list_vms(xapi.port) if v["name"] == f"snapferry-vm-{sid}"]


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def pending(xapi: Xapi, name: str) -> bool:
    return any(t["name"] == name and t["status"] == "pending" for t in list_tasks(xapi.port))


def test_a_long_vm_snapshot_heartbeats_through_its_task(xapi: Xapi) -> None:
    """VM.snapshot takes 3 s, three heartbeat timeouts: the activity heartbeats while it
    polls the task, never a heartbeat timeout apart, and the snapshot is made once."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "hb01", [4 * MIB])
    set_task_delay(xapi.port, 3.0, "VM.snapshot")
    sid = new_snapshot_id()
    beats: list[float] = []
    t0 = time.monotonic()
    activity_env(beats).run(d.take_vm_snapshot, op("hb01", sid))
    t1 = time.monotonic()
    assert t1 - t0 >= 3.0
    assert async_calls(xapi.port).get("VM.snapshot") == 1
    marks = [t0, *beats, t1]
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    assert max(gaps) < HEARTBEAT_TIMEOUT_S / 2, gaps
    assert len(snapshot_vms(xapi, sid)) == 1
    assert list_tasks(xapi.port) == []


@pytest.mark.parametrize(
    ("method", "code", "error"),
    [
        ("VM.snapshot", "OTHER_OPERATION_IN_PROGRESS", ChainBusy),
        ("VM.checkpoint", "LICENCE_RESTRICTION", InvalidInput),
        ("VM.revert", "SR_BACKEND_FAILURE_44", HypervisorUnavailable),
        ("VM.resume", "VM_BAD_POWER_STATE", InvalidInput),
        ("VDI.destroy", "VDI_IN_USE", ChainBusy),
    ],
)
def test_a_failed_task_is_the_error_of_the_sync_call(
    xapi: Xapi, method: str, code: str, error: type[Exception]
) -> None:
    """The task's ``error_info`` is mapped as the synchronous call's failure was: the same
    error type, naming XAPI's code, and no task is left behind."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "fail01", [4 * MIB])
    sid = new_snapshot_id()
    memory = VmSnapshotType.DISK_AND_MEMORY
    kind = VmSnapshotType.DISK if method == "VM.snapshot" else memory
    if method in ("VM.snapshot", "VM.checkpoint"):
        run: Callable[[], object] = lambda: d.take_vm_snapshot(op("fail01", sid, kind))  # noqa: E731
    elif method == "VDI.destroy":
        d.take(volume=volume("fail01"), snapshot_id=sid)
        run = lambda: d.discard(DiscardRequest(snapshot_id=sid, vm=volume("fail01").vm))  # noqa: E731
    else:  # a revert with memory: XAPI shuts the VM down itself, the driver resumes it
        d.take_vm_snapshot(op("fail01", sid, kind))
        run = lambda: d.revert_vm_snapshot(op("fail01", sid, kind))  # noqa: E731
    inject_fault(xapi.port, method, code, ["OpaqueRef:x", "why"])
    with pytest.raises(error, match=code):
        run()
    assert async_calls(xapi.port).get(method) == 1
    assert list_tasks(xapi.port) == []


def test_a_cancelled_activity_cancels_and_destroys_its_task(xapi: Xapi) -> None:
    """The VM snapshot's task is still running when the activity is cancelled: the task is
    cancelled in XAPI (so no snapshot is made afterwards) and destroyed, and the activity
    ends cancelled."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "can01", [4 * MIB])
    stall_tasks(xapi.port, "VM.snapshot")
    sid = new_snapshot_id()
    env = activity_env([])
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            env.run(d.take_vm_snapshot, op("can01", sid))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    thread = threading.Thread(target=take)
    thread.start()
    wait_for("the snapshot's task", lambda: pending(xapi, "Async.VM.snapshot"))
    env.cancel()
    thread.join(15)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CancelledError), outcome
    assert list_tasks(xapi.port) == []  # cancelled in XAPI, then destroyed
    stall_tasks(xapi.port, "VM.snapshot", False)
    time.sleep(0.3)
    assert snapshot_vms(xapi, sid) == []


def test_a_revert_that_cannot_be_cancelled_still_has_its_task_destroyed(
    xapi: Xapi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VM.revert is not cancellable in XAPI: the cancelled activity asks, waits a while for
    the task to end, then destroys it anyway; XAPI removes the task once the revert ends."""
    monkeypatch.setattr(xen_core, "TASK_CANCEL_WAIT_S", 0.5)
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "can02", [4 * MIB])
    sid = new_snapshot_id()
    memory = VmSnapshotType.DISK_AND_MEMORY
    d.take_vm_snapshot(op("can02", sid, memory))
    stall_tasks(xapi.port, "VM.revert")
    env = activity_env([])
    outcome: list[BaseException | None] = []

    def revert() -> None:
        try:
            env.run(d.revert_vm_snapshot, op("can02", sid, memory))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    thread = threading.Thread(target=revert)
    thread.start()
    wait_for("the revert's task", lambda: pending(xapi, "Async.VM.revert"))
    env.cancel()
    thread.join(15)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CancelledError), outcome
    (task,) = list_tasks(xapi.port)
    assert task["status"] == "pending" and task["current_operations"].get("task") == "destroy"
    stall_tasks(xapi.port, "VM.revert", False)
    wait_for("the revert's end", lambda: list_tasks(xapi.port) == [])


def test_no_task_is_left_after_each_operation(xapi: Xapi) -> None:
    """Every long call goes through its task, and each task is destroyed once read: after
    a take, a VM snapshot with memory, its revert (and resume), its delete, and a volume
    snapshot's discard, XAPI holds no task."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "left01", [4 * MIB])
    memory = VmSnapshotType.DISK_AND_MEMORY
    vsid, sid = new_snapshot_id(), new_snapshot_id()
    steps: list[tuple[str, Callable[[], object]]] = [
        ("take", lambda: d.take(volume=volume("left01"), snapshot_id=vsid)),
        ("discard", lambda: d.discard(DiscardRequest(snapshot_id=vsid, vm=volume("left01").vm))),
        ("VM snapshot", lambda: d.take_vm_snapshot(op("left01", sid, memory))),
        ("revert", lambda: d.revert_vm_snapshot(op("left01", sid, memory))),
        ("delete", lambda: d.delete_vm_snapshot(op("left01", sid, memory))),
    ]
    for name, step in steps:
        step()
        assert list_tasks(xapi.port) == [], name
    assert xapi.vm("left01")["power"] == "Running"
    started = async_calls(xapi.port)
    for method in ("VDI.snapshot", "VDI.destroy", "VM.checkpoint", "VM.revert", "VM.resume"):
        assert started.get(method), (method, started)


def test_a_cancelled_take_cancels_its_snapshot_task_and_leaves_no_mark(xapi: Xapi) -> None:
    """A volume take cancelled while its ``Async.VDI.snapshot`` runs: the task is
    cancelled and destroyed, no snapshot VDI is made, and the source keeps no mark."""
    d = XenServerDriver(xapi.settings)
    vm = create_vm(xapi.port, "can03", [4 * MIB])
    stall_tasks(xapi.port, "VDI.snapshot")
    env = activity_env([])
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            env.run(d.take, volume=volume("can03"), snapshot_id=new_snapshot_id())
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    thread = threading.Thread(target=take)
    thread.start()
    wait_for("the take's task", lambda: pending(xapi, "Async.VDI.snapshot"))
    env.cancel()
    thread.join(15)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CancelledError), outcome
    stall_tasks(xapi.port, "VDI.snapshot", False)
    time.sleep(0.3)
    assert list_tasks(xapi.port) == []
    assert not xapi.snapshot_vdis()
    with operator_session(xapi) as x:
        marks = x.VDI.get_other_config(vm["disks"][0]["vdi"])
    assert not any(k.startswith("snapferry") for k in marks), marks


def test_a_revert_whose_polls_break_is_waited_for_and_done_once(xapi: Xapi) -> None:
    """Two polls of the VM.revert task fail (a dropped connection); the revert goes on in
    XAPI. The driver polls again and reads its end, instead of failing an operation whose
    outcome it does not know: one revert, the VM resumed, no task left."""
    d = XenServerDriver(xapi.settings)
    create_vm(xapi.port, "poll01", [4 * MIB])
    sid = new_snapshot_id()
    memory = VmSnapshotType.DISK_AND_MEMORY
    d.take_vm_snapshot(op("poll01", sid, memory))
    set_task_delay(xapi.port, 1.0, "VM.revert")
    inject_fault(xapi.port, "task.get_status", "INTERNAL_ERROR", ["connection reset"], count=2)
    d.revert_vm_snapshot(op("poll01", sid, memory))
    assert async_calls(xapi.port).get("VM.revert") == 1
    assert xapi.vm("poll01")["power"] == "Running"
    assert list_tasks(xapi.port) == []
