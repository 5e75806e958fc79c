"""The driver's XAPI calls and lookups: VMs, disks by slot, tasks, our snapshots."""

from __future__ import annotations

import re
import time
from typing import Any

import XenAPI

from ...errors import (
    DiskNotFound,
    InvalidInput,
    VmNotFound,
)
from ...settings import Settings
from .common import (
    _UUID,
    _VOLUME_LABEL,
    NULL_REF,
    SNAPSHOT_KEY,
    TASK_POLL_MAX_S,
    TASK_POLL_S,
    VOLUME_PREFIX,
    _failure_error,
    _not_a_vm,
    _userdevice,
)
from .session import XapiSession


class XenCore:
    def __init__(self, settings: Settings) -> None:
        if settings.xen is None:
            raise InvalidInput("XenServer needs SNAPFERRY_XEN_URL (and user and password)")
        self.config = settings.xen
        self.delta_max = settings.delta_max
        self.session = XapiSession(settings.xen)

    def _api(self, method: str, *args: Any) -> Any:
        """One XenAPI call by its name (``"VDI.snapshot"``, ``"Async.VM.revert"``)."""

        def call(xenapi: Any) -> Any:
            fn = xenapi
            for part in method.split("."):
                fn = getattr(fn, part)
            return fn(*args)

        return self.session.call(call, method)

    # -- lookups ---------------------------------------------------------------------------
    def _vm(self, name: str) -> str:
        """The one VM ``name`` means: a UUID is looked up as one, anything else as a label.
        Templates, snapshots and control domains are not VMs to act on; a label that names
        more than one VM is refused (listing their UUIDs) rather than guessed."""
        where = f"on XenServer {self.config.url}"
        if _UUID.fullmatch(name):
            ref = self._vm_by_uuid(name.lower())
            if ref is None:
                raise VmNotFound(f"no VM has UUID {name} {where}")
            kind = _not_a_vm(self._api("VM.get_record", ref))
            if kind:
                raise VmNotFound(f"UUID {name} {where} is {kind}, not a VM")
            return ref
        records = {
            str(r): self._api("VM.get_record", r) for r in self._api("VM.get_by_name_label", name)
        }
        vms = {r: rec for r, rec in records.items() if not _not_a_vm(rec)}
        if not vms:
            others = ", ".join(sorted(_not_a_vm(rec) for rec in records.values()))
            also = f" (the name belongs only to: {others})" if others else ""
            raise VmNotFound(f"VM {name!r} does not exist {where}{also}")
        if len(vms) > 1:
            listing = ", ".join(
                f"{rec['uuid']} ({rec['power_state']})"
                for rec in sorted(vms.values(), key=lambda rec: str(rec["uuid"]))
            )
            raise InvalidInput(
                f"{len(vms)} VMs are named {name!r} {where}: {listing}; name the VM by its"
                " UUID instead"
            )
        return next(iter(vms))

    def _vm_by_uuid(self, uuid: str) -> str | None:
        def call(xenapi: Any) -> Any:
            try:
                return xenapi.VM.get_by_uuid(uuid)
            except XenAPI.Failure as exc:
                if exc.details and exc.details[0] == "UUID_INVALID":
                    return None
                raise

        ref = self.session.call(call, "VM.get_by_uuid")
        return None if ref is None else str(ref)

    def _vdis(self, vm: str) -> dict[str, str]:
        """The VM's disks by ``VBD.userdevice`` ("0", "1", ...) -> VDI ref. Not by
        ``VBD.device``: XAPI leaves it "" until the VM boots, and for disks attached while
        it is halted (xapi_vbd.ml, ``create``), and HVM guests call them hda..hdd;
        userdevice is the slot, fixed from the start (as CloudStack keys them)."""
        disks = {}
        for vbd in self._api("VM.get_VBDs", vm):
            if self._api("VBD.get_type", vbd) != "Disk":
                continue
            vdi = self._api("VBD.get_VDI", vbd)
            if vdi != NULL_REF:
                disks[str(self._api("VBD.get_userdevice", vbd))] = vdi
        return disks

    def _vdi(self, vm: str, vm_name: str, disk: str) -> str:
        """``--disk`` as a device name (``xvda``, ``hda``, ``sda``: its letter is the slot)
        or as the userdevice number itself."""
        disks = self._vdis(vm)
        slot = _userdevice(disk)
        if slot is None or slot not in disks:
            have = ", ".join(
                f"xvd{chr(97 + int(d))} (userdevice {d})" for d in sorted(disks, key=int)
            )
            raise DiskNotFound(f"VM {vm_name!r} has no disk {disk!r} (it has: {have or 'none'})")
        return disks[slot]

    def _wait(self, task: str, what: str, *, keep: bool = False) -> str:
        """Poll an Async call's task; its result is XML like ``<value>OpaqueRef:…</value>``.
        The task is destroyed once its end has been read, and only then: when a poll fails
        (the connection broke), the task goes on in XAPI and stays for a retry to wait for
        (XAPI removes a pending task after 24 h, an ended one after 65 min). ``keep``
        keeps a successful task too, for the caller to destroy once it holds the result
        durably."""
        delay = TASK_POLL_S
        # "cancelling" is a task state too (datamodel: pending, success, failure,
        # cancelling, cancelled): the task has not ended yet.
        while (status := self._api("task.get_status", task)) in ("pending", "cancelling"):
            time.sleep(delay)
            delay = min(delay * 2, TASK_POLL_MAX_S)
        if status != "success":
            info = self._api("task.get_error_info", task)
            self._api("task.destroy", task)
            raise _failure_error(XenAPI.Failure(info), what)
        result = self._api("task.get_result", task)
        if not keep:
            self._api("task.destroy", task)
        match = re.search(r"<value>(.*?)</value>", result or "")
        return match.group(1) if match else str(result)

    def _snapshot_vdis(self, vdi: str) -> dict[str, str]:
        """Our volume snapshots of one VDI: label ``snapferry-<uuid>`` -> ref, each marked
        ``SNAPSHOT_KEY = <uuid>`` (older ones carry only the label). Nothing is adopted
        here: a snapshot of the VDI that is not labelled ours may be another tool's, even
        when it inherited a take's mark (see ``XenServerDriver.take``)."""
        found = {}
        for snap in self._api("VDI.get_snapshots", vdi):
            label = self._api("VDI.get_name_label", snap)
            if not _VOLUME_LABEL.fullmatch(label):
                continue
            marked = self._api("VDI.get_other_config", snap).get(SNAPSHOT_KEY)
            if marked not in (None, label[len(VOLUME_PREFIX) :]):
                continue
            found[label] = snap
        return found

    def _power(self, vm: str) -> str:
        return str(self._api("VM.get_power_state", vm))
