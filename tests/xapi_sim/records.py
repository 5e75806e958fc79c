"""XAPI records built live from the model, so generic ``get_<field>`` calls stay consistent.

Field names and value shapes follow the XAPI datamodel: refs and enums are strings,
ints travel as strings (see ``wire``), booleans are real booleans, maps are str->str.
Only the fields a backup tool plausibly reads are present; others answer
MESSAGE_METHOD_UNKNOWN rather than a made-up value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .chains import base_copies, parent_uuid
from .disks import allocated_bytes
from .model import (
    BLOCK,
    EPOCH,
    HOST2_NAME,
    HOST_NAME,
    NULL_REF,
    PBD,
    SR,
    VBD,
    VDI,
    VM,
    Store,
    Task,
    XapiError,
)


def wire(value: Any) -> Any:
    """Convert to XAPI's XML-RPC shapes: ints as strings, no nil anywhere."""
    if isinstance(value, bool | float | str):
        return value
    if isinstance(value, int):
        return str(value)
    if value is None:
        return ""
    if isinstance(value, dict):
        return {str(k): wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [wire(v) for v in value]
    return value


def _vm(store: Store, vm: VM) -> dict[str, Any]:
    snapshots = [v.ref for v in store.vms.values() if v.snapshot_of == vm.ref and v.is_a_snapshot]
    return {
        "uuid": vm.uuid,
        "name_label": vm.name_label,
        "name_description": vm.name_description,
        "power_state": vm.power_state,
        # datamodel_vm.ml: is_a_template, is_a_snapshot, is_control_domain are Bools on
        # every VM record; a snapshot has is_a_template = true as well (xapi_vm_clone.ml).
        "is_a_template": vm.is_a_template,
        "is_default_template": False,
        "is_a_snapshot": vm.is_a_snapshot,
        "is_control_domain": vm.is_control_domain,
        "snapshot_of": vm.snapshot_of,
        "snapshots": snapshots,
        "snapshot_time": vm.snapshot_time,
        "snapshot_info": vm.snapshot_info,
        "parent": vm.parent,
        "children": [],
        "VBDs": list(vm.vbds),
        "VIFs": [],
        "suspend_VDI": vm.suspend_vdi,
        "memory_static_max": vm.memory,
        "resident_on": store.host_ref if vm.power_state == "Running" else NULL_REF,
        "domid": _domid(vm),
        "other_config": vm.other_config,
        "tags": [],
        "allowed_operations": [],
        "current_operations": {},
        "blocked_operations": vm.blocked_operations,
    }


def _domid(vm: VM) -> int:
    if vm.is_control_domain:
        return 0  # dom0 (create_misc.ml: ~domid:0L)
    return 1 if vm.power_state == "Running" else -1


def _vbd(store: Store, vbd: VBD) -> dict[str, Any]:
    running = store.vms[vbd.vm].power_state == "Running"
    return {
        "uuid": vbd.uuid,
        "VM": vbd.vm,
        "VDI": vbd.vdi,
        "device": vbd.device,
        "userdevice": vbd.userdevice,
        "bootable": vbd.userdevice == 0,
        "mode": "RW",
        "type": "Disk",
        "empty": False,
        "currently_attached": running,
        "unpluggable": True,
        "other_config": {},
        "allowed_operations": [],
        "current_operations": {},
    }


def _vdi(store: Store, vdi: VDI) -> dict[str, Any]:
    return _vdi_record(
        uuid=vdi.uuid,
        name_label=vdi.name_label,
        name_description=vdi.name_description,
        sr=vdi.sr,
        vbds=[b.ref for b in store.vbds.values() if b.vdi == vdi.ref],
        virtual_size=vdi.size,
        physical_utilisation=allocated_bytes(vdi.path),
        type=vdi.type,
        managed=True,
        is_a_snapshot=vdi.is_a_snapshot,
        snapshot_of=vdi.snapshot_of,
        snapshots=[v.ref for v in store.vdis.values() if v.snapshot_of == vdi.ref],
        snapshot_time=vdi.snapshot_time,
        sm_config=_sm_config(vdi),
        other_config=vdi.other_config,
    )


def _base_copy(store: Store, ref: object) -> dict[str, Any] | None:
    """The VDI record SM introduced for a base copy (``FileSR._snapshot`` l.857-868): read
    only, unmanaged, no VBDs, snapshots or other_config (chains.py)."""
    entry = base_copies(store).get(ref) if isinstance(ref, str) else None
    if entry is None:
        return None
    layer, chain, i = entry
    sm_config = {"vdi_type": "vhd"}
    if (parent := parent_uuid(chain, i)) is not None:
        sm_config["vhd-parent"] = parent
    return _vdi_record(
        uuid=layer.uuid,
        name_label="base copy",
        name_description="",
        sr=layer.sr,
        vbds=[],
        virtual_size=layer.size,
        physical_utilisation=len(layer.blocks) * BLOCK,
        type="user",
        managed=False,
        is_a_snapshot=False,
        snapshot_of=NULL_REF,
        snapshots=[],
        snapshot_time=EPOCH,
        sm_config=sm_config,
        other_config={},
    )


def _vdi_record(
    *,
    uuid: str,
    name_label: str,
    name_description: str,
    sr: str,
    vbds: list[str],
    virtual_size: int,
    physical_utilisation: int,
    type: str,  # noqa: A002 - XAPI's field name
    managed: bool,
    is_a_snapshot: bool,
    snapshot_of: str,
    snapshots: list[str],
    snapshot_time: str,
    sm_config: dict[str, str],
    other_config: dict[str, str],
) -> dict[str, Any]:
    """A VDI record (datamodel.ml's VDI fields a backup tool reads), for a VDI or a base
    copy: a base copy is the VDI that is not managed, and only it is read only."""
    return {
        "uuid": uuid,
        "name_label": name_label,
        "name_description": name_description,
        "SR": sr,
        "VBDs": vbds,
        "virtual_size": virtual_size,
        "physical_utilisation": physical_utilisation,
        "type": type,
        "sharable": False,
        "read_only": not managed,
        "managed": managed,
        "missing": False,
        "location": uuid,
        "is_a_snapshot": is_a_snapshot,
        "snapshot_of": snapshot_of,
        "snapshots": snapshots,
        "snapshot_time": snapshot_time,
        "sm_config": sm_config,
        "other_config": other_config,
        "xenstore_data": {},
        "on_boot": "persist",
        "allow_caching": False,
        "cbt_enabled": False,
        "is_tools_iso": False,
        "tags": [],
        "allowed_operations": [],
        "current_operations": {},
    }


def _sm_config(vdi: VDI) -> dict[str, str]:
    """SM's keys: the image format, and on a VHD SR the parent VHD's uuid (``vhd-parent``,
    absent for a chain's root: SM FileVDI.load l.488/539, chains.py)."""
    config = {"vdi_type": vdi.image_format, "image-format": vdi.image_format}
    if vdi.image_format == "vhd" and (parent := parent_uuid(vdi.chain, 0)) is not None:
        config["vhd-parent"] = parent
    return config


def _sr(store: Store, sr: SR) -> dict[str, Any]:
    return {
        "uuid": sr.uuid,
        "name_label": sr.name_label,
        "name_description": "",
        "type": sr.type,
        "content_type": "user",
        "shared": sr.shared,
        "VDIs": [v.ref for v in store.vdis.values() if v.sr == sr.ref]
        + [ref for ref, (layer, _, _) in base_copies(store).items() if layer.sr == sr.ref],
        "PBDs": [p.ref for p in store.pbds.values() if p.sr == sr.ref],
        "other_config": {},
        "sm_config": dict(sr.sm_config),
        "tags": [],
    }


def _pbd(store: Store, pbd: PBD) -> dict[str, Any]:
    return {
        "uuid": pbd.uuid,
        "host": pbd.host,
        "SR": pbd.sr,
        "device_config": {},
        "currently_attached": pbd.currently_attached,
        "other_config": {},
    }


def _task(store: Store, task: Task) -> dict[str, Any]:
    return {
        "uuid": task.uuid,
        "name_label": task.name_label,
        "name_description": task.name_description,
        "status": task.status,
        "progress": task.progress,
        "result": task.result,
        "error_info": task.error_info,
        "created": task.created,
        "finished": task.finished,
        "type": "<none/>",
        "resident_on": store.host_ref,
        "subtask_of": NULL_REF,
        "subtasks": [],
        "other_config": task.other_config,
        # ["cancel"] while a cancellable task is pending; [] once it ended (taskHelper.ml
        # complete, failed, cancel_this) or for an operation that is not cancellable
        "allowed_operations": ["cancel"] if task.status == "pending" and task.cancellable else [],
        "current_operations": dict(task.current_operations),
    }


def _host(store: Store, ref: str) -> dict[str, Any]:
    member = ref == store.host2_ref
    return {
        "uuid": store.host2_uuid if member else store.host_uuid,
        "name_label": HOST2_NAME if member else HOST_NAME,
        "name_description": "",
        "address": store.host_address.get(ref) or "127.0.0.1",
        "API_version_major": 2,
        "API_version_minor": 21,
        "API_version_vendor": "XenServer simulator",
        "enabled": True,
        "resident_VMs": []
        if member
        else [v.ref for v in store.vms.values() if v.power_state == "Running"],
        "other_config": {},
        "tags": [],
    }


def _pool(store: Store) -> dict[str, Any]:
    return {
        "uuid": store.pool_uuid,
        "name_label": "",
        "name_description": "",
        "master": store.master_ref,
        "default_SR": store.sr.ref,
        "other_config": {},
        "tags": [],
    }


_BUILDERS: dict[str, Callable[[Store, Any], dict[str, Any]]] = {
    "VM": _vm,
    "VBD": _vbd,
    "VDI": _vdi,
    "SR": _sr,
    "PBD": _pbd,
    "task": _task,
}


def all_refs(store: Store, cls: str) -> list[str]:
    if cls == "host":
        return [store.host_ref, store.host2_ref]
    if cls == "pool":
        return [store.pool_ref]
    if cls == "VDI":  # base copies are VDIs in XAPI's database too (chains.py)
        return [*store.vdis, *base_copies(store)]
    return list(store.table(cls))


def record(store: Store, cls: str, ref: object) -> dict[str, Any]:
    """The record of ``ref``; HANDLE_INVALID when it is not an object of ``cls``."""
    if cls in ("host", "pool"):
        if ref not in all_refs(store, cls):
            raise XapiError("HANDLE_INVALID", cls, ref)
        return _host(store, str(ref)) if cls == "host" else _pool(store)
    base = _base_copy(store, ref) if cls == "VDI" and ref not in store.vdis else None
    if base is not None:
        return base
    return _BUILDERS[cls](store, store.get(cls, ref))


def ref_by_uuid(store: Store, cls: str, value: object) -> str:
    """``<class>.get_by_uuid``: the exact UUID or ``UUID_INVALID [class, uuid]``, for every
    row of the class, templates, snapshots and dom0 included (db_cache_impl.ml
    ``db_get_by_uuid`` raises ``Read_missing_uuid``, which exnHelper.ml maps to
    ``UUID_INVALID [tbl; uuid]``)."""
    for ref in all_refs(store, cls):
        if record(store, cls, ref)["uuid"] == value:
            return ref
    raise XapiError("UUID_INVALID", cls, value)


def refs_by_name_label(store: Store, cls: str, label: object) -> list[str]:
    """``<class>.get_by_name_label``: every row whose name_label equals ``label`` exactly,
    with no filter: templates, snapshots and dom0 are VMs like the others
    (db_cache_impl.ml ``db_get_by_name_label`` is a scan on ``name__label``).
    XAPI's order is that of its table fold, which is by OpaqueRef (arbitrary); here it is
    creation order, so a test can put a decoy first on purpose."""
    return [r for r in all_refs(store, cls) if record(store, cls, r).get("name_label") == label]
