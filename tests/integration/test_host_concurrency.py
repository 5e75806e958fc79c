"""A host worker runs operations of different VMs side by side and those of one VM one at a
time, on real libvirtd/QEMU: takes sent at once hold their VMs' disk-chain locks together,
and a VM with many queued takes holds no thread from the others.

A spy on the KVM driver's lock records when each VM's lock is held and holds each one until
``VMS`` different VMs hold theirs at once (or a few seconds pass): that only happens if the
worker really runs that many VMs' takes together. The takes themselves are the real ones
(real overlays, checked in each disk's chain).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client
from temporalio.service import RPCError

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.hypervisors.kvm import connection
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.demo_vm import MIB
from snapferry.workers.worker import running_workers
from snapferry.workflows.routing import snapshot_workflow_id

from .helpers import chain_of, disk_source, request_for

pytestmark = pytest.mark.integration

VMS = 8  # more than four: the host worker's whole bound before it ran VMs side by side
RENDEZVOUS_S = 8.0


class LockSpy:
    """Wraps the driver's domain lock: (vm, held from, held to) of every hold, and the most
    VMs that held theirs at one time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, together: int) -> None:
        self.together = together
        self.holds: list[tuple[str, float, float]] = []
        self.holding: dict[str, int] = {}
        self.most = 0
        self.cond = threading.Condition()
        real = connection.domain_lock

        @contextlib.contextmanager
        def spied(lock_dir: Path, vm: str, *, timeout_s: float) -> Iterator[None]:
            with real(lock_dir, vm, timeout_s=timeout_s):
                start = time.monotonic()
                with self.cond:
                    self.holding[vm] = self.holding.get(vm, 0) + 1
                    self.most = max(self.most, len(self.holding))
                    self.cond.notify_all()
                    # Hold on until enough VMs hold theirs (at most RENDEZVOUS_S).
                    self.cond.wait_for(lambda: self.most >= self.together, RENDEZVOUS_S)
                try:
                    yield
                finally:
                    with self.cond:
                        self.holding[vm] -= 1
                        if not self.holding[vm]:
                            del self.holding[vm]
                        self.holds.append((vm, start, time.monotonic()))

        monkeypatch.setattr(connection, "domain_lock", spied)

    def overlaps_within_one_vm(self) -> list[tuple[str, float, float]]:
        found = []
        by_vm: dict[str, list[tuple[float, float]]] = {}
        for vm, start, end in self.holds:
            by_vm.setdefault(vm, []).append((start, end))
        for vm, spans in by_vm.items():
            spans.sort()
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                if start < end:
                    found.append((vm, start, end))
        return found


async def creates(client: Client, settings: Settings, host: str, names: list[str]) -> list:
    return await asyncio.gather(
        *(starter.create_snapshot(client, request_for(n, host, settings)) for n in names)
    )


async def takes_started(client: Client, snapshot_ids: list[str]) -> bool:
    """Whether every one of these snapshots' takes has been handed to the host worker."""
    for sid in snapshot_ids:
        try:
            desc = await client.get_workflow_handle(snapshot_workflow_id(sid)).describe()
        except RPCError:
            return False  # not started yet
        pending = desc.raw_description.pending_activities
        if not any(p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED for p in pending):
            return False
    return True


async def test_takes_of_different_vms_run_together_and_of_one_vm_one_at_a_time(
    client: Client,
    settings: Settings,
    make_vm,
    host_name: str,
    libvirt_conn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vms = [make_vm(size=16 * MIB, data_bytes=1 * MIB) for _ in range(VMS)]
    spy = LockSpy(monkeypatch, together=VMS)
    async with running_workers(client, settings, hosts=[host_name]):
        answers = await creates(client, settings, host_name, [v.name for v in vms for _ in "abc"])
    assert all(a.state == SnapshotState.CREATED_ON_PRIMARY for a in answers)
    assert spy.most >= VMS, f"at most {spy.most} VMs' takes ran at once, not {VMS}"
    assert spy.overlaps_within_one_vm() == []
    assert sorted(vm for vm, _, _ in spy.holds) == sorted(v.name for v in vms for _ in "abc")
    for vm in vms:
        # Each take really added its layer: the original file under three overlays.
        chain = chain_of(disk_source(libvirt_conn, vm.name))
        assert len(chain) == 4 and chain[-1] == str(vm.disk), chain
        overlays = {a.primary.overlay for a in answers if a.vm == vm.name and a.primary}
        assert overlays == set(chain[:3])


async def test_takes_queued_on_one_vm_hold_no_thread_from_the_others(
    client: Client,
    settings: Settings,
    make_vm,
    host_name: str,
    libvirt_conn,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One VM with a dozen takes sent first (a VM with many disks, say), then one take for
    each of seven others: the seven run while the first VM's takes are still queued."""
    busy, *others = [make_vm(size=16 * MIB, data_bytes=1 * MIB) for _ in range(VMS)]
    spy = LockSpy(monkeypatch, together=VMS)
    async with running_workers(client, settings, hosts=[host_name]):
        requests = [request_for(busy.name, host_name, settings) for _ in range(12)]
        queued = [asyncio.create_task(starter.create_snapshot(client, r)) for r in requests]
        try:
            # Every one of those twelve is with the host worker before the others are sent.
            deadline = time.monotonic() + 60
            while not await takes_started(client, [r.snapshot_id for r in requests]):
                assert time.monotonic() < deadline, "the twelve never all reached the worker"
                await asyncio.sleep(0.1)
            rest = await creates(client, settings, host_name, [v.name for v in others])
            first = await asyncio.gather(*queued)
        finally:
            for task in queued:
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)
    assert all(a.state == SnapshotState.CREATED_ON_PRIMARY for a in first + rest)
    assert spy.most >= VMS, f"at most {spy.most} VMs' takes ran at once, not {VMS}"
    assert spy.overlaps_within_one_vm() == []
    assert len(chain_of(disk_source(libvirt_conn, busy.name))) == 13
