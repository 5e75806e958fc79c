"""End-to-end self-check: real pyvmomi against the simulator process, byte-exact.

Run from the repo root: ``.venv/bin/python -m tests.vsphere_sim.selfcheck``.
Not a pytest test; it exits non-zero on the first failed check.
"""

from __future__ import annotations

import http.client
import tempfile
import time
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from .control import (
    SimulatorProcess,
    create_vm,
    disk_path,
    guest_write,
    set_datastore_gone,
    set_datastore_type,
    set_ignore_range,
    set_task_delay,
)

USER, PASSWORD = "administrator@vsphere.local", "s3cret pass"
MIB = 1 << 20


def check(cond: object, what: str) -> None:
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok   {what}")


def raises(fn: Any, exc: type[BaseException], what: str) -> None:
    try:
        fn()
    except exc:
        return check(True, what)
    check(False, what)


def wait(task: vim.Task) -> Any:
    """Poll task.info (no PropertyCollector filters needed) until it finishes."""
    while (info := task.info).state not in ("success", "error"):
        time.sleep(0.05)
    return info


def ds_request(
    port: int, cookie: str | None, method: str, path: str, body: bytes | None = None, **hdr: str
) -> tuple[http.client.HTTPResponse, bytes]:
    """One datastore file-transfer request, as a backup tool would make it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Cookie": cookie} if cookie else {}
    conn.request(method, f"/folder/{path}?dcPath=dc1&dsName=ds1", body, headers | hdr)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def main() -> None:
    with tempfile.TemporaryDirectory() as root, SimulatorProcess() as sim:
        port = sim.start(root, 0, USER, PASSWORD)
        check(port > 0, f"simulator ready on port {port}")
        create_vm(port, "vm1", [4 * MIB, 1 * MIB], "poweredOn")
        si = SmartConnect(protocol="http", host="127.0.0.1", port=port, user=USER, pwd=PASSWORD)
        content = si.RetrieveContent()
        check(
            content.about.apiType == "VirtualCenter", f"connected, api {content.about.apiVersion}"
        )
        cookie = si._stub.cookie
        vm = content.searchIndex.FindByInventoryPath("dc1/vm/vm1")
        check(vm is not None and vm.name == "vm1", "FindByInventoryPath dc1/vm/vm1")
        check(content.searchIndex.FindByInventoryPath("dc1/vm/nope") is None, "unknown VM -> None")
        check(vm.snapshot is None, "vm.snapshot is None without snapshots")
        check(vm.parent.name == "vm" and vm.datastore[0].name == "ds1", "vm.parent, vm.datastore")
        devs = vm.config.hardware.device
        ctrl = [d for d in devs if isinstance(d, vim.vm.device.VirtualLsiLogicController)]
        disks = [d for d in devs if isinstance(d, vim.vm.device.VirtualDisk)]
        check(ctrl and ctrl[0].key == 1000 and len(disks) == 2, "controller + 2 disks")
        check(
            disks[1].backing.fileName == "[ds1] vm1/vm1_1.vmdk"
            and disks[0].capacityInBytes == 4 * MIB
            and disks[1].unitNumber == 1,
            "disk backing names, capacity and unit numbers",
        )

        guest_write(port, "vm1", 0, b"A" * 4096)
        guest_write(port, "vm1", 3 * MIB, b"tail-at-snapshot")
        guest_write(port, "vm1", 100, disk=1, pattern=0x5A, length=1000)
        expected = disk_path(root, "vm1", 0).read_bytes()
        expected1 = disk_path(root, "vm1", 1).read_bytes()
        info = wait(vm.CreateSnapshot_Task("snap1", "first", memory=False, quiesce=False))
        snap = info.result
        check(info.state == "success" and isinstance(snap, vim.vm.Snapshot), "CreateSnapshot_Task")
        tree = vm.snapshot.rootSnapshotList[0]
        check(vm.snapshot.currentSnapshot == snap and tree.name == "snap1", "snapshot tree")
        disk0 = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
        b = disk0[0].backing
        check(
            b.fileName == "[ds1] vm1/vm1-000001.vmdk"
            and b.parent.fileName == "[ds1] vm1/vm1.vmdk"
            and b.parent.parent is None
            and disk0[1].backing.fileName == "[ds1] vm1/vm1_1-000001.vmdk",
            "after a snapshot each disk is a delta whose parent is the base",
        )
        check(tree.state == "poweredOff", "non-memory snapshot state is poweredOff")
        guest_write(port, "vm1", 0, b"B" * 4096)

        set_task_delay(port, 2.0)
        spec = vim.vm.CloneSpec(
            snapshot=snap,
            location=vim.vm.RelocateSpec(diskMoveType="moveAllDiskBackingsAndDisallowSharing"),
            powerOn=False,
            template=False,
        )
        task = vm.CloneVM_Task(folder=vm.parent, name="vm1-snapferry-x", spec=spec)
        check(task.info.state == "running", "clone task observed running (task-delay)")
        early = content.searchIndex.FindByInventoryPath("dc1/vm/vm1-snapferry-x")
        check(early is not None, "a running clone is already listed")
        check(
            any(t.info.key == task.info.key for t in vm.recentTask),
            "the running clone is in the source VM's recentTask",
        )
        time.sleep(0.5)
        progress = task.info.progress
        check(0 < (progress or 0) < 100, f"a running clone reports progress ({progress}%)")
        info = wait(task)
        check(info.progress == 100, "a finished clone reports 100%")
        clone = info.result
        check(info.state == "success" and clone.name == "vm1-snapferry-x", "CloneVM_Task")
        cb = [d.backing for d in clone.config.hardware.device if hasattr(d, "capacityInKB")]
        check(
            cb[0].fileName == "[ds1] vm1-snapferry-x/vm1-snapferry-x.vmdk" and cb[0].parent is None,
            "a full clone of a VM with deltas has flat disks named after it",
        )
        set_task_delay(port, 0)
        dup = wait(vm.CloneVM_Task(folder=vm.parent, name="vm1-snapferry-x", spec=spec))
        check(isinstance(dup.error, vim.fault.DuplicateName), "clone to existing name")
        # A clone whose config removes disk 0 copies disk 1 only, keeping its device key.
        src_disks = [d for d in vm.config.hardware.device if hasattr(d, "capacityInKB")]
        rm = vim.vm.device.VirtualDeviceSpec(operation="remove", device=src_disks[0])
        spec1 = vim.vm.CloneSpec(
            snapshot=snap,
            location=vim.vm.RelocateSpec(diskMoveType="moveAllDiskBackingsAndDisallowSharing"),
            config=vim.vm.ConfigSpec(deviceChange=[rm]),
            powerOn=False,
            template=False,
        )
        one = wait(vm.CloneVM_Task(folder=vm.parent, name="vm1-one", spec=spec1)).result
        kept = [d for d in one.config.hardware.device if hasattr(d, "capacityInKB")]
        check(
            [d.key for d in kept] == [2001]
            and sorted(p.name for p in (Path(root) / "ds1/vm1-one").iterdir())
            == ["vm1-one-flat.vmdk", "vm1-one.vmdk"]
            and (Path(root) / "ds1/vm1-one/vm1-one-flat.vmdk").read_bytes() == expected1,
            "a clone without disk 0: only disk 1 (key 2001) copied, the bytes at the snapshot",
        )
        wait(one.Destroy_Task())
        rm.device = vim.vm.device.VirtualDisk(key=2999, capacityInKB=1)
        info = wait(vm.CloneVM_Task(folder=vm.parent, name="vm1-bad", spec=spec1))
        check(isinstance(info.error, vim.fault.InvalidDeviceSpec), "removing no disk: invalid")

        info = wait(snap.RemoveSnapshot_Task(removeChildren=False))
        check(info.state == "success" and vm.snapshot is None, "RemoveSnapshot_Task")
        b = [d.backing for d in vm.config.hardware.device if hasattr(d, "capacityInKB")][0]
        check(b.fileName == "[ds1] vm1/vm1.vmdk" and b.parent is None, "removal consolidates")

        flat = "vm1-snapferry-x/vm1-snapferry-x-flat.vmdk"
        resp, _ = ds_request(port, cookie, "HEAD", flat)
        check(resp.status == 200 and int(resp.headers["Content-Length"]) == 4 * MIB, "HEAD")
        got = b""
        while len(got) < 4 * MIB:
            rng = f"bytes={len(got)}-{len(got) + MIB - 1}"
            resp, data = ds_request(port, cookie, "GET", flat, Range=rng)
            assert resp.status == 206, resp.status
            got += data
        check(got == expected, "clone disk 0 (ranged GET) == bytes at snapshot time")
        _, data = ds_request(port, cookie, "GET", "vm1-snapferry-x/vm1-snapferry-x_1-flat.vmdk")
        check(data == expected1, "clone disk 1 == bytes at snapshot time")
        src = disk_path(root, "vm1", 0).read_bytes()
        check(src[:4096] == b"B" * 4096, "source disk still has the post-snapshot write")
        check(ds_request(port, None, "GET", flat)[0].status == 401, "GET without cookie -> 401")
        resp, data = ds_request(port, cookie, "GET", flat, Range="bytes=-16")
        check(resp.status == 206 and data == b"\0" * 16, "suffix range")
        set_ignore_range(port, True)
        resp, data = ds_request(port, cookie, "GET", flat, Range="bytes=0-15")
        check(
            resp.status == 200 and data == expected and "Content-Range" not in resp.headers,
            "ignore-range mode: a ranged GET gets a plain 200 with the whole file",
        )
        set_ignore_range(port, False)
        ds = vm.datastore[0]
        check(ds.summary.type == "VMFS", "datastore summary.type VMFS")
        set_datastore_type(port, "vsan")
        check(ds.summary.type == "vsan", "datastore summary.type vsan")
        check(ds_request(port, cookie, "HEAD", flat)[0].status == 404, "vsan: no -flat.vmdk")
        set_datastore_type(port, "VMFS")

        info = wait(vm.PowerOffVM_Task())
        check(info.state == "success" and vm.runtime.powerState == "poweredOff", "PowerOff")
        info = wait(vm.PowerOffVM_Task())
        check(isinstance(info.error, vim.fault.InvalidPowerState), "PowerOff twice")
        new = b"R" * 512 + b"\0" * (MIB - 1024) + b"S" * 512
        resp, _ = ds_request(port, cookie, "PUT", "vm1/vm1_1-flat.vmdk", body=new)
        check(resp.status == 200 and disk_path(root, "vm1", 1).read_bytes() == new, "PUT disk")
        resp, _ = ds_request(port, cookie, "PUT", "vm1/vm1_1-flat.vmdk", body=b"short")
        check(resp.status == 400, "PUT of a wrong-sized disk is refused")
        info = wait(vm.PowerOnVM_Task())
        check(info.state == "success" and vm.runtime.powerState == "poweredOn", "PowerOn")

        def chain() -> list[str]:
            b = [d.backing for d in vm.config.hardware.device if hasattr(d, "capacityInKB")][0]
            names = []
            while b is not None:
                names.append(b.fileName.rpartition("/")[2])
                b = b.parent
            return names

        a = wait(vm.CreateSnapshot_Task("a", "", memory=False, quiesce=False)).result
        wait(vm.CreateSnapshot_Task("b", "", memory=False, quiesce=False))
        check(chain() == ["vm1-000002.vmdk", "vm1-000001.vmdk", "vm1.vmdk"], "two deltas")
        wait(a.RevertToSnapshot_Task())
        check(chain() == ["vm1-000002.vmdk", "vm1.vmdk"], "a revert starts a new delta")
        wait(a.RemoveSnapshot_Task(removeChildren=False))
        check(chain() == ["vm1-000002.vmdk", "vm1.vmdk"], "b still needs the base: no merge")
        wait(vm.snapshot.rootSnapshotList[0].snapshot.RemoveSnapshot_Task(removeChildren=False))
        check(chain() == ["vm1.vmdk"] and vm.snapshot is None, "all removed: the base again")
        if vm.runtime.powerState != "poweredOn":
            wait(vm.PowerOnVM_Task())

        snap2 = wait(vm.CreateSnapshot_Task("mem", "", memory=True, quiesce=False)).result
        before = disk_path(root, "vm1", 0).read_bytes()
        guest_write(port, "vm1", 0, b"C" * 10)
        wait(vm.PowerOffVM_Task())
        info = wait(snap2.RevertToSnapshot_Task())
        check(info.state == "success", "RevertToSnapshot_Task")
        check(disk_path(root, "vm1", 0).read_bytes() == before, "revert restored bytes")
        check(vm.runtime.powerState == "poweredOn", "memory snapshot revert -> poweredOn")

        pc = vmodl.query.PropertyCollector
        fs = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=clone, skip=False)],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["name", "snapshot"])],
        )
        res = content.propertyCollector.RetrievePropertiesEx([fs], pc.RetrieveOptions())
        names = [p.name for p in res.objects[0].propSet]
        check(names == ["name"], "RetrievePropertiesEx omits unset snapshot")

        info = wait(clone.Destroy_Task())
        check(
            info.state == "success" and not (Path(root) / "ds1/vm1-snapferry-x").exists(), "Destroy"
        )
        raises(lambda: clone.name, vmodl.fault.ManagedObjectNotFound, "destroyed VM -> MONotFound")
        info = wait(vm.Destroy_Task())
        check(isinstance(info.error, vim.fault.InvalidPowerState), "Destroy poweredOn VM fails")

        set_datastore_gone(port, True)
        info = wait(vm.CreateSnapshot_Task("x", "", memory=False, quiesce=False))
        check(isinstance(info.error, vim.fault.FileNotFound), "datastore gone -> FileNotFound")
        check(ds_request(port, cookie, "HEAD", "vm1/vm1-flat.vmdk")[0].status == 404, "gone: 404")
        set_datastore_gone(port, False)

        bad = dict(protocol="http", host="127.0.0.1", port=port, user=USER, pwd="bad")
        raises(lambda: SmartConnect(**bad), vim.fault.InvalidLogin, "bad password -> InvalidLogin")
        Disconnect(si)
        raises(lambda: vm.name, vim.fault.NotAuthenticated, "after Logout -> NotAuthenticated")
    print("selfcheck passed")


if __name__ == "__main__":
    main()
