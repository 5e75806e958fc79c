"""Activities that run on a hypervisor host's own task queue: every hypervisor operation.

Like CloudStack's agent, each host runs one worker polling ``snapferry-host-<name>``; the
workflow routes every hypervisor operation for a VM to the queue of the host that owns it.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from temporalio import activity

from .contracts import (
    BootCheck,
    BootCheckRequest,
    DiscardRequest,
    InstantRunRequest,
    InstantRunResult,
    PrimarySnapshot,
    ReleaseRequest,
    RevertRequest,
    TakeRequest,
    VmSnapshotOperation,
    VmSnapshotTaken,
    VolumeRef,
)
from .errors import InvalidInput, SnapshotDeleted, converts_errors
from .hypervisors import Drivers
from .hypervisors.base import HypervisorDriver
from .names import (
    CHECK_BOOT,
    CHECK_VOLUME,
    COPY_INSTANT_VM,
    DELETE_VM_SNAPSHOT,
    DISCARD_SNAPSHOT,
    RELEASE_PRIMARY,
    REVERT_VM_SNAPSHOT,
    REVERT_VOLUME,
    RUN_INSTANT_VM,
    TAKE_SNAPSHOT,
    TAKE_VM_SNAPSHOT,
    VM_SNAPSHOT_DELETED,
)
from .receipts import Receipts

if TYPE_CHECKING:
    from .hypervisors.kvm import KvmDriver
from .settings import Settings

# Host operations that can run long (a revert copies a whole disk, a merge commits a layer)
# heartbeat this often, and the workflows give them a heartbeat timeout of a minute, so that
# a killed host worker is noticed in a minute, not at a 12-hour start-to-close bound.
HOST_HEARTBEAT_PERIOD_S = 5.0


@contextlib.contextmanager
def heartbeating(
    period_s: float | None = None, *, details: Callable[[], tuple[object, ...]] = tuple
) -> Iterator[None]:
    """Heartbeat the running activity from a side thread while the block runs.

    The drivers' long steps (``qemu-img convert``, a block commit, a vSphere task) have no
    progress of their own to report; what must be known quickly is that the worker is
    alive. Where a step has progress, ``details`` gives it, and every beat carries it (the
    Web UI shows the last one). The thread runs in a copy of the activity's context, which
    is what :func:`temporalio.activity.heartbeat` needs (thread-safe for sync activities)."""
    if not activity.in_activity():
        yield
        return
    done = threading.Event()
    context = contextvars.copy_context()
    period = HOST_HEARTBEAT_PERIOD_S if period_s is None else period_s

    def beat() -> None:
        while not done.wait(period):
            context.run(activity.heartbeat, *details())

    ticker = threading.Thread(target=beat, name="host-heartbeat", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


class HostActivities:
    def __init__(self, settings: Settings) -> None:
        self.drivers = Drivers(settings)
        self.receipts = Receipts(settings.home / "receipts")
        self.boot_checks = settings.home / "boot-checks"  # overlays and consoles, while they run
        self.instant = settings.home / "instant"  # the exports instant-restored VMs run on

    def driver(self, req: TakeRequest | ReleaseRequest) -> HypervisorDriver:
        return self.drivers.get(req.volume.vm.hypervisor)

    @activity.defn(name=TAKE_SNAPSHOT)
    @converts_errors
    def take_snapshot(self, req: TakeRequest) -> PrimarySnapshot:
        """Take once per snapshot ID, ever: a take run again (by a reset) answers with what
        the first take returned, and never snapshots the volume a second time."""
        done = self.receipts.get("take", req.snapshot_id)
        if done is not None:
            activity.logger.info("snapshot %s was taken before: its receipt", req.snapshot_id)
            return PrimarySnapshot.model_validate_json(done)
        primary = self.driver(req).take(
            volume=req.volume, snapshot_id=req.snapshot_id, quiesce=req.quiesce
        )
        self.receipts.put("take", req.snapshot_id, primary.model_dump_json())
        return primary

    @activity.defn(name=REVERT_VOLUME)
    @converts_errors
    def revert_volume(self, req: RevertRequest) -> None:
        self._once(
            "revert",
            req.operation_id,
            lambda: self.drivers.get(req.volume.vm.hypervisor).revert(req),
        )

    def _once(self, kind: str, operation_id: str | None, do: Callable[[], None]) -> None:
        """Do it once per operation ID: an update re-delivered after a reset is not done
        again (a second revert would discard what the guest wrote since the first)."""
        if operation_id is not None and self.receipts.get(kind, operation_id) is not None:
            activity.logger.info("%s %s was done before: not again", kind, operation_id)
            return
        with heartbeating():
            do()
        if operation_id is not None:
            self.receipts.put(kind, operation_id, "{}")

    @activity.defn(name=CHECK_VOLUME)
    @converts_errors
    def check_volume(self, volume: VolumeRef) -> None:
        self.drivers.get(volume.vm.hypervisor).check_volume(volume)

    @activity.defn(name=RELEASE_PRIMARY)
    @converts_errors
    def release_primary(self, req: ReleaseRequest) -> None:
        with heartbeating():
            self.driver(req).release(
                volume=req.volume,
                snapshot_id=req.snapshot_id,
                source=req.source,
                backed_up=req.backed_up,
            )

    @activity.defn(name=DISCARD_SNAPSHOT)
    @converts_errors
    def discard_snapshot(self, req: DiscardRequest) -> None:
        with heartbeating():
            self.drivers.get(req.vm.hypervisor).discard(req)

    @activity.defn(name=TAKE_VM_SNAPSHOT)
    @converts_errors
    def take_vm_snapshot(self, op: VmSnapshotOperation) -> VmSnapshotTaken:
        """Once per VM snapshot ID, as for volume snapshots."""
        if self.receipts.get("vm-deleted", op.snapshot_id) is not None:
            raise SnapshotDeleted(
                f"VM snapshot {op.snapshot_id} was deleted; a reset does not take it again"
            )
        done = self.receipts.get("vm-take", op.snapshot_id)
        if done is not None:
            return VmSnapshotTaken.model_validate_json(done)
        with heartbeating():  # a memory snapshot writes the VM's RAM out: minutes
            taken = self.drivers.get(op.vm.hypervisor).take_vm_snapshot(op)
        self.receipts.put("vm-take", op.snapshot_id, taken.model_dump_json())
        return taken

    @activity.defn(name=VM_SNAPSHOT_DELETED)
    @converts_errors
    def vm_snapshot_deleted(self, op: VmSnapshotOperation) -> bool:
        return self.receipts.get("vm-deleted", op.snapshot_id) is not None

    @activity.defn(name=REVERT_VM_SNAPSHOT)
    @converts_errors
    def revert_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        self._once(
            "vm-revert",
            op.operation_id,
            lambda: self.drivers.get(op.vm.hypervisor).revert_vm_snapshot(op),
        )

    @activity.defn(name=DELETE_VM_SNAPSHOT)
    @converts_errors
    def delete_vm_snapshot(self, op: VmSnapshotOperation) -> None:
        with heartbeating():
            self.drivers.get(op.vm.hypervisor).delete_vm_snapshot(op)
        self.receipts.put("vm-deleted", op.snapshot_id, "{}")

    @activity.defn(name=CHECK_BOOT)
    @converts_errors
    def check_boot(self, req: BootCheckRequest) -> BootCheck:
        """Boot the backup in a throwaway VM on this host (hypervisors/kvm/boot_check.py);
        a guest that shows no sign of life is a failed check, returned, not raised."""
        with heartbeating():
            return self._kvm(req, "a boot check").check_boot(req, work=self.boot_checks)

    def _kvm(self, req: BootCheckRequest | InstantRunRequest, what: str) -> KvmDriver:
        from .hypervisors.kvm import KvmDriver

        driver = self.drivers.get(req.volume.vm.hypervisor)
        if not isinstance(driver, KvmDriver):
            raise InvalidInput(
                f"{what} runs on KVM hosts; {req.volume.vm.hypervisor.value} has none"
            )
        return driver

    @activity.defn(name=RUN_INSTANT_VM)
    @converts_errors
    def run_instant_vm(self, req: InstantRunRequest) -> None:
        with heartbeating():
            self._kvm(req, "an instant restore").run_instant(req, work=self.instant)

    @activity.defn(name=COPY_INSTANT_VM)
    @converts_errors
    def copy_instant_vm(self, req: InstantRunRequest) -> InstantRunResult:
        """Heartbeats carry the copy's progress (bytes done, of), shown in the Web UI."""
        driver = self._kvm(req, "an instant restore")
        latest: dict[str, tuple[int, int]] = {"copied": (0, 0)}

        def progress(done: int, end: int) -> None:
            latest["copied"] = (done, end)

        with heartbeating(details=lambda: latest["copied"]):
            return driver.copy_instant(req, work=self.instant, progress=progress)

    @property
    def all(self) -> list:  # type: ignore[type-arg]
        """Every activity a host worker serves."""
        return [
            self.take_snapshot,
            self.check_volume,
            self.release_primary,
            self.revert_volume,
            self.discard_snapshot,
            self.take_vm_snapshot,
            self.vm_snapshot_deleted,
            self.revert_vm_snapshot,
            self.delete_vm_snapshot,
            self.check_boot,
            self.run_instant_vm,
            self.copy_instant_vm,
        ]
