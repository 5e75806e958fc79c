"""The main job (``make run``): a real split snapshot on the embedded stack, end to end.

Starts the stack, creates a demo VM whose disk holds random data, takes a volume snapshot
(printing how fast the answer came), shows the background backup's progress, verifies the
backup against the disk's content at snapshot time, then serves until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import libvirt

from snapferry.activities.contracts import SnapshotRequest, VmRef, VolumeRef, new_snapshot_id
from snapferry.activities.settings import Settings
from snapferry.activities.storage.secondary import SecondaryStore

from . import starter
from .client import connect
from .demo_vm import MIB, create_vm
from .stack import Stack

DEMO_VM = "snapferry-demo"


async def run_demo(settings: Settings, *, host: str, size_mib: int) -> int:
    stack = Stack(settings)
    print(f"starting the stack under {settings.home} ...")
    stack.up(worker_args=["--host", host, "--backup", "--concurrency", "2"])
    client = await connect(settings)

    conn = libvirt.open(settings.libvirt_uri)
    print(f"creating demo VM {DEMO_VM!r}: {size_mib} MiB qcow2 disk of random data (TCG) ...")
    vm = create_vm(
        conn,
        name=DEMO_VM,
        directory=settings.home / "primary",
        size=size_mib * MIB,
        data_bytes=size_mib * MIB,
    )
    try:
        req = SnapshotRequest(
            snapshot_id=new_snapshot_id(),
            volume=VolumeRef(vm=VmRef(name=DEMO_VM, host=host), disk="vda"),
            # Frequent progress for a lively bar; production keeps the default interval.
            backup=settings.backup_defaults.model_copy(update={"progress_interval_s": 0.5}),
        )
        t0 = time.perf_counter()
        record = await starter.create_snapshot(client, req)
        answer = time.perf_counter() - t0
        print(f"snapshot {record.id}: {record.state.value} after {answer * 1000:.0f} ms")
        vm.guest_write(pattern=0x5A, offset=0, length=MIB)
        print("the VM keeps running and writing; backup in the background:")
        from .watch import watch

        record = await watch(client, record.id)
        total = time.perf_counter() - t0
        if record.backup is None:
            print(f"backup did not complete: {record.backup_error or record.error}")
            return 1
        print(f"BackedUp after {total:.1f} s (answer came after {answer * 1000:.0f} ms)")
        SecondaryStore.verify(SecondaryStore.read_manifest(Path(record.backup.manifest_path)))
        same = (
            subprocess.run(
                [
                    "qemu-img",
                    "compare",
                    "-q",
                    "-f",
                    "raw",
                    "-F",
                    "raw",
                    str(vm.reference),
                    record.backup.path,
                ],
            ).returncode
            == 0
        )
        print(f"verified: checksum {record.backup.checksum}")
        print(f"backup equals the disk at snapshot time (qemu-img compare): {same}")
        print(
            f"\nTemporal Web UI: http://127.0.0.1:{settings.ui_port}"
            f"/namespaces/{settings.namespace}/workflows"
        )
        print("serving; press Ctrl-C to stop the stack")
        try:
            while True:
                await asyncio.sleep(3600)
        except (asyncio.CancelledError, KeyboardInterrupt):
            pass
        return 0 if same else 1
    finally:
        vm.destroy()
        stack.down()
