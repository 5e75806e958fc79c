"""Configuration, read from the environment once per process.

Everything is an environment variable so that the same image runs as the embedded demo, in
CI and on a cluster. Secrets are never part of this object's payload-facing parts: hypervisor
credentials are read by the drivers from the environment or a file, by reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .contracts import BackupOptions


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "")
    return value if value else default


@dataclass(frozen=True)
class VcenterConfig:
    """Where a VMware worker finds vCenter. The password is *not* here: only where to read
    it (``SNAPFERRY_VCENTER_PASSWORD_FILE``, else ``SNAPFERRY_VCENTER_PASSWORD``), read at
    login, so that no settings dump, payload or log can carry it."""

    url: str
    user: str
    datacenter: str
    password_file: str | None
    verify_tls: bool

    def password(self) -> str:
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return os.environ.get("SNAPFERRY_VCENTER_PASSWORD", "")

    @classmethod
    def from_env(cls) -> VcenterConfig | None:
        url = os.environ.get("SNAPFERRY_VCENTER_URL")
        if not url:
            return None
        return cls(
            url=url.rstrip("/"),
            user=_env("SNAPFERRY_VCENTER_USER", "administrator@vsphere.local"),
            datacenter=_env("SNAPFERRY_VCENTER_DATACENTER", "dc1"),
            password_file=os.environ.get("SNAPFERRY_VCENTER_PASSWORD_FILE") or None,
            verify_tls=_env("SNAPFERRY_VCENTER_VERIFY_TLS", "1") != "0",
        )


@dataclass(frozen=True)
class XenConfig:
    """Where a XenServer worker finds its pool master; the password, as for vCenter, is
    only referenced (``SNAPFERRY_XEN_PASSWORD_FILE``, else ``SNAPFERRY_XEN_PASSWORD``).
    ``delta_max`` is CloudStack's ``snapshot.delta.max``: deltas before a new full."""

    url: str
    user: str
    password_file: str | None
    verify_tls: bool
    delta_max: int

    def password(self) -> str:
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return os.environ.get("SNAPFERRY_XEN_PASSWORD", "")

    @classmethod
    def from_env(cls) -> XenConfig | None:
        url = os.environ.get("SNAPFERRY_XEN_URL")
        if not url:
            return None
        return cls(
            url=url.rstrip("/"),
            user=_env("SNAPFERRY_XEN_USER", "root"),
            password_file=os.environ.get("SNAPFERRY_XEN_PASSWORD_FILE") or None,
            verify_tls=_env("SNAPFERRY_XEN_VERIFY_TLS", "1") != "0",
            delta_max=int(_env("SNAPFERRY_SNAPSHOT_DELTA_MAX", "16")),
        )


@dataclass(frozen=True)
class Settings:
    home: Path
    secondary: Path
    libvirt_uri: str
    temporal_address: str
    namespace: str
    ui_port: int
    alert_log: Path
    alert_webhook: str | None
    backup_rate_limit_bps: float | None
    chunk_size: int
    checkpoint_bytes: int
    backup_defaults: BackupOptions = field(default_factory=BackupOptions)
    vcenter: VcenterConfig | None = None
    xen: XenConfig | None = None

    @property
    def temporal_port(self) -> int:
        return int(self.temporal_address.rsplit(":", 1)[1])

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(_env("SNAPFERRY_HOME", "./.snapferry")).absolute()
        rate = os.environ.get("SNAPFERRY_BACKUP_RATE_LIMIT_MBPS")
        defaults = BackupOptions()
        backup_defaults = BackupOptions(
            retry_attempts=int(_env("SNAPFERRY_BACKUP_RETRY", str(defaults.retry_attempts))),
            retry_interval_s=float(
                _env("SNAPFERRY_BACKUP_RETRY_INTERVAL", str(defaults.retry_interval_s))
            ),
            heartbeat_timeout_s=float(
                _env("SNAPFERRY_BACKUP_HEARTBEAT_TIMEOUT", str(defaults.heartbeat_timeout_s))
            ),
            progress_interval_s=float(
                _env("SNAPFERRY_PROGRESS_INTERVAL", str(defaults.progress_interval_s))
            ),
        )
        return cls(
            home=home,
            secondary=Path(_env("SNAPFERRY_SECONDARY", str(home / "secondary"))).absolute(),
            libvirt_uri=_env("SNAPFERRY_LIBVIRT_URI", "qemu:///system"),
            temporal_address=_env("SNAPFERRY_TEMPORAL_ADDRESS", "127.0.0.1:7233"),
            namespace=_env("SNAPFERRY_NAMESPACE", "default"),
            ui_port=int(_env("SNAPFERRY_UI_PORT", "8233")),
            alert_log=Path(
                _env("SNAPFERRY_ALERT_LOG", str(home / "logs" / "management-server.log"))
            ).absolute(),
            alert_webhook=os.environ.get("SNAPFERRY_ALERT_WEBHOOK") or None,
            backup_rate_limit_bps=float(rate) * 1e6 if rate else None,
            chunk_size=int(_env("SNAPFERRY_CHUNK_SIZE", str(8 * 1024 * 1024))),
            checkpoint_bytes=int(_env("SNAPFERRY_CHECKPOINT_BYTES", str(64 * 1024 * 1024))),
            backup_defaults=backup_defaults,
            vcenter=VcenterConfig.from_env(),
            xen=XenConfig.from_env(),
        )
