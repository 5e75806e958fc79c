"""The driver's XAPI calls and lookups: VMs, disks by slot, tasks, our snapshots."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import XenAPI
from temporalio import activity
from temporalio.exceptions import CancelledError

from ...errors import (
    DiskNotFound,
    HypervisorUnavailable,
    InvalidInput,
    SnapferryError,
    SourceGone,
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

log = logging.getLogger(__name__)

# How long a cancelled activity waits for its task to end after task.cancel before it
# destroys the task anyway (a VM.revert is not cancellable: XAPI ends it as it would have).
TASK_CANCEL_WAIT_S = 30.0
# Failed polls in a row of a long call's task that are polled again (about 2 min of
# backoff in all): its outcome is read rather than lost to a dropped connection.
TASK_POLL_RETRIES = 30


class TaskLost(HypervisorUnavailable):
    """A task XAPI no longer knows after the session was renewed (the pool master changed:
    a new master starts without the old one's tasks, ``datamodel.ml`` l.628-633,
    PersistNothing; ``xapi_pool_transition.ml`` l.84-89 and l.227-240 restart xapi): what
    it did is unknown, and the retry finds it by its marks or labels."""


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

    def _run(self, method: str, *args: Any, cancellable: bool = True) -> str:
        """``Async.<method>``, its task waited for (see ``_wait``), as Xen Orchestra and
        CloudStack's XenServer plugin make their long calls: a VM.snapshot, checkpoint,
        revert, start or resume, a VDI.destroy. A synchronous call holds one XML-RPC
        request open for as long as the operation runs: a connection dropped meanwhile loses
        its outcome, and nothing heartbeats. ``cancellable=False`` for a call made while
        the activity already ends (a clean-up after a failure): it is waited for as is."""
        task = str(self._api(f"Async.{method}", *args))
        since = self.session.generation
        return self._wait(
            task, method, cancellable=cancellable, poll_retries=TASK_POLL_RETRIES, since=since
        )

    def _task_api(self, method: str, task: str, since: int | None) -> Any:
        """``task.<method>(task)``; HANDLE_INVALID for a task made before the last login
        (``since``, ``XapiSession.generation``) is ``TaskLost``, not SourceGone."""
        try:
            return self._api(method, task)
        except SourceGone as exc:
            if since is not None and self.session.generation != since:
                raise TaskLost(
                    f"{method}: task {task} is gone with the pool master it ran on (the"
                    " session was renewed since); its outcome is unknown"
                ) from exc
            raise

    def _wait(
        self,
        task: str,
        what: str,
        *,
        keep: bool = False,
        cancellable: bool = True,
        undo: Callable[[str], None] | None = None,
        poll_retries: int = 0,
        since: int | None = None,
    ) -> str:
        """Poll an Async call's task; its result is XML like ``<value>OpaqueRef:…</value>``
        (``Xmlrpc.to_string`` of the call's value), its failure ``error_info``, mapped as
        the synchronous call's failure. The task is destroyed once its end has been read,
        and only then: when a poll fails (the connection broke), the task goes on in XAPI
        and stays for a retry to wait for (XAPI removes a pending task after 24 h, an ended
        one after 65 min). ``keep`` keeps a successful task too, for the caller to destroy
        once it holds the result durably.

        Inside an activity each poll heartbeats (polls back off to a quarter of the
        heartbeat timeout at most), so a long task is bounded by liveness, not by a wall
        clock. When the activity is cancelled the task is cancelled too (``task.cancel``;
        XAPI may still let it end as it would have, VM.revert always), waited for up to
        ``TASK_CANCEL_WAIT_S``, and destroyed; a result it made all the same is handed to
        ``undo``. ``poll_retries``: how many failed polls in a row (XAPI unreachable for a
        moment) are polled again, the task going on meanwhile, before the failure is
        raised. ``since``: the session generation the task was made in (``_task_api``):
        a task lost to a master change is ``TaskLost`` (retryable), never SourceGone."""
        delay, cap = TASK_POLL_S, _poll_cap()
        try:
            # "cancelling" is a task state too (datamodel: pending, success, failure,
            # cancelling, cancelled): the task has not ended yet.
            while (status := self._poll(task, poll_retries, since)) in ("pending", "cancelling"):
                if activity.in_activity():
                    activity.heartbeat({"task": what, "status": status})
                    if cancellable and activity.is_cancelled():
                        raise CancelledError(f"{what}: the activity was cancelled")
                time.sleep(delay)
                delay = min(delay * 2, cap)
            if status != "success":
                info = self._task_api("task.get_error_info", task, since)
                self._api("task.destroy", task)
                raise _failure_error(XenAPI.Failure(info), what)
            result = self._task_api("task.get_result", task, since)
        except CancelledError:
            if cancellable:
                self._cancel_task(task, what, undo)
            raise
        if not keep:
            self._api("task.destroy", task)
        return _task_value(result)

    def _poll(self, task: str, retries: int, since: int | None = None) -> str:
        """``task.get_status``, asked again up to ``retries`` times while XAPI cannot be
        reached (each wait heartbeats: the activity is alive, only the link is not)."""
        delay = TASK_POLL_S
        for attempt in range(retries + 1):
            try:
                return str(self._task_api("task.get_status", task, since))
            except TaskLost:
                raise
            except HypervisorUnavailable as exc:
                if attempt == retries:
                    raise
                log.warning("polling task %s: %s; polling it again", task, exc)
                if activity.in_activity():
                    activity.heartbeat({"task": task, "poll_failed": str(exc)})
                time.sleep(delay)
                delay = min(delay * 4, TASK_POLL_MAX_S * 4)
        raise AssertionError("unreachable")

    def _cancel_task(self, task: str, what: str, undo: Callable[[str], None] | None) -> None:
        """``task.cancel``, then the task's end (up to ``TASK_CANCEL_WAIT_S``), then
        ``task.destroy``: XAPI removes a task destroyed while still pending once it ends
        (xapi_task.ml ``destroy``, db_gc_util.ml ``timeout_tasks``). Shielded from a
        second cancellation; XAPI errors are logged, not raised (the activity ends
        cancelled either way)."""
        shield = activity.shield_thread_cancel_exception if activity.in_activity() else None
        with shield() if shield is not None else contextlib.nullcontext():
            status = "pending"
            try:
                self._api("task.cancel", task)
                deadline, delay = time.monotonic() + TASK_CANCEL_WAIT_S, TASK_POLL_S
                while (status := self._api("task.get_status", task)) in (
                    "pending",
                    "cancelling",
                ) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, TASK_POLL_MAX_S)
                if status == "success" and undo is not None:
                    undo(_task_value(self._api("task.get_result", task)))
            except SnapferryError as exc:
                log.warning("%s: cancelling its task %s: %s", what, task, exc)
            if status in ("pending", "cancelling"):
                log.warning(
                    "%s: its task %s did not end within %.0f s of its cancel; XAPI goes on"
                    " with it and removes the task when it ends",
                    what,
                    task,
                    TASK_CANCEL_WAIT_S,
                )
            with contextlib.suppress(SnapferryError):
                self._api("task.destroy", task)

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

    def _image_format(self, uuid: str) -> str:
        """``sm_config['image-format']`` (XCP-ng 8.3: ``vhd``, ``qcow2``), else SM's
        ``vdi_type`` (``vhd``, ``aio``/``raw`` for a raw VDI); ``vhd`` when neither says."""
        ref = self._api("VDI.get_by_uuid", uuid)
        config = self._api("VDI.get_sm_config", ref) or {}
        value = str(config.get("image-format") or config.get("vdi_type") or "vhd").lower()
        return value


def _poll_cap() -> float:
    """The longest pause between two polls of a task: ``TASK_POLL_MAX_S``, and never more
    than a quarter of the activity's heartbeat timeout."""
    cap = TASK_POLL_MAX_S
    if activity.in_activity():
        timeout = activity.info().heartbeat_timeout
        if timeout:
            cap = min(cap, timeout.total_seconds() / 4)
    return cap


def _task_value(result: object) -> str:
    """The value in a task's result text (``<value>OpaqueRef:…</value>``; '' for void)."""
    match = re.search(r"<value>(.*?)</value>", str(result or ""), re.DOTALL)
    return match.group(1) if match else str(result or "")
