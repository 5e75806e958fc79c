"""A real Linux guest for the integration tests, and the checks of its ext4 disk.

Debian's ``linux-image-cloud-amd64`` kernel is booted directly under TCG (``<os><kernel>``)
with an initramfs of ``busybox-static`` plus the virtio modules (ext4 is built into that
kernel: ``CONFIG_EXT4_FS=y``). Its ``/init`` mounts the ext4 data disk ``vda`` and writes
files in a loop: file N gets :func:`file_content` (N), the file is fsynced, the directory is
fsynced, and only then does the guest print ``WROTE N`` on its serial console, which QEMU
writes to a file the test reads. So a ``WROTE N`` line on the console means: file N is
durable on the disk as the guest sees it.
"""

from __future__ import annotations

import gzip
import lzma
import re
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt

# Each module needs the ones before it (modinfo's "depends").
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)
KERNEL_GLOB = "vmlinuz-*-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
ERROR_TAG = "GUEST-ERROR"
MOUNTED = "MOUNTED"
WROTE_RE = re.compile(r"WROTE (\d+)")

# Kernel messages of level ERR and worse (an I/O error, an ext4 error, a hung task) reach the
# console too, so a test sees them; chattier ones are suppressed. A panic powers off at once
# (panic=-1 reboots, and the domain's on_reboot is destroy), so a test fails fast.
CMDLINE = "console=ttyS0 loglevel=4 panic=-1"


def init_preamble(modules: tuple[str, ...]) -> str:
    """The start of every test guest's ``/init``: busybox's applets, /proc, /sys, /dev and
    the kernel modules (each after those it depends on)."""
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /var/run /tmp
for m in {" ".join(modules)}; do
  insmod /lib/modules/$m.ko || echo "{ERROR_TAG} insmod $m"
done
"""


INIT = (
    init_preamble(VIRTIO_MODULES)
    + f"""i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if mount -t ext4 -o errors=remount-ro /dev/vda /mnt; then
  echo "{MOUNTED}"
  n=1
  while :; do
    f=/mnt/file$n
    # busybox sync FILE is fsync(FILE); on the directory it makes the new entry durable.
    if seq $n $((n + n % 16 * 256 + 64)) > $f && sync $f && sync /mnt; then
      echo "WROTE $n"
    else
      echo "{ERROR_TAG} write $n"
      break
    fi
    n=$((n + 1))
  done
else
  echo "{ERROR_TAG} mount /dev/vda"
fi
while :; do sleep 3600; done
"""
)


def file_content(n: int) -> bytes:
    """What the guest's ``seq n (n + n % 16 * 256 + 64)`` writes into file N (0.3-19 KiB)."""
    return "".join(f"{i}\n" for i in range(n, n + n % 16 * 256 + 64 + 1)).encode()


# -- kernel and initramfs ------------------------------------------------------------------
def find_kernel(boot: Path = Path("/boot")) -> tuple[Path, str]:
    """The newest cloud kernel and its version (``scripts/bootstrap.sh`` installs it)."""
    found = sorted(boot.glob(KERNEL_GLOB), key=lambda p: _version_key(p.name))
    if not found:
        raise FileNotFoundError(
            f"no {boot}/{KERNEL_GLOB}: install linux-image-cloud-amd64 (scripts/bootstrap.sh)"
        )
    return found[-1], found[-1].name.removeprefix("vmlinuz-")


def _version_key(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def module_bytes(version: str, name: str) -> bytes:
    """A module's object code, decompressed if the kernel package ships it compressed
    (busybox's insmod loads plain ``.ko`` files)."""
    root = Path("/lib/modules") / version / "kernel"
    for suffix, unpack in (
        (".ko", bytes),
        (".ko.xz", lzma.decompress),
        (".ko.gz", gzip.decompress),
    ):
        hits = sorted(root.rglob(name + suffix))
        if hits:
            return unpack(hits[0].read_bytes())
    raise FileNotFoundError(f"kernel module {name} not found under {root}")


def _cpio_entry(name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int]) -> bytes:
    """One "newc" cpio entry: a header of 13 hex fields, the name, the data, 4-byte aligned."""
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build_initramfs(
    dest: Path,
    version: str,
    *,
    init: str = INIT,
    modules: tuple[str, ...] = VIRTIO_MODULES,
    files: dict[str, tuple[int, bytes]] | None = None,
) -> Path:
    """A gzipped newc cpio, written directly rather than from a staging tree, so that the
    ``/dev/console`` node the kernel opens for ``/init`` needs no mknod. ``files`` adds
    more (path: (mode, bytes)); their directories are made."""
    extra = files or {}
    dirs = {"bin", "dev", "lib", "lib/modules", "mnt", "proc", "sys"}
    for path in extra:
        parts = path.split("/")[:-1]
        dirs |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (d, 0o040755, b"", (0, 0)) for d in sorted(dirs)
    ]
    entries.append(("dev/console", 0o020600, b"", (5, 1)))
    entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes(), (0, 0)))
    for m in modules:
        entries.append((f"lib/modules/{m}.ko", 0o100644, module_bytes(version, m), (0, 0)))
    for path, (mode, data) in sorted(extra.items()):
        entries.append((path, mode, data, (0, 0)))
    entries.append(("init", 0o100755, init.encode(), (0, 0)))
    archive = b"".join(_cpio_entry(n, m, d, i + 1, r) for i, (n, m, d, r) in enumerate(entries))
    archive += _cpio_entry("TRAILER!!!", 0, b"", 0, (0, 0))
    dest.write_bytes(gzip.compress(archive, compresslevel=1))
    return dest


# -- data disk and domain ------------------------------------------------------------------
def make_ext4_qcow2(path: Path, size: int) -> Path:
    """An empty ext4 file system as a qcow2: mkfs on a raw file, then converted. Inode
    tables and journal are written now, so no lazy-init thread writes in the guest."""
    raw = path.with_suffix(".mkfs.raw")
    try:
        with open(raw, "wb") as f:
            f.truncate(size)
        mkfs = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "sfdata"]
        subprocess.run(
            [*mkfs, "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)], check=True
        )
        subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
            check=True,
        )
    finally:
        raw.unlink(missing_ok=True)
    return path


def domain_xml(
    name: str,
    *,
    kernel: Path,
    initrd: Path,
    disk: Path,
    console: Path,
    cmdline: str = CMDLINE,
    agent: bool = False,
) -> str:
    """The guest's definition; with ``agent`` a virtio-serial channel for the QEMU guest
    agent, named as libvirt expects it (https://libvirt.org/formatdomain.html#channel:
    ``org.qemu.guest_agent.0``; libvirt picks the host socket's path itself)."""
    n, k, i, d, c = (escape(str(v), {"'": "&apos;"}) for v in (name, kernel, initrd, disk, console))
    channel = (
        "<channel type='unix'><source mode='bind'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        if agent
        else ""
    )
    return f"""<domain type='qemu'>
  <name>{n}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{k}</kernel>
    <initrd>{i}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{d}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{c}'/>
      <target port='0'/>
    </serial>
    {channel}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


@dataclass
class RealGuest:
    """A running guest, its data disk and its console log."""

    conn: libvirt.virConnect
    name: str
    disk: Path
    console: Path
    started: float = 0.0
    boot_seconds: float = 0.0
    # (monotonic time, highest WROTE) each time the watcher saw the number grow.
    progress: list[tuple[float, int]] = field(default_factory=list)
    # (monotonic time, libvirt domain state) each time the watcher saw the state change.
    states: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None

    @property
    def domain(self) -> libvirt.virDomain:
        return self.conn.lookupByName(self.name)

    def lines(self) -> list[str]:
        """The console's complete lines so far (a line still being printed is left out)."""
        text = self.console.read_bytes().decode(errors="replace") if self.console.exists() else ""
        return text.replace("\r", "").split("\n")[:-1]

    def wrote(self) -> list[int]:
        """The N of every ``WROTE N`` line, in console order."""
        return [int(m.group(1)) for line in self.lines() if (m := WROTE_RE.fullmatch(line))]

    def last_wrote(self) -> int:
        found = self.wrote()
        return found[-1] if found else 0

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines()[-n:])

    def check_console(self) -> list[int]:
        """After ``MOUNTED`` the console holds ``WROTE 1``, ``WROTE 2``, ... and nothing else:
        no guest error, no kernel error, no line lost. Returns the numbers."""
        lines = self.lines()
        assert MOUNTED in lines, f"the guest never mounted its disk:\n{self.tail()}"
        after = lines[lines.index(MOUNTED) + 1 :]
        numbers = [int(m.group(1)) for line in after if (m := WROTE_RE.fullmatch(line))]
        odd = [line for line in after if not WROTE_RE.fullmatch(line)]
        assert not odd, f"unexpected console lines: {odd[:10]}"
        assert numbers == list(range(1, len(numbers) + 1)), "WROTE lines out of sequence"
        return numbers

    def wait_wrote(self, n: int, *, timeout: float) -> int:
        """Poll the console until ``WROTE n`` (or later) shows; fail on an error or a stop."""
        deadline = time.monotonic() + timeout
        while True:
            last = self.last_wrote()
            if last >= n:
                return last
            lines = self.lines()
            bad = [line for line in lines if ERROR_TAG in line or "Kernel panic" in line]
            assert not bad, f"the guest failed: {bad}\n{self.tail()}"
            assert self.domain.isActive(), f"the guest stopped:\n{self.tail()}"
            assert time.monotonic() < deadline, (
                f"no WROTE {n} after {timeout:.0f}s (last {last}):\n{self.tail()}"
            )
            time.sleep(0.05)

    def running(self) -> bool:
        state, _ = self.domain.state()
        return state == libvirt.VIR_DOMAIN_RUNNING

    def start_watching(self, interval: float = 0.05) -> None:
        """Record in a thread when the guest's WROTE count grows, to measure its pauses."""

        def watch() -> None:
            while not self._stop.wait(interval):
                last = self.last_wrote()
                if not self.progress or last > self.progress[-1][1]:
                    self.progress.append((time.monotonic(), last))
                try:
                    state = self.domain.state()[0]
                except libvirt.libvirtError:
                    state = -1
                if not self.states or state != self.states[-1][1]:
                    self.states.append((time.monotonic(), state))

        self._watcher = threading.Thread(target=watch, name=f"watch-{self.name}", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()

    def longest_pause(self, until: float) -> float:
        """The longest time the watcher saw no new WROTE line, up to ``until``."""
        mounted = self.started + self.boot_seconds
        times = [mounted] + [t for t, _ in self.progress if t <= until] + [until]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def destroy(self) -> None:
        """Stop watching, destroy and undefine the domain, delete every file it made."""
        self.stop_watching()
        try:
            dom = self.domain
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
        for p in self.disk.parent.glob(self.disk.name + "*"):
            p.unlink(missing_ok=True)
        self.console.unlink(missing_ok=True)


def define_guest(
    conn: libvirt.virConnect,
    *,
    directory: Path,
    initrd: Path,
    kernel: Path,
    disk_size: int,
    cmdline: str = CMDLINE,
    agent: bool = False,
) -> RealGuest:
    """Define (not start) a guest on a fresh ext4 disk in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"sf-guest-{uuid.uuid4().hex[:8]}"
    disk = make_ext4_qcow2(directory / f"{name}-vda.qcow2", disk_size)
    guest = RealGuest(conn=conn, name=name, disk=disk, console=directory / f"{name}.console")
    xml = domain_xml(
        name,
        kernel=kernel,
        initrd=initrd,
        disk=disk,
        console=guest.console,
        cmdline=cmdline,
        agent=agent,
    )
    conn.defineXML(xml)
    return guest


def boot(guest: RealGuest, *, timeout: float) -> float:
    """Start the guest and wait for its ``MOUNTED`` line; the seconds that took."""
    guest.started = time.monotonic()
    guest.domain.create()
    deadline = guest.started + timeout
    while MOUNTED not in guest.lines():
        assert guest.domain.isActive(), f"the guest stopped while booting:\n{guest.tail()}"
        assert time.monotonic() < deadline, f"no mount after {timeout:.0f}s:\n{guest.tail()}"
        time.sleep(0.02)
    guest.boot_seconds = time.monotonic() - guest.started
    return guest.boot_seconds


# -- checks of an ext4 image ---------------------------------------------------------------
# What e2fsck -fy may say about a file system that was merely cut off mid-flight, as by a
# power loss: it replays the journal and recounts the superblock's free totals, which
# ext4 does not keep current while mounted. Anything else would be an inconsistency.
_E2FSCK_BENIGN = re.compile(
    r"e2fsck \d.*"
    r"|.*: recovering journal"
    r"|Pass \d[A-Z]?: .*"
    r"|Free (blocks|inodes) count wrong \(\d+, counted=\d+\)\."
    r"|Fix\? yes"
    r"|.*: \*{5} FILE SYSTEM WAS MODIFIED \*{5}"
    r"|.*: \d+/\d+ files \(.*\), \d+/\d+ blocks"
    r"|"
)


def fsck_after_replay(image: Path) -> str:
    """``e2fsck -fy`` (journal replay, counts), then ``e2fsck -fn`` must find it clean.

    Run it on a copy: it writes to the image. Returns what ``-fy`` printed."""
    fix = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True)
    said = fix.stdout + fix.stderr
    assert fix.returncode in (0, 1), f"e2fsck -fy {image}: exit {fix.returncode}\n{said}"
    odd = [line for line in said.splitlines() if not _E2FSCK_BENIGN.fullmatch(line)]
    assert not odd, f"e2fsck -fy {image} found more than a cut-off file system:\n{said}"
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, (
        f"e2fsck -fn {image}: exit {check.returncode}\n{check.stdout}{check.stderr}"
    )
    return said


def read_files(image: Path, workdir: Path) -> dict[int, bytes]:
    """Every ``/fileN`` in the ext4 image, read by debugfs (no mount needed): ``ls -p /``
    lists the root, then one ``debugfs -f`` run dumps each file's bytes. Any other name in
    the root but ``lost+found`` fails."""
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /", str(image)], capture_output=True, text=True, check=True
    )
    # ls -p prints /inode/mode/uid/gid/name/size/ per entry.
    names = [row.split("/")[5] for row in listing.stdout.splitlines() if row.startswith("/")]
    others = sorted(set(names) - {".", "..", "lost+found"} - {n for n in names if _num(n)})
    assert not others, f"unexpected entries in {image}: {others}"
    numbers = sorted(_num(n) for n in names if _num(n))
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / "dump.cmds"
    script.write_text("".join(f"dump /file{n} {workdir}/file{n}\n" for n in numbers))
    subprocess.run(["debugfs", "-f", str(script), str(image)], capture_output=True, check=True)
    return {n: (workdir / f"file{n}").read_bytes() for n in numbers}


def _num(name: str) -> int:
    m = re.fullmatch(r"file([1-9]\d*)", name)
    return int(m.group(1)) if m else 0


def check_written_prefix(files: dict[int, bytes], *, must_have: int, at_most: int) -> int:
    """What a point-in-time image of the guest's disk must hold: files 1..K, no gap, each
    with its exact content, K at least ``must_have`` (every file reported durable before the
    image's instant) and at most ``at_most``. Only the last file, K, may be cut off (a
    prefix of its content, possibly empty), and only if it was not reported durable.
    Returns K."""
    last = max(files, default=0)
    assert sorted(files) == list(range(1, last + 1)), "the files have a gap"
    assert last >= must_have, f"file{must_have} was reported durable but is missing"
    assert last <= at_most, f"file{last} is there, but nothing after file{at_most} can be"
    for n in range(1, last + 1):
        want = file_content(n)
        if n == last and n > must_have:
            assert want.startswith(files[n]), f"file{n} is not a prefix of its content"
        else:
            assert files[n] == want, f"file{n} has the wrong content ({len(files[n])} bytes)"
    return last
