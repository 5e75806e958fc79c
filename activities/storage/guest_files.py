"""The files inside a backed-up disk, read with libguestfs over the backup's NBD export.

``guestfish --listen`` starts one appliance; each step is a ``guestfish --remote`` command.
The disk is added as raw (never probed) and read-only, every file system is mounted with
``mount-ro``: an operating system's by inspection (its fstab), else the disk's only file
system, else the one the operator names. Partitions, LVM, ext4 and XFS are read; an encrypted
file system (LUKS) is refused, naming it. The appliance is ended when the context ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidInput

# What list-filesystems reports for devices that hold no file system to mount.
NOT_MOUNTABLE = {"swap", "unknown", "LVM2_member", "linux_raid_member"}
ENCRYPTED = {"crypto_LUKS", "BitLocker"}
CALL_TIMEOUT_S = 600.0


class GuestFilesError(InvalidInput):
    """The backed-up disk cannot be read as asked (nothing mountable, encrypted, no path)."""


def guestfs_env() -> dict[str, str]:
    """libguestfs runs its appliance directly (no libvirt session needed) unless told."""
    env = dict(os.environ)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    return env


class GuestFs:
    def __init__(self, pid: int, env: dict[str, str]) -> None:
        self.pid = pid
        self.env = env

    def call(self, *args: str) -> str:
        proc = subprocess.run(
            ["guestfish", f"--remote={self.pid}", "--", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=CALL_TIMEOUT_S,
        )
        if proc.returncode != 0:
            what = proc.stderr.strip().removeprefix("libguestfs: error: ")
            raise GuestFilesError(f"{args[0]}: {what or f'exit {proc.returncode}'}")
        return proc.stdout

    def lines(self, *args: str) -> list[str]:
        return [line for line in self.call(*args).splitlines() if line.strip()]

    def pairs(self, *args: str) -> list[tuple[str, str]]:
        """``key: value`` lines (list-filesystems, inspect-get-mountpoints)."""
        out = []
        for line in self.lines(*args):
            key, _, value = line.partition(": ")
            out.append((key.strip(), value.strip()))
        return out

    def is_true(self, *args: str) -> bool:
        return self.call(*args).strip() == "true"

    def mount(self, filesystem: str | None) -> str:
        """Mount the disk's file systems read-only under /; says what was mounted."""
        found = dict(self.pairs("list-filesystems"))
        if filesystem is not None:
            if filesystem not in found:
                raise GuestFilesError(
                    f"no file system {filesystem} on the disk (it has: {_names(found)})"
                )
            if found[filesystem] in ENCRYPTED:
                raise GuestFilesError(_encrypted([filesystem]))
            self.call("mount-ro", filesystem, "/")
            return f"{filesystem} ({found[filesystem]})"
        roots = self.lines("inspect-os")
        if roots:
            points = self.pairs("inspect-get-mountpoints", roots[0])
            for point, dev in sorted(points, key=lambda p: len(p[0])):
                self.call("mount-ro", dev, point)
            return ", ".join(f"{dev} on {point}" for point, dev in sorted(points))
        readable = [d for d, k in found.items() if k not in NOT_MOUNTABLE | ENCRYPTED]
        if len(readable) == 1:
            self.call("mount-ro", readable[0], "/")
            return f"{readable[0]} ({found[readable[0]]})"
        if readable:
            raise GuestFilesError(
                f"the disk holds several file systems and no operating system: name one with"
                f" --filesystem ({_names({d: found[d] for d in readable})})"
            )
        encrypted = self.encrypted()
        if encrypted:
            raise GuestFilesError(_encrypted(encrypted))
        raise GuestFilesError(
            f"no file system snapferry can read on the disk ({_names(found) or 'none found'})"
        )

    def encrypted(self) -> list[str]:
        """Devices and partitions holding an encrypted volume (list-filesystems leaves
        them out without their key)."""
        candidates = self.lines("list-devices") + self.lines("list-partitions")
        found = []
        for dev in candidates:
            with contextlib.suppress(GuestFilesError):  # vfs-type fails on an empty device
                if self.call("vfs-type", dev).strip() in ENCRYPTED:
                    found.append(dev)
        return found

    def kind(self, path: str) -> str:
        """``dir`` or ``file`` (anything not a directory), refused if absent."""
        if self.is_true("is-dir", path):
            return "dir"
        if self.is_true("exists", path) or self.is_true("is-symlink", path):
            return "file"
        raise GuestFilesError(f"{path} does not exist in the backup")


def _names(found: dict[str, str]) -> str:
    return ", ".join(f"{dev} {kind}" for dev, kind in found.items())


def _encrypted(devices: list[str]) -> str:
    return (
        f"{', '.join(devices)} is an encrypted file system (LUKS): snapferry cannot read the"
        " files in it; restore the whole volume instead (snapshot to-volume)"
    )


def guest_path(path: str) -> str:
    if not path.startswith("/"):
        path = "/" + path
    if "\n" in path or "\0" in path:
        raise GuestFilesError(f"not a path: {path!r}")
    return path


@contextlib.contextmanager
def opened(nbd_socket: Path, *, filesystem: str | None = None) -> Iterator[tuple[GuestFs, str]]:
    """A libguestfs appliance on the NBD export at ``nbd_socket``, its file systems mounted
    read-only: (the handle, what was mounted). The appliance is ended afterwards."""
    env = guestfs_env()
    # Files, not pipes: the daemon guestfish leaves behind keeps its output open.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = subprocess.run(
            ["guestfish", "--listen"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            timeout=60,
        )
        out.seek(0)
        err.seek(0)
        match = re.search(r"GUESTFISH_PID=(\d+)", out.read())
        if started.returncode != 0 or match is None:
            raise GuestFilesError(f"guestfish did not start: {err.read().strip()}")
    g = GuestFs(int(match.group(1)), env)
    try:
        g.call(
            "add",
            "",
            "protocol:nbd",
            f"server:unix:{nbd_socket}",
            "format:raw",
            "readonly:true",
        )
        g.call("run")
        yield g, g.mount(filesystem)
    finally:
        _end(g)


def _end(g: GuestFs) -> None:
    with contextlib.suppress(subprocess.SubprocessError, GuestFilesError):
        subprocess.run(
            ["guestfish", f"--remote={g.pid}", "--", "exit"],
            capture_output=True,
            env=g.env,
            timeout=30,
        )
    deadline = time.monotonic() + 30
    while _alive(g.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(g.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(g.pid, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of nobody here: guestfish --listen is not our child, but check anyway.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False
