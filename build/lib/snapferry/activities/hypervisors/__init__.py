"""Name -> driver registry. Vendor SDKs are imported lazily, so that a backup worker or a
VMware-only host never needs libvirt installed (each SDK is an install extra)."""

from __future__ import annotations

import importlib

from ..contracts import HypervisorType
from ..errors import InvalidInput
from ..settings import Settings
from .base import HypervisorDriver

_DRIVERS: dict[HypervisorType, str] = {
    HypervisorType.KVM: "snapferry.activities.hypervisors.kvm:KvmDriver",
    HypervisorType.VMWARE: "snapferry.activities.hypervisors.vmware:VmwareDriver",
    HypervisorType.XENSERVER: "snapferry.activities.hypervisors.xenserver:XenServerDriver",
}


def load_driver(hypervisor: HypervisorType, settings: Settings) -> HypervisorDriver:
    try:
        target = _DRIVERS[hypervisor]
    except KeyError:
        raise InvalidInput(f"hypervisor {hypervisor.value!r} has no driver yet") from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    driver: HypervisorDriver = cls(settings)
    return driver


class Drivers:
    """One driver per hypervisor kind per process, created on first use (each holds a
    connection, e.g. to libvirtd)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: dict[HypervisorType, HypervisorDriver] = {}

    def get(self, hypervisor: HypervisorType) -> HypervisorDriver:
        if hypervisor not in self._loaded:
            self._loaded[hypervisor] = load_driver(hypervisor, self.settings)
        return self._loaded[hypervisor]
