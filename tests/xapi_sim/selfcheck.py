"""End-to-end self-check: real XenAPI.py against the simulator process, byte-exact.

Run from the repo root: ``.venv/bin/python -m tests.xapi_sim.selfcheck``.
Not a pytest test; it exits non-zero on the first failed check.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import tempfile
import time
import urllib.request
import xmlrpc.client
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import XenAPI

from . import conformance
from . import control as sim
from .vhd import BLOCK_SIZE, apply_vhd, read_vhd_blocks

USER, PASSWORD = "root", "s3cret pass"
MIB = 1 << 20
DISK0, DISK1 = 64 * MIB, 10 * MIB + 512  # disk 1 ends mid-block on purpose


def check(cond: object, what: str) -> None:
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok   {what}")


def failure(fn: Any, *args: Any) -> list[str]:
    """The ErrorDescription of the XenAPI.Failure ``fn(*args)`` raises ([] if none)."""
    try:
        fn(*args)
    except XenAPI.Failure as exc:
        return list(exc.details)
    return []


def wait_task(x: Any, task: str) -> str:
    while (status := x.task.get_status(task)) == "pending":
        time.sleep(0.02)
    return status


def result_ref(x: Any, task: str) -> str:
    """Parse ``<value>OpaqueRef:…</value>`` as a real client must."""
    text = x.task.get_result(task)
    return text.removeprefix("<value>").removesuffix("</value>")


def http_get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def http_put(port: int, query: str, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("PUT", f"/import_raw_vdi?{query}", body)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


def changed_blocks(a: bytes, b: bytes) -> set[int]:
    return {
        i
        for i in range(-(-len(a) // BLOCK_SIZE))
        if a[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] != b[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
    }


def qemu_to_raw(vhd: Path, out: Path) -> bytes:
    """qemu-img's reading (``-f vpc``, never a probe; sized by current_size, see
    conformance.qemu_reads)."""
    info = subprocess.run(
        ["qemu-img", "info", "-f", "vpc", str(vhd)], capture_output=True, text=True
    )
    check("file format: vpc" in info.stdout, f"qemu-img info -f vpc reads {vhd.name}")
    return conformance.qemu_reads(vhd, out)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="xapi-sim-check-"))
    proc = sim.SimulatorProcess()
    try:
        port = proc.start(work / "root", 0, USER, PASSWORD)
        print(f"simulator ready on {proc.url} (pid {proc.proc.pid if proc.proc else '?'})")
        run(proc, port, work)
    finally:
        proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("ALL CHECKS PASSED")


def run(proc: sim.SimulatorProcess, port: int, work: Path) -> None:
    sim.create_vm(port, "web01", [DISK0, DISK1], "Running")

    bad = XenAPI.Session(proc.url)
    err = failure(bad.xenapi.login_with_password, USER, "wrong", "2.21", "selfcheck")
    check(err[:1] == ["SESSION_AUTHENTICATION_FAILED"], f"bad password -> {err[:1]}")

    session = XenAPI.Session(proc.url)
    session.xenapi.login_with_password(USER, PASSWORD, "2.21", "selfcheck")
    x = session.xenapi
    check(session.API_version == "2.21", "session.API_version via pool/host getters")

    (vm,) = x.VM.get_by_name_label("web01")
    check(x.VM.get_power_state(vm) == "Running", "VM found by name, Running")
    check(x.VM.get_is_a_snapshot(vm) is False and x.VM.get_snapshots(vm) == [], "VM flags")
    vbds = sorted(x.VM.get_VBDs(vm), key=x.VBD.get_userdevice)
    check([x.VBD.get_device(b) for b in vbds] == ["xvda", "xvdb"], "VBD devices xvda, xvdb")
    check([x.VBD.get_userdevice(b) for b in vbds] == ["0", "1"], "VBD userdevice '0','1'")
    check(x.VBD.get_type(vbds[0]) == "Disk", "VBD type Disk")
    vdi, vdi1 = x.VBD.get_VDI(vbds[0]), x.VBD.get_VDI(vbds[1])
    check(x.VDI.get_virtual_size(vdi) == str(DISK0), "virtual_size travels as a string")
    (sr,) = x.SR.get_by_name_label("Local storage")
    check(x.VDI.get_SR(vdi) == sr and x.SR.get_uuid(sr), "VDI lives on 'Local storage'")
    vdi_uuid = x.VDI.get_uuid(vdi)
    check(x.VDI.get_by_uuid(vdi_uuid) == vdi, "VDI.get_by_uuid")
    live = sim.vdi_path(port, vdi)

    for i, off in enumerate([0, 3 * MIB + 17, 9 * MIB, 30 * MIB, 50 * MIB + 4096]):
        sim.guest_write(port, "web01", off, bytes([i + 1, 0xA5]) * 40_000)
    sim.guest_write(port, "web01", 4096, b"second disk", disk=1)
    sim.guest_write(port, "web01", DISK1 - 600, b"\x5a" * 600, disk=1)

    sim.set_task_delay(port, 0.3)
    before = live.read_bytes()
    task = x.Async.VDI.snapshot(vdi, {})
    check(x.task.get_status(task) == "pending", "Async.VDI.snapshot task starts pending")
    check(wait_task(x, task) == "success", "task polled to success")
    snap1 = result_ref(x, task)
    check(snap1.startswith("OpaqueRef:") and x.task.get_progress(task) == 1.0, "result + progress")
    x.task.destroy(task)
    check(failure(x.task.get_status, task)[:2] == ["HANDLE_INVALID", "task"], "task.destroy")
    sim.set_task_delay(port, 0)
    snap1_bytes = sim.vdi_path(port, snap1).read_bytes()
    check(snap1_bytes == before, "snapshot 1 holds the disk bytes at that instant")
    check(x.VDI.get_is_a_snapshot(snap1) and x.VDI.get_snapshot_of(snap1) == vdi, "snap flags")
    check(snap1 in x.VDI.get_snapshots(vdi), "VDI.get_snapshots lists it")

    # ~1% of the disk changes: block 2, the 9/10 boundary, 20; one rewrite (block 15) is
    # identical: vhd-tool picks blocks by allocation, so it is sent all the same.
    sim.guest_write(port, "web01", 5 * MIB + 100, b"\x11" * 4096)
    sim.guest_write(port, "web01", 20 * MIB - 10, b"\x22" * 20)
    sim.guest_write(port, "web01", 40 * MIB, b"\x33" * (640 << 10))
    sim.guest_write(port, "web01", 30 * MIB, before[30 * MIB : 30 * MIB + 80_000])
    snap2 = x.VDI.snapshot(vdi, {})
    snap2_bytes = sim.vdi_path(port, snap2).read_bytes()
    expected = changed_blocks(snap1_bytes, snap2_bytes)
    check(expected == {2, 9, 10, 20}, f"ground truth: changed 2 MiB blocks {sorted(expected)}")

    base_url = f"{proc.url}/export_raw_vdi?session_id={session.handle}"
    status, full, hdr = http_get(f"{base_url}&vdi={snap1}&format=vhd")
    check(status == 200 and "Content-Length" not in hdr, "full VHD export, no Content-Length")
    (work / "full.vhd").write_bytes(full)
    check(qemu_to_raw(work / "full.vhd", work / "full.raw") == snap1_bytes, "qemu raw == snap1")
    size, block, blocks = read_vhd_blocks(work / "full.vhd")
    nonzero = {
        i for i in range(DISK0 // BLOCK_SIZE) if any(snap1_bytes[i * block : (i + 1) * block])
    }
    check(size == DISK0 and block == BLOCK_SIZE and set(blocks) == nonzero, "full = written")

    snap1_uuid = x.VDI.get_uuid(snap1)
    status, delta, _ = http_get(f"{base_url}&vdi={snap2}&format=vhd&base={snap1_uuid}")
    (work / "delta.vhd").write_bytes(delta)
    _, _, dblocks = read_vhd_blocks(work / "delta.vhd")
    written = expected | {15}
    check(status == 200 and set(dblocks) == written, f"delta has exactly {sorted(dblocks)}")
    length = 2048 + 512 + len(written) * (512 + BLOCK_SIZE) + 512  # BAT of 32 entries: 1 sector
    check(len(delta) == length, f"delta is {len(delta)} bytes: metadata + its 5 blocks")
    shutil.copy(work / "full.raw", work / "rebuilt.raw")
    check(apply_vhd(work / "delta.vhd", work / "rebuilt.raw") == 5, "apply_vhd applies 5 blocks")
    check((work / "rebuilt.raw").read_bytes() == snap2_bytes, "full + delta == snapshot 2")

    status, raw, hdr = http_get(f"{base_url}&vdi={x.VDI.get_uuid(snap2)}&format=raw")
    check(status == 200 and raw == snap2_bytes and "Content-Length" not in hdr, "raw")
    status, odd, _ = http_get(f"{base_url}&vdi={vdi1}&format=vhd")
    (work / "odd.vhd").write_bytes(odd)
    odd_raw = qemu_to_raw(work / "odd.vhd", work / "odd.raw")
    check(odd_raw == sim.vdi_path(port, vdi1).read_bytes(), "odd-size disk VHD via qemu-img")
    bad_session = f"{proc.url}/export_raw_vdi?session_id=OpaqueRef:nope&vdi={snap1}&format=raw"
    check(http_get(bad_session)[0] == 401, "export with a bad session -> 401")
    check(http_get(f"{base_url}&vdi=OpaqueRef:nope&format=raw")[0] == 500, "unknown VDI -> 500")

    conf_vm = sim.create_vm(port, "conf01", [32 * MIB])["ref"]
    conformance.run(check, x, port, session.handle, conf_vm, work)

    check_faults(x, port, session, vdi, proc.url)
    check_vm_semantics(x, port, vm, vdi, vdi1)
    check_import(x, port, session, sr, vm, work, snap2_bytes)
    check_lookup(x, port, vm)
    check_throttle(port, f"{proc.url}/export_raw_vdi?session_id={session.handle}", snap1)
    session.xenapi.session.logout()
    check(True, "logout")
    conformance.run_pool(check, port, USER, PASSWORD)


def check_faults(x: Any, port: int, session: Any, vdi: str, url: str) -> None:
    tmp = x.VDI.snapshot(vdi, {})
    sim.inject_fault(port, "VDI.destroy", "VDI_IN_USE", [tmp, "destroy"], count=1)
    err = failure(x.VDI.destroy, tmp)
    check(err == ["VDI_IN_USE", tmp, "destroy"], "injected VDI_IN_USE on VDI.destroy")
    x.VDI.destroy(tmp)
    check(failure(x.VDI.get_uuid, tmp)[:2] == ["HANDLE_INVALID", "VDI"], "fault was one-shot")
    err = failure(x.VDI.destroy, vdi)
    check(err == ["VDI_IN_USE", vdi, "destroy"], "real VDI_IN_USE: disk of a Running VM")
    err = failure(x.VDI.get_uuid, "OpaqueRef:bogus")
    check(err == ["HANDLE_INVALID", "VDI", "OpaqueRef:bogus"], "HANDLE_INVALID [class, ref]")
    check(failure(x.VDI.get_by_uuid, "nope")[:1] == ["UUID_INVALID"], "UUID_INVALID")
    sim.inject_fault(port, "VDI.snapshot", "SR_BACKEND_FAILURE_44", ["", "no space", ""], 1)
    task = x.Async.VDI.snapshot(vdi, {})
    check(wait_task(x, task) == "failure", "injected fault fails the Async task")
    check(x.task.get_error_info(task)[0] == "SR_BACKEND_FAILURE_44", "task.get_error_info")

    old, vms = session.handle, len(x.VM.get_all())
    check(sim.expire_sessions(port) >= 1, "sessions expired")
    raw: Any = xmlrpc.client.ServerProxy(url).VM.get_all(old)
    check(raw["ErrorDescription"] == ["SESSION_INVALID", old], "wire answer is SESSION_INVALID")
    check(len(x.VM.get_all()) == vms, "XenAPI client re-logged in transparently")
    check(session.handle != old, "new session ref after re-login")
    sim.set_session_idle(port, 0.2)
    idle = session.handle
    time.sleep(0.4)
    raw = xmlrpc.client.ServerProxy(url).VM.get_all(idle)
    check(raw["ErrorDescription"] == ["SESSION_INVALID", idle], "an idle session expires")
    x.VM.get_all()  # XenAPI logs in again
    sim.set_session_idle(port, 0.2)
    time.sleep(0.4)
    status = http_get(f"{url}/export_raw_vdi?session_id={session.handle}&vdi={vdi}")[0]
    check(status == 401, "an idle session's export -> 401")
    sim.set_session_idle(port, 24 * 3600)
    x.VM.get_all()


def check_vm_semantics(x: Any, port: int, vm: str, vdi: str, vdi1: str) -> None:
    sim.set_revert_mode(port, "in-place")  # the default is "xapi", checked below
    disk0, disk1 = sim.vdi_path(port, vdi), sim.vdi_path(port, vdi1)
    state_a = (disk0.read_bytes(), disk1.read_bytes())
    snap_a = x.VM.snapshot(vm, "snap-a")
    check(x.VM.get_is_a_snapshot(snap_a) and x.VM.get_snapshot_of(snap_a) == vm, "VM.snapshot")
    check(x.VM.get_power_state(snap_a) == "Halted", "snapshot VM is Halted")
    svdis = [x.VBD.get_VDI(b) for b in sorted(x.VM.get_VBDs(snap_a), key=x.VBD.get_userdevice)]
    check(all(x.VDI.get_is_a_snapshot(v) for v in svdis), "snapshot VBDs point at new snap VDIs")
    check(sim.vdi_path(port, svdis[0]).read_bytes() == state_a[0], "snapshot VDI holds bytes")

    sim.guest_write(port, vm, 7 * MIB, b"\x77" * 9000)
    state_b = (disk0.read_bytes(), disk1.read_bytes())
    cp_b = x.VM.checkpoint(vm, "cp-b")
    info = x.VM.get_record(cp_b)["snapshot_info"]
    check(info.get("power-state-at-snapshot") == "Running", "checkpoint remembers Running")
    image = x.VM.get_suspend_VDI(cp_b)
    check(image != "OpaqueRef:NULL" and x.VDI.get_type(image) == "suspend", "suspend_VDI")
    check(x.VM.get_suspend_VDI(snap_a) == "OpaqueRef:NULL", "a Disk snapshot has none")
    check(vm and set(x.VM.get_snapshots(vm)) == {snap_a, cp_b}, "VM.get_snapshots")

    sim.guest_write(port, vm, 7 * MIB, b"\x88" * 9000)
    x.VM.clean_shutdown(vm)
    x.VM.revert(snap_a)
    check(x.VM.get_power_state(vm) == "Halted", "revert to snapshot -> Halted")
    check((disk0.read_bytes(), disk1.read_bytes()) == state_a, "revert restores snap-a bytes")
    check(x.VBD.get_VDI(x.VM.get_VBDs(vm)[0]) == vdi, "VM keeps its VDI refs (in-place mode)")
    try:
        sim.guest_write(port, vm, 0, b"x")
        check(False, "guest write to a Halted VM refused")
    except HTTPError as exc:
        check(exc.code == 409, "guest write to a Halted VM -> 409")
    err = failure(x.VM.hard_shutdown, vm)
    check(err == ["VM_BAD_POWER_STATE", vm, "running", "halted"], "VM_BAD_POWER_STATE")
    x.VM.start(vm, False, False)
    check(x.VM.get_power_state(vm) == "Running", "VM.start")
    # message_forwarding.ml l.2462-2471: XAPI hard-shuts a running VM itself, then reverts
    task = x.Async.VM.revert(cp_b)
    check(wait_task(x, task) == "success" and x.task.get_result(task) == "", "Async.VM.revert")
    check(x.VM.get_power_state(vm) == "Running", "revert to checkpoint -> Running")
    check((disk0.read_bytes(), disk1.read_bytes()) == state_b, "revert restores cp-b bytes")

    x.VM.destroy(snap_a)
    check(failure(x.VM.get_uuid, snap_a)[:2] == ["HANDLE_INVALID", "VM"], "VM.destroy(snapshot)")
    check(all(x.VDI.get_is_a_snapshot(v) for v in svdis), "its VDIs survive VM.destroy")
    for v in svdis:
        x.VDI.destroy(v)
    check(failure(x.VDI.get_uuid, svdis[0])[:1] == ["HANDLE_INVALID"], "VDI.destroy removes them")

    sim.set_revert_mode(port, "xapi")
    x.VM.hard_shutdown(vm)
    x.VM.revert(cp_b)
    new_vdi = x.VBD.get_VDI(sorted(x.VM.get_VBDs(vm), key=x.VBD.get_userdevice)[0])
    check(new_vdi != vdi and failure(x.VDI.get_uuid, vdi), "xapi mode: revert makes new VDIs")
    check(x.VM.get_power_state(vm) == "Suspended", "xapi mode: checkpoint revert -> Suspended")
    resumed_from = x.VM.get_suspend_VDI(vm)
    check(resumed_from not in ("OpaqueRef:NULL", image), "xapi mode: a clone of the image")
    x.VM.resume(vm, False, False)
    check(x.VM.get_suspend_VDI(vm) == "OpaqueRef:NULL", "resume consumes the image")
    check(sim.vdi_path(port, new_vdi).read_bytes() == state_b[0], "xapi mode: bytes restored")
    x.VM.hard_shutdown(vm)
    x.VM.destroy(cp_b)
    check(x.VDI.get_type(image) == "suspend", "VM.destroy leaves the checkpoint's image")
    x.VDI.destroy(image)
    x.VM.start(vm, False, False)

    never = sim.create_vm(port, "cold01", [MIB, MIB], "Halted")["ref"]
    vbds = sorted(x.VM.get_VBDs(never), key=x.VBD.get_userdevice)
    check([x.VBD.get_device(b) for b in vbds] == ["", ""], "never booted: VBD.device ''")
    check([x.VBD.get_userdevice(b) for b in vbds] == ["0", "1"], "... userdevice 0, 1")
    x.VM.start(never, False, False)
    check([x.VBD.get_device(b) for b in vbds] == ["xvda", "xvdb"], "booted: xvda, xvdb")
    x.VM.hard_shutdown(never)


def check_import(
    x: Any, port: int, session: Any, sr: str, vm: str, work: Path, want: bytes
) -> None:
    rec: dict[str, Any] = {"name_label": "restore", "SR": sr, "virtual_size": str(DISK0)}
    rec |= {"type": "user"}
    rec |= {"sharable": False, "read_only": False, "other_config": {}}
    raw_dst, vhd_dst = x.VDI.create(rec), x.VDI.create(rec)
    check(x.VDI.get_virtual_size(raw_dst) == str(DISK0), "VDI.create makes an empty VDI")
    q = f"session_id={session.handle}&vdi={raw_dst}"
    check(http_put(port, q + "&format=raw", want) == 200, "import_raw_vdi raw -> 200")
    check(sim.vdi_path(port, raw_dst).read_bytes() == want, "raw import round trip")
    q = f"session_id={session.handle}&vdi={x.VDI.get_uuid(vhd_dst)}&format=vhd"
    check(http_put(port, q, (work / "full.vhd").read_bytes()) == 200, "import full VHD")
    check(http_put(port, q, (work / "delta.vhd").read_bytes()) == 200, "import delta VHD")
    check(sim.vdi_path(port, vhd_dst).read_bytes() == want, "full + delta import == snap2")
    live = x.VBD.get_VDI(x.VM.get_VBDs(vm)[0])  # after the xapi-mode revert: a new VDI
    q = f"session_id={session.handle}&vdi={live}&format=raw"
    # xapi_vbd_helpers.ml l.288-319: dom0's VBD is exempt from the sharing check; no 409
    head = sim.vdi_path(port, live).read_bytes()[:512]
    check(http_put(port, q, head) == 200, "import into a Running VM's disk is not refused")


def check_lookup(x: Any, port: int, vm: str) -> None:
    """One label, many VM objects: XAPI's lookups filter nothing (db_cache_impl.ml)."""
    (dom0,) = x.VM.get_by_name_label("Control domain on host: xapi-sim")
    rec = x.VM.get_record(dom0)
    check(rec["is_control_domain"] and rec["domid"] == "0", "dom0 is in the VM table")
    check(not rec["is_a_template"] and rec["power_state"] == "Running", "dom0 runs")
    err = failure(x.VM.snapshot, dom0, "d0")
    check(err[:1] == ["OPERATION_NOT_ALLOWED"], "dom0 cannot be snapshotted")
    uuid = x.VM.get_uuid(vm)
    check(x.VM.get_by_uuid(uuid) == vm, "VM.get_by_uuid")
    missing = "00000000-0000-4000-8000-000000000000"
    err = failure(x.VM.get_by_uuid, missing)
    check(err == ["UUID_INVALID", "VM", missing], "VM.get_by_uuid unknown -> UUID_INVALID")

    template = sim.create_template(port, "web01", [MIB])["ref"]
    trec = x.VM.get_record(template)
    check(trec["is_a_template"] and not trec["is_a_snapshot"], "a template named like a VM")
    err = failure(x.VM.start, template)
    check(err == ["VM_IS_TEMPLATE", template, "start"], "a template is not started")
    err = failure(x.VM.snapshot, template, "t")
    check(err == ["VM_IS_TEMPLATE", template, "snapshot"], "a template is not snapshotted")
    err = failure(x.VM.revert, template)
    check(err == ["VM_IS_TEMPLATE", template, "revert"], "nor reverted to")
    check(failure(x.VM.revert, vm) == ["REVERT_ONLY_ALLOWED_ON_SNAPSHOT"], "revert to a VM")

    snap = x.VM.snapshot(vm, "web01")  # the new_name is the label, even the VM's own
    srec = x.VM.get_record(snap)
    check(srec["name_label"] == "web01" and srec["snapshot_of"] == vm, "snapshot named web01")
    check(srec["is_a_snapshot"] and srec["is_a_template"], "a snapshot is a template too")
    err = failure(x.VM.start, snap)
    check(err == ["VM_IS_SNAPSHOT", snap, "start"], "a snapshot is not started")
    labelled = x.VM.get_by_name_label("web01")
    check(labelled == [vm, template, snap], "get_by_name_label: VM, template and snapshot")

    try:
        sim.create_vm(port, "web01", [MIB])
        check(False, "a second live web01 refused unless asked for")
    except HTTPError as exc:
        check(exc.code == 409, "a second live web01 refused unless asked for")
    twin = sim.create_vm(port, "web01", [MIB], "Halted", allow_duplicate=True)
    check(len(x.VM.get_by_name_label("web01")) == 4, "two VMs named web01 on request")
    try:
        sim.guest_write(port, "web01", 0, b"x")
        check(False, "a guest write by an ambiguous name refused")
    except HTTPError as exc:
        check(exc.code == 409, "a guest write by an ambiguous name -> 409")
    x.VM.destroy(twin["ref"])
    x.VM.destroy(template)
    for vdi in [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(snap)]:
        x.VDI.destroy(vdi)
    x.VM.destroy(snap)
    check(x.VM.get_by_name_label("web01") == [vm], "decoys destroyed")


def check_throttle(port: int, base_url: str, snap: str) -> None:
    sim.set_export_delay(port, 256 << 10)
    t0 = time.monotonic()
    with urllib.request.urlopen(f"{base_url}&vdi={snap}&format=raw", timeout=30) as resp:
        got = len(resp.read(128 << 10))
    check(got == 128 << 10 and time.monotonic() - t0 >= 0.3, "export throttled, reader quit")
    sim.set_export_delay(port, 0)
    check(sim.list_vms(port), "simulator still answers after the aborted export")


if __name__ == "__main__":
    main()
