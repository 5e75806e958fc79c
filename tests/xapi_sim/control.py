"""Start/stop the simulator as a child process and drive its ``/sim`` control endpoints.

The simulator runs in its own process (and session) so the code under test talks
to it exactly as it would to a XenServer pool master: over TCP, with real XenAPI.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests import simulator


class SimulatorProcess(simulator.SimulatorProcess):
    module = "tests.xapi_sim"
    default_user = "root"


_call = simulator.control_call
guest_write = simulator.guest_write
list_vms = simulator.list_vms


def create_vm(
    port: int,
    name: str,
    disks: list[int],
    power: str = "Running",
    *,
    allow_duplicate: bool = False,
    host: int = 1,
    shared: bool = False,
) -> dict[str, Any]:
    """Create a VM with zero-filled disks (userdevice 0, 1, ...; device xvda, ... once it
    runs, "" while it never ran); returns ref, uuid and disks. A second live VM of one name
    is refused unless ``allow_duplicate`` (XAPI allows it). ``host=2`` puts its disks on the
    pool member's local SR, so the master answers their exports with a 302; ``shared``
    puts them on the shared (NFS) SR, which both hosts serve."""
    body = {
        "name": name,
        "disks": disks,
        "power": power,
        "allow_duplicate": allow_duplicate,
        "host": host,
        "shared": shared,
    }
    return _call(port, "POST", "/sim/vms", body)


def create_template(port: int, name: str, disks: list[int]) -> dict[str, Any]:
    """A template (``is_a_template``, Halted, never started) with zero-filled disks; any
    name, a live VM's included, as XAPI allows."""
    return _call(port, "POST", "/sim/vms", {"name": name, "disks": disks, "template": True})


def list_vdis(port: int) -> list[dict[str, Any]]:
    """Every VDI with ref, uuid, name, is_a_snapshot, snapshot_of, size and local path."""
    return _call(port, "GET", "/sim/vdis")["vdis"]


def vdi_path(port: int, vdi: str) -> Path:
    """Local raw file of a VDI (by ref or uuid), for byte comparisons in tests."""
    for v in list_vdis(port):
        if vdi in (v["ref"], v["uuid"]):
            return Path(v["path"])
    raise KeyError(vdi)


def inject_fault(
    port: int,
    method: str,
    code: str,
    params: list[str] | None = None,
    count: int = 1,
    *,
    at_byte: int | None = None,
) -> None:
    """The next ``count`` calls of ``method`` (e.g. ``VDI.destroy``) fail with ``code``.

    ``export_raw_vdi`` fails as XAPI's export does after its 200: the body stops after
    ``at_byte`` bytes (default 0), the connection closes, and the ``task_id`` task, if
    any, fails with ``[code, *params]``. ``export_raw_vdi:401`` makes the export refuse
    the session (401) however valid it is, as for a session that expired between the
    caller's last XML-RPC call and its GET. ``import_raw_vdi`` answers 500.
    """
    body: dict[str, Any] = {"method": method, "code": code, "params": params or [], "count": count}
    if at_byte is not None:
        body["at_byte"] = at_byte
    _call(port, "POST", "/sim/faults", body)


def clear_faults(port: int) -> None:
    _call(port, "POST", "/sim/faults", {"clear": True})


def expire_sessions(port: int) -> int:
    """Invalidate every session: the next call answers SESSION_INVALID."""
    return _call(port, "POST", "/sim/faults", {"method": "session", "expire": True})["expired"]


def set_export_delay(port: int, bytes_per_second: int) -> None:
    """Throttle export streams (0 = full speed); takes effect on running exports too."""
    _call(port, "POST", "/sim/export-delay", {"bytes_per_second": bytes_per_second})


def set_session_idle(port: int, seconds: float) -> None:
    """Sessions unused for ``seconds`` expire (XAPI: 24 h, the default here too)."""
    _call(port, "POST", "/sim/session-idle", {"seconds": seconds})


def set_call_latency(port: int, seconds: float) -> None:
    """Every synchronous XML-RPC call takes ``seconds`` (and the in-flight peak resets)."""
    _call(port, "POST", "/sim/call-latency", {"seconds": seconds})


def max_calls_in_flight(port: int) -> int:
    """The most synchronous calls the simulator served at once since the latency was set."""
    return int(_call(port, "GET", "/sim/calls")["max_in_flight"])


def set_task_delay(port: int, seconds: float, method: str | None = None) -> None:
    """Async tasks stay ``pending`` for ``seconds`` before their operation runs; with a
    ``method`` (``VM.snapshot``), that method's calls take ``seconds``, sync or Async."""
    body: dict[str, Any] = {"seconds": seconds}
    if method is not None:
        body["method"] = method
    _call(port, "POST", "/sim/task-delay", body)


def stall_tasks(port: int, method: str, stalled: bool = True) -> None:
    """Calls of ``method`` do not end until released (``stalled=False``); a cancellable
    Async task of it ends ``cancelled`` once ``task.cancel`` asks."""
    _call(port, "POST", "/sim/task-delay", {"method": method, "stall": stalled})


def list_tasks(port: int) -> list[dict[str, Any]]:
    """Every task record: ref, name (``Async.VM.snapshot``), status, progress, result,
    error_info, cancellable, current_operations."""
    return _call(port, "GET", "/sim/tasks")["tasks"]


def async_calls(port: int) -> dict[str, int]:
    """How many ``Async.<method>`` calls the simulator was asked for, by method."""
    return dict(_call(port, "GET", "/sim/tasks")["started"])


def set_revert_mode(port: int, mode: str) -> None:
    """``xapi`` (the default: new VDIs, as XAPI does) or ``in-place`` (the VM keeps its
    VDI refs: the project's first model, kept for the self-check)."""
    _call(port, "POST", "/sim/revert-mode", {"mode": mode})


def datapaths(port: int) -> dict[str, Any]:
    """dom0's datapaths held per VDI, and how many attaches were refused
    (``Illegal_transition``) so far."""
    return _call(port, "GET", "/sim/datapaths")


def set_attach_linger(port: int, seconds: float) -> None:
    """How long a dropped export keeps its RO datapath (default 1 s)."""
    _call(port, "POST", "/sim/attach-linger", {"seconds": seconds})


def set_sr_type(port: int, sr: str, sr_type: str, sm_config: dict[str, str] | None = None) -> None:
    """The type of the master's local SR (``local``), the member's (``member``) or the
    shared one: ``lvm`` and ``linstor`` change the parent names a delta's header carries.
    An ``lvm`` SR is LVHD (``sm_config`` ``use_vhd=true``) unless ``sm_config={}``: a
    legacy LVM SR, whose new VDIs are not pre-zeroed (no ``format=vhd`` import)."""
    body: dict[str, Any] = {"sr": sr, "type": sr_type}
    if sm_config is not None:
        body["sm_config"] = sm_config
    _call(port, "POST", "/sim/sr-type", body)


def set_image_format(port: int, vdi: str, image_format: str) -> None:
    """A VDI's ``sm_config['image-format']`` (``qcow2``, ``raw``): no delta can be computed
    against it or from it; its snapshots inherit it."""
    _call(port, "POST", "/sim/image-format", {"vdi": vdi, "format": image_format})


def set_restricted_features(port: int, features: list[str]) -> None:
    """Licensed features the pool lacks (``Checkpoint``): their calls answer
    ``LICENCE_RESTRICTION [feature]``, as ``Pool_features.assert_enabled``."""
    _call(port, "POST", "/sim/licence", {"restricted": features})


def set_gc(port: int, *, stalled: bool) -> int:
    """Stall SM's garbage collector (an LVHD SR too full to coalesce), or let it run: it
    runs at once then, and after every ``VDI.destroy``; returns how many base copies it
    coalesced."""
    return int(_call(port, "POST", "/sim/gc", {"stalled": stalled})["coalesced"])


def list_hosts(port: int) -> list[dict[str, Any]]:
    """The pool's hosts: ``host`` (1, 2), ref, ``address`` (``Host.address``), the
    ``port`` it serves on, whether it is the ``master`` and whether it is ``down``."""
    return _call(port, "GET", "/sim/hosts")["hosts"]


def set_pool(port: int, *, master: int, down: list[int] | None = None) -> list[dict[str, Any]]:
    """Host ``master`` (1 or 2) is the pool master, the hosts in ``down`` are dead (their
    ports refuse connections) and the others are up: HA's failover, and a dead host coming
    back as a slave. A master change drops every session and task. Send it to a host that
    is up."""
    return _call(port, "POST", "/sim/pool", {"master": master, "down": down or []})["hosts"]


def set_host_address(port: int, host: int, address: str) -> None:
    """The ``Host.address`` XAPI reports for host 1 or 2 (and names in HOST_IS_SLAVE and
    302s): e.g. a management IP this client cannot reach."""
    _call(port, "POST", "/sim/host-address", {"host": host, "address": address})
