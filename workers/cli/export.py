"""``snapferry snapshot export ID --format raw|qcow2 FILE``: a backup as a plain image.

It runs where the operator runs it, reading secondary storage directly (a plain-file backup
or a repository backup, with ``SNAPFERRY_REPOSITORY_KEY_FILE`` for an encrypted one): every
chunk is checked as it is read, the image is written as ``FILE.partial``, compared with the
backup by ``qemu-img compare``, fsynced and renamed. Nothing is left behind on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
from pathlib import Path

from snapferry.activities.errors import SnapferryError
from snapferry.activities.settings import Settings
from snapferry.activities.storage.backup_image import backup_image
from snapferry.activities.storage.files import fsync_replace

from .. import starter
from .common import cli_client

FORMATS = ("raw", "qcow2")


def _qemu_img(*args: str) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SnapferryError(f"qemu-img {args[0]} failed: {proc.stderr.strip()}")


def export_backup(manifest_path: str, fmt: str, out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    try:
        with backup_image(manifest_path) as raw:
            # The formats are named, never probed; raw output stays sparse (-S 4k).
            _qemu_img("convert", "-q", "-f", "raw", "-O", fmt, "-S", "4k", str(raw), str(partial))
            _qemu_img("compare", "-q", "-f", "raw", "-F", fmt, str(raw), str(partial))
        fsync_replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


async def cmd_snapshot_export(args: argparse.Namespace, settings: Settings) -> int:
    out = Path(args.file).absolute()
    if out.exists() or out.with_name(out.name + ".partial").exists():
        raise starter.SnapferryClientError(f"{out} exists: export writes a new file only")
    if not out.parent.is_dir():
        raise starter.SnapferryClientError(f"{out.parent} is not a directory")
    record = await starter.get_record(await cli_client(settings), args.id)
    if record.backup is None:
        raise starter.SnapferryClientError(
            f"snapshot {args.id} has no backup to export (it is {record.state.value})"
        )
    try:
        await asyncio.to_thread(export_backup, record.backup.manifest_path, args.format, out)
    except SnapferryError as err:  # a damaged backup, a missing key: named, nothing written
        raise starter.SnapferryClientError(f"{type(err).__name__}: {err}") from err
    print(f"snapshot {args.id} exported to {out} ({args.format}, {os.path.getsize(out)} bytes)")
    return 0
