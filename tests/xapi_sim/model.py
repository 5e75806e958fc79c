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
CLASSES = ("VM", "VBD", "VDI", "SR", "task", "host", "pool")
HOST_NAME = "xapi-sim"  # the one host's name_label (and its dom0's label, below)


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


@dataclass
class VBD:
    ref: str
    uuid: str
    vm: str
    vdi: str
    userdevice: int

    @property
    def device(self) -> str:
        return "xvd" + chr(ord("a") + self.userdevice)


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
        self.vms: dict[str, VM] = {}
        self.vbds: dict[str, VBD] = {}
        self.vdis: dict[str, VDI] = {}
        self.srs: dict[str, SR] = {}
        self.tasks: dict[str, Task] = {}
        self.faults: dict[str, list[Fault]] = {}
        self.export_bps = 0  # 0 = unthrottled
        self.task_delay = 0.0  # seconds an Async task stays pending before it runs
        self.revert_mode = "in-place"  # or "xapi" (new VDIs, like the real pool)
        sr_uuid = new_uuid()
        sr = SR(new_ref(), sr_uuid, "Local storage", root / sr_uuid)
        sr.path.mkdir(parents=True, exist_ok=True)
        self.srs[sr.ref] = sr
        self.sr = sr
        self.host_ref, self.pool_ref = new_ref(), new_ref()
        self.host_uuid, self.pool_uuid = new_uuid(), new_uuid()
        # Every host has its dom0 in the VM table (create_misc.ml,
        # create_domain_zero_record): "Control domain on host: <hostname>", Running,
        # domid 0, is_control_domain = true, not a template. VM.get_all and
        # VM.get_by_name_label return it like any VM.
        dom0 = VM(new_ref(), new_uuid(), f"Control domain on host: {HOST_NAME}", "Running")
        dom0.is_control_domain = True
        self.vms[dom0.ref] = dom0

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
        return ref

    def check_session(self, ref: object) -> None:
        if not isinstance(ref, str) or ref not in self.sessions:
            raise XapiError("SESSION_INVALID", ref if isinstance(ref, str) else "")

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
