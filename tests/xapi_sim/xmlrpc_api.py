"""XML-RPC front end: XAPI's result envelope, sessions, fault injection and Async tasks.

Every reply is ``{'Status': 'Success', 'Value': v}`` or ``{'Status': 'Failure',
'ErrorDescription': [code, *params]}``; XenAPI.py turns the latter into
``XenAPI.Failure`` and, for SESSION_INVALID, logs in again by itself. Explicit
operations live in ``self.methods``; per-class getters are generic over the records.
"""

from __future__ import annotations

import inspect
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape

from . import ops
from .model import CLASSES, Store, Task, XapiError, new_ref, new_uuid, xapi_time
from .records import all_refs, record, ref_by_uuid, refs_by_name_label, wire

Method = Callable[..., Any]
_NAMED = {"VM": "vms", "VDI": "vdis"}  # classes whose name/other_config can be set


class XapiService:
    """Decodes one XML-RPC request body and encodes the XAPI reply."""

    def __init__(self, store: Store, host_ref: str) -> None:
        self.host_ref = host_ref  # the host this XML-RPC endpoint is
        self.store = s = store
        self.methods: dict[str, Method] = {
            "session.get_this_host": lambda _self: host_ref,
            "VM.snapshot": lambda vm, name, ignore=None: ops.vm_snapshot(s, vm, name, ignore),
            "VM.checkpoint": lambda vm, name: ops.vm_snapshot(s, vm, name, memory=True),
            "VM.revert": lambda snap: ops.vm_revert(s, snap),
            "VM.destroy": lambda vm: ops.vm_destroy(s, vm),
            "VM.start": lambda vm, paused=False, force=False: ops.vm_set_power(
                s, vm, "Halted", "Running", "start"
            ),
            "VM.resume": lambda vm, paused=False, force=False: ops.vm_set_power(
                s, vm, "Suspended", "Running", "resume"
            ),
            # start_on/resume_on: on this host (the member runs no VMs here)
            "VM.start_on": lambda vm, host, paused=False, force=False: ops.vm_set_power(
                s, vm, "Halted", "Running", "start_on"
            ),
            "VM.resume_on": lambda vm, host, paused=False, force=False: ops.vm_set_power(
                s, vm, "Suspended", "Running", "resume_on"
            ),
            "VM.add_to_blocked_operations": lambda vm, op, value: ops.add_blocked(s, vm, op, value),
            "VM.remove_from_blocked_operations": lambda vm, op: (
                s.get("VM", vm).blocked_operations.pop(str(op), None) and ""
            ),
            "VM.set_blocked_operations": lambda vm, value: setattr(
                s.get("VM", vm), "blocked_operations", {str(k): str(v) for k, v in value.items()}
            ),
            "VM.hard_shutdown": lambda vm: ops.vm_set_power(
                s, vm, "Running", "Halted", "hard_shutdown"
            ),
            "VM.clean_shutdown": lambda vm: ops.vm_set_power(
                s, vm, "Running", "Halted", "clean_shutdown"
            ),
            "VDI.snapshot": lambda vdi, params=None: ops.vdi_snapshot(s, vdi, params),
            "VDI.clone": lambda vdi, params=None: ops.vdi_clone(s, vdi),
            "VDI.copy": lambda vdi, sr: ops.vdi_copy(s, vdi, sr),
            "VDI.create": lambda rec: ops.vdi_create(s, rec),
            "VDI.destroy": lambda vdi: ops.vdi_destroy(s, vdi),
            "VDI.resize": lambda vdi, size: ops.vdi_resize(s, vdi, size),
            "VBD.create": lambda rec: ops.vbd_create(s, rec),
            "VBD.destroy": lambda vbd: ops.vbd_destroy(s, vbd),
            "task.create": self._task_create,
            "task.cancel": self._task_cancel,
            "task.destroy": self._task_destroy,
            "task.set_status": self._task_set_status,
        }

    # ----- wire ------------------------------------------------------------------

    def handle(self, body: bytes) -> bytes:
        try:
            params, method = xmlrpc.client.loads(body)
        except Exception:  # noqa: BLE001 - any undecodable body is a parse fault
            fault = xmlrpc.client.Fault(-32700, "XML-RPC parse error")
            return xmlrpc.client.dumps(fault, methodresponse=True).encode()
        reply = self.call(method or "", list(params))
        return xmlrpc.client.dumps((reply,), methodresponse=True).encode()

    def call(self, method: str, params: list[Any]) -> dict[str, Any]:
        try:
            value = self._call(method, params)
        except XapiError as exc:
            return {"Status": "Failure", "ErrorDescription": exc.description}
        except Exception as exc:  # noqa: BLE001 - a sim bug must look like XAPI's error
            return {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", repr(exc)]}
        return {"Status": "Success", "Value": wire(value)}

    def _call(self, method: str, params: list[Any]) -> Any:
        s = self.store
        if method == "session.login_with_password":
            if fault := s.take_fault(method):
                raise fault
            if not 2 <= len(params) <= 4:
                raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, 4, len(params))
            if self.host_ref != s.master_ref:
                # xapi_session.ml (l.996-1001, a login): a pool member answers
                # HOST_IS_SLAVE [master address]; so does an old master after a failover.
                raise XapiError("HOST_IS_SLAVE", s.host_address[s.master_ref])
            with s.lock:
                return s.login(params[0], params[1], str(params[3]) if len(params) > 3 else "")
        session, args = (params[0] if params else None), params[1:]
        with s.lock:
            s.check_session(session)
            if method == "session.logout":
                s.sessions.pop(str(session), None)
                return ""
        if method.startswith("Async."):
            return self._start_task(method[len("Async.") :], args)
        fn = self._resolve(method, args)
        # A sync call runs the same operation as its Async form while the caller's
        # connection waits for the reply (server_helpers.ml do_dispatch l.168-175 against
        # l.177-197): it takes as long, and nothing can cancel it.
        self._take_time(method)
        return self.invoke(method, args, fn)

    def invoke(self, method: str, args: list[Any], fn: Method | None = None) -> Any:
        """Run one (sync) method: injected fault first, then the implementation."""
        if fault := self.store.take_fault(method):
            raise fault
        fn = fn or self._resolve(method, args)
        s = self.store
        if s.call_latency:
            with s.lock:
                s.in_flight += 1
                s.max_in_flight = max(s.max_in_flight, s.in_flight)
            try:
                time.sleep(s.call_latency)  # outside the lock: calls overlap, as on XAPI
            finally:
                with s.lock:
                    s.in_flight -= 1
        with s.lock:
            return fn(*args)

    def _resolve(self, method: str, args: list[Any]) -> Method:
        fn = self.methods.get(method)
        if fn is None:
            cls, _, name = method.partition(".")
            fn = self._generic(cls, name) if cls in CLASSES else None
        if fn is None:
            raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
        try:
            inspect.signature(fn).bind(*args)
        except TypeError:
            wanted = len(inspect.signature(fn).parameters) + 1
            raise XapiError(
                "MESSAGE_PARAMETER_COUNT_MISMATCH", method, wanted, len(args) + 1
            ) from None
        return fn

    # ----- generic per-class methods -----------------------------------------------

    def _generic(self, cls: str, name: str) -> Method | None:
        s = self.store
        if name == "get_record":
            return lambda ref: record(s, cls, ref)
        if name == "get_all":
            return lambda: all_refs(s, cls)
        if name == "get_all_records":
            return lambda: {r: record(s, cls, r) for r in all_refs(s, cls)}
        if name == "get_by_uuid":
            return lambda value: ref_by_uuid(s, cls, value)
        if name == "get_by_name_label":
            return lambda label: refs_by_name_label(s, cls, label)
        if name.startswith("get_"):
            return lambda ref: self._field(cls, ref, name[len("get_") :])
        if cls in _NAMED and name in ("set_name_label", "set_name_description"):
            return lambda ref, value: setattr(s.get(cls, ref), name[len("set_") :], str(value))
        if cls in _NAMED and name == "add_to_other_config":
            return lambda ref, k, v: s.get(cls, ref).other_config.__setitem__(str(k), str(v))
        if cls in _NAMED and name == "remove_from_other_config":
            return lambda ref, k: s.get(cls, ref).other_config.pop(str(k), None) and ""
        return None

    def _field(self, cls: str, ref: object, field: str) -> Any:
        rec = record(self.store, cls, ref)
        if field not in rec:
            raise XapiError("MESSAGE_METHOD_UNKNOWN", f"{cls}.get_{field}")
        return rec[field]

    # ----- tasks -----------------------------------------------------------------
    # xapi-project/xen-api at e2ee48d688, ocaml/xapi: xapi_task.ml (create, destroy,
    # cancel), taskHelper.ml (complete, failed, cancel_this, exn_if_cancelling),
    # server_helpers.ml (do_dispatch: an Async call answers its task ref at once and runs
    # the operation in a thread of its own), db_gc_util.ml (timeout_tasks).

    def _task_create(self, label: str, description: str = "") -> str:
        task = Task(new_ref(), new_uuid(), str(label), name_description=str(description))
        self.store.tasks[task.ref] = task
        return task.ref

    def _task_cancel(self, ref: str) -> str:
        """xapi_task.ml cancel (l.46-65): any task of ours may be asked; the request is
        recorded in ``current_operations`` and the call returns. Nothing is refused: a task
        that has ended, or one whose operation is not cancellable (VM.revert), just goes
        on to its own end ("a task may fail to be cancelled and may complete or fail
        normally", datamodel.ml Task.cancel)."""
        task = self.store.get("task", ref)
        task.current_operations = {new_ref(): "cancel"}
        return ""

    def _task_destroy(self, ref: str) -> str:
        """xapi_task.ml destroy (l.37-44): an ended task is removed; a pending one gets
        ``destroy`` in ``current_operations`` and stays until it ends, when the DB GC
        removes it (db_gc_util.ml timeout_tasks l.386-400, on its next pass; here at
        once)."""
        task = self.store.get("task", ref)
        if task.status == "pending":
            task.current_operations["task"] = "destroy"
        else:
            self.store.tasks.pop(task.ref, None)
        return ""

    def _task_set_status(self, ref: str, value: str) -> str:
        """xapi_task.ml set_status (l.67-70): the status, as given (an enum of
        task_status_type, datamodel.ml l.423-431); a task destroyed while pending goes once
        it is set ended."""
        task = self.store.get("task", ref)
        if value not in ("pending", "success", "failure", "cancelling", "cancelled"):
            # a value outside the enum does not unmarshal (api_errors.ml l.943)
            raise XapiError("XMLRPC_UNMARSHAL_FAILURE", "task_status_type", value)
        task.status = str(value)
        if (
            value in ("success", "failure", "cancelled")
            and task.current_operations.get("task") == "destroy"
        ):
            self.store.tasks.pop(task.ref, None)
        return ""

    def _start_task(self, inner: str, args: list[Any]) -> str:
        """Validate now (the arguments are unmarshalled before do_dispatch), then run the
        operation in a thread of its own (now, or after the task's delay); return the ref."""
        self._resolve(inner, args)
        with self.store.lock:
            ref = self._task_create(f"Async.{inner}")
            task = self.store.tasks[ref]
            task.cancellable = inner not in _NOT_CANCELLABLE
            self.store.async_started[inner] = self.store.async_started.get(inner, 0) + 1
            delay = self.store.task_delay + self.store.op_delay.get(inner, 0.0)
            stalled = inner in self.store.stalled
        fn: Method | None = None
        if inner == "VDI.snapshot" and args:
            # The source's record is read when the call begins, its other_config copied
            # onto the snapshot when the call ends (xapi_vdi.ml snapshot_and_clone).
            at_start = ops.vdi_record_at_start(self.store, str(args[0]))

            def fn(vdi: str, params: object = None) -> str:
                return ops.vdi_snapshot(self.store, vdi, params, at_start=at_start)

        if delay > 0 or stalled:
            run = threading.Thread(target=self._run_task, args=(task, inner, args, fn))
            run.daemon = True
            run.start()
        else:
            self._run_task(task, inner, args, fn)
        return ref

    def _take_time(self, method: str, task: Task | None = None) -> bool:
        """The time an operation takes (``task_delay`` for Async calls, the method's own
        delay, a stall until released), its task's progress rising meanwhile. False when a
        cancellable task was cancelled meanwhile: the operation checks for that as it goes
        (TaskHelper.exn_if_cancelling, e.g. before each disk of a VM.snapshot,
        xapi_vm_clone.ml l.198) and ends ``cancelled`` without doing anything."""
        s = self.store
        with s.lock:
            total = s.op_delay.get(method, 0.0) + (s.task_delay if task is not None else 0.0)
        t0 = time.monotonic()
        while True:
            with s.lock:
                if task is not None and task.cancellable and _cancel_asked(task):
                    return False
                elapsed = time.monotonic() - t0
                if elapsed >= total and method not in s.stalled:
                    return True
                if task is not None and total > 0:
                    task.progress = round(min(elapsed / total, 0.99), 2)
            time.sleep(0.02)

    def _run_task(self, task: Task, inner: str, args: list[Any], fn: Method | None = None) -> None:
        if self._take_time(inner, task):
            try:
                value = self.invoke(inner, args, fn)
            except XapiError as exc:
                finish_task(task, "failure", error=exc.description)
            except Exception as exc:  # noqa: BLE001
                finish_task(task, "failure", error=["INTERNAL_ERROR", repr(exc)])
            else:
                finish_task(task, "success", result=task_result(value))
        else:
            # server_helpers.ml exec_with_context l.90-94: TASK_CANCELLED [task] ends the
            # task cancelled (TaskHelper.cancel, taskHelper.ml l.246-263)
            finish_task(task, "cancelled", error=["TASK_CANCELLED", task.ref])
        with self.store.lock:
            if task.current_operations.get("task") == "destroy":
                self.store.tasks.pop(task.ref, None)


# Operations that say they cannot be cancelled (TaskHelper.set_not_cancellable): VM.revert
# ("destructive and relatively fast", xapi_vm_snapshot.ml l.653-656).
_NOT_CANCELLABLE = frozenset({"VM.revert"})


def _cancel_asked(task: Task) -> bool:
    """TaskHelper.is_cancelling (taskHelper.ml l.227-235): ``cancel`` in current_operations."""
    return "cancel" in task.current_operations.values()


def task_result(value: Any) -> str:
    """XAPI's task result text: ``<value>OpaqueRef:…</value>``, or '' for void."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return f"<value>{escape(value)}</value>"
    text = xmlrpc.client.dumps((wire(value),))
    return text[text.index("<value>") : text.rindex("</value>") + len("</value>")]


def finish_task(task: Task, status: str, result: str = "", error: list[str] | None = None) -> None:
    """taskHelper.ml complete/failed/cancel_this: a pending task only (an ended one keeps
    its end); progress 1, finished now, no allowed operations."""
    if task.status != "pending":
        return
    task.status, task.result, task.error_info = status, result, list(error or [])
    task.progress, task.finished = 1.0, xapi_time()
