"""Start/stop the simulator as a child process and drive its ``/sim`` control endpoints.

The simulator runs in its own process (and session) so the code under test talks
to it exactly as it would to vCenter: over TCP, with its own pyvmomi stubs.
"""

from __future__ import annotations

from pathlib import Path

from tests import simulator

from .objects import DS
from .vms import disk_base


def disk_path(root: str | Path, vm: str, disk_index: int) -> Path:
    """Local path of a VM's current flat disk, for byte comparisons in tests."""
    return Path(root) / DS / vm / f"{disk_base(vm, disk_index)}-flat.vmdk"


class SimulatorProcess(simulator.SimulatorProcess):
    module = "tests.vsphere_sim"
    default_user = "administrator@vsphere.local"


_call = simulator.control_call
guest_write = simulator.guest_write
list_vms = simulator.list_vms


def create_vm(
    port: int,
    name: str,
    disks: list[int],
    power: str = "poweredOn",
    folder: str = "",
    **kind: object,
) -> str:
    """Create a VM with zero-filled disks of the given byte sizes, in VM folder ``folder``
    (``a/b``, made if new; default the datacenter's ``vm`` folder); returns its moid.
    ``kind``: ``encrypted=True``, ``disk_mode="independent_persistent"``,
    ``backing="rdm"`` or ``"sesparse"``; ``home_ds="ds2"`` (where its configuration is),
    ``disk_ds=["ds1", "ds2"]`` (each disk's datastore), ``bases=["web01", "web01"]`` (each
    disk's file stem; equal stems on two datastores are allowed, as on vSphere)."""
    body = {"name": name, "disks": disks, "power": power, "folder": folder, "kind": kind}
    return _call(port, "POST", "/sim/vms", body)["moid"]


def set_datastore_gone(port: int, gone: bool) -> None:
    _call(port, "POST", "/sim/datastore", {"gone": gone})


def set_datastore_type(port: int, ds_type: str, name: str = "ds1") -> None:
    """DatastoreSummary.type of ``name`` (ds1 or ds2; ``VMFS``; ``vsan``/``VVOL`` serve no
    -flat.vmdk)."""
    _call(port, "POST", "/sim/datastore", {"type": ds_type, "name": name})


def set_file_access(port: int, allowed: bool) -> None:
    """Whether the login holds Datastore.Browse and Datastore.FileManagement: without them
    every /folder GET, HEAD and PUT answers 403."""
    _call(port, "POST", "/sim/datastore", {"file_management": allowed})


def set_ignore_range(port: int, ignore: bool) -> None:
    """Make /folder GET answer a ranged request with a plain 200 and the whole file."""
    _call(port, "POST", "/sim/range", {"ignore": ignore})


def cut_next_get(port: int, after: int) -> None:
    """The next /folder GET sends ``after`` bytes of its body, then closes the connection
    (a network fault injected by the test, not a vSphere behaviour)."""
    _call(port, "POST", "/sim/range", {"cut_after": after})


def folder_stats(port: int) -> dict[str, int]:
    """/folder GETs since the last call, and over how many client connections."""
    return _call(port, "POST", "/sim/folder-stats", {})


def set_inventory(
    port: int,
    *,
    api_type: str | None = None,
    capacity_in_bytes: bool | None = None,
    clone_removes_disks: bool | None = None,
    clone_listed: str | None = None,
    interrupt_clones: int | None = None,
    clone_copies_removed_disks: bool | None = None,
    leave_deltas: bool | None = None,
    consolidate_fails: int | None = None,
    clone_fault: str | None = None,
    ignore_disk_locators: bool | None = None,
) -> None:
    """``api_type="HostAgent"``: a standalone ESXi host (no CloneVM_Task);
    ``capacity_in_bytes=False``: disks set only capacityInKB, as older inventories do;
    ``clone_removes_disks=False``: a clone that leaves disks out answers NotSupported (a
    test control for the driver's fallback, not a behaviour seen on vSphere);
    ``clone_listed="end"``: a clone is registered only when its copy is done;
    ``interrupt_clones=n``: the next n clone tasks fail half-way and leave their folder;
    ``clone_copies_removed_disks=True``: disks a clone removes are copied, then detached
    (govmomi's reading); ``leave_deltas=True``: a snapshot removal leaves its redo logs
    (consolidationNeeded) until ConsolidateVMDisks_Task; ``consolidate_fails=n``: the next
    n consolidations fail with FileLocked; ``clone_fault="NoPermission"`` or
    ``"NoDiskSpace"``: the next clone is refused for that; ``ignore_disk_locators=True``: a
    clone puts every disk on its home datastore, whatever spec.location.disk says
    (govmomi's reading)."""
    body = {
        "api_type": api_type,
        "capacity_in_bytes": capacity_in_bytes,
        "clone_removes_disks": clone_removes_disks,
        "clone_listed": clone_listed,
        "interrupt_clones": interrupt_clones,
        "clone_copies_removed_disks": clone_copies_removed_disks,
        "leave_deltas": leave_deltas,
        "consolidate_fails": consolidate_fails,
        "clone_fault": clone_fault,
        "ignore_disk_locators": ignore_disk_locators,
    }
    _call(port, "POST", "/sim/inventory", {k: v for k, v in body.items() if v is not None})


def reverse_devices(port: int, vm: str, reverse: bool = True) -> None:
    """List the VM's disks last first in config.hardware.device (a test control: the API
    promises no device order)."""
    _call(port, "POST", "/sim/vm-devices", {"vm": vm, "reverse": reverse})


def set_guest(
    port: int,
    vm: str,
    *,
    tools: str | None = None,
    quiesce_fails: int | None = None,
    quiesce_fault: str | None = None,
) -> dict:
    """VMware Tools in ``vm``'s guest: ``tools="running"`` (the default), ``"notRunning"``
    or ``"notInstalled"``; ``quiesce_fails=n``: its next n quiesced snapshots fail with
    ``quiesce_fault`` (``"ApplicationQuiesceFault"``, the default, or
    ``"FilesystemQuiesceFault"``), rolled back."""
    body = {"tools": tools, "quiesce_fails": quiesce_fails, "quiesce_fault": quiesce_fault}
    body = {k: v for k, v in body.items() if v is not None}
    return _call(port, "POST", "/sim/guest", {"vm": vm, **body})


def list_tasks(port: int) -> list[dict]:
    """Every task: key, descriptionId, state, and how often a client read its info."""
    return _call(port, "GET", "/sim/tasks")["tasks"]


def set_task_delay(port: int, seconds: float, method: str = "CloneVM_Task") -> None:
    """Make ``method``'s tasks (CloneVM_Task, CreateSnapshot_Task, RemoveSnapshot_Task)
    stay 'running' for ``seconds`` before they do their work."""
    _call(port, "POST", "/sim/task-delay", {"seconds": seconds, "method": method})


def set_session_timeout(port: int, seconds: float) -> None:
    """Sessions end ``seconds`` after their last SOAP call (0: never), /folder or not."""
    _call(port, "POST", "/sim/sessions", {"idle_timeout": seconds})


def expire_sessions(port: int) -> None:
    """End every session now (a vpxd restart, or TerminateSession of each)."""
    _call(port, "POST", "/sim/sessions", {"expire": True})


def session_stats(port: int, *, reset: bool = False) -> dict[str, int]:
    """Logins, logouts, expired sessions, live sessions now, and the most live at once
    (since the last reset, which starts it at the live count)."""
    return _call(port, "POST", "/sim/sessions", {"reset": reset})


def soap_calls(port: int) -> dict[str, int]:
    """How many times each SOAP method was called since the simulator started."""
    return _call(port, "POST", "/sim/calls", {})["calls"]


def cbt(port: int, vm: str | None = None, **controls: object) -> dict:
    """Changed Block Tracking controls and state (tests/vsphere_sim/cbt.py): ``page=n`` (the
    disk bytes one QueryChangedDiskAreas answer covers), ``disk_random_read=False`` (the
    login lacks VirtualMachine.Provisioning.DiskRandomRead: QueryChangedDiskAreas answers
    NoPermission), ``invalid_argument="startOffset"`` (the next QueryChangedDiskAreas of
    a delta answers InvalidArgument of that property, once); for ``vm``: ``supported=False``
    (capability.changeTrackingSupported, as below hardware version 7), ``reset=True`` (a
    CBT reset: new tracking UUIDs). Answers ``page``, ``queries`` and, for ``vm``,
    ``requested``, ``active`` and each disk's ``change_ids``."""
    body = {**controls, **({"vm": vm} if vm else {})}
    return _call(port, "POST", "/sim/cbt", body)
