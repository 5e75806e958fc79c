"""Shared fixtures: a real Temporal dev server per test, real libvirt domains, workers.

Every server binds 127.0.0.1 on a free port, every process is stopped by its own PID, and
every domain and file a test makes is destroyed at teardown.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client

from snapferry.activities.settings import Settings
from snapferry.workers.client import connect
from snapferry.workers.stack import (
    dev_server_command,
    free_port,
    spawn,
    start_dev_server,
    terminate,
)
from tests.simulator import secret_file

ROOT = Path(__file__).resolve().parent.parent
_exit_status = 0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--model-examples",
        type=int,
        default=0,
        help="extra examples for model-based tests (CI keeps the fixed seed only)",
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's status before a Temporal client can abort the interpreter
    at shutdown (temporalio/sdk-python#300, exit code 134)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


@dataclass
class DevServer:
    """One ``temporal server start-dev`` on SQLite, restartable on the same file."""

    db: Path
    port: int
    log: Path
    pid: int | None = None
    dynamic_config: dict[str, str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.pid = start_dev_server(
            lambda cmd: spawn(cmd, self.log),
            lambda: dev_server_command(
                db=self.db,
                host="127.0.0.1",
                port=self.port,
                ui_port=None,
                dynamic_config=self.dynamic_config,
            ),
            "127.0.0.1",
            self.port,
        )

    def stop(self) -> None:
        if self.pid is not None:
            terminate(self.pid)
            self.pid = None


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def dev_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DevServer]:
    """A dev server per test; ``@pytest.mark.dev_server_config(key=value)`` sets dynamic
    config, e.g. a small history limit so that continue-as-new really happens."""
    marker = request.node.get_closest_marker("dev_server_config")
    server = DevServer(
        db=tmp_path / "temporal.db",
        port=free_port(),
        log=tmp_path / "temporal.log",
        dynamic_config=dict(marker.kwargs) if marker else None,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(
    home: Path,
    dev_server: DevServer,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Settings:
    """Settings for one test; also exported to the environment for CLI subprocesses.
    ``@pytest.mark.kvm_full_backups``: KVM incrementals off (SNAPFERRY_KVM_INCREMENTAL=0),
    for the tests of that mode's merge back onto the original file after every backup.
    ``@pytest.mark.backup_store("repository")``: backups go to the backup repository."""
    store = request.node.get_closest_marker("backup_store")
    env = {
        # SNAPFERRY_TEST_BACKUP_STORE runs the unmarked tests against another store.
        "SNAPFERRY_BACKUP_STORE": (
            store.args[0] if store else os.environ.get("SNAPFERRY_TEST_BACKUP_STORE", "files")
        ),
        "SNAPFERRY_KVM_INCREMENTAL": (
            "0" if request.node.get_closest_marker("kvm_full_backups") else "1"
        ),
        "SNAPFERRY_HOME": str(home),
        "SNAPFERRY_SECONDARY": str(home / "secondary"),
        "SNAPFERRY_TEMPORAL_ADDRESS": dev_server.address,
        "SNAPFERRY_BACKUP_RETRY": "2",
        "SNAPFERRY_BACKUP_RETRY_INTERVAL": "0.5",
        "SNAPFERRY_BACKUP_HEARTBEAT_TIMEOUT": "5",
        "SNAPFERRY_PROGRESS_INTERVAL": "0.5",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings.from_env()


@pytest_asyncio.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    yield await connect(settings)


@pytest.fixture
def host_name() -> str:
    return f"h{uuid.uuid4().hex[:8]}"


@pytest.fixture
def libvirt_conn() -> Iterator[object]:
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def make_vm(libvirt_conn: object, tmp_path: Path) -> Iterator[object]:
    """Factory for TCG domains with random-data disks; all destroyed at teardown."""
    from snapferry.workers.demo_vm import DemoVm, create_vm

    made: list[DemoVm] = []

    def factory(*, size: int, data_bytes: int, start: bool = True, seed: int = 0) -> DemoVm:
        name = f"sf-test-{uuid.uuid4().hex[:8]}"
        vm = create_vm(
            libvirt_conn,
            name=name,
            directory=tmp_path / "primary",  # type: ignore[arg-type]
            size=size,
            data_bytes=data_bytes,
            start=start,
            seed=seed,
        )
        made.append(vm)
        return vm

    try:
        yield factory
    finally:
        for vm in made:
            vm.destroy()


@pytest.fixture
def make_thin_vm(libvirt_conn: object, tmp_path: Path) -> Iterator[object]:
    """Factory for TCG domains on a large thin qcow2 holding only the given writes
    (offset, length, pattern); all destroyed, and their files removed, at teardown."""
    from snapferry.workers.demo_vm import DemoVm, create_thin_vm

    made: list[DemoVm] = []

    def factory(*, size: int, writes: list[tuple[int, int, int]], start: bool = True) -> DemoVm:
        vm = create_thin_vm(
            libvirt_conn,  # type: ignore[arg-type]
            name=f"sf-test-{uuid.uuid4().hex[:8]}",
            directory=tmp_path / "primary",
            size=size,
            writes=writes,
            start=start,
        )
        made.append(vm)
        return vm

    try:
        yield factory
    finally:
        for vm in made:
            vm.destroy()


def with_settings(settings: Settings, **changes: object) -> Settings:
    return replace(settings, **changes)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def workers(client: Client, settings: Settings, host_name: str) -> AsyncIterator[None]:
    """In-process workers: this test's host queue, and a backup pool of two."""
    from snapferry.workers.worker import running_workers

    async with running_workers(client, settings, hosts=[host_name], backup=True, concurrency=2):
        yield


async def snapferry_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real console script with this test's environment, off the event loop (the
    in-process workers share the loop and must keep serving while the CLI waits)."""
    exe = shutil.which("snapferry", path=str(Path(sys.executable).parent)) or "snapferry"
    return await asyncio.to_thread(
        subprocess.run, [exe, *args], capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Vsphere:
    """A running vSphere simulator (tests/vsphere_sim) and snapferry's settings for it."""

    port: int
    root: Path
    settings: Settings

    def disk(self, vm: str, index: int = 0) -> Path:
        from tests.vsphere_sim.control import disk_path

        return disk_path(self.root, vm, index)

    def vm_names(self) -> set[str]:
        from tests.vsphere_sim.control import list_vms

        return {v["name"] for v in list_vms(self.port)}

    def snapshot_names(self, vm: str) -> list[str]:
        from tests.vsphere_sim.control import list_vms

        found = [v for v in list_vms(self.port) if v["name"] == vm]
        return list(found[0]["snapshots"]) if found else []

    def connect(self):  # type: ignore[no-untyped-def]
        """A pyvmomi session of the test's own (to power VMs on and off, as a user would)."""
        from pyVim.connect import SmartConnect

        assert self.settings.vcenter is not None
        return SmartConnect(
            protocol="http",
            host="127.0.0.1",
            port=self.port,
            user=self.settings.vcenter.user,
            pwd=self.settings.vcenter.password(),
        )


VSPHERE_PASSWORD = "sim pass w0rd"  # a test secret: must never show up in a history


@pytest.fixture
def vsphere(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Vsphere]:
    """The simulator as a separate process, and the environment a VMware worker reads."""
    from snapferry.activities.settings import VcenterConfig
    from tests.vsphere_sim.control import SimulatorProcess

    sim = SimulatorProcess()
    port = sim.start(tmp_path / "vsphere", 0, "administrator@vsphere.local", VSPHERE_PASSWORD)
    password_file = secret_file(tmp_path / "vcenter.password", VSPHERE_PASSWORD)
    monkeypatch.setenv("SNAPFERRY_VCENTER_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SNAPFERRY_VCENTER_USER", "administrator@vsphere.local")
    monkeypatch.setenv("SNAPFERRY_VCENTER_PASSWORD_FILE", str(password_file))
    monkeypatch.setenv("SNAPFERRY_VCENTER_DATACENTER", "dc1")
    try:
        yield Vsphere(
            port=port,
            root=tmp_path / "vsphere",
            settings=replace(settings, vcenter=VcenterConfig.from_env()),
        )
    finally:
        sim.stop()


@dataclass
class Xapi:
    """A running XAPI simulator (tests/xapi_sim) and snapferry's settings for it."""

    port: int
    settings: Settings

    def vm(self, name: str) -> dict:
        from tests.xapi_sim.control import list_vms

        return next(v for v in list_vms(self.port) if v["name"] == name)

    def disk(self, vm: str, index: int = 0) -> Path:
        """The VM's current VDI's bytes (a revert may have replaced the VDI)."""
        return Path(self.vm(vm)["disks"][index]["path"])

    def snapshot_vdis(self) -> list[dict]:
        from tests.xapi_sim.control import list_vdis

        return [v for v in list_vdis(self.port) if v["is_a_snapshot"]]


XAPI_PASSWORD = "xen s3cret"  # a test secret: must never show up in a history


@pytest.fixture
def xapi(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Xapi]:
    """The XAPI simulator as a separate process, in XAPI's own revert mode (a revert gives
    the VM new VDIs and leaves a checkpoint Suspended), and the environment a worker reads."""
    from snapferry.activities.settings import XenConfig
    from tests.xapi_sim.control import SimulatorProcess, set_revert_mode

    sim = SimulatorProcess()
    port = sim.start(tmp_path / "xapi", 0, "root", XAPI_PASSWORD)
    set_revert_mode(port, "xapi")
    password_file = secret_file(tmp_path / "xen.password", XAPI_PASSWORD)
    monkeypatch.setenv("SNAPFERRY_XEN_URL", sim.url)
    monkeypatch.setenv("SNAPFERRY_XEN_USER", "root")
    monkeypatch.setenv("SNAPFERRY_XEN_PASSWORD_FILE", str(password_file))
    try:
        yield Xapi(port=port, settings=replace(settings, xen=XenConfig.from_env(), delta_max=3))
    finally:
        sim.stop()
