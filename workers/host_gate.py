"""How a host worker lets its operations run side by side: one VM at a time, many VMs at once.

A host worker's operations on different VMs are independent, and those on one KVM VM are
not: its disk chain has one writer at a time (``hypervisors/domain_lock.py``, a ``flock``
that also keeps other processes out). Were every accepted operation handed to a thread at
once, operations queued on one VM's lock would each hold a thread while they wait, and a
VM with many disks, or a burst of creates, could take every thread from the other VMs.

So the wait happens here, before the thread: an activity interceptor holds each KVM
operation on its VM's in-process queue (FIFO, no thread), then bounds long operations
(merges, reverts: whole-disk work that can run for minutes) apart from quick ones (takes,
which callers wait for), and only then gives it to the host thread pool, whose size is the
bound on what really runs at once (``Settings.host_concurrency``). The ``flock`` is still
taken inside the driver: it is what serialises against other processes.

While an operation waits here it heartbeats, so a long wait behind a merge is not taken for
a dead worker. A wait for its VM gives up after ``domain_lock_timeout_s`` with the
retryable ``ChainBusy``, as a wait on the ``flock`` does; a wait for a long slot does not
(it would have waited in the server's queue), and is bounded by the operation's own
start-to-close timeout. A cancel (or the worker's shutdown) ends either wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from temporalio import activity
from temporalio.exceptions import CancelledError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from snapferry.activities.contracts import HypervisorType, VmRef
from snapferry.activities.errors import ChainBusy, as_application_error
from snapferry.activities.names import (
    DELETE_VM_SNAPSHOT,
    DISCARD_SNAPSHOT,
    RELEASE_PRIMARY,
    REVERT_VM_SNAPSHOT,
    REVERT_VOLUME,
    TAKE_SNAPSHOT,
    TAKE_VM_SNAPSHOT,
)

# What takes a KVM VM's disk-chain lock in the driver: these wait for their VM here.
CHAIN_OPERATIONS = frozenset(
    {
        TAKE_SNAPSHOT,
        RELEASE_PRIMARY,
        REVERT_VOLUME,
        DISCARD_SNAPSHOT,
        TAKE_VM_SNAPSHOT,
        REVERT_VM_SNAPSHOT,
        DELETE_VM_SNAPSHOT,
    }
)
# Whole-disk work (commits, copies, clones) that can run for minutes.
LONG_OPERATIONS = frozenset(
    {RELEASE_PRIMARY, REVERT_VOLUME, DISCARD_SNAPSHOT, REVERT_VM_SNAPSHOT, DELETE_VM_SNAPSHOT}
)
VMWARE = HypervisorType.VMWARE
# How often a waiting operation looks for a cancel and heartbeats.
WAIT_SLICE_S = 0.5


def vm_of(request: Any) -> VmRef | None:
    """The VM a host operation's request is about (requests name it directly or through
    their volume)."""
    vm = getattr(request, "vm", None)
    if vm is None:
        vm = getattr(getattr(request, "volume", None), "vm", None)
    return vm if isinstance(vm, VmRef) else None


def is_long(activity_type: str, vm: VmRef | None) -> bool:
    """Whole-disk work; a VMware take waits for a full clone of the disk, unlike KVM's and
    XenServer's, which only add a layer."""
    if activity_type in LONG_OPERATIONS:
        return True
    return activity_type == TAKE_SNAPSHOT and vm is not None and vm.hypervisor == VMWARE


class _VmQueues:
    """One FIFO lock per VM name, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, vm: str, *, timeout_s: float) -> AsyncIterator[None]:
        lock, users = self._locks.get(vm, (asyncio.Lock(), 0))
        self._locks[vm] = (lock, users + 1)
        try:
            await _acquire(
                lock,
                timeout_s=timeout_s,
                busy=lambda: (
                    f"VM {vm!r}: earlier operations of this worker on its disks were still"
                    f" running after {timeout_s:g} s; retrying later"
                ),
            )
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[vm]
            if users == 1:
                del self._locks[vm]
            else:
                self._locks[vm] = (lock, users - 1)

    def waiting(self, vm: str) -> int:
        """How many operations hold or wait for ``vm`` (for tests)."""
        return self._locks.get(vm, (None, 0))[1]


async def _acquire(
    lock: asyncio.Lock | asyncio.Semaphore, *, timeout_s: float | None, busy: Any = None
) -> None:
    """Acquire ``lock``, within ``timeout_s`` if given (else ChainBusy), heartbeating as it
    waits and leaving at once if the activity is cancelled. Sync activities are not
    cancelled as asyncio tasks: their cancel is an event, looked at every
    :data:`WAIT_SLICE_S`."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    while True:
        if activity.is_cancelled():
            raise CancelledError("cancelled while waiting for its turn")
        remaining = WAIT_SLICE_S if deadline is None else deadline - loop.time()
        if remaining <= 0:
            raise as_application_error(ChainBusy(busy()))
        try:
            await asyncio.wait_for(lock.acquire(), timeout=min(remaining, WAIT_SLICE_S))
            return
        except TimeoutError:
            activity.heartbeat()


class HostGate(Interceptor):
    """The host worker's interceptor; one per process, shared by its host queues."""

    def __init__(self, *, long_concurrency: int, wait_timeout_s: float) -> None:
        self.vms = _VmQueues()
        self.long = asyncio.Semaphore(long_concurrency)
        self.wait_timeout_s = wait_timeout_s

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Gated(next, self)


class _Gated(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, gate: HostGate) -> None:
        super().__init__(next)
        self.gate = gate

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        kind = activity.info().activity_type
        vm = vm_of(input.args[0]) if input.args else None
        async with contextlib.AsyncExitStack() as stack:
            if kind in CHAIN_OPERATIONS and vm is not None and vm.hypervisor == HypervisorType.KVM:
                await stack.enter_async_context(
                    self.gate.vms.turn(vm.name, timeout_s=self.gate.wait_timeout_s)
                )
            if is_long(kind, vm):
                # No ChainBusy here: a long operation waits for a long slot as it would
                # wait in the server's queue, bounded by its own start-to-close timeout.
                await _acquire(self.gate.long, timeout_s=None)
                stack.callback(self.gate.long.release)
            return await super().execute_activity(input)
