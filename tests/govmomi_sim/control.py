"""Build (once per source version) and run tests/govmomi_sim/main.go, govmomi's vCenter
simulator from Debian's golang-github-vmware-govmomi-dev, built offline with golang-go."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.simulator import REPO_ROOT, wait_ready

SOURCE = Path(__file__).with_name("main.go")
GOCODE = Path("/usr/share/gocode")
GOVMOMI = GOCODE / "src/github.com/vmware/govmomi/simulator"
CACHE = REPO_ROOT / ".venv" / "cache" / "govmomi_sim"
DEBIAN_PACKAGES = ("golang-go", "golang-github-vmware-govmomi-dev")


def missing() -> str | None:
    """Why it cannot be built here (the Debian packages are not installed), or None."""
    if shutil.which("go") is None or not GOVMOMI.is_dir():
        return f"needs the Debian packages {' '.join(DEBIAN_PACKAGES)} (apt-get install)"
    return None


def build() -> Path:
    """The simulator binary, built offline with GOPATH=<cache>:/usr/share/gocode."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    binary = CACHE / f"govmomi_sim-{digest}"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        GOPATH=f"{CACHE / 'gopath'}:{GOCODE}",
        GO111MODULE="off",
        GOPROXY="off",
        GOFLAGS="",
        GOCACHE=str(CACHE / "go-build"),
    )
    tmp = binary.with_suffix(".tmp")
    proc = subprocess.run(
        ["go", "build", "-o", str(tmp), "."],
        cwd=SOURCE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building {SOURCE} failed:\n{proc.stderr[-3000:]}")
    tmp.replace(binary)
    return binary


class GovmomiSimulator:
    """One simulator child process on 127.0.0.1; ``stop()`` signals only its own PID."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self._password_file: str | None = None

    def start(
        self, user: str, password: str, timeout: float = 30.0, *, idle_timeout: float = 0.0
    ) -> int:
        """``idle_timeout``: seconds after its last SOAP call that a session ends (0:
        never), govmomi's own SessionIdleTimeout."""
        binary = build()
        fd, self._password_file = tempfile.mkstemp(prefix="govmomi-pw-")  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(password)
        self.proc = subprocess.Popen(
            [
                str(binary),
                *("--port", "0", "--user", user, "--password-file", self._password_file),
                f"--session-idle-timeout={idle_timeout}s",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        port = wait_ready(self.proc, timeout)
        if port is not None:
            self.port = port
            return port
        self.stop()
        raise RuntimeError("govmomi simulator did not become ready")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()  # it removes its datastore directory on SIGTERM
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
