"""Activities that run on a hypervisor host's own task queue: take and release.

Like CloudStack's agent, each host runs one worker polling ``snapferry-host-<name>``; the
workflow routes every hypervisor operation for a VM to the queue of the host that owns it.
"""

from __future__ import annotations

from temporalio import activity

from .contracts import PrimarySnapshot, ReleaseRequest, RevertRequest, TakeRequest
from .errors import converts_errors
from .hypervisors import Drivers
from .hypervisors.base import HypervisorDriver
from .names import RELEASE_PRIMARY, REVERT_VOLUME, TAKE_SNAPSHOT
from .settings import Settings


class HostActivities:
    def __init__(self, settings: Settings) -> None:
        self.drivers = Drivers(settings)

    def driver(self, req: TakeRequest | ReleaseRequest) -> HypervisorDriver:
        return self.drivers.get(req.volume.vm.hypervisor)

    @activity.defn(name=TAKE_SNAPSHOT)
    @converts_errors
    def take_snapshot(self, req: TakeRequest) -> PrimarySnapshot:
        return self.driver(req).take(volume=req.volume, snapshot_id=req.snapshot_id)

    @activity.defn(name=REVERT_VOLUME)
    @converts_errors
    def revert_volume(self, req: RevertRequest) -> None:
        self.drivers.get(req.volume.vm.hypervisor).revert(req)

    @activity.defn(name=RELEASE_PRIMARY)
    @converts_errors
    def release_primary(self, req: ReleaseRequest) -> None:
        self.driver(req).release(volume=req.volume, snapshot_id=req.snapshot_id, source=req.source)
