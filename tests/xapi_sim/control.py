"""Start/stop the simulator as a child process and drive its ``/sim`` control endpoints.

The simulator runs in its own process (and session) so the code under test talks
to it exactly as it would to a XenServer pool master: over TCP, with real XenAPI.py.
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

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        user: str = "root",
        password: str = "sim-password",
        timeout: float = 20.0,
    ) -> int:
        """Spawn the simulator, wait for ``ready <port>`` and return the port."""
        self.root = Path(root)
        fd, self._password_file = tempfile.mkstemp(prefix="xapi-sim-pw-")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(password)
        cmd = [sys.executable, "-m", "tests.xapi_sim", "--port", str(port)]
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
        raise RuntimeError("XAPI simulator did not become ready")

    @property
    def url(self) -> str:
        """What to pass to ``XenAPI.Session(url)``."""
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


def create_vm(port: int, name: str, disks: list[int], power: str = "Running") -> dict[str, Any]:
    """Create a VM with zero-filled disks (xvda, xvdb, ...); returns ref, uuid and disks."""
    return _call(port, "POST", "/sim/vms", {"name": name, "disks": disks, "power": power})


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
    """Write into a Running VM's current disk (by name, ref or uuid), as its guest would."""
    body: dict[str, Any] = {"vm": vm, "disk": disk, "offset": offset}
    body |= {"data_hex": data.hex()} if data is not None else {"pattern": pattern, "length": length}
    _call(port, "POST", "/sim/guest-write", body)


def list_vms(port: int) -> list[dict[str, Any]]:
    return _call(port, "GET", "/sim/vms")["vms"]


def list_vdis(port: int) -> list[dict[str, Any]]:
    """Every VDI with ref, uuid, name, is_a_snapshot, snapshot_of, size and local path."""
    return _call(port, "GET", "/sim/vdis")["vdis"]


def vdi_path(port: int, vdi: str) -> Path:
    """Local raw file of a VDI (by ref or uuid), for byte comparisons in tests."""
    for v in list_vdis(port):
        if vdi in (v["ref"], v["uuid"]):
            return Path(v["path"])
    raise KeyError(vdi)


def inject_fault(
    port: int, method: str, code: str, params: list[str] | None = None, count: int = 1
) -> None:
    """The next ``count`` calls of ``method`` (e.g. ``VDI.destroy``) fail with ``code``.

    ``export_raw_vdi``/``import_raw_vdi`` as method make those HTTP requests answer 500.
    """
    body = {"method": method, "code": code, "params": params or [], "count": count}
    _call(port, "POST", "/sim/faults", body)


def clear_faults(port: int) -> None:
    _call(port, "POST", "/sim/faults", {"clear": True})


def expire_sessions(port: int) -> int:
    """Invalidate every session: the next call answers SESSION_INVALID."""
    return _call(port, "POST", "/sim/faults", {"method": "session", "expire": True})["expired"]


def set_export_delay(port: int, bytes_per_second: int) -> None:
    """Throttle export streams (0 = full speed); takes effect on running exports too."""
    _call(port, "POST", "/sim/export-delay", {"bytes_per_second": bytes_per_second})


def set_task_delay(port: int, seconds: float) -> None:
    """Async tasks stay ``pending`` for ``seconds`` before their operation runs."""
    _call(port, "POST", "/sim/task-delay", {"seconds": seconds})


def set_revert_mode(port: int, mode: str) -> None:
    """``in-place`` (default: VM keeps its VDI refs) or ``xapi`` (new VDIs, as XAPI does)."""
    _call(port, "POST", "/sim/revert-mode", {"mode": mode})
