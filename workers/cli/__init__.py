"""``snapferry``: the command line for operators, the demo, and the worker processes.

Every command that prints a record takes ``--json``. Errors exit non-zero with a message
that names what was wrong (exit codes: 0 done, 1 refused or failed, 2 usage, 130 Ctrl-C).
The process ends with ``os._exit`` after flushing, because a Temporal client can abort the
interpreter at shutdown (temporalio/sdk-python#300) and turn success into exit code 134.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from snapferry.activities.settings import Settings

from .. import starter
from . import policies, processes, repository, snapshots, vms
from .common import EPILOG, explain, web_ui_link

__all__ = ["build_parser", "main", "run", "web_ui_link"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snapferry", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    def add(parent: Any, name: str, fn: Callable[..., Awaitable[int]], help_: str) -> Any:
        sp = parent.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        sp.set_defaults(fn=fn)
        return sp

    processes.register_processes(sub, add)
    snapshots.register_snapshots(sub, add)
    vms.register(sub, add)
    snapshots.register_backups(sub, add)
    policies.register(sub, add)
    repository.register(sub, add)
    processes.register_tools(sub, add)
    explain(p)
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    try:
        return asyncio.run(args.fn(args, settings))
    except starter.SnapferryClientError as err:
        print(f"snapferry: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C is how the demo is meant to end (after its cleanup ran); elsewhere it aborts.
        return 0 if args.command == "demo" else 130
    except (ConnectionError, RuntimeError) as err:
        print(f"snapferry: error: {err}", file=sys.stderr)
        return 1


def main() -> None:
    status = run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
