"""In-memory XAPI object tables, sessions and fault switches shared by every layer.

One process-wide ``RLock`` guards all of it. Handlers hold it only while they touch
metadata or copy bytes that must be taken "at one instant" (snapshots, guest writes),
never while streaming an export, so a slow reader blocks nobody.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NULL_REF = "OpaqueRef:NULL"
EPOCH = "19700101T00:00:00Z"
# XAPI class names exactly as they appear in method names and HANDLE_INVALID.
CLASSES = ("VM", "VBD", "VDI", "SR", "PBD", "task", "host", "pool")
HOST_NAME = "xapi-sim"  # the master's name_label (and its dom0's label, below)
HOST2_NAME = "xapi-sim-2"  # a pool member: only its local SR, no VMs run there
BLOCK = 2 << 20  # a VHD block (vhd-tool's default_block_size_sectors_shift = 12)


class XapiError(Exception):
    """An XAPI failure; ``description`` is the wire ``ErrorDescription`` (all strings)."""

    def __init__(self, code: str, *params: object) -> None:
        super().__init__(code, *params)
        self.description = [code, *(str(p) for p in params)]


def new_ref() -> str:
    return f"OpaqueRef:{uuid.uuid4()}"


def new_uuid() -> str:
    return str(uuid.uuid4())


def xapi_time() -> str:
    """XAPI's dateTime.iso8601 text, e.g. ``20240131T12:00:00Z``."""
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())


@dataclass
class SR:
    ref: str
    uuid: str
    name_label: str
    path: Path
    host: str = ""  # the host whose local SR it is (a VDI here is exported by that host)
    shared: bool = False  # every host has an attached PBD (an NFS SR)
    type: str = "ext"
    # SM's keys; an LVM SR made since XenServer 5.5 is LVHD: {"use_vhd": "true"}
    sm_config: dict[str, str] = field(default_factory=dict)


@dataclass
class PBD:
    """An SR's plug on one host. ``Xapi_vm_helpers.assert_can_see_specified_SRs`` (the
    check of ``Importexport.check_sr_availability`` and ``find_host_for_sr``) asks for a
    ``currently_attached`` PBD of the SR on the host."""

    ref: str
    uuid: str
    host: str
    sr: str
    currently_attached: bool = True


@dataclass(eq=False)
class Layer:
    """One VHD file of a VDI's tapdisk chain on a VHD-based SR (ext, NFS, LVHD): its footer
    uid and the 2 MiB blocks its BAT allocates. ``VDI.snapshot``/``clone`` freeze the leaf
    as a shared parent and give each side a new empty leaf (SM's "double" snapshot), and a
    guest write allocates blocks in the leaf, so delta exports can be computed from
    allocation exactly as vhd-tool does (see ``vhd.py``). Bytes stay in the raw file."""

    uid: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    blocks: set[int] = field(default_factory=set)
    # Once frozen as a parent, the layer is a "base copy" VDI of its own (see chains.py):
    # its ref and uuid, the SR and the virtual size it had then.
    ref: str = ""
    uuid: str = ""
    sr: str = ""
    size: int = 0


@dataclass
class VDI:
    ref: str
    uuid: str
    name_label: str
    size: int
    sr: str
    path: Path
    is_a_snapshot: bool = False
    snapshot_of: str = NULL_REF
    snapshot_time: str = EPOCH
    name_description: str = ""
    other_config: dict[str, str] = field(default_factory=dict)
    chain: list[Layer] = field(default_factory=lambda: [Layer()])  # leaf first
    type: str = "user"  # or "suspend" (a memory image)
    # sm_config['image-format'] on XCP-ng 8.3 ("vhd", "qcow2"; "raw" for a raw VDI)
    image_format: str = "vhd"
    # XOSTOR/LINSTOR names a volume by a random UUID of its own, not the VDI's (xcp-ng/sm
    # drivers/linstorvolumemanager.py, create_volume -> _find_free_volume_name, gen_uuid)
    volume_name: str = field(default_factory=lambda: f"xcp-volume-{uuid.uuid4()}")

    def allocated(self) -> set[int]:
        """Blocks allocated anywhere on the chain (vhd-tool's ``in_any_bat``)."""
        return set().union(*(layer.blocks for layer in self.chain))


@dataclass
class VBD:
    ref: str
    uuid: str
    vm: str
    vdi: str
    userdevice: int
    # xapi_vbd.ml (create, l.145-150): a VBD made while its VM is not Suspended gets
    # device "" and currently_attached false; the device name ("xvda", or "hda" for HVM)
    # is filled in only when the VM starts (xenopsd reports it). It then stays.
    device: str = ""

    def boot(self) -> None:
        if not self.device:
            self.device = "xvd" + chr(ord("a") + self.userdevice)


@dataclass
class VM:
    ref: str
    uuid: str
    name_label: str
    power_state: str
    vbds: list[str] = field(default_factory=list)
    is_a_template: bool = False  # a snapshot is a template too (xapi_vm_clone.ml)
    is_a_snapshot: bool = False
    is_control_domain: bool = False
    snapshot_of: str = NULL_REF
    snapshot_time: str = EPOCH
    snapshot_info: dict[str, str] = field(default_factory=dict)
    parent: str = NULL_REF
    name_description: str = ""
    other_config: dict[str, str] = field(default_factory=dict)
    suspend_vdi: str = NULL_REF  # a checkpoint's memory image (xapi_vm_snapshot.ml)
    # operation -> the error text its refusal carries (datamodel_vm.ml, set by operators
    # and tools: VM.add_to_blocked_operations)
    blocked_operations: dict[str, str] = field(default_factory=dict)
    memory: int = 256 << 20  # memory_static_max: the size of a suspend image


@dataclass
class Task:
    ref: str
    uuid: str
    name_label: str
    status: str = "pending"
    result: str = ""
    error_info: list[str] = field(default_factory=list)
    progress: float = 0.0
    created: str = field(default_factory=xapi_time)
    finished: str = EPOCH
    name_description: str = ""
    other_config: dict[str, str] = field(default_factory=dict)
    # TaskHelper.set_cancellable/set_not_cancellable (taskHelper.ml l.216-225): most
    # operations advertise ``cancel`` while pending; VM.revert does not
    # (xapi_vm_snapshot.ml l.653-656: "There's no point advertising cancel").
    cancellable: bool = True
    # task.cancel and task.destroy of a pending task are recorded here, keyed by the
    # calling task (xapi_task.ml l.37-62): "cancel" is seen by the operation at its next
    # check (TaskHelper.exn_if_cancelling), "destroy" once it has ended.
    current_operations: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    """A pending injected failure: the next ``count`` calls of a method raise it."""

    code: str
    params: list[str]
    count: int


class Store:
    """All simulator state. Lookups raise the XAPI error a real pool would return."""

    def __init__(self, root: Path, user: str, password: str) -> None:
        self.lock = threading.RLock()
        self.root = root
        self.user, self.password = user, password
        self.sessions: dict[str, dict[str, str]] = {}
        # xapi_globs.ml: a session unused for 24 h is destroyed (inactive_session_timeout)
        self.session_idle_s = 24 * 3600.0
        self.session_used: dict[str, float] = {}
        self.vms: dict[str, VM] = {}
        self.vbds: dict[str, VBD] = {}
        self.vdis: dict[str, VDI] = {}
        self.srs: dict[str, SR] = {}
        self.pbds: dict[str, PBD] = {}
        from .dom0 import Datapaths  # noqa: PLC0415 - dom0 imports XapiError from here

        self.datapaths = Datapaths()
        self.tasks: dict[str, Task] = {}
        self.faults: dict[str, list[Fault]] = {}
        self.fault_at_byte: dict[str, int] = {}  # where an injected export fault cuts the body
        self.export_bps = 0  # 0 = unthrottled
        self.task_delay = 0.0  # seconds an Async task stays pending before it runs
        # How long one method's calls take, sync or Async (POST /sim/task-delay with a
        # "method"), and the methods whose calls do not end until released ("stall").
        self.op_delay: dict[str, float] = {}
        self.stalled: set[str] = set()
        self.async_started: dict[str, int] = {}  # Async calls by method (GET /sim/tasks)
        # Latency of every synchronous call (a loaded pool master takes its time), and how
        # many calls were in flight at once at most: the test of a client that does not
        # serialise its calls. XAPI serves each accepted connection on its own thread
        # (ocaml/libs/http-lib/server_io.ml: handler_by_thread, Thread.create per accept),
        # so concurrent calls of one session overlap there too.
        self.call_latency = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.restricted: set[str] = set()  # licensed features the pool lacks ("Checkpoint")
        self.gc_stalled = False  # SM's GC cannot coalesce (chains.py; POST /sim/gc)
        self.revert_mode = "xapi"  # XAPI's (xapi_vm_snapshot.ml), or "in-place" (old model)
        sr_uuid = new_uuid()
        self.host_ref, self.pool_ref = new_ref(), new_ref()
        self.host_uuid, self.pool_uuid = new_uuid(), new_uuid()
        # A second host (a pool member) with its own local SR: XAPI serves a VDI's data
        # only on a host that sees its SR, and the master answers a 302 to that host
        # (export_raw_vdi.ml, export_raw; importexport.ml, return_302_redirect).
        self.host2_ref, self.host2_uuid = new_ref(), new_uuid()
        self.host_address = {self.host_ref: "", self.host2_ref: ""}  # set by the server
        # The pool's master, and the hosts that are down (POST /sim/pool). HA makes a member
        # the master when its master leaves the live set (xapi_ha.ml on_master_failure
        # l.137-171, Xapi_pool_transition.become_master l.84-90); the others, and an old
        # master that comes back, become its slaves (become_another_masters_slave l.227-240).
        self.master_ref = self.host_ref
        self.down: set[str] = set()
        self.servers: dict[str, Any] = {}  # host ref -> its SimServer (set by the server)
        sr = SR(new_ref(), sr_uuid, "Local storage", root / sr_uuid, self.host_ref)
        sr.path.mkdir(parents=True, exist_ok=True)
        self.srs[sr.ref] = sr
        self.sr = sr
        sr2_uuid = new_uuid()
        # Named apart from the master's (XAPI calls both "Local storage") so that a lookup
        # by that label stays unambiguous in tests.
        sr2 = SR(new_ref(), sr2_uuid, f"Local storage on {HOST2_NAME}", root / sr2_uuid)
        sr2.host = self.host2_ref
        sr2.path.mkdir(parents=True, exist_ok=True)
        self.srs[sr2.ref] = sr2
        self.sr2 = sr2
        # A shared SR (NFS): attached on both hosts, so either serves its VDIs.
        shared_uuid = new_uuid()
        shared = SR(new_ref(), shared_uuid, "NFS virtual disk storage", root / shared_uuid)
        shared.shared, shared.type = True, "nfs"
        shared.path.mkdir(parents=True, exist_ok=True)
        self.srs[shared.ref] = shared
        self.shared_sr = shared
        for one, hosts in ((sr, [self.host_ref]), (sr2, [self.host2_ref])):
            for h in hosts:
                self._plug(one, h)
        for h in (self.host_ref, self.host2_ref):
            self._plug(shared, h)
        # Every host has its dom0 in the VM table (create_misc.ml,
        # create_domain_zero_record): "Control domain on host: <hostname>", Running,
        # domid 0, is_control_domain = true, not a template. VM.get_all and
        # VM.get_by_name_label return it like any VM.
        dom0 = VM(new_ref(), new_uuid(), f"Control domain on host: {HOST_NAME}", "Running")
        dom0.is_control_domain = True
        self.vms[dom0.ref] = dom0

    def _plug(self, sr: SR, host: str) -> None:
        pbd = PBD(new_ref(), new_uuid(), host, sr.ref)
        self.pbds[pbd.ref] = pbd

    def sr_visible(self, sr: SR, host: str) -> bool:
        """``check_sr_availability``: the SR has an attached PBD on ``host``."""
        return any(
            p.sr == sr.ref and p.host == host and p.currently_attached for p in self.pbds.values()
        )

    def host_for_sr(self, sr: SR) -> str:
        """``Importexport.find_host_for_sr`` (importexport.ml l.208-212): a host that sees
        the SR (``choose_host``, the master first here)."""
        for host in (self.host_ref, self.host2_ref):
            if self.sr_visible(sr, host):
                return host
        raise XapiError("SR_NOT_ATTACHED", sr.ref)

    def live_vm(self, vm: VM) -> bool:
        """A VM a guest runs in: not a template, a snapshot or a control domain."""
        return not (vm.is_a_template or vm.is_a_snapshot or vm.is_control_domain)

    # ----- lookups ---------------------------------------------------------------

    def table(self, cls: str) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {
            "VM": self.vms,
            "VBD": self.vbds,
            "VDI": self.vdis,
            "SR": self.srs,
            "PBD": self.pbds,
            "task": self.tasks,
        }
        return tables[cls]

    def get(self, cls: str, ref: object) -> Any:
        obj = self.table(cls).get(ref) if isinstance(ref, str) else None
        if obj is None:
            raise XapiError("HANDLE_INVALID", cls, ref)
        return obj

    def by_uuid(self, cls: str, value: object) -> Any:
        for obj in self.table(cls).values():
            if obj.uuid == value:
                return obj
        raise XapiError("UUID_INVALID", cls, value)

    def vdi_by_ref_or_uuid(self, key: str) -> VDI | None:
        """HTTP handlers accept either form, as XAPI's ``vdi=`` parameter does."""
        return self.vdis.get(key) or next((v for v in self.vdis.values() if v.uuid == key), None)

    # ----- sessions --------------------------------------------------------------

    def login(self, user: object, password: object, originator: str = "") -> str:
        if not secrets.compare_digest(str(user), self.user) or not secrets.compare_digest(
            str(password), self.password
        ):
            raise XapiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        ref = new_ref()
        self.sessions[ref] = {"uuid": new_uuid(), "user": str(user), "originator": originator}
        self.session_used[ref] = time.monotonic()
        return ref

    def check_session(self, ref: object) -> None:
        if not self.session_valid(ref):
            raise XapiError("SESSION_INVALID", ref if isinstance(ref, str) else "")

    def session_valid(self, ref: object) -> bool:
        """A live session (its idle time is reset); one idle too long is destroyed."""
        with self.lock:
            if not isinstance(ref, str) or ref not in self.sessions:
                return False
            now = time.monotonic()
            if now - self.session_used.get(ref, now) > self.session_idle_s:
                del self.sessions[ref]
                self.session_used.pop(ref, None)
                return False
            self.session_used[ref] = now
            return True

    # ----- fault injection -------------------------------------------------------

    def add_fault(self, method: str, code: str, params: list[str], count: int) -> None:
        self.faults.setdefault(method, []).append(Fault(code, [str(p) for p in params], count))

    def take_fault(self, method: str) -> XapiError | None:
        """Consume one pending fault for ``method`` (if any) and return it as an error."""
        with self.lock:
            pending = self.faults.get(method)
            if not pending:
                return None
            fault = pending[0]
            fault.count -= 1
            if fault.count <= 0:
                pending.pop(0)
            return XapiError(fault.code, *fault.params)
