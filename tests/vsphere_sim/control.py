"""Start/stop the simulator as a child process and drive its ``/sim`` control endpoints.

The simulator runs in its own process (and session) so the code under test talks
to it exactly as it would to vCenter: over TCP, with its own pyvmomi stubs.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .inventory import DS, disk_base

REPO_ROOT = Path(__file__).resolve().parents[2]


def disk_path(root: str | Path, vm: str, disk_index: int) -> Path:
    """Local path of a VM's current flat disk, for byte comparisons in tests."""
    return Path(root) / DS / vm / f"{disk_base(vm, disk_index)}-flat.vmdk"


class SimulatorProcess:
    """One simulator child process; ``stop()`` only ever signals its own PID."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.root: Path | None = None
        self._password_file: str | None = None

    def start(
        self,
        root: str | Path,
        port: int = 0,
        user: str = "administrator@vsphere.local",
        password: str = "sim-password",
        timeout: float = 20.0,
    ) -> int:
        """Spawn the simulator, wait for ``ready <port>`` and return the port."""
        self.root = Path(root)
        fd, self._password_file = tempfile.mkstemp(prefix="vsphere-sim-pw-")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(password)
        cmd = [sys.executable, "-m", "tests.vsphere_sim", "--port", str(port)]
        cmd += ["--root", str(self.root), "--user", user, "--password-file", self._password_file]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("ready "):
                    self.port = int(line.split()[1])
                    return self.port
                if not line:
                    break
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("vSphere simulator did not become ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Terminate our own child by PID and wait; remove the password file."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
        if self._password_file:
            Path(self._password_file).unlink(missing_ok=True)
            self._password_file = None

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _call(port: int, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def create_vm(port: int, name: str, disks: list[int], power: str = "poweredOn") -> str:
    """Create a VM with zero-filled disks of the given byte sizes; returns its moid."""
    return _call(port, "POST", "/sim/vms", {"name": name, "disks": disks, "power": power})["moid"]


def guest_write(
    port: int,
    vm: str,
    offset: int,
    data: bytes | None = None,
    *,
    disk: int = 0,
    pattern: int | None = None,
    length: int = 0,
) -> None:
    """Write into a powered-on VM's current disk, as its guest OS would."""
    body: dict[str, Any] = {"vm": vm, "disk": disk, "offset": offset}
    body |= {"data_hex": data.hex()} if data is not None else {"pattern": pattern, "length": length}
    _call(port, "POST", "/sim/guest-write", body)


def list_vms(port: int) -> list[dict[str, Any]]:
    return _call(port, "GET", "/sim/vms")["vms"]


def set_datastore_gone(port: int, gone: bool) -> None:
    _call(port, "POST", "/sim/datastore", {"gone": gone})


def set_task_delay(port: int, seconds: float) -> None:
    """Make CloneVM_Task stay 'running' for ``seconds`` before it does its work."""
    _call(port, "POST", "/sim/task-delay", {"seconds": seconds})
