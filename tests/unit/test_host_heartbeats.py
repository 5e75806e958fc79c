"""Long host operations heartbeat while they run, so that a killed host
worker is noticed within the workflows' heartbeat timeout, not at a 12-hour bound."""

from __future__ import annotations

import time

from temporalio.testing import ActivityEnvironment

from snapferry.activities import host
from snapferry.activities.contracts import (
    HypervisorType,
    PrimarySnapshot,
    ReleaseRequest,
    VmRef,
    VmSnapshotOperation,
    VmSnapshotTaken,
    VmSnapshotType,
    VolumeRef,
    new_snapshot_id,
)


class SlowDriver:
    """Stands in for a driver whose merge takes a while (a block commit of a big layer)."""

    def __init__(self) -> None:
        self.released = False

    def release(self, **_: object) -> None:
        time.sleep(0.5)
        self.released = True


class OneDriver:
    def __init__(self, driver: SlowDriver) -> None:
        self.driver = driver

    def get(self, _kind: HypervisorType) -> SlowDriver:
        return self.driver


def test_a_release_heartbeats_while_the_driver_works(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(host, "HOST_HEARTBEAT_PERIOD_S", 0.05)
    activities = host.HostActivities.__new__(host.HostActivities)
    slow = SlowDriver()
    activities.drivers = OneDriver(slow)  # type: ignore[assignment]
    beats: list[tuple] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    req = ReleaseRequest(
        snapshot_id=new_snapshot_id(),
        volume=VolumeRef(vm=VmRef(name="vm1", host="h1"), disk="vda"),
        source=PrimarySnapshot(
            image="/x", image_format="qcow2", virtual_size=1, vm_was_running=True
        ),
    )
    env.run(activities.release_primary, req)
    assert slow.released
    assert len(beats) >= 5, beats  # about one per 50 ms of the 500 ms the merge took
    # And outside an activity (a driver used by a CLI tool) nothing heartbeats, nothing fails.
    with host.heartbeating(0.01):
        time.sleep(0.05)


class SlowVmDriver:
    """Stands in for a driver whose VM snapshot takes a while (a memory snapshot writes
    the VM's RAM out)."""

    def take_vm_snapshot(self, op: object) -> VmSnapshotTaken:
        time.sleep(0.5)
        return VmSnapshotTaken(overlays={}, memory=None, vm_was_running=True)


def test_a_vm_snapshot_take_heartbeats_while_the_driver_works(monkeypatch, tmp_path) -> None:
    from snapferry.activities.receipts import Receipts

    monkeypatch.setattr(host, "HOST_HEARTBEAT_PERIOD_S", 0.05)
    activities = host.HostActivities.__new__(host.HostActivities)
    activities.drivers = OneDriver(SlowVmDriver())  # type: ignore[assignment]
    activities.receipts = Receipts(tmp_path / "receipts")
    beats: list[tuple] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    op = VmSnapshotOperation(
        snapshot_id=new_snapshot_id(), vm=VmRef(name="vm1", host="h1"), type=VmSnapshotType.DISK
    )
    taken = env.run(activities.take_vm_snapshot, op)
    assert taken.vm_was_running
    assert len(beats) >= 5, beats
