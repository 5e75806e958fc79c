"""``snapferry snapshot serve|files|restore-file``: a backup as a disk, and the files in it.

``serve`` exports a backup read-only over NBD (nbdkit, storage/nbd_export.py) until Ctrl-C or
SIGTERM; ``files`` and ``restore-file`` serve it on a private unix socket and read it with
libguestfs (storage/guest_files.py). Like ``snapshot export`` they run where the operator
runs them, reading secondary storage directly (``SNAPFERRY_REPOSITORY_KEY_FILE`` for a
repository backup), and nothing is restored first. Every process they start is stopped, and
every socket removed, when they end, on a refusal or a signal too.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.errors import SnapferryError
from snapferry.activities.settings import Settings
from snapferry.activities.storage import guest_files
from snapferry.activities.storage.nbd_export import serving

from .. import starter
from .common import Adder, cli_client


async def backed_up_manifest(settings: Settings, snapshot_id: str) -> str:
    """The manifest of a BackedUp snapshot's backup; anything else refused, naming why."""
    record = await starter.get_record(await cli_client(settings), snapshot_id)
    if record.state != SnapshotState.BACKED_UP or record.backup is None:
        raise starter.SnapferryClientError(
            f"snapshot {snapshot_id} is {record.state.value}: only a BackedUp snapshot's"
            " backup can be read"
        )
    return str(record.backup.manifest_path)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt where the command is, so that its cleanup
    (nbdkit, the appliance, a half-restored directory) runs before it exits."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    before = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """A store, key or guest error is the command's message, not a traceback."""
    try:
        yield
    except SnapferryError as err:
        raise starter.SnapferryClientError(str(err)) from err


def parse_tcp(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {value!r}")
    return host.strip("[]"), int(port)


async def cmd_snapshot_serve(args: argparse.Namespace, settings: Settings) -> int:
    if args.tcp is not None and args.socket is not None:
        raise starter.SnapferryClientError("give either --socket or --tcp")
    if args.tcp is None and args.tls_certificates is not None:
        raise starter.SnapferryClientError("--tls-certificates goes with --tcp")
    if args.tcp is not None and args.tls_certificates is None:
        raise starter.SnapferryClientError(
            "--tcp needs --tls-certificates DIR: a backup is never served in the clear on TCP"
        )
    tls_dir = Path(args.tls_certificates).absolute() if args.tls_certificates else None
    if tls_dir is not None and not (tls_dir / "server-cert.pem").is_file():
        raise starter.SnapferryClientError(f"{tls_dir} holds no server-cert.pem")
    sock = Path(args.socket).absolute() if args.socket else None
    if sock is not None and (sock.exists() or not sock.parent.is_dir()):
        raise starter.SnapferryClientError(
            f"{sock} exists" if sock.exists() else f"{sock.parent} is not a directory"
        )
    manifest = await backed_up_manifest(settings, args.id)
    with signals_interrupt(), refusals():
        try:
            with serving(manifest, socket_path=sock, tcp=args.tcp, tls_dir=tls_dir) as export:
                print(
                    f"snapshot {args.id}: {export.size} bytes, read-only at {export.uri}"
                    f" (nbdkit PID {export.process.pid}); Ctrl-C stops",
                    flush=True,
                )
                while export.process.poll() is None:
                    time.sleep(0.2)
                raise starter.SnapferryClientError(
                    f"nbdkit ended by itself (exit {export.process.returncode})"
                )
        except KeyboardInterrupt:
            print(f"snapshot {args.id}: export stopped", flush=True)
            return 0


async def cmd_snapshot_files(args: argparse.Namespace, settings: Settings) -> int:
    path = guest_files.guest_path(args.path)
    manifest = await backed_up_manifest(settings, args.id)
    with signals_interrupt(), refusals(), serving(manifest) as export:
        assert export.socket is not None
        with guest_files.opened(export.socket, filesystem=args.filesystem) as (g, mounted):
            g.kind(path)
            listing = g.call("ll", path)
    print(f"# snapshot {args.id}, {mounted}: {path}")
    sys.stdout.write(listing)
    return 0


def _count(root: Path) -> tuple[int, int]:
    files = [p for p in [root, *root.rglob("*")] if p.is_file() and not p.is_symlink()]
    return len(files), sum(p.stat().st_size for p in files)


async def cmd_snapshot_restore_file(args: argparse.Namespace, settings: Settings) -> int:
    path = guest_files.guest_path(args.path)
    to = Path(args.to).absolute()
    if to.exists() or to.is_symlink():
        raise starter.SnapferryClientError(f"{to} exists: restore-file writes a new directory")
    if not to.parent.is_dir():
        raise starter.SnapferryClientError(f"{to.parent} is not a directory")
    manifest = await backed_up_manifest(settings, args.id)
    made = False
    try:
        with signals_interrupt(), refusals(), serving(manifest) as export:
            assert export.socket is not None
            with guest_files.opened(export.socket, filesystem=args.filesystem) as (g, _):
                g.kind(path)  # refused before anything is made here
                to.mkdir(mode=0o700)
                made = True
                g.call("copy-out", path, str(to))
    except BaseException:  # a refusal, a failed copy, Ctrl-C: no half-restored tree left
        if made:
            shutil.rmtree(to, ignore_errors=True)
        raise
    files, size = _count(to)
    print(f"snapshot {args.id}: {path} restored into {to} ({files} file(s), {size} bytes)")
    return 0


def register_serve(snap: Any, add: Adder) -> None:
    s = add(snap, "serve", cmd_snapshot_serve, "export a backup read-only over NBD (nbdkit)")
    s.add_argument("id")
    s.add_argument(
        "--socket",
        metavar="PATH",
        help="the unix socket to create (default: one in a new private directory)",
    )
    s.add_argument(
        "--tcp", type=parse_tcp, metavar="HOST:PORT", help="serve on TCP instead (TLS only)"
    )
    s.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="with --tcp: ca-cert.pem, server-cert.pem and server-key.pem (clients need a"
        " certificate from that CA)",
    )
    for name, fn, help_ in (
        ("files", cmd_snapshot_files, "list a directory of the backed-up disk (libguestfs)"),
        ("restore-file", cmd_snapshot_restore_file, "copy files or trees out of a backup"),
    ):
        f = add(snap, name, fn, help_)
        f.add_argument("id")
        if name == "files":
            f.add_argument("path", nargs="?", default="/", help="a directory or file in the disk")
        else:
            f.add_argument("path", help="a file or directory in the disk")
            f.add_argument("--to", required=True, metavar="DIR", help="a new directory")
        f.add_argument(
            "--filesystem",
            metavar="DEVICE",
            help="the file system to read (e.g. /dev/sda2) where the disk holds several and"
            " no operating system",
        )
