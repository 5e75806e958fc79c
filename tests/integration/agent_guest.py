"""A real guest with the QEMU guest agent, for application-consistent (quiesced) snapshots.

The same Debian cloud kernel and busybox ``/init`` as ``guest.py``, plus Debian's
``qemu-ga`` (``qemu-guest-agent``) and the shared libraries ``ldd`` names for it, on a
virtio-serial port (``virtio_console``) named ``org.qemu.guest_agent.0``.

The guest plays a database that does not fsync: a writer keeps ``/mnt/log`` open and
appends ``line N`` every few milliseconds, and the kernel is told not to write dirty pages
back by itself (``dirty_writeback_centisecs`` 0, ext4 ``commit=3600``), so without a flush
nothing it wrote reaches the disk. The agent's fsfreeze hook (``qemu-ga -F``, run with
``freeze`` before the agent freezes the file systems and ``thaw`` after it thaws them, as
``qga/commands-posix.c`` ``execute_fsfreeze_hook`` does) is the database's own: it stops
the writer, appends ``MARKER`` and lets the freeze flush it all; on thaw the writer goes on.
So a quiesced snapshot's ``/log`` is ``line 1`` .. ``line K`` then ``MARKER``, and a crash-
consistent one holds almost nothing. The hook prints ``FREEZE <uptime>`` and ``THAW
<uptime>`` on the console (the freeze window, in the guest's clock), and sleeps
``sf_freeze_delay`` seconds (kernel command line) after the marker, to hold a freeze open;
with ``sf_freeze_fail=1`` it fails instead, and the agent does not freeze.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .guest import CMDLINE, ERROR_TAG, MOUNTED, VIRTIO_MODULES, build_initramfs, init_preamble

QEMU_GA = Path("/usr/sbin/qemu-ga")
AGENT_MODULES = (*VIRTIO_MODULES, "virtio_console")
AGENT_UP = "AGENT UP"
MARKER = "MARKER"
REFUSED = "FREEZE REFUSED"
FREEZE_RE = re.compile(r"FREEZE (\d+\.\d+)")
THAW_RE = re.compile(r"THAW (\d+\.\d+)")
APPENDED_RE = re.compile(r"APPENDED (\d+)")

HOOK = f"""#!/bin/sh
read up _ < /proc/uptime
case "$1" in
  freeze)
    case " $(cat /proc/cmdline) " in
      *" sf_freeze_fail=1 "*) echo "{REFUSED}" > /dev/console; exit 1 ;;
    esac
    kill -STOP "$(cat /run/writer.pid)"
    echo {MARKER} >> /mnt/log
    echo "FREEZE $up" > /dev/console
    for arg in $(cat /proc/cmdline); do
      case "$arg" in sf_freeze_delay=*) sleep "${{arg#sf_freeze_delay=}}" ;; esac
    done
    ;;
  thaw)
    echo "THAW $up" > /dev/console
    case " $(cat /proc/cmdline) " in
      *" sf_thaw_fail=1 "*) kill -CONT "$(cat /run/writer.pid)"; exit 1 ;;
    esac
    kill -CONT "$(cat /run/writer.pid)"
    ;;
esac
exit 0
"""

INIT = (
    init_preamble(AGENT_MODULES)
    + f"""i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
# Nothing reaches the disk but by a flush: no periodic writeback, no early journal commit.
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs
case " $(cat /proc/cmdline) " in
  *" sf_no_disk=1 "*) mount -t tmpfs tmpfs /mnt ;;  # nothing the agent can freeze
  *) mount -t ext4 -o errors=remount-ro,commit=3600 /dev/vda /mnt ;;
esac
if ! grep -q ' /mnt ' /proc/mounts; then
  echo "{ERROR_TAG} mount /dev/vda"
  while :; do sleep 3600; done
fi
echo "{MOUNTED}"
(
  exec 3>>/mnt/log
  n=1
  while :; do
    echo "line $n" >&3
    if [ $((n % 50)) = 0 ]; then echo "APPENDED $n" > /dev/console; fi
    n=$((n + 1))
    usleep 2000
  done
) &
echo $! > /run/writer.pid
port=""
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename $p)
  done
  [ -z "$port" ] && sleep 0.1
  i=$((i + 1))
done
if [ -z "$port" ]; then echo "{ERROR_TAG} no agent port"; while :; do sleep 3600; done; fi
while [ ! -c "$port" ]; do sleep 0.1; done
/usr/sbin/qemu-ga -d -m virtio-serial -p "$port" -F/bin/fsfreeze-hook -t /run -f /run/qga.pid \\
  && echo "{AGENT_UP}" || echo "{ERROR_TAG} qemu-ga"
while :; do sleep 3600; done
"""
)


def shared_libraries(binary: Path) -> list[Path]:
    """What the dynamic loader maps for ``binary`` (``ldd``), the loader itself included."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    found = []
    for line in out.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            found.append(Path(m.group(1)))
    return found


def build_agent_initramfs(dest: Path, version: str) -> Path:
    """The initramfs with ``qemu-ga``, its libraries and the freeze hook."""
    files = agent_files()
    files["bin/fsfreeze-hook"] = (0o100755, HOOK.encode())
    return build_initramfs(dest, version, init=INIT, modules=AGENT_MODULES, files=files)


def agent_files() -> dict[str, tuple[int, bytes]]:
    """``qemu-ga`` and the shared libraries it loads, for an initramfs."""
    if not QEMU_GA.exists():
        raise FileNotFoundError(f"no {QEMU_GA}: install qemu-guest-agent (scripts/bootstrap.sh)")
    files = {"usr/sbin/qemu-ga": (0o100755, QEMU_GA.read_bytes())}
    for lib in shared_libraries(QEMU_GA):
        # The loader is named by its absolute path (/lib64/ld-linux-x86-64.so.2); the rest
        # by the path ldd resolved, which the loader's default search finds again.
        files[str(lib).lstrip("/")] = (0o100755, lib.resolve().read_bytes())
    return files


def cmdline(
    freeze_delay_s: float = 0.0,
    *,
    refuse_freeze: bool = False,
    fail_thaw: bool = False,
    no_disk: bool = False,
) -> str:
    """The guest's kernel command line: how long its hook holds a freeze open; whether the
    hook's freeze fails (as a database that cannot flush would), so the agent does not
    freeze; whether its thaw fails (after the agent thawed); whether the writer writes to a
    tmpfs instead of the disk (the agent then has no file system to freeze)."""
    return (
        f"{CMDLINE} sf_freeze_delay={freeze_delay_s:g} sf_freeze_fail={int(refuse_freeze)}"
        f" sf_thaw_fail={int(fail_thaw)} sf_no_disk={int(no_disk)}"
    )


def log_lines(data: bytes) -> list[str]:
    """``/log``'s complete lines (a line cut off by a crash-consistent image is left out)."""
    return data.decode(errors="replace").split("\n")[:-1]


def check_quiesced_log(lines: list[str]) -> int:
    """A quiesced image's ``/log``: ``line 1`` .. ``line K``, every one, with a ``MARKER``
    after each freeze, and the last line a marker (the writer was stopped before it, the
    freeze flushed everything). Returns K."""
    assert lines and lines[-1] == MARKER, f"the log does not end with the marker: {lines[-3:]}"
    body = [line for line in lines if line != MARKER]
    want = [f"line {n}" for n in range(1, len(body) + 1)]
    assert body == want, "the log's lines are not line 1..K"
    return len(body)
