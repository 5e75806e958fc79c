"""The simulated vCenter inventory: one datacenter, two datastores, VMs with real disk bytes.

``Inventory`` holds all state and carries out every vSphere operation; its parts are laid
out by concern:

- objects.py: the fixed managed objects (datacenter, VM folder, datastores, service objects);
- datastores.py: the datastores' folders and disk files, DatastoreSummary, file deletes;
- vms.py: VMs, their disks and devices, power operations and Destroy_Task;
- snapshots.py: the snapshot tree, the disk chains it shows, snapshot tasks;
- tasks.py: TaskInfo, and CloneVM_Task;
- cbt.py: Changed Block Tracking.

This module resolves morefs, keeps the VM folder tree, answers the PropertyCollector's
reads (``properties``) and SearchIndex's finds.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

from pyVmomi import vim, vmodl
from pyVmomi.VmomiSupport import ManagedObject

from .cbt import ChangeTracking
from .datastores import DatastoreFiles
from .objects import (
    DATACENTER,
    DATASTORE,
    DATASTORE2,
    DATASTORES,
    DC,
    FILE_MANAGER,
    PROPERTY_COLLECTOR,
    ROOT_FOLDER,
    SEARCH_INDEX,
    SESSION_MANAGER,
    SI,
    VM_FOLDER,
)
from .objects import MAX_NAME as MAX_NAME  # with escaped_length, imported from here by tests
from .objects import escaped_length as escaped_length
from .snapshots import Snap, Snapshots
from .tasks import Tasks
from .vms import Vm, Vms

_FIXED = {m._moId: m for m in (SI, ROOT_FOLDER, DATACENTER, VM_FOLDER, DATASTORE, DATASTORE2)}
_FIXED |= {m._moId: m for m in (PROPERTY_COLLECTOR, SESSION_MANAGER, SEARCH_INDEX, FILE_MANAGER)}


class Inventory(Vms, Snapshots, Tasks, DatastoreFiles):
    """All state and vSphere operations; callers hold ``lock`` around every call."""

    def __init__(self, root: Path, user: str) -> None:
        self.user = user
        self.lock = threading.RLock()
        self._init_datastores(root)
        self._init_vms()
        self._init_snapshots()
        self._init_tasks()
        # ServiceContent.about.apiType: "VirtualCenter", or "HostAgent" for a standalone
        # ESXi host, which has no CloneVM_Task (it answers NotSupported, "The operation is
        # not supported on the object": nsidc/vagrant-vsphere#70).
        self.api_type = "VirtualCenter"
        self.folders: dict[str, tuple[str, str]] = {}  # sub-folder moid -> (name, parent)
        self.calls: dict[str, int] = {}  # test control: SOAP calls per method
        self.cbt = ChangeTracking()  # Changed Block Tracking (see cbt.py)
        self._ids = itertools.count(100)

    # ----- lookup ------------------------------------------------------------------

    def new_moid(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def resolve(self, mo: Any, kind: type = ManagedObject) -> Any:
        """Return the record behind a moref, or raise ManagedObjectNotFound like vSphere.

        The moref's type must match too: ``Folder:vm-5`` is as unknown as ``vm-999``.
        """
        moid: str = getattr(mo, "_moId", "")
        for table, typ in (
            (self.vms, vim.VirtualMachine),
            (self.snaps, vim.vm.Snapshot),
            (self.tasks, vim.Task),
            (self.folders, vim.Folder),
            (_FIXED, type(_FIXED.get(moid))),
        ):
            if moid in table and isinstance(mo, typ) and isinstance(mo, kind):
                return table[moid]
        raise vmodl.fault.ManagedObjectNotFound(obj=mo, msg=f"object {moid} not found")

    def folder(self, path: str) -> str:
        """The moid of VM folder ``a/b`` under the datacenter's ``vm`` folder, made if new."""
        moid = VM_FOLDER._moId
        for part in [p for p in path.split("/") if p]:
            found = [m for m, (n, parent) in self.folders.items() if (n, parent) == (part, moid)]
            if found:
                moid = found[0]
            else:
                new = self.new_moid("group-v")
                self.folders[new] = (part, moid)
                moid = new
        return moid

    # ----- properties ----------------------------------------------------------------

    def properties(
        self,
        mo: Any,
        api_version: str = "",
        session: vim.UserSession | None = None,
        sessions: list[vim.UserSession] | None = None,
    ) -> dict[str, Any]:
        """Every *modelled* property of an object; unset ones map to None."""
        rec = self.resolve(mo)
        if isinstance(rec, Vm):
            props = self._vm_props(rec)
        elif isinstance(rec, Snap):
            props = {
                "vm": vim.VirtualMachine(rec.vm),
                "childSnapshot": vim.vm.Snapshot.Array([vim.vm.Snapshot(c) for c in rec.children]),
                "config": self.cbt.snap_config.get(rec.moid),
            }
        elif isinstance(rec, vim.TaskInfo):
            props = {"info": rec}
        elif rec is SI:
            props = {"content": self.service_content(api_version)}
        elif rec is ROOT_FOLDER:
            props = {"name": "Datacenters", "childEntity": vim.ManagedEntity.Array([DATACENTER])}
        elif rec is DATACENTER:
            props = {"name": DC, "parent": ROOT_FOLDER, "vmFolder": VM_FOLDER}
            props["datastore"] = vim.Datastore.Array(list(DATASTORES.values()))
        elif rec is VM_FOLDER or isinstance(rec, tuple):
            moid = mo._moId
            name, parent = ("vm", DATACENTER) if rec is VM_FOLDER else (rec[0], vim.Folder(rec[1]))
            children: list[Any] = [vim.Folder(m) for m, f in self.folders.items() if f[1] == moid]
            children += [vim.VirtualMachine(m) for m, v in self.vms.items() if v.folder == moid]
            props = {"name": name, "parent": parent}
            props["childEntity"] = vim.ManagedEntity.Array(children)
        elif isinstance(rec, vim.Datastore) and rec._moId in {d._moId for d in DATASTORES.values()}:
            name = next(n for n, d in DATASTORES.items() if d._moId == rec._moId)
            props = {"name": name, "parent": DATACENTER, "summary": self._ds_summary(name)}
        elif rec is SESSION_MANAGER:
            # sessionList: "The list of currently active sessions" (vSphere API reference,
            # SessionManager), which a test reads to count what a driver holds.
            props = {"currentSession": session, "sessionList": list(sessions or [])}
        else:
            props = {}
        return props

    def service_content(self, api_version: str) -> vim.ServiceInstanceContent:
        esxi = self.api_type == "HostAgent"
        product = "VMware ESXi" if esxi else "VMware vCenter Server"
        about = vim.AboutInfo(
            name=product,
            fullName=f"{product} (snapferry test simulator)",
            vendor="VMware, Inc.",
            version=api_version,
            build="0",
            osType="linux-x64",
            productLineId="embeddedEsx" if esxi else "vpx",
            apiType=self.api_type,
            apiVersion=api_version,
            instanceUuid="00000000-0000-0000-0000-00000000511a",
        )
        return vim.ServiceInstanceContent(
            rootFolder=ROOT_FOLDER,
            propertyCollector=PROPERTY_COLLECTOR,
            sessionManager=SESSION_MANAGER,
            searchIndex=SEARCH_INDEX,
            fileManager=FILE_MANAGER,
            about=about,
        )

    # ----- SearchIndex -------------------------------------------------------------

    def find_by_inventory_path(self, path: str) -> Any:
        """``dc1``, ``dc1/vm``, ``dc1/vm/<folder>/.../<name>``: each step a child's name."""
        parts = path.strip("/").split("/")
        if parts[0] != DC:
            return None
        if len(parts) == 1:
            return DATACENTER
        if parts[1] != "vm":
            return None
        found: Any = VM_FOLDER
        for part in parts[2:]:
            if not isinstance(found, vim.Folder):
                return None
            found = self.find_child(found, part)
            if found is None:
                return None
        return found

    def find_child(self, entity: Any, name: str) -> Any:
        """SearchIndex.FindChild: "Finds a particular managed entity based on its name" among
        the direct children of a folder (vSphere API reference)."""
        if entity._moId == DATACENTER._moId:
            return VM_FOLDER if name == "vm" else None
        folder = self.resolve(entity, vim.Folder)
        for child in self.properties(entity).get("childEntity", []) if folder else []:
            if self.properties(child)["name"] == name:
                return child
        return None

    def find_by_uuid(self, uuid_: str, instance: bool) -> Any:
        """SearchIndex.FindByUuid for VMs: the instance UUID (vCenter's) or the BIOS UUID."""
        for moid, vm in self.vms.items():
            if (vm.uuid if instance else vm.bios_uuid) == uuid_.lower():
                return vim.VirtualMachine(moid)
        return None
