"""What the project's hypervisor simulators share: their process, their command line and
their ``/sim`` control calls. ``tests/vsphere_sim`` and ``tests/xapi_sim`` each run as a
separate process, so the code under test talks to them exactly as to the real thing: over
TCP, through the real client library."""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def secret_file(path: Path, secret: str) -> Path:
    """A simulator's password where a worker reads it: a file, owner-only (by reference,
    never in a payload)."""
    path.write_text(secret)
    path.chmod(0o600)
    return path


def vcenter_config(port: int, directory: Path, *, user: str, password: str, datacenter: str):  # type: ignore[no-untyped-def]
    """The driver's settings for a vSphere simulator on ``port`` (ours or govmomi's)."""
    from snapferry.activities.settings import VcenterConfig

    return VcenterConfig(
        url=f"http://127.0.0.1:{port}",
        user=user,
        password_file=str(secret_file(directory / "vcenter.password", password)),
        verify_tls=False,
        datacenter=datacenter,
    )


def wait_ready(proc: subprocess.Popen, timeout: float) -> int | None:
    """The port a simulator announces with its ``ready PORT`` line, or None if it exits or
    stays silent for ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("ready "):
                return int(line.split()[1])
            if not line:
                return None
        if proc.poll() is not None:
            return None
    return None


class SimulatorProcess:
    """One simulator child process; ``stop()`` only ever signals its own PID."""

    module = ""  # e.g. "tests.vsphere_sim"
    default_user = ""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.root: Path | None = None
        self._password_file: str | None = None

    def start(
        self,
        root: str | Path,
        port: int = 0,
        user: str | None = None,
        password: str = "sim-password",
        timeout: float = 20.0,
    ) -> int:
        """Spawn the simulator, wait for ``ready <port>`` and return the port. The password
        goes through a 0600 file, so it never shows in ``ps``."""
        self.root = Path(root)
        fd, self._password_file = tempfile.mkstemp(prefix="sim-pw-")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(password)
        cmd = [sys.executable, "-m", self.module, "--port", str(port), "--root", str(self.root)]
        cmd += ["--user", user or self.default_user, "--password-file", self._password_file]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        port = wait_ready(self.proc, timeout)
        if port is not None:
            self.port = port
            return port
        self.stop()
        raise RuntimeError(f"{self.module} did not become ready")

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


def control_call(port: int, method: str, path: str, body: Any = None) -> Any:
    """One JSON call to a simulator's ``/sim`` control endpoints (no auth: test-only)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def serve_main(
    prog: str,
    *,
    default_user: str,
    root_help: str,
    make_server: Callable[[int, Path, str, str], Any],
    argv: list[str] | None = None,
) -> None:
    """A simulator's command line: ``--port P --root DIR [--user U --password-file F]``;
    binds 127.0.0.1 only, prints ``ready <port>`` once listening (``--port 0`` picks one)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--root", type=Path, required=True, help=root_help)
    ap.add_argument("--user", default=default_user)
    ap.add_argument("--password-file", type=Path)
    args = ap.parse_args(argv)
    password = args.password_file.read_text().rstrip("\r\n") if args.password_file else ""
    args.root.mkdir(parents=True, exist_ok=True)
    server = make_server(args.port, args.root, args.user, password)
    # SIGTERM -> SystemExit so serve_forever unwinds and the socket is closed cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"ready {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


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
    """Write into a running VM's current disk, as its guest OS would (both simulators)."""
    body: dict[str, Any] = {"vm": vm, "disk": disk, "offset": offset}
    body |= {"data_hex": data.hex()} if data is not None else {"pattern": pattern, "length": length}
    control_call(port, "POST", "/sim/guest-write", body)


def list_vms(port: int) -> list[dict[str, Any]]:
    return control_call(port, "GET", "/sim/vms")["vms"]  # type: ignore[no-any-return]
