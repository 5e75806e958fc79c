"""What each supported SOAP method does: sessions, property reads, VM and snapshot tasks.

Kept apart from the HTTP plumbing so the vSphere semantics read top to bottom in
one place. Methods not listed here answer ``vmodl.fault.NotSupported`` instead of
pretending, so a driver that needs more than is modelled fails loudly.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from pyVmomi import vim, vmodl

from . import soap
from .inventory import Inventory
from .objects import FILE_MANAGER, SEARCH_INDEX, SI, now
from .snapshots import Snap

# Methods that may run before Login (pyVim calls them to bootstrap a connection).
_UNAUTHENTICATED_OK = {"RetrieveServiceContent", "Login"}


def _walk(value: Any, path: list[str]) -> Any:
    """Follow ``config.hardware.device`` style paths, keeping pyVmomi typed arrays."""
    for seg in path:
        if value is None:
            return None
        try:
            typ = type(value)._GetPropertyInfo(seg).type
        except (AttributeError, KeyError) as exc:
            raise vmodl.query.InvalidProperty(name=seg) from exc
        value = getattr(value, seg)
        if isinstance(value, list) and not hasattr(value, "Item"):
            value = typ(value)  # DynamicProperty.val is xsd:anyType: arrays must be typed
    return value


def _fails(fault: vmodl.MethodFault) -> Callable[[], Any]:
    def raise_it() -> Any:
        raise fault

    return raise_it


class VimService:
    """The vSphere API as far as snapferry uses it, on top of an ``Inventory``."""

    def __init__(self, inv: Inventory, user: str, password: str) -> None:
        self.inv, self.user, self.password = inv, user, password
        self.sessions: dict[str, vim.UserSession] = {}
        # Idle sessions expire: a session ends ``idle_timeout`` seconds after its last
        # SOAP call (0: never), as govmomi's simulator ends one SessionIdleTimeout after
        # its LastActiveTime, which each /sdk request sets (simulator/session_manager.go,
        # expiredSession and SetSession). Datastore transfers (/folder) do not keep it
        # alive here: nothing documents that they do on vCenter, and virt-v2v renews its
        # cookie during long /folder reads because "VMware authentication expires after
        # 30 minutes" (input/vCenter.ml). vCenter's default is 30 minutes.
        self.idle_timeout = 0.0
        self.last_active: dict[str, float] = {}
        self.stats = {"logins": 0, "logouts": 0, "expired": 0, "max_live": 0}

    def handle(
        self, body: bytes, soapaction: str | None, session_key: str | None, user_agent: str
    ) -> tuple[int, bytes, str | None]:
        """Decode, authorise and run one SOAP call: (HTTP status, envelope, new session key)."""
        version = soap.version_from_soapaction(soapaction)
        with self.inv.lock:
            try:
                req = soap.parse_request(body, version)
                self.inv.calls[req.method] = self.inv.calls.get(req.method, 0) + 1
                session = self.live_session(session_key)
                if session is not None:
                    self.last_active[session.key] = time.monotonic()
                    session.lastActiveTime = now()
                    session.callCount = (session.callCount or 0) + 1
                if session is None and req.method not in _UNAUTHENTICATED_OK:
                    raise vim.fault.NotAuthenticated(msg="The session is not authenticated.")
                if req.method == "Login":
                    session = self._login(req.args, user_agent)
                result, rtype = self._call(req, soap.vs.versionIdMap[version], session)
                new_key = session.key if req.method == "Login" and session else None
                return 200, soap.response(req.method, result, rtype, version), new_key
            except vmodl.MethodFault as exc:
                return 500, soap.fault(exc, version), None
            except Exception as exc:  # a simulator bug must not kill the client's connection
                traceback.print_exc()
                fault = vmodl.RuntimeFault(msg=f"simulator bug: {exc!r}")
                return 500, soap.fault(fault, version), None

    def live_session(self, key: str | None) -> vim.UserSession | None:
        """The session of this cookie, unless it has idled past ``idle_timeout`` (then it
        is ended, as vCenter ends it). Reading it does not keep it alive."""
        session = self.sessions.get(key or "")
        if session is None:
            return None
        idle = time.monotonic() - self.last_active.get(session.key, 0.0)
        if self.idle_timeout and idle > self.idle_timeout:
            del self.sessions[session.key]
            self.stats["expired"] += 1
            return None
        return session

    def live_sessions(self) -> list[vim.UserSession]:
        return [s for key in list(self.sessions) if (s := self.live_session(key)) is not None]

    def expire_all(self) -> None:
        """Every session ends at once (a vpxd restart, or an administrator's
        SessionManager.TerminateSession of each)."""
        self.stats["expired"] += len(self.sessions)
        self.sessions.clear()

    def _login(self, args: dict[str, Any], user_agent: str) -> vim.UserSession:
        if (args.get("userName"), args.get("password")) != (self.user, self.password):
            raise vim.fault.InvalidLogin(
                msg="Cannot complete login due to an incorrect user name or password."
            )
        key = str(uuid.uuid4())
        self.sessions[key] = vim.UserSession(
            key=key,
            userName=self.user,
            fullName=self.user,
            loginTime=now(),
            lastActiveTime=now(),
            locale=args.get("locale") or "en",
            messageLocale="en",
            extensionSession=False,
            ipAddress="127.0.0.1",
            userAgent=user_agent,
            callCount=0,
        )
        self.last_active[key] = time.monotonic()
        self.stats["logins"] += 1
        self.stats["max_live"] = max(self.stats["max_live"], len(self.live_sessions()))
        return self.sessions[key]

    def _call(self, req: soap.SoapRequest, api: str, session: Any) -> tuple[Any, type]:
        """Run one method; returns (result, its declared type for serialisation)."""
        inv, a, m, this = self.inv, req.args, req.method, req.this
        info = soap.method_info(m)
        rtype = info.result if info else object
        if m == "Fetch":  # how pyvmomi reads ``vm.name`` etc. (StubAdapterAccessorImpl)
            props = inv.properties(this, api, session, self.live_sessions())
            if isinstance(this, vim.Task) and a["prop"] == "info":
                inv.task_reads[this._moId] = inv.task_reads.get(this._moId, 0) + 1
            try:
                rtype = type(this)._GetPropertyInfo(a["prop"]).type
            except AttributeError as exc:
                raise vmodl.query.InvalidProperty(name=a["prop"]) from exc
            if a["prop"] not in props:
                what = f"{type(this).__name__}.{a['prop']}"
                raise vmodl.fault.NotSupported(msg=f"simulator does not model {what}")
            return props[a["prop"]], rtype
        if m == "RetrieveProperties":
            return self._retrieve(a.get("specSet") or [], api, session), rtype
        if m == "RetrievePropertiesEx":
            objects = self._retrieve(a.get("specSet") or [], api, session)
            result = vmodl.query.PropertyCollector.RetrieveResult(objects=objects)
            return (result if objects else None), rtype
        if m == "RetrieveServiceContent" and this._moId == SI._moId:
            return inv.service_content(api), rtype
        if m == "Login":
            return session, rtype
        if m == "Logout":
            self.sessions.pop(session.key, None)
            self.stats["logouts"] += 1
            return None, rtype
        if m == "FindByInventoryPath" and this._moId == SEARCH_INDEX._moId:
            return inv.find_by_inventory_path(a["inventoryPath"]), rtype
        if m == "FindChild" and this._moId == SEARCH_INDEX._moId:
            return inv.find_child(a["entity"], a["name"]), rtype
        if m == "FindByUuid" and this._moId == SEARCH_INDEX._moId:
            if a.get("datacenter") is not None or not a.get("vmSearch"):
                raise vmodl.fault.NotSupported(msg="simulator: FindByUuid of VMs, all DCs")
            return inv.find_by_uuid(a["uuid"], bool(a.get("instanceUuid"))), rtype
        if m == "DeleteDatastoreFile_Task" and this._moId == FILE_MANAGER._moId:
            name = a["name"]
            return inv.run_task(
                None, "FileManager.deleteFile", lambda: inv.delete_datastore_file(name)
            ), rtype
        if m == "QueryChangedDiskAreas" and isinstance(this, vim.VirtualMachine):
            vm = inv.resolve(this, vim.VirtualMachine)
            found = inv.cbt.query(
                inv, vm, a.get("snapshot"), a["deviceKey"], a["startOffset"], a["changeId"]
            )
            return found, rtype
        if m == "MoveIntoFolder_Task" and isinstance(this, vim.Folder):
            inv.resolve(this, vim.Folder)
            entities = list(a["list"])
            work = lambda: inv.move_into_folder(this._moId, entities)  # noqa: E731
            return inv.run_task(this, "Folder.moveInto", work), rtype
        return self._start_task(m, this, a), rtype

    def _start_task(self, m: str, this: Any, a: dict[str, Any]) -> vim.Task:
        inv = self.inv
        rec = inv.resolve(this)
        tasks: dict[str, tuple[str, Callable[[], Any]]] = {}
        if isinstance(rec, Snap):
            suppress, remove_children = (
                bool(a.get("suppressPowerOn")),
                bool(a.get("removeChildren")),
            )
            tasks = {
                "RevertToSnapshot_Task": ("vm.Snapshot.revert", lambda: inv.revert(rec, suppress)),
                "RemoveSnapshot_Task": (
                    "vm.Snapshot.remove",
                    lambda: inv.remove_snapshot(rec, remove_children),
                ),
            }
        elif isinstance(this, vim.VirtualMachine):
            clone: Callable[[], Any] = _fails(vmodl.fault.NotSupported(msg="not a clone"))
            if m == "CloneVM_Task":
                if inv.api_type == "HostAgent":  # nsidc/vagrant-vsphere#70
                    raise vmodl.fault.NotSupported(
                        msg="The operation is not supported on the object."
                    )
                inv.resolve(a["folder"], vim.Folder)  # a bad folder is a call-time fault
                if inv.clone_fault == "NoPermission":
                    inv.clone_fault = None
                    raise vim.fault.NoPermission(
                        object=this,
                        privilegeId="VirtualMachine.Provisioning.Clone",
                        msg="Permission to perform this operation was denied.",
                    )
                try:  # the clone is listed at once; its bytes come when the task ends
                    clone = inv.begin_clone(rec, a["name"], a["spec"], a["folder"]._moId)
                except vmodl.MethodFault as exc:
                    clone = _fails(exc)  # reported in task.info.error, as vSphere does
            tasks = {
                "CreateSnapshot_Task": (
                    "VirtualMachine.createSnapshot",
                    lambda: inv.create_snapshot(
                        rec, a["name"], a.get("description"), a["memory"], a["quiesce"]
                    ),
                ),
                "CloneVM_Task": ("VirtualMachine.clone", clone),
                "PowerOnVM_Task": (
                    "VirtualMachine.powerOn",
                    lambda: inv.set_power(rec, "poweredOn"),
                ),
                "PowerOffVM_Task": (
                    "VirtualMachine.powerOff",
                    lambda: inv.set_power(rec, "poweredOff"),
                ),
                "Destroy_Task": ("VirtualMachine.destroy", lambda: inv.destroy(rec)),
                "ReconfigVM_Task": (
                    "VirtualMachine.reconfigure",
                    lambda: inv.cbt.reconfigure(rec, a["spec"]),
                ),
                "ConsolidateVMDisks_Task": (
                    "VirtualMachine.consolidateDisks",
                    lambda: inv.consolidate_disks(rec),
                ),
            }
        if m not in tasks:
            raise vmodl.fault.NotSupported(msg=f"simulator does not implement {m} on {this}")
        entity = vim.VirtualMachine(rec.vm) if isinstance(rec, Snap) else this
        delay = inv.clone_delay if m == "CloneVM_Task" else inv.task_delays.get(m, 0.0)
        return inv.run_task(entity, tasks[m][0], tasks[m][1], delay)

    def _retrieve(self, specs: list[Any], api: str, session: Any) -> list[Any]:
        """PropertyCollector.RetrieveProperties over explicit objects (no traversal specs)."""
        pc = vmodl.query.PropertyCollector
        out = []
        for spec in specs:
            for ospec in spec.objectSet:
                if ospec.selectSet:
                    raise vmodl.fault.NotSupported(msg="simulator has no traversal specs")
                if ospec.skip:
                    continue
                props = self.inv.properties(ospec.obj, api, session, self.live_sessions())
                found = []
                for pspec in spec.propSet:
                    if not isinstance(ospec.obj, pspec.type):
                        continue
                    for path in sorted(props) if pspec.all else pspec.pathSet:
                        head, *rest = path.split(".")
                        if head not in props:
                            raise vmodl.query.InvalidProperty(name=path)
                        val = _walk(props[head], rest)
                        if val is not None:  # unset: simply absent, as on vSphere
                            found.append(vmodl.DynamicProperty(name=path, val=val))
                out.append(pc.ObjectContent(obj=ospec.obj, propSet=found))
        return out
