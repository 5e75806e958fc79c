"""HTTP front end: SOAP on ``/sdk``, datastore files on ``/folder``, test control on ``/sim``.

One ThreadingHTTPServer speaks HTTP/1.1 keep-alive because pyvmomi pools its
connections. Every SOAP call and datastore request except RetrieveServiceContent
and Login needs the ``vmware_soap_session`` cookie handed out by Login.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import soap
from .datastores import NO_FLAT_FILES
from .inventory import Inventory
from .objects import DC, DS
from .vimapi import VimService

COOKIE = "vmware_soap_session"
_CHUNK = 1 << 20


class SimServer(ThreadingHTTPServer):
    """Loopback-only server; a thread per connection so a slow download blocks nobody."""

    daemon_threads = True

    def __init__(self, port: int, inventory: Inventory, user: str, password: str) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.inv = inventory
        self.vim = VimService(inventory, user, password)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SimServer

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("VSPHERE_SIM_VERBOSE"):
            super().log_message(format, *args)

    # ----- plumbing ------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain", **hdr: str):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in hdr.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authenticated(self) -> bool:
        morsel = SimpleCookie(self.headers.get("Cookie") or "").get(COOKIE)
        with self.server.inv.lock:
            return morsel is not None and self.server.vim.live_session(morsel.value) is not None

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        if path == "/sdk/vimServiceVersions.xml":
            self._send(200, soap.service_versions_xml(), "text/xml")
        elif path == "/sdk/vimService.wsdl":
            self._send(200, soap.SERVICE_WSDL, "text/xml")
        elif path.startswith("/folder/"):
            self._datastore_get()
        elif path == "/sim/vms":
            self._sim_list()
        elif path == "/sim/tasks":
            with self.server.inv.lock:
                tasks = [
                    {
                        "key": key,
                        "descriptionId": info.descriptionId,
                        "state": info.state,
                        "reads": self.server.inv.task_reads.get(key, 0),
                    }
                    for key, info in self.server.inv.tasks.items()
                ]
            self._json(200, {"tasks": tasks})
        else:
            self._send(404, b"not found")

    do_HEAD = do_GET

    def do_PUT(self) -> None:  # noqa: N802
        if urlsplit(self.path).path.startswith("/folder/"):
            self._datastore_put()
        else:
            self._send(404, b"not found")

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        if path == "/sdk":
            self._soap()
        elif path.startswith("/sim/"):
            try:
                self._sim(path[5:], json.loads(self._body() or b"{}"))
            except (KeyError, TypeError, ValueError) as exc:
                self._json(400, {"error": f"bad control request: {exc!r}"})
        else:
            self._send(404, b"not found")

    # ----- SOAP ----------------------------------------------------------------------

    def _soap(self) -> None:
        morsel = SimpleCookie(self.headers.get("Cookie") or "").get(COOKIE)
        status, body, new_key = self.server.vim.handle(
            self._body(),
            self.headers.get("SOAPAction"),
            morsel.value if morsel else None,
            self.headers.get("User-Agent") or "",
        )
        cookie = {"Set_Cookie": f'{COOKIE}="{new_key}"; Path=/; HttpOnly'} if new_key else {}
        self._send(status, body, "text/xml; charset=utf-8", **cookie)

    # ----- datastore file transfer -----------------------------------------------------

    def _datastore_file(self) -> Path | None:
        """Map ``/folder/<path>?dcPath=dc1&dsName=ds1`` to a local file path (or None)."""
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        rel = unquote(url.path[len("/folder/") :])
        inv = self.server.inv
        root = inv.ds_dirs.get(q.get("dsName", ""))
        if inv.datastore_gone or root is None or q.get("dcPath", DC).strip("/") != DC:
            return None
        target = (root / rel).resolve()
        return target if target.is_relative_to(root) and rel else None

    def _datastore_get(self) -> None:
        if not self._authenticated():
            return self._send(401, b"session cookie required")
        if not self.server.inv.file_access:  # Datastore.Browse/FileManagement missing
            return self._send(403, b"Permission to perform this operation was denied.")
        path = self._datastore_file()
        if path is None or not path.is_file():
            return self._send(404, b"file not found")
        ds_name = parse_qs(urlsplit(self.path).query).get("dsName", [""])[0]
        ds_type = self.server.inv.ds_types.get(ds_name, "")
        if ds_type in NO_FLAT_FILES and path.name.endswith("-flat.vmdk"):
            # vSAN/vVols keep disks as objects, not flat extents: /folder has no such file
            # (OpenNebula/one#7788, libguestfs/virt-v2v#29).
            return self._send(404, b"file not found")
        size = path.stat().st_size
        start, end = 0, size - 1
        status, extra = 200, {}
        with self.server.inv.lock:  # test control: how many GETs, over how many connections
            self.server.inv.folder_gets.append(self.client_address[1])
        rng = self.headers.get("Range")
        if rng and self.server.inv.ignore_range:
            # VMware documents /folder GET without ranges, and direct ESXi has been seen
            # answering a ranged GET with the whole file (PegaProx/project-pegaprox#438):
            # a plain 200, no Content-Range, no Accept-Ranges.
            rng = None
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or not (m[1] or m[2]):
                return self._send(416, b"bad range", Content_Range=f"bytes */{size}")
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
            else:
                start = max(size - int(m[2]), 0)
            if start > end:
                return self._send(416, b"bad range", Content_Range=f"bytes */{size}")
            status, extra = 206, {"Content-Range": f"bytes {start}-{end}/{size}"}
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if not self.server.inv.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with self.server.inv.lock:
            cut, self.server.inv.cut_after = self.server.inv.cut_after, None
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            if cut is not None and cut < left:
                # Test control, a network fault rather than a vSphere behaviour: the body
                # stops after ``cut`` bytes and the connection closes (a reset mid-transfer).
                self.wfile.write(f.read(cut))
                self.close_connection = True
                return
            try:
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    self.wfile.write(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client stopped reading (a dropped stream)

    def _datastore_put(self) -> None:
        """Write a whole file; zero chunks become holes so restored disks stay sparse."""
        length = self.headers.get("Content-Length")
        if not self._authenticated():
            return self._send(401, b"session cookie required")
        if not self.server.inv.file_access:  # Datastore.Browse/FileManagement missing
            return self._send(403, b"Permission to perform this operation was denied.")
        path = self._datastore_file()
        if path is None or not path.parent.is_dir():
            return self._send(404, b"directory not found")
        if length is None:
            return self._send(411, b"Content-Length required")
        # Stricter than vSphere on purpose: a restore must replace a whole disk of a
        # powered-off VM (vSphere would refuse the running VM's locked file anyway).
        inv = self.server.inv
        vm = inv.vm_by_dir(path.parent.name)
        disks = [inv.disk_file(vm, i) for i in range(len(vm.disks))] if vm else []
        if vm and path in disks:
            if vm.power == "poweredOn":
                return self._send(409, b"disk is locked by a running VM")
            if int(length) != vm.disks[disks.index(path)]:
                return self._send(400, b"upload size differs from the disk capacity")
        existed = path.exists()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        with os.fdopen(fd, "wb") as f:
            left = int(length)
            while left > 0:
                chunk = self.rfile.read(min(_CHUNK, left))
                if not chunk:
                    break
                if chunk.count(0) == len(chunk):
                    f.seek(len(chunk), os.SEEK_CUR)
                else:
                    f.write(chunk)
                left -= len(chunk)
            f.truncate(int(length) - left)
        if left:
            os.unlink(tmp)
            return self._send(400, b"short body")
        os.replace(tmp, path)
        self._send(200 if existed else 201, b"")

    # ----- test control (not vSphere) --------------------------------------------------

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _sim_list(self) -> None:
        inv = self.server.inv
        with inv.lock:
            vms = [
                {
                    "name": vm.name,
                    "moid": vm.moid,
                    "power": vm.power,
                    "disks": [str(inv.disk_file(vm, i)) for i in range(len(vm.disks))],
                    "snapshots": [s.name for s in inv.snaps.values() if s.vm == vm.moid],
                    "chains": [vm.chains.chain(i) for i in range(len(vm.disks))],
                    "instance_uuid": vm.uuid,
                    "bios_uuid": vm.bios_uuid,
                    "complete": vm.complete,
                    "disk_keys": list(vm.keys),
                    "copied": vm.copied,
                    "current_snapshot": vm.current and inv.snaps[vm.current].name,
                    "dir": vm.dir,
                    "home_ds": vm.home_ds,
                    "disk_ds": list(vm.disk_ds),
                    "consolidation_needed": vm.consolidation_needed,
                }
                for vm in inv.vms.values()
            ]
        self._json(200, {"vms": vms, "datastore_gone": inv.datastore_gone})

    def _sim(self, what: str, req: dict[str, Any]) -> None:
        inv = self.server.inv
        with inv.lock:
            if what == "vms":
                try:
                    new = inv.create_vm(
                        req["name"],
                        req["disks"],
                        req.get("power", "poweredOff"),
                        req.get("folder", ""),
                        **req.get("kind", {}),
                    )
                except ValueError as exc:
                    return self._json(409, {"error": str(exc)})
                return self._json(201, {"moid": new.moid})
            if what == "guest-write":
                vm = inv.vm_by_name(req["vm"])
                if vm is None:
                    return self._json(404, {"error": "no such vm"})
                if vm.power != "poweredOn":
                    return self._json(409, {"error": "vm is not powered on"})
                data = (
                    bytes.fromhex(req["data_hex"])
                    if "data_hex" in req
                    else bytes([req["pattern"] & 0xFF]) * req["length"]
                )
                try:
                    inv.guest_write(vm, req.get("disk", 0), req["offset"], data)
                except (ValueError, IndexError) as exc:
                    return self._json(400, {"error": str(exc)})
                return self._json(200, {"written": len(data)})
            if what == "datastore":
                name = req.get("name", DS)
                inv.datastore_gone = bool(req.get("gone", inv.datastore_gone))
                inv.ds_types[name] = str(req.get("type", inv.ds_types[name]))
                inv.file_access = bool(req.get("file_management", inv.file_access))
                return self._json(
                    200,
                    {
                        "gone": inv.datastore_gone,
                        "type": inv.ds_types[name],
                        "file_management": inv.file_access,
                    },
                )
            if what == "inventory":
                inv.api_type = str(req.get("api_type", inv.api_type))
                inv.capacity_in_bytes = bool(req.get("capacity_in_bytes", inv.capacity_in_bytes))
                inv.clone_removes_disks = bool(
                    req.get("clone_removes_disks", inv.clone_removes_disks)
                )
                inv.clone_listed = str(req.get("clone_listed", inv.clone_listed))
                inv.leave_deltas = bool(req.get("leave_deltas", inv.leave_deltas))
                inv.clone_fault = req.get("clone_fault", inv.clone_fault)
                inv.consolidate_fails = int(req.get("consolidate_fails", inv.consolidate_fails))
                inv.interrupt_clones = int(req.get("interrupt_clones", inv.interrupt_clones))
                inv.clone_copies_removed_disks = bool(
                    req.get("clone_copies_removed_disks", inv.clone_copies_removed_disks)
                )
                inv.ignore_disk_locators = bool(
                    req.get("ignore_disk_locators", inv.ignore_disk_locators)
                )
                return self._json(
                    200,
                    {
                        "api_type": inv.api_type,
                        "capacity_in_bytes": inv.capacity_in_bytes,
                        "clone_removes_disks": inv.clone_removes_disks,
                        "clone_listed": inv.clone_listed,
                        "leave_deltas": inv.leave_deltas,
                        "consolidate_fails": inv.consolidate_fails,
                        "interrupt_clones": inv.interrupt_clones,
                        "clone_copies_removed_disks": inv.clone_copies_removed_disks,
                        "ignore_disk_locators": inv.ignore_disk_locators,
                    },
                )
            if what == "vm-devices":
                vm = inv.vm_by_name(req["vm"])
                if vm is None:
                    return self._json(404, {"error": "no such vm"})
                vm.reverse_devices = bool(req["reverse"])
                return self._json(200, {"reverse": vm.reverse_devices})
            if what == "range":
                inv.ignore_range = bool(req.get("ignore", inv.ignore_range))
                if "cut_after" in req:
                    inv.cut_after = req["cut_after"]
                return self._json(200, {"ignore": inv.ignore_range, "cut_after": inv.cut_after})
            if what == "folder-stats":
                gets, inv.folder_gets = inv.folder_gets, []
                return self._json(200, {"gets": len(gets), "connections": len(set(gets))})
            if what == "task-delay":
                method = req.get("method", "CloneVM_Task")
                if method == "CloneVM_Task":
                    inv.clone_delay = float(req["seconds"])
                else:
                    inv.task_delays[method] = float(req["seconds"])
                return self._json(200, {"seconds": float(req["seconds"]), "method": method})
            if what == "sessions":
                service = self.server.vim
                if "idle_timeout" in req:
                    service.idle_timeout = float(req["idle_timeout"])
                if req.get("expire"):
                    service.expire_all()
                live = len(service.live_sessions())
                if req.get("reset"):
                    service.stats = {"logins": 0, "logouts": 0, "expired": 0, "max_live": live}
                return self._json(200, {**service.stats, "live": live})
            if what == "guest":  # VMware Tools (Vm.tools) and quiesce faults
                vm = inv.vm_by_name(req["vm"])
                if vm is None:
                    return self._json(404, {"error": "no such vm"})
                tools = str(req.get("tools", vm.tools))
                fault = str(req.get("quiesce_fault", vm.quiesce_fault))
                if tools not in ("running", "notRunning", "notInstalled") or fault not in (
                    "ApplicationQuiesceFault",
                    "FilesystemQuiesceFault",
                ):
                    return self._json(400, {"error": f"bad tools {tools!r} or fault {fault!r}"})
                vm.tools, vm.quiesce_fault = tools, fault
                vm.quiesce_fails = int(req.get("quiesce_fails", vm.quiesce_fails))
                return self._json(
                    200, {"tools": vm.tools, "quiesce_fails": vm.quiesce_fails, "fault": fault}
                )
            if what == "cbt":  # Changed Block Tracking controls (see cbt.py)
                return self._json(*inv.cbt.control(inv, req))
            if what == "calls":
                return self._json(200, {"calls": dict(inv.calls)})
        self._json(404, {"error": f"unknown control endpoint {what}"})
