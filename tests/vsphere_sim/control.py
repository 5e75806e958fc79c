"""Start/stop the simulator as a child process and drive its ``/sim`` control endpoints.

The simulator runs in its own process (and session) so the code under test talks
to it exactly as it would to vCenter: over TCP, with its own pyvmomi stubs.
"""

from __future__ import annotations

from pathlib import Path

from tests import simulator

from .inventory import DS, disk_base


def disk_path(root: str | Path, vm: str, disk_index: int) -> Path:
    """Local path of a VM's current flat disk, for byte comparisons in tests."""
    return Path(root) / DS / vm / f"{disk_base(vm, disk_index)}-flat.vmdk"


class SimulatorProcess(simulator.SimulatorProcess):
    module = "tests.vsphere_sim"
    default_user = "administrator@vsphere.local"


_call = simulator.control_call
guest_write = simulator.guest_write
list_vms = simulator.list_vms


def create_vm(port: int, name: str, disks: list[int], power: str = "poweredOn") -> str:
    """Create a VM with zero-filled disks of the given byte sizes; returns its moid."""
    return _call(port, "POST", "/sim/vms", {"name": name, "disks": disks, "power": power})["moid"]


def set_datastore_gone(port: int, gone: bool) -> None:
    _call(port, "POST", "/sim/datastore", {"gone": gone})


def set_task_delay(port: int, seconds: float) -> None:
    """Make CloneVM_Task stay 'running' for ``seconds`` before it does its work."""
    _call(port, "POST", "/sim/task-delay", {"seconds": seconds})
