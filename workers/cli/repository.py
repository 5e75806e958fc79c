"""``snapferry repository ...``: the backup repository on secondary and its jobs.

The repository is ``$SNAPFERRY_SECONDARY/repository`` unless ``--root`` names another; it is
encrypted when ``SNAPFERRY_REPOSITORY_KEY_FILE`` names a key made by ``repository key create``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from snapferry.activities.errors import SnapferryError
from snapferry.activities.settings import Settings
from snapferry.activities.storage.repository import Repository, create_key_file, jobs, key_from_env

from .common import Adder


def _root(args: argparse.Namespace, settings: Settings) -> Path:
    return Path(args.root) if args.root else settings.repository


def _open(args: argparse.Namespace, settings: Settings) -> Repository:
    root = _root(args, settings)
    if not (root / "config.json").exists():
        raise SnapferryError(f"{root} is not a snapferry repository (no config.json)")
    return Repository(root, key_from_env())


def _fail(err: SnapferryError) -> int:
    print(f"snapferry: error: {err}", file=sys.stderr)
    return 1


async def cmd_key_create(args: argparse.Namespace, settings: Settings) -> int:
    try:
        key = create_key_file(Path(args.file))
    except SnapferryError as err:
        return _fail(err)
    print(f"key {key.fingerprint} written to {args.file} (mode 0600)")
    print("keep a copy somewhere safe: without this key its backups cannot be read")
    return 0


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    try:
        s = jobs.status(_open(args, settings))
    except SnapferryError as err:
        return _fail(err)
    row = dataclasses.asdict(s) | {
        "dedup_ratio": round(s.dedup_ratio, 2),
        "compression_ratio": round(s.compression_ratio, 2),
    }
    if args.json:
        print(json.dumps(row, indent=2))
    else:
        for name, value in row.items():
            print(f"{name}: {value}")
    return 0


async def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    try:
        result = jobs.verify(_open(args, settings))
    except SnapferryError as err:
        return _fail(err)
    print(f"verified {result.packs} packs, {result.blobs} blobs, {result.bytes_read} bytes read")
    for damage in result.damaged:
        print(f"damaged: {damage}")
    for snapshot, offsets in result.snapshots.items():
        print(f"snapshot {snapshot}: {len(offsets)} damaged chunks, first at offset {offsets[0]}")
    return 0 if result.ok else 1


async def cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    try:
        r = jobs.gc(_open(args, settings))
    except SnapferryError as err:
        return _fail(err)
    print(
        f"removed {r.packs_removed} packs ({r.bytes_freed} bytes); kept {r.packs_live} in use"
        f" and {r.packs_kept_young} too recent to judge"
    )
    return 0


async def cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    try:
        r = jobs.sync(_root(args, settings), Path(args.to))
    except SnapferryError as err:
        return _fail(err)
    print(f"copied {r.packs_copied} packs and {r.backups_copied} backups ({r.bytes_copied} bytes)")
    return 0


def register(sub: argparse._SubParsersAction, add: Adder) -> None:  # type: ignore[type-arg]
    repo = sub.add_parser("repository", help="the backup repository on secondary and its jobs")
    rsub = repo.add_subparsers(dest="repository_command", required=True)
    key = rsub.add_parser("key", help="repository keys")
    ksub = key.add_subparsers(dest="key_command", required=True)
    create = add(ksub, "create", cmd_key_create, "write a new random repository key to FILE")
    create.add_argument(
        "file", metavar="FILE", help="where to write the key (refused if it exists)"
    )

    def with_root(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--root", help="the repository (default: $SNAPFERRY_SECONDARY/repository)")
        return sp

    status = with_root(add(rsub, "status", cmd_status, "bytes, chunks, dedup and compression"))
    status.add_argument("--json", action="store_true")
    with_root(add(rsub, "verify", cmd_verify, "re-read every chunk from the medium and check it"))
    with_root(add(rsub, "gc", cmd_gc, "free the chunks no backup uses (safe while backups run)"))
    sync = with_root(add(rsub, "sync", cmd_sync, "copy what a second repository lacks"))
    sync.add_argument("--to", required=True, help="the second repository's directory")
