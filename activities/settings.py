"""Configuration, read from the environment once per process.

Everything is an environment variable so that the same image runs as the embedded demo, in
CI and on a cluster. Secrets are never part of this object's payload-facing parts: hypervisor
credentials are read by the drivers from the environment or a file, by reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .contracts import BackupOptions


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "")
    return value if value else default


def _manager_env(
    *, url: str, user: str, default_user: str, password_file: str, verify_tls: str
) -> dict[str, Any] | None:
    """The connection fields every hypervisor manager shares, from the named variables;
    None when its URL is not set (that hypervisor is not used by this worker)."""
    value = os.environ.get(url)
    if not value:
        return None
    return {
        "url": value.rstrip("/"),
        "user": _env(user, default_user),
        "password_file": os.environ.get(password_file) or None,
        "verify_tls": _env(verify_tls, "1") != "0",
    }


def _non_negative(name: str, default: str) -> int:
    """An integer setting, refused with its name when it is not a whole number >= 0."""
    value = _env(name, default)
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise ValueError(f"{name}={value!r}: expected a whole number >= 0")
    return number


@dataclass(frozen=True)
class ManagerConfig:
    """Where a worker finds a hypervisor manager (vCenter, a XenServer pool master). The
    password is *not* here: only where to read it (a file, else one environment variable),
    read at login, so that no settings dump, payload or log can carry it."""

    password_var: ClassVar[str]
    url: str
    user: str
    password_file: str | None
    verify_tls: bool

    def password(self) -> str:
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return os.environ.get(self.password_var, "")


@dataclass(frozen=True)
class VcenterConfig(ManagerConfig):
    password_var = "SNAPFERRY_VCENTER_PASSWORD"
    datacenter: str = "dc1"

    @classmethod
    def from_env(cls) -> VcenterConfig | None:
        common = _manager_env(
            url="SNAPFERRY_VCENTER_URL",
            user="SNAPFERRY_VCENTER_USER",
            default_user="administrator@vsphere.local",
            password_file="SNAPFERRY_VCENTER_PASSWORD_FILE",
            verify_tls="SNAPFERRY_VCENTER_VERIFY_TLS",
        )
        if common is None:
            return None
        return cls(**common, datacenter=_env("SNAPFERRY_VCENTER_DATACENTER", "dc1"))


@dataclass(frozen=True)
class XenConfig(ManagerConfig):
    password_var = "SNAPFERRY_XEN_PASSWORD"

    @classmethod
    def from_env(cls) -> XenConfig | None:
        common = _manager_env(
            url="SNAPFERRY_XEN_URL",
            user="SNAPFERRY_XEN_USER",
            default_user="root",
            password_file="SNAPFERRY_XEN_PASSWORD_FILE",
            verify_tls="SNAPFERRY_XEN_VERIFY_TLS",
        )
        if common is None:
            return None
        return cls(**common)


@dataclass(frozen=True)
class SmtpConfig:
    """Where alerts are mailed, as CloudStack mails its alerts (``alert.smtp.*``). The
    password, if any, is only referenced (``SNAPFERRY_ALERT_SMTP_PASSWORD_FILE``) and read
    when a mail is sent."""

    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    user: str | None = None
    password_file: str | None = None
    starttls: bool = False
    timeout_s: float = 10.0

    def password(self) -> str | None:
        return Path(self.password_file).read_text().strip() if self.password_file else None

    @classmethod
    def from_env(cls) -> SmtpConfig | None:
        host = os.environ.get("SNAPFERRY_ALERT_SMTP_HOST")
        if not host:
            return None
        recipients = tuple(
            r.strip() for r in _env("SNAPFERRY_ALERT_SMTP_TO", "").split(",") if r.strip()
        )
        if not recipients:
            raise ValueError("SNAPFERRY_ALERT_SMTP_HOST is set but SNAPFERRY_ALERT_SMTP_TO is not")
        return cls(
            host=host,
            port=int(_env("SNAPFERRY_ALERT_SMTP_PORT", "25")),
            sender=_env("SNAPFERRY_ALERT_SMTP_FROM", "snapferry@localhost"),
            recipients=recipients,
            user=os.environ.get("SNAPFERRY_ALERT_SMTP_USER") or None,
            password_file=os.environ.get("SNAPFERRY_ALERT_SMTP_PASSWORD_FILE") or None,
            starttls=_env("SNAPFERRY_ALERT_SMTP_STARTTLS", "0") != "0",
        )


def _positive(name: str, default: str) -> int:
    """An integer setting, refused with its name when it is not a whole number >= 1."""
    value = _env(name, default)
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name}={value!r}: expected a whole number >= 1")
    return number


BACKUP_STORES = ("files", "repository")


@dataclass(frozen=True)
class Settings:
    """What one process reads from its environment (see :meth:`from_env` for the names).

    ``host_concurrency`` (``SNAPFERRY_HOST_CONCURRENCY``, default 16): how many hypervisor
    operations a host worker runs at once, over all its VMs; it is the size of the thread
    pool that makes libvirt calls and runs ``qemu-img``. Operations on one KVM VM wait their
    turn before they get a thread (the VM's disks have one writer at a time anyway, see
    hypervisors/domain_lock.py), so three takes of one VM use one thread and the other VMs
    are not held back by them. The default lets a burst over a dozen VMs take them all side
    by side, and stays under libvirtd's own 20 worker threads (``max_workers``), so one
    worker never takes all of libvirtd from other clients.

    ``host_long_concurrency`` (``SNAPFERRY_HOST_LONG_CONCURRENCY``, default 4, at most
    ``host_concurrency``): of those, how many may be long operations (releases and merges,
    reverts, discards, VM snapshot reverts and deletes, VMware's clone-taking takes). They
    read and write whole disks and can run for minutes: bounded apart, they never hold every
    thread, and a caller waiting for a take is answered while merges run.
    """

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
    alert_smtp: SmtpConfig | None = None
    # Host-wide, not per SNAPFERRY_HOME: every worker process on a host must see one lock.
    lock_dir: Path = Path("/run/lock/snapferry")
    domain_lock_timeout_s: float = 60.0
    # CloudStack's snapshot.delta.max: deltas before a new full (XenServer and KVM); a
    # snapshot's own BackupOptions.delta_max (a policy's) overrides it.
    delta_max: int = 16
    # KVM incremental backups (keep one layer, see hypervisors/kvm/); off = every KVM
    # backup is a full and the chain is merged back onto the original file after each.
    kvm_incremental: bool = True
    host_concurrency: int = 16
    host_long_concurrency: int = 4
    # Where backups go on secondary: "files" (a sparse raw file, or a delta file, per
    # snapshot) or "repository" (deduplicated, compressed, encrypted chunks: storage/
    # repository/). Backups in either restore, whichever is set.
    backup_store: str = "files"
    repository_zstd_level: int = 3

    @property
    def repository(self) -> Path:
        """The backup repository (``snapferry repository`` works on it too)."""
        return self.secondary / "repository"

    def __post_init__(self) -> None:
        if self.backup_store not in BACKUP_STORES:
            raise ValueError(
                f"SNAPFERRY_BACKUP_STORE={self.backup_store!r} is not one of"
                f" {', '.join(BACKUP_STORES)}"
            )
        if not 1 <= self.repository_zstd_level <= 22:
            raise ValueError(
                f"SNAPFERRY_REPOSITORY_ZSTD_LEVEL={self.repository_zstd_level} is not"
                " within 1..22 (zstd's levels)"
            )
        if self.host_long_concurrency > self.host_concurrency:
            raise ValueError(
                f"SNAPFERRY_HOST_LONG_CONCURRENCY={self.host_long_concurrency} is more than"
                f" SNAPFERRY_HOST_CONCURRENCY={self.host_concurrency}: long operations are"
                " a part of all host operations"
            )

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
            take_heartbeat_timeout_s=float(
                _env("SNAPFERRY_TAKE_HEARTBEAT_TIMEOUT", str(defaults.take_heartbeat_timeout_s))
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
            alert_smtp=SmtpConfig.from_env(),
            lock_dir=Path(_env("SNAPFERRY_LOCK_DIR", "/run/lock/snapferry")).absolute(),
            domain_lock_timeout_s=float(_env("SNAPFERRY_DOMAIN_LOCK_TIMEOUT", "60")),
            delta_max=_non_negative("SNAPFERRY_SNAPSHOT_DELTA_MAX", "16"),
            kvm_incremental=_env("SNAPFERRY_KVM_INCREMENTAL", "1") != "0",
            host_concurrency=_positive("SNAPFERRY_HOST_CONCURRENCY", "16"),
            host_long_concurrency=_positive("SNAPFERRY_HOST_LONG_CONCURRENCY", "4"),
            backup_store=_env("SNAPFERRY_BACKUP_STORE", "files"),
            repository_zstd_level=_positive("SNAPFERRY_REPOSITORY_ZSTD_LEVEL", "3"),
        )
