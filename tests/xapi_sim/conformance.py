"""Conformance of the simulator's ``/export_raw_vdi`` with what XAPI sends, checked with a
plain HTTP client and a VHD parser of its own (neither the driver nor ``vhd.py``).

What is checked, and where XAPI does it (xapi-project/xen-api at e2ee48d688):

- ``ocaml/xapi/export_raw_vdi.ml``: 200 with ``keep_alive:false`` and no Content-Length
  (the body ends at the close); 401 for a bad session; 500 for an unknown VDI (the lookup
  raises before any header); a 302 to the host that sees a VDI's local SR
  (``importexport.ml`` ``return_302_redirect``: same path and query); an error after the
  200 (an unknown ``base``, a failed attach, vhd-tool's ``VDI_IO_ERROR``) is a short body
  and a failed ``task_id`` task.
- ``ocaml/libs/vhd/vhd_format/f.ml`` ``Vhd_input.vhd_common``: footer at 0 and at the end,
  header at 512, an empty sector at 1536, BAT at 2048; type 3 for a full export, 4 for a
  delta, whose header names the base's leaf VHD (parent unique id, UTF-16BE name, a MacX
  ``file://`` locator at 1536); ``current_size`` = the virtual size; creator ``caml``; the
  blocks allocated in the chains (full: any BAT; delta: the VHDs on one chain only), each
  complete, with every bitmap bit set.
- ``qemu-img`` (always ``-f vpc``) reads a full export byte for byte. qemu sizes a VHD
  whose creator is not one it knows (``caml`` is not) by its CHS geometry, which rounds
  down, so it is told to use ``current_size`` (``force_size_calc``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import struct
import subprocess
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK = 2 << 20
PAGE = b"HTTP/1.1 500 Internal Error\r\n"  # http_svr.ml response_internal_error
Check = Callable[[object, str], None]


@dataclass
class Export:
    status: int
    headers: dict[str, str]
    body: bytes


def get(port: int, path: str) -> Export:
    """One GET with http.client: no redirect following, the body read to the close."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return Export(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def _ones_complement(buf: bytes, at: int) -> int:
    return ~(sum(buf) - sum(buf[at : at + 4])) & 0xFFFFFFFF


@dataclass
class ParsedVhd:
    disk_type: int
    creator: bytes
    current_size: int
    original_size: int
    uid: bytes
    table_offset: int
    block_size: int
    parent_uid: bytes
    parent_name: str
    locator0: tuple[int, int, int, int]  # code, space (sectors), length, offset
    locator_sector: bytes
    blocks: dict[int, bytes]  # index -> data (full block)
    bitmaps_full: bool
    trailing_footer_equal: bool


def parse_vhd(data: bytes) -> ParsedVhd:
    """A strict reading of one streamed VHD, asserting its checksums as it goes."""
    foot = data[:512]
    if foot[:8] != b"conectix" or data[-512:] != foot:
        raise ValueError("footer missing or the two copies differ")
    if struct.unpack(">I", foot[64:68])[0] != _ones_complement(foot, 64):
        raise ValueError("footer checksum")
    (data_offset,) = struct.unpack(">Q", foot[16:24])
    creator = foot[28:32]
    original, current = struct.unpack(">QQ", foot[40:56])
    (disk_type,) = struct.unpack(">I", foot[60:64])
    hdr = data[data_offset : data_offset + 1024]
    if hdr[:8] != b"cxsparse" or struct.unpack(">I", hdr[36:40])[0] != _ones_complement(hdr, 36):
        raise ValueError("dynamic header cookie or checksum")
    table_offset, _, entries, block_size = struct.unpack(">QIII", hdr[16:36])
    parent_uid = hdr[40:56]
    parent_name = hdr[64:576].decode("utf-16-be").split("\0", 1)[0]
    code, space, length, _, offset = struct.unpack(">IIIIQ", hdr[576:600])
    bat = struct.unpack(f">{entries}I", data[table_offset : table_offset + 4 * entries])
    bitmap_len = -(-(block_size // 512 // 8) // 512) * 512
    blocks, full = {}, True
    for i, sector in enumerate(bat):
        if sector == 0xFFFFFFFF:
            continue
        at = sector * 512
        full = full and data[at : at + bitmap_len] == b"\xff" * bitmap_len
        blocks[i] = data[at + bitmap_len : at + bitmap_len + block_size]
        if len(blocks[i]) != block_size:
            raise ValueError(f"block {i} is cut short")
    return ParsedVhd(
        disk_type=disk_type,
        creator=creator,
        current_size=current,
        original_size=original,
        uid=foot[68:84],
        table_offset=table_offset,
        block_size=block_size,
        parent_uid=parent_uid,
        parent_name=parent_name,
        locator0=(code, space, length, offset),
        locator_sector=data[1536:2048],
        blocks=blocks,
        bitmaps_full=full,
        trailing_footer_equal=data[-512:] == foot,
    )


def qemu_reads(vhd: Path, out: Path) -> bytes:
    """The raw bytes qemu-img makes of a VHD, format given (``-f vpc``), sized by the
    footer's current_size rather than by CHS (qemu's rule for unknown creators)."""
    spec = {"driver": "vpc", "force_size_calc": "current_size", "file": {"driver": "file"}}
    spec["file"]["filename"] = str(vhd)  # type: ignore[index]
    name = "json:" + json.dumps(spec)
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", name, str(out)], check=True)
    return out.read_bytes()


def qemu_chs_size(vhd: Path) -> int:
    info = subprocess.run(
        ["qemu-img", "info", "-f", "vpc", "--output=json", str(vhd)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(info.stdout)["virtual-size"])


def sim_vdi(port: int, ref: str) -> dict[str, Any]:
    from . import control

    return next(v for v in control.list_vdis(port) if ref in (v["ref"], v["uuid"]))


def run(check: Check, x: Any, port: int, session: str, vm: str, work: Path) -> None:
    """The export conformance checks on a fresh disk of VM ``vm`` (a running VM)."""
    from . import control as sim

    vdi = x.VBD.get_VDI(sorted(x.VM.get_VBDs(vm), key=x.VBD.get_userdevice)[0])
    size = int(x.VDI.get_virtual_size(vdi))
    q = f"/export_raw_vdi?session_id={session}"
    for off in (0, 7 * BLOCK + 4096, 12 * BLOCK):
        sim.guest_write(port, vm, off, b"\x5c" * 70_000)
    base = x.VDI.snapshot(vdi, {})
    base_bytes = sim.vdi_path(port, base).read_bytes()
    sim.guest_write(port, vm, 3 * BLOCK + 1, b"\x17" * 100)  # a new block
    sim.guest_write(port, vm, 12 * BLOCK, base_bytes[12 * BLOCK : 12 * BLOCK + 512])  # same bytes
    snap = x.VDI.snapshot(vdi, {})
    snap_bytes = sim.vdi_path(port, snap).read_bytes()

    # --- a full export ------------------------------------------------------------------
    full = get(port, f"{q}&vdi={base}&format=vhd")
    check(full.status == 200, "conformance: full export -> 200")
    check("content-length" not in full.headers, "conformance: no Content-Length")
    check(full.headers.get("connection", "").lower() == "close", "conformance: Connection: close")
    f = parse_vhd(full.body)
    check(f.disk_type == 3 and f.creator == b"caml", "conformance: full = dynamic, creator caml")
    check(f.current_size == f.original_size == size, "conformance: current_size = virtual size")
    check(f.table_offset == 2048 and f.block_size == BLOCK, "conformance: BAT at 2048, 2 MiB")
    check(f.locator_sector == bytes(512) and f.parent_uid == bytes(16), "conformance: no parent")
    check(
        set(f.blocks) == {0, 7, 12}, f"conformance: full has the written blocks {sorted(f.blocks)}"
    )
    check(f.bitmaps_full, "conformance: every bitmap bit set")
    check(
        all(f.blocks[i] == base_bytes[i * BLOCK : (i + 1) * BLOCK] for i in f.blocks),
        "conformance: full blocks are complete",
    )
    (work / "conf-full.vhd").write_bytes(full.body)
    raw = qemu_reads(work / "conf-full.vhd", work / "conf-full.raw")
    check(raw == base_bytes, "conformance: qemu-img -f vpc reads the full export byte for byte")
    chs = qemu_chs_size(work / "conf-full.vhd")
    check(chs <= size, f"conformance: qemu's CHS size {chs} <= current_size {size}")

    # --- a delta ------------------------------------------------------------------------
    base_uuid = x.VDI.get_uuid(base)
    delta = get(port, f"{q}&vdi={snap}&format=vhd&base={base_uuid}")
    check(delta.status == 200 and "content-length" not in delta.headers, "conformance: delta 200")
    d = parse_vhd(delta.body)
    check(d.disk_type == 4, "conformance: a delta is a differencing VHD (type 4)")
    check(d.current_size == size, "conformance: delta current_size = virtual size")
    leaf = bytes.fromhex(sim_vdi(port, base)["vhd_uid"])
    check(d.parent_uid == leaf, "conformance: parent uid = the base's leaf VHD footer uid")
    check(base_uuid in d.parent_name, f"conformance: parent name {d.parent_name!r}")
    uri = len("file://" + d.parent_name)
    check(d.locator0 == (0x4D616358, 1, uri, 1536), "conformance: MacX locator at 1536")
    check(d.locator_sector == bytes(512), "conformance: the locator sector is streamed empty")
    check(d.table_offset == 2048 and d.bitmaps_full, "conformance: delta BAT 2048, full bitmaps")
    # allocation, not bytes: block 12 was rewritten with its own bytes and is still sent
    check(set(d.blocks) == {3, 12}, f"conformance: delta blocks {sorted(d.blocks)} = written")
    check(
        all(d.blocks[i] == snap_bytes[i * BLOCK : (i + 1) * BLOCK] for i in d.blocks),
        "conformance: delta blocks are complete (whole 2 MiB of the VDI)",
    )
    back = get(port, f"{q}&vdi={base}&format=vhd&base={x.VDI.get_uuid(snap)}")
    check(set(parse_vhd(back.body).blocks) == {3, 12}, "conformance: symmetric difference")

    # --- status codes and errors after the 200 ------------------------------------------
    check(get(port, f"/export_raw_vdi?session_id=OpaqueRef:x&vdi={base}").status == 401, "401")
    check(get(port, f"{q}&vdi=00000000-0000-0000-0000-000000000000").status == 500, "500")
    task = x.task.create("export", "")
    gone = get(port, f"{q}&vdi={snap}&format=vhd&base=no-such-uuid&task_id={task}")
    check(gone.status == 200 and gone.body.startswith(PAGE), "conformance: unknown base -> 200")
    check(b"UUID_INVALID" in gone.body, "conformance: ... then Http_svr's 500 page in the body")
    check(x.task.get_status(task) == "failure", "conformance: ... and the task failed")
    check(x.task.get_error_info(task)[0] == "UUID_INVALID", "conformance: ... UUID_INVALID")
    x.task.destroy(task)
    task = x.task.create("export", "")
    sim.inject_fault(port, "export_raw_vdi", "VDI_IO_ERROR", ["Device I/O errors"], at_byte=3000)
    cut = get(port, f"{q}&vdi={base}&format=vhd&task_id={task}")
    check(cut.status == 200 and cut.body[:8] == b"conectix", "conformance: a failure mid-stream")
    check(cut.body[3000:].startswith(PAGE), "conformance: ... the 500 page follows the data")
    check(x.task.get_error_info(task)[0] == "VDI_IO_ERROR", "conformance: ... VDI_IO_ERROR")
    x.task.destroy(task)
    task = x.task.create("export", "")
    whole = get(port, f"{q}&vdi={base}&format=vhd&task_id={task}")
    check(whole.headers.get("task-id") == task, "conformance: the task-id header")
    check(len(whole.body) == len(full.body), "conformance: the export with a task is whole")
    check(x.task.get_status(task) == "success", "conformance: ... and its task succeeded")
    x.task.destroy(task)

    far = sim.create_vm(port, "far01", [8 << 20], host=2)
    sim.guest_write(port, "far01", 0, b"far")
    far_vdi = far["disks"][0]["vdi"]
    moved = get(port, f"{q}&vdi={far_vdi}&format=raw")
    where = urllib.parse.urlsplit(moved.headers.get("location", ""))
    check(moved.status == 302 and where.port not in (None, port), "conformance: 302 elsewhere")
    check(f"session_id={session}" in where.query, "conformance: the query (session) is kept")
    there = get(int(where.port or 0), f"{where.path}?{where.query}")
    check(there.status == 200 and there.body[:3] == b"far", "conformance: the member serves it")
    raw_full = get(port, f"{q}&vdi={snap}&format=raw")
    check(raw_full.body == snap_bytes, "conformance: raw export = the VDI's bytes")
    run_import(check, x, port, session, work)
    run_sizes(check, x, port, session)
    run_chains(check, x, port)
    run_blocked(check, x, port)
    run_tasks(check, x, port)
    run_thin(check, x, port, session)


def run_sizes(check: Check, x: Any, port: int, session: str) -> None:
    """SM's sizes (``vhdutil.validate_and_round_vhd_size``: at least 2 MiB, whole 2 MiB
    blocks, at ``VDI.create`` and ``VDI.resize``; no shrinking, ``FileVDI.resize``) and a
    delta across a resize (f.ml l.2820: the target's BAT, the base looked up per block)."""
    from . import control as sim

    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    record = {"name_label": "conf-size", "SR": sr, "virtual_size": str(5 * BLOCK // 2 + 1)}
    made = x.VDI.create({**record, "type": "user", "sharable": False, "read_only": False})
    check(x.VDI.get_virtual_size(made) == str(3 * BLOCK), "conformance: VDI.create rounds up")
    tiny = x.VDI.create({**record, "virtual_size": "4096"})
    check(x.VDI.get_virtual_size(tiny) == str(BLOCK), "conformance: ... to at least 2 MiB")
    x.VDI.destroy(tiny)
    vm = sim.create_vm(port, "conf-size", [4 * BLOCK], power="Halted")
    vdi = vm["disks"][0]["vdi"]
    base = x.VDI.snapshot(vdi, {})
    x.VDI.resize(vdi, str(6 * BLOCK + 7))
    check(x.VDI.get_virtual_size(vdi) == str(7 * BLOCK), "conformance: VDI.resize rounds up")
    try:
        x.VDI.resize(vdi, str(BLOCK))
        shrunk = "allowed"
    except Exception as exc:  # noqa: BLE001 - XenAPI.Failure, not imported here
        shrunk = str(exc)
    check("SR_BACKEND_FAILURE_79" in shrunk, f"conformance: no shrinking ({shrunk})")
    snap = x.VDI.snapshot(vdi, {})
    q = f"/export_raw_vdi?session_id={session}&format=vhd"
    delta = get(port, f"{q}&vdi={snap}&base={x.VDI.get_uuid(base)}")
    check(delta.body[:8] == b"conectix", "conformance: a delta across a resize is exported")
    check(parse_vhd(delta.body).current_size == 7 * BLOCK, "conformance: ... at the new size")
    for one in (snap, base, made):
        x.VDI.destroy(one)


@dataclass
class Put:
    status: int
    status_before_body: bool  # the status line arrived before any byte of the body went
    body: bytes


def put(port: int, path: str, body: bytes) -> Put:
    """A PUT that reads the status line before it sends the body, as far as it can: XAPI
    answers 200 first (import_raw_vdi.ml l.172-179), so the line must be there already."""
    import select
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        sock.sendall(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        early = bool(select.select([sock], [], [], 5)[0])
        with contextlib.suppress(OSError):  # a failed import closes, the body unread
            sock.sendall(body)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(1 << 16):
                data += chunk
    finally:
        sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
    return Put(status, early, rest)


def run_import(check: Check, x: Any, port: int, session: str, work: Path) -> None:
    """``import_raw_vdi.ml``, dom0's attach automaton and find_host_for_sr."""
    import time

    from . import control as sim

    size = 16 * BLOCK
    vm = sim.create_vm(port, "conf-import", [size], power="Halted")
    vdi = vm["disks"][0]["vdi"]
    data = bytes(range(256)) * (size // 256)
    q = f"session_id={session}&vdi={vdi}&format=raw"
    task = x.task.create("import", "")
    done = put(port, f"/import_raw_vdi?{q}&task_id={task}", data)
    check(done.status == 200 and done.status_before_body, "conformance: import 200 before body")
    check(x.task.get_status(task) == "success", "conformance: the import's task completes")
    check(x.task.get_result(task) == f"<value>{vdi}</value>", "conformance: ... with the VDI")
    check(sim.vdi_path(port, vdi).read_bytes() == data, "conformance: raw import written")
    x.task.destroy(task)

    task = x.task.create("import", "")
    sim.inject_fault(port, "import_raw_vdi", "VDI_IO_ERROR", ["Device I/O errors"], at_byte=BLOCK)
    bad = put(port, f"/import_raw_vdi?{q}&task_id={task}", bytes(size))
    check(bad.status == 200 and bad.body.startswith(PAGE), "conformance: import error page")
    check(x.task.get_error_info(task)[0] == "VDI_IO_ERROR", "conformance: ... the task says why")
    on_disk = sim.vdi_path(port, vdi).read_bytes()
    check(on_disk[:BLOCK] == bytes(BLOCK) and on_disk[BLOCK:] == data[BLOCK:], "... half-written")
    x.task.destroy(task)

    # an export dropped after its headers keeps its RO datapath a moment: RW is refused
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", f"/export_raw_vdi?{q}")
    check(conn.getresponse().status == 200, "conformance: a probe export's 200")
    conn.close()
    time.sleep(0.2)
    task = x.task.create("import", "")
    busy = put(port, f"/import_raw_vdi?{q}&task_id={task}", data)
    info = x.task.get_error_info(task)
    check(busy.status == 200 and busy.body.startswith(PAGE), "conformance: RW after RO -> page")
    check(info[0] == "INTERNAL_ERROR" and "Illegal_transition" in info[1], f"... {info}")
    x.task.destroy(task)
    deadline = time.monotonic() + 10
    while sim.datapaths(port)["held"] and time.monotonic() < deadline:
        time.sleep(0.1)
    task = x.task.create("import", "")
    put(port, f"/import_raw_vdi?{q}&task_id={task}", data)
    check(x.task.get_status(task) == "success", "conformance: ... and allowed once detached")
    x.task.destroy(task)

    # find_host_for_sr: a shared SR is served where asked; a local one by its PBD's host
    srs = {x.SR.get_name_label(r): r for r in x.SR.get_all()}
    shared = srs["NFS virtual disk storage"]
    check(x.SR.get_shared(shared) and len(x.SR.get_PBDs(shared)) == 2, "conformance: shared SR")
    hosts = {x.PBD.get_host(p) for p in x.SR.get_PBDs(shared)}
    check(hosts == set(x.host.get_all()), "conformance: ... plugged on every host")
    member = next(h for h in x.host.get_all() if h != x.pool.get_master(x.pool.get_all()[0]))
    member_port = int(x.host.get_address(member).rsplit(":", 1)[1])
    nfs = sim.create_vm(port, "conf-nfs", [BLOCK], power="Halted", shared=True)
    nq = f"session_id={session}&vdi={nfs['disks'][0]['vdi']}&format=raw"
    check(get(member_port, f"/export_raw_vdi?{nq}").status == 200, "conformance: no 302 for NFS")
    local = srs[f"Local storage on {x.host.get_name_label(member)}"]
    (pbd,) = x.SR.get_PBDs(local)
    check(x.PBD.get_host(pbd) == member and x.PBD.get_currently_attached(pbd), "local PBD")


def run_chains(check: Check, x: Any, port: int) -> None:
    """SM's VHD chains (``chains.py``): base copies (``managed`` false) named by
    ``sm_config['vhd-parent']``, ``SR_BACKEND_FAILURE_109`` at 30 VHDs (``vhdutil.py``
    l.30, ``FileSR._snapshot`` l.772-777), and the GC coalescing what has one child."""
    from . import control as sim

    def depth(vdi: str) -> tuple[int, list[dict[str, Any]]]:
        chain = [x.VDI.get_record(vdi)]
        while parent := chain[-1]["sm_config"].get("vhd-parent"):
            chain.append(x.VDI.get_record(x.VDI.get_by_uuid(parent)))
        return len(chain), chain

    vdi = sim.create_vm(port, "conf-chain", [BLOCK], power="Halted")["disks"][0]["vdi"]
    check(depth(vdi)[0] == 1, "conformance: a new VDI is one VHD (no vhd-parent)")
    sim.set_gc(port, stalled=True)
    for _ in range(29):
        x.VDI.destroy(x.VDI.snapshot(vdi, {}))
    deep, chain = depth(vdi)
    check(deep == 30, f"conformance: 29 snapshots later the chain is 30 deep ({deep})")
    bases = chain[1:]
    check(all(not b["managed"] and b["name_label"] == "base copy" for b in bases), "base copies")
    sr = x.VDI.get_SR(vdi)
    check(set(x.SR.get_VDIs(sr)) >= {x.VDI.get_by_uuid(b["uuid"]) for b in bases}, "in SR.VDIs")
    try:
        x.VDI.snapshot(vdi, {})
        refused = "allowed"
    except Exception as exc:  # noqa: BLE001 - XenAPI.Failure, not imported here
        refused = str(exc)
    check("SR_BACKEND_FAILURE_109" in refused, f"conformance: 109 at depth 30 ({refused})")
    check(sim.set_gc(port, stalled=False) == 28, "conformance: the GC coalesces 28 base copies")
    check(depth(vdi)[0] == 2, "conformance: ... the leaf on the original (no leaf-coalesce)")
    kept = [x.VDI.snapshot(vdi, {}) for _ in range(28)]
    check(depth(vdi)[0] == 30, "conformance: 28 kept snapshots: 30 deep again")
    for one in kept:
        x.VDI.destroy(one)
    check(depth(vdi)[0] == 2, "conformance: their delete lets the GC shorten it")


def run_blocked(check: Check, x: Any, port: int) -> None:
    """``VM.blocked_operations``: checked first, before the power state
    (xapi_vm_lifecycle.ml ``check_operation_error`` l.495-510); a map key added twice is
    MAP_DUPLICATE_KEY (db_cache_impl.ml l.375, exnHelper.ml l.47)."""
    from . import control as sim

    def error(fn: Callable[..., Any], *args: Any) -> list[str]:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - XenAPI.Failure, not imported here
            return [str(d) for d in getattr(exc, "details", [exc])]
        return []

    vm = sim.create_vm(port, "conf-blocked", [BLOCK])["ref"]  # Running
    x.VM.add_to_blocked_operations(vm, "start", "held by a test")
    got = error(x.VM.start, vm, False, False)
    check(got == ["OPERATION_BLOCKED", vm, "held by a test"], f"conformance: blocked first {got}")
    got = error(x.VM.add_to_blocked_operations, vm, "start", "again")
    check(got[:1] == ["MAP_DUPLICATE_KEY"], f"conformance: a key twice {got}")
    x.VM.hard_shutdown(vm)
    for op in ("start_on", "resume"):
        x.VM.add_to_blocked_operations(vm, op, "held")
    check(
        error(x.VM.start_on, vm, x.host.get_all()[0], False, False)[:1] == ["OPERATION_BLOCKED"],
        "start_on",
    )
    check(x.VM.get_blocked_operations(vm)["resume"] == "held", "conformance: the map is read")
    x.VM.remove_from_blocked_operations(vm, "start")
    x.VM.start(vm, False, False)
    check(x.VM.get_power_state(vm) == "Running", "conformance: unblocked, it starts")


def run_tasks(check: Check, x: Any, port: int) -> None:
    """``Async.*`` tasks (ocaml/xapi: server_helpers.ml do_dispatch, taskHelper.ml,
    xapi_task.ml, db_gc_util.ml): the task ref comes back at once, ``pending`` with
    ``cancel`` allowed; it ends with progress 1 and its result as XML-RPC text
    (``Xmlrpc.to_string``, taskHelper.ml l.168-175), or with the sync call's error in
    ``error_info``. ``task.cancel`` is recorded and seen by a cancellable operation
    (``cancelled``, ``TASK_CANCELLED [task]``); VM.revert is not cancellable and ends as
    it would have. ``task.destroy`` of a pending task removes it only once it ends."""
    import time

    from . import control as sim

    def wait(task: str) -> str:
        deadline = time.monotonic() + 20
        while (status := x.task.get_status(task)) == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
        return str(status)

    def error(fn: Callable[..., Any], *args: Any) -> list[str]:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - XenAPI.Failure, not imported here
            return [str(d) for d in getattr(exc, "details", [exc])]
        return []

    vm = sim.create_vm(port, "conf-tasks", [BLOCK])["ref"]  # Running
    sim.set_task_delay(port, 0.6, "VM.snapshot")
    t0 = time.monotonic()
    task = x.Async.VM.snapshot(vm, "conf-async")
    check(time.monotonic() - t0 < 0.5, "conformance: Async answers its task at once")
    rec = x.task.get_record(task)
    check(rec["status"] == "pending", "conformance: ... pending")
    check(rec["allowed_operations"] == ["cancel"], "conformance: ... cancel allowed")
    check(wait(task) == "success", "conformance: ... then success")
    rec = x.task.get_record(task)
    snap = rec["result"].removeprefix("<value>").removesuffix("</value>")
    check(rec["result"] == f"<value>{snap}</value>", f"conformance: result {rec['result']!r}")
    check(x.VM.get_is_a_snapshot(snap), "conformance: ... names the snapshot VM")
    check(rec["progress"] == 1.0 and rec["allowed_operations"] == [], "conformance: ended")
    x.task.destroy(task)
    check(error(x.task.get_status, task)[:2] == ["HANDLE_INVALID", "task"], "ended: destroyed")
    t0 = time.monotonic()
    x.VM.snapshot(vm, "conf-sync")
    check(time.monotonic() - t0 >= 0.6, "conformance: the sync call takes as long")
    sim.set_task_delay(port, 0, "VM.snapshot")

    # the same error as the sync call, in error_info
    sync_error = error(x.VM.start, vm, False, False)
    task = x.Async.VM.start(vm, False, False)
    check(wait(task) == "failure", "conformance: a failing Async call fails its task")
    info = x.task.get_error_info(task)
    check(info == sync_error and info[0] == "VM_BAD_POWER_STATE", f"conformance: {info}")
    x.task.destroy(task)

    # cancel: seen by a cancellable operation, which then does nothing
    snapshots = len(x.VM.get_snapshots(vm))
    sim.stall_tasks(port, "VM.snapshot")
    task = x.Async.VM.snapshot(vm, "conf-cancelled")
    x.task.cancel(task)
    check(wait(task) == "cancelled", "conformance: a cancelled VM.snapshot ends cancelled")
    check(x.task.get_error_info(task) == ["TASK_CANCELLED", task], "conformance: TASK_CANCELLED")
    check(len(x.VM.get_snapshots(vm)) == snapshots, "conformance: ... and made nothing")
    x.task.cancel(task)  # an ended task: recorded, no error
    check(x.task.get_status(task) == "cancelled", "conformance: a cancel after the end")
    x.task.destroy(task)
    sim.stall_tasks(port, "VM.snapshot", False)

    # VM.revert is not cancellable; a pending task's destroy waits for its end
    snap = x.VM.get_snapshots(vm)[0]
    sim.stall_tasks(port, "VM.revert")
    task = x.Async.VM.revert(snap)
    check(x.task.get_allowed_operations(task) == [], "conformance: VM.revert: no cancel")
    x.task.cancel(task)
    x.task.destroy(task)
    check(x.task.get_status(task) == "pending", "conformance: a pending task outlives destroy")
    check(x.task.get_current_operations(task).get("task") == "destroy", "... marked destroy")
    sim.stall_tasks(port, "VM.revert", False)
    deadline = time.monotonic() + 10
    while not error(x.task.get_status, task) and time.monotonic() < deadline:
        time.sleep(0.05)
    check(error(x.task.get_status, task)[:1] == ["HANDLE_INVALID"], "... gone once it ended")
    check(x.VM.get_power_state(vm) == "Halted", "conformance: ... and the revert was done")

    # a task of our own (task.create) that no request ended: destroy, then set_status
    task = x.task.create("unused", "")
    x.task.destroy(task)
    check(x.task.get_status(task) == "pending", "conformance: a created task outlives destroy")
    x.task.set_status(task, "cancelled")
    check(error(x.task.get_status, task)[:1] == ["HANDLE_INVALID"], "... until it is ended")


def run_thin(check: Check, x: Any, port: int, session: str) -> None:
    """What an import allocates: raw writes every byte (vhd-tool serve_raw_to_raw, impl.ml
    l.1298-1326) and tapdisk allocates each block written, zeros too (blktap block-vhd.c
    vhd_queue_write l.2146-2180); a VHD import writes only the blocks it carries
    (serve_vhd_to_raw l.582-613), and only into a pre-zeroed VDI: on a legacy LVM SR
    (sm_fs_ops.ml must_write_zeroes_into_new_vdi l.66-95) it fails with VDI_IO_ERROR
    (vhd_tool_wrapper.ml l.64-71)."""
    from . import control as sim

    size = 8 * BLOCK
    source = sim.create_vm(port, "conf-thin", [size])  # Running: the guest writes
    sim.guest_write(port, "conf-thin", 5 * BLOCK + 3, b"thin")
    vhd = get(
        port, f"/export_raw_vdi?session_id={session}&vdi={source['disks'][0]['vdi']}&format=vhd"
    )
    check(set(parse_vhd(vhd.body).blocks) == {5}, "conformance: a VHD of one block")
    for fmt, body, allocated in (("raw", bytes(size), list(range(8))), ("vhd", vhd.body, [5])):
        vm = sim.create_vm(port, f"conf-thin-{fmt}", [size], power="Halted")
        vdi = vm["disks"][0]["vdi"]
        check(sim_vdi(port, vdi)["allocated"] == [], "conformance: a new VDI allocates nothing")
        done = put(port, f"/import_raw_vdi?session_id={session}&vdi={vdi}&format={fmt}", body)
        check(done.status == 200 and not done.body, f"conformance: {fmt} import")
        got = sim_vdi(port, vdi)["allocated"]
        check(got == allocated, f"conformance: a {fmt} import allocates {got}")
    sim.set_sr_type(port, "local", "lvm", sm_config={})
    check(x.SR.get_sm_config(x.VDI.get_SR(vdi)) == {}, "conformance: a legacy LVM SR")
    task = x.task.create("import", "")
    q = f"session_id={session}&vdi={vdi}&format=vhd&task_id={task}"
    refused = put(port, f"/import_raw_vdi?{q}", vhd.body)
    check(refused.status == 200 and refused.body.startswith(PAGE), "conformance: not prezeroed")
    check(x.task.get_error_info(task)[0] == "VDI_IO_ERROR", "conformance: ... VDI_IO_ERROR")
    x.task.destroy(task)
    sim.set_sr_type(port, "local", "lvm")
    check(x.SR.get_sm_config(x.VDI.get_SR(vdi)) == {"use_vhd": "true"}, "conformance: LVHD")
    sim.set_sr_type(port, "local", "ext")


def run_pool(check: Check, port: int, user: str, password: str) -> None:
    """The master moves (``/sim/pool``), checked over plain XML-RPC and TCP. HA makes a
    member the master when its master dies (``xapi_ha.ml`` ``on_master_failure``
    l.137-171); a dead host answers nothing; the new master starts without the sessions
    (``datamodel.ml`` l.237-242, ``PersistNothing``); every other host, the old master once
    back included, answers a login with ``HOST_IS_SLAVE [master address]``
    (``xapi_session.ml`` l.996-1001, ``become_another_masters_slave``), the address being
    ``Host.address``, whatever it is. Run last: it leaves host 1 the master again."""
    import socket
    import xmlrpc.client

    from . import control as sim

    def login(at: int) -> dict[str, Any]:
        rpc = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{at}")
        return rpc.session.login_with_password(user, password, "2.21", "conformance")  # type: ignore[no-any-return]

    def call(at: int, method: str, *args: Any) -> dict[str, Any]:
        rpc = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{at}")
        return getattr(rpc, method)(*args)  # type: ignore[no-any-return]

    hosts = {h["host"]: h for h in sim.list_hosts(port)}
    p1, p2 = hosts[1]["port"], hosts[2]["port"]
    old = login(p1)["Value"]
    refused = login(p2)["ErrorDescription"]
    check(refused == ["HOST_IS_SLAVE", hosts[1]["address"]], f"conformance: member {refused}")

    sim.set_pool(port, master=2, down=[1])
    try:
        socket.create_connection(("127.0.0.1", p1), timeout=5).close()
        check(False, "conformance: a dead host refuses connections")
    except ConnectionRefusedError:
        check(True, "conformance: a dead host refuses connections")
    new = login(p2)
    check(new["Status"] == "Success", "conformance: the promoted member logs in")
    me = call(p2, "session.get_this_host", new["Value"], new["Value"])["Value"]
    pool = call(p2, "pool.get_all", new["Value"])["Value"][0]
    check(call(p2, "pool.get_master", new["Value"], pool)["Value"] == me, "conformance: master")
    stale = call(p2, "pool.get_all", old)["ErrorDescription"]
    check(stale[:1] == ["SESSION_INVALID"], f"conformance: sessions do not survive ({stale})")

    sim.set_pool(p2, master=2, down=[])  # the old master is back, as a slave
    back = login(p1)["ErrorDescription"]
    check(back == ["HOST_IS_SLAVE", hosts[2]["address"]], f"conformance: old master {back}")

    unreachable = f"127.0.0.2:{p1}"
    sim.set_host_address(p2, 1, unreachable)
    sim.set_pool(p2, master=1, down=[])
    named = login(p2)["ErrorDescription"]
    check(named == ["HOST_IS_SLAVE", unreachable], f"conformance: Host.address named ({named})")
    sim.set_host_address(port, 1, hosts[1]["address"])
