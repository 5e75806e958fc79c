"""Test-control endpoints under ``/sim/`` (JSON, no auth; not part of XAPI).

They let a test set up VMs, act as the guest OS, and inject the failures a real
pool produces only under load or bad luck (busy VDIs, expired sessions, slow links).
"""

from __future__ import annotations

import json
from typing import Any

from . import ops
from .chains import coalesce
from .httpbase import ReplyHandler
from .model import VDI, VM, Store, Task


class ControlHandler(ReplyHandler):
    """Mixin half of the request handler: ``GET``/``POST /sim/<what>``."""

    def _json(self, status: int, obj: Any) -> None:
        self._reply(status, json.dumps(obj).encode(), "application/json")

    def sim_get(self, what: str) -> None:
        store: Store = self.server.store
        with store.lock:
            if what == "calls":
                return self._json(200, {"max_in_flight": store.max_in_flight})
            if what == "vms":
                return self._json(200, {"vms": [_vm_info(store, v) for v in store.vms.values()]})
            if what == "vdis":
                return self._json(200, {"vdis": [_vdi_info(v) for v in store.vdis.values()]})
            if what == "datapaths":
                return self._json(200, store.datapaths.snapshot())
            if what == "tasks":
                tasks = [_task_info(t) for t in store.tasks.values()]
                return self._json(200, {"tasks": tasks, "started": store.async_started})
            if what == "hosts":
                return self._json(200, {"hosts": _hosts(store)})
            if what == "faults":
                faults = {m: [f.__dict__ for f in fs] for m, fs in store.faults.items() if fs}
                return self._json(200, {"faults": faults})
        self._json(404, {"error": f"unknown control endpoint {what}"})

    def sim_post(self, what: str, req: dict[str, Any]) -> None:
        store: Store = self.server.store
        with store.lock:
            if what == "vms":
                template = bool(req.get("template", False))
                try:
                    vm = ops.create_vm(
                        store,
                        req["name"],
                        req["disks"],
                        req.get("power", "Halted" if template else "Running"),
                        template=template,
                        allow_duplicate=bool(req.get("allow_duplicate", False)),
                        host=int(req.get("host", 1)),
                        shared=bool(req.get("shared", False)),
                    )
                except ValueError as exc:
                    return self._json(409, {"error": str(exc)})
                return self._json(201, _vm_info(store, vm))
            if what == "guest-write":
                return self._guest_write(store, req)
            if what == "faults":
                return self._faults(store, req)
            if what == "export-delay":
                store.export_bps = max(int(req.get("bytes_per_second") or 0), 0)
                return self._json(200, {"bytes_per_second": store.export_bps})
            if what == "session-idle":
                store.session_idle_s = max(float(req.get("seconds") or 0), 0.0)
                return self._json(200, {"seconds": store.session_idle_s})
            if what == "call-latency":
                store.call_latency = max(float(req.get("seconds") or 0), 0.0)
                store.max_in_flight = 0
                return self._json(200, {"seconds": store.call_latency})
            if what == "task-delay":
                return self._task_delay(store, req)
            if what == "sr-type":  # {"sr": "local" | "member" | "shared", "type": ...}
                sr = {"local": store.sr, "member": store.sr2, "shared": store.shared_sr}
                one = sr[str(req.get("sr", "local"))]
                one.type = str(req["type"])
                lvm = one.type in ("lvm", "lvmoiscsi", "lvmohba")
                # an LVM SR is LVHD (use_vhd) unless {"sm_config": {}} says legacy LVM
                default = {"use_vhd": "true"} if lvm else {}
                one.sm_config = {str(k): str(v) for k, v in req.get("sm_config", default).items()}
                return self._json(200, {"type": one.type, "sm_config": one.sm_config})
            if what == "image-format":  # {"vdi": ref or uuid, "format": "qcow2" | "raw"}
                vdi = store.vdi_by_ref_or_uuid(str(req["vdi"]))
                if vdi is None:
                    return self._json(404, {"error": "no such vdi"})
                vdi.image_format = str(req["format"])
                return self._json(200, {"format": vdi.image_format})
            if what == "licence":  # {"restricted": ["Checkpoint"]}: features not licensed
                store.restricted = {str(f) for f in req.get("restricted", [])}
                return self._json(200, {"restricted": sorted(store.restricted)})
            if what == "gc":  # {"stalled": bool}: SM's GC cannot run; unstalled, it runs
                store.gc_stalled = bool(req.get("stalled", False))
                return self._json(200, {"stalled": store.gc_stalled, "coalesced": coalesce(store)})
            if what == "attach-linger":
                store.datapaths.linger_s = max(float(req.get("seconds") or 0), 0.0)
                return self._json(200, {"seconds": store.datapaths.linger_s})
            if what == "pool":  # {"master": 1 | 2, "down": [1, ...]}
                return self._pool(store, req)
            if what == "host-address":  # {"host": 1 | 2, "address": "..."}
                store.host_address[_host_ref(store, req["host"])] = str(req["address"])
                return self._json(200, {"hosts": _hosts(store)})
            if what == "revert-mode":
                if req.get("mode") not in ("in-place", "xapi"):
                    return self._json(400, {"error": "mode must be in-place or xapi"})
                store.revert_mode = req["mode"]
                return self._json(200, {"mode": store.revert_mode})
        self._json(404, {"error": f"unknown control endpoint {what}"})

    def _pool(self, store: Store, req: dict[str, Any]) -> None:
        """A new master and the hosts that are down. A master change drops every session
        and task: neither is in the database a new master starts from (``datamodel.ml``
        l.237-242 and l.628-633, ``PersistNothing``)."""
        master = _host_ref(store, req.get("master", 1))
        down = {_host_ref(store, h) for h in req.get("down", [])}
        if master != store.master_ref:
            store.sessions.clear()
            store.session_used.clear()
            store.tasks.clear()
        store.master_ref = master
        going, coming = down - store.down, store.down - down
        store.down = down
        # Before the reply, so that the caller finds them down or up: closing a listening
        # socket leaves the connections it accepted (this one) open.
        for host in going:
            store.servers[host].go_down()
        for host in coming:
            store.servers[host].come_up()
        self._json(200, {"hosts": _hosts(store)})

    def _task_delay(self, store: Store, req: dict[str, Any]) -> None:
        """``{"seconds"}``: every Async task waits that long before its operation runs.
        With ``"method"``: that method's calls, sync or Async, take ``seconds``; with
        ``"stall": true`` they do not end until ``"stall": false`` (or, for a cancellable
        task, a task.cancel)."""
        method = req.get("method")
        if method is None:
            store.task_delay = max(float(req.get("seconds") or 0), 0.0)
            return self._json(200, {"seconds": store.task_delay})
        method = str(method)
        if "stall" in req:
            if req["stall"]:
                store.stalled.add(method)
            else:
                store.stalled.discard(method)
        if "seconds" in req:
            store.op_delay[method] = max(float(req.get("seconds") or 0), 0.0)
        return self._json(
            200,
            {
                "method": method,
                "seconds": store.op_delay.get(method, 0.0),
                "stalled": method in store.stalled,
            },
        )

    def _guest_write(self, store: Store, req: dict[str, Any]) -> None:
        found = _find_vms(store, str(req["vm"]))
        if not found:
            return self._json(404, {"error": "no such vm"})
        if len(found) > 1:
            return self._json(409, {"error": "several VMs have that name: pass a ref or uuid"})
        vm = found[0]
        if vm.power_state != "Running":
            return self._json(409, {"error": f"vm is {vm.power_state}, not Running"})
        if "data_hex" in req:
            data = bytes.fromhex(req["data_hex"])
        else:
            data = bytes([int(req["pattern"]) & 0xFF]) * int(req["length"])
        try:
            ops.guest_write(store, vm, int(req.get("disk", 0)), int(req["offset"]), data)
        except (ValueError, IndexError) as exc:
            return self._json(400, {"error": str(exc)})
        self._json(200, {"written": len(data)})

    def _faults(self, store: Store, req: dict[str, Any]) -> None:
        if req.get("clear"):
            store.faults.clear()
            return self._json(200, {"cleared": True})
        if req.get("method") == "session" and req.get("expire"):
            expired = len(store.sessions)
            store.sessions.clear()
            return self._json(200, {"expired": expired})
        count = int(req.get("count", 1))
        if "at_byte" in req:
            store.fault_at_byte[str(req["method"])] = int(req["at_byte"])
        store.add_fault(str(req["method"]), str(req["code"]), list(req.get("params", [])), count)
        self._json(200, {"method": req["method"], "code": req["code"], "count": count})


def _find_vms(store: Store, key: str) -> list[VM]:
    """Live VMs by ref or uuid, else by name (templates, snapshots and dom0 have no guest)."""
    live = [vm for vm in store.vms.values() if store.live_vm(vm)]
    return [vm for vm in live if key in (vm.ref, vm.uuid)] or [
        vm for vm in live if vm.name_label == key
    ]


def _vm_info(store: Store, vm: VM) -> dict[str, Any]:
    vbds = sorted((store.vbds[r] for r in vm.vbds), key=lambda b: b.userdevice)
    return {
        "ref": vm.ref,
        "uuid": vm.uuid,
        "name": vm.name_label,
        "power": vm.power_state,
        "is_a_snapshot": vm.is_a_snapshot,
        "is_a_template": vm.is_a_template,
        "is_control_domain": vm.is_control_domain,
        "snapshot_of": vm.snapshot_of,
        "suspend_vdi": vm.suspend_vdi,
        "disks": [
            {
                "device": b.device,
                "userdevice": b.userdevice,
                "vbd": b.ref,
                "vdi": b.vdi,
                "vdi_uuid": store.vdis[b.vdi].uuid,
                "path": str(store.vdis[b.vdi].path),
            }
            for b in vbds
        ],
    }


def _task_info(task: Task) -> dict[str, Any]:
    return {
        "ref": task.ref,
        "name": task.name_label,
        "status": task.status,
        "progress": task.progress,
        "result": task.result,
        "error_info": task.error_info,
        "cancellable": task.cancellable,
        "current_operations": dict(task.current_operations),
    }


def _vdi_info(vdi: VDI) -> dict[str, Any]:
    return {
        "ref": vdi.ref,
        "uuid": vdi.uuid,
        "name": vdi.name_label,
        "is_a_snapshot": vdi.is_a_snapshot,
        "snapshot_of": vdi.snapshot_of,
        "type": vdi.type,
        "size": vdi.size,
        "vhd_uid": vdi.chain[0].uid.hex(),  # the footer uid of its leaf VHD (not in XAPI)
        "allocated": sorted(vdi.allocated()),  # blocks its chain's BATs allocate
        "depth": len(vdi.chain),  # VHDs in its chain, its own included (vhd-util query -d)
        "path": str(vdi.path),
    }


def _host_ref(store: Store, host: object) -> str:
    """Host 1 (the first master) or 2 (the first member)."""
    refs = {1: store.host_ref, 2: store.host2_ref}
    if host not in refs:
        raise ValueError(f"host must be 1 or 2, not {host!r}")
    return refs[host]  # type: ignore[index]


def _hosts(store: Store) -> list[dict[str, Any]]:
    return [
        {
            "host": n,
            "ref": ref,
            "address": store.host_address[ref],
            "port": store.servers[ref].server_address[1],
            "master": ref == store.master_ref,
            "down": ref in store.down,
        }
        for n, ref in ((1, store.host_ref), (2, store.host2_ref))
    ]
