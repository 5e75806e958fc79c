"""The stack every benchmark runs on: a private Temporal dev server, libvirt, a work directory.

Each benchmark measures against peers in the same run on the same files; this is the part
they share: a dev server on a free port (its SQLite file in the work directory), settings
pointing home and secondary storage there, a client, and clean-up of all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from snapferry.activities.settings import Settings
from snapferry.workers.client import connect
from snapferry.workers.stack import dev_server_command, free_port, terminate, wait_for_port


@dataclasses.dataclass
class BenchStack:
    work: Path
    settings: Settings
    client: Any
    conn: Any
    server_pid: int


@contextlib.asynccontextmanager
async def bench_stack(prefix: str = "snapferry-bench-") -> AsyncIterator[BenchStack]:
    import libvirt

    work = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TMPDIR", "/var/tmp")))
    port = free_port()
    server = subprocess.Popen(
        dev_server_command(db=work / "temporal.db", host="127.0.0.1", port=port, ui_port=None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    conn = libvirt.open("qemu:///system")
    try:
        wait_for_port("127.0.0.1", port)
        settings = dataclasses.replace(
            Settings.from_env(),
            home=work,
            secondary=work / "secondary",
            temporal_address=f"127.0.0.1:{port}",
        )
        yield BenchStack(work, settings, await connect(settings), conn, server.pid)
    finally:
        terminate(server.pid)
        conn.close()
        shutil.rmtree(work, ignore_errors=True)
