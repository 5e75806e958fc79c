"""The processes: ``up``/``down`` (the embedded stack), ``worker``, ``codec-server``; and the
tools: ``replay``, ``schema``, ``codec-key``, ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from snapferry.activities.settings import Settings

from .. import starter
from ..client import connect
from ..stack import Stack
from .common import (
    Adder,
    cli_client,
    default_host,
)


async def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from ..replay import replay_closed

    count, failures = await replay_closed(
        await cli_client(settings),
        limit=args.limit,
        export=Path(args.export) if args.export else None,
    )
    for failure in failures:
        print(f"NON-DETERMINISM: {failure}")
    print(f"replayed {count} closed workflows against this code: {len(failures)} failed")
    return 1 if failures else 0


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from ..worker import running_workers

    if not args.host and not args.backup:
        raise starter.SnapferryClientError("say what to serve: --host NAME and/or --backup")
    address = args.metrics_address or os.environ.get("SNAPFERRY_METRICS_ADDRESS")
    runtime = None
    if address:
        from ..metrics import metrics_runtime

        try:
            runtime = metrics_runtime(address)
        except ValueError as err:
            raise starter.SnapferryClientError(str(err)) from None
    client = await connect(settings, runtime=runtime)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_workers(
        client, settings, hosts=args.host, backup=args.backup, concurrency=args.concurrency
    ):
        print(
            f"worker ready: hosts={args.host or []} backup={args.backup}"
            f" concurrency={args.concurrency}"
            + (f" metrics=http://{address}/metrics" if address else ""),
            flush=True,
        )
        await stop.wait()
    return 0


async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    stack = Stack(settings)
    worker_args = ["--host", args.host, "--backup", "--concurrency", str(args.concurrency)]
    stack.up(workers=not args.no_workers, worker_args=worker_args)
    status = stack.status()
    print(f"temporal: {settings.temporal_address} (pid {status['temporal'] or 'external'})")
    print(f"web ui:   http://127.0.0.1:{settings.ui_port}")
    if not args.no_workers:
        print(f"worker:   pid {status['worker']} (host {args.host}, backup pool)")
    print(f"logs:     {settings.home / 'logs'}")
    return 0


async def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    stopped = Stack(settings).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


async def cmd_codec_server(args: argparse.Namespace, settings: Settings) -> int:
    from ..codec import CodecAuth, CodecAuthError, KeyRing, codec_server

    ring = KeyRing.from_env()
    if ring is None:
        raise starter.SnapferryClientError("set SNAPFERRY_CODEC_KEYS_FILE to the codec keys file")
    try:
        auth = CodecAuth.from_env(
            tls_cert=args.tls_cert_file,
            tls_key=args.tls_key_file,
            client_ca=args.tls_client_ca_file,
            insecure_no_auth=args.insecure_no_auth,
        )
        server = codec_server(
            ring, host=args.host, port=args.port, ui_origin=args.ui_origin, auth=auth
        )
    except CodecAuthError as err:
        raise starter.SnapferryClientError(f"codec server not started: {err}") from err
    print(
        f"codec server on {auth.scheme}://{args.host}:{server.server_port} for {args.ui_origin}"
        f" (keys {sorted(ring.keys)}, current {ring.current});"
        f" auth: {auth.describe(args.host, server.server_port)}",
        flush=True,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    serving = loop.run_in_executor(None, server.serve_forever)
    await stop.wait()
    server.shutdown()
    await serving
    return 0


async def cmd_codec_key(args: argparse.Namespace, settings: Settings) -> int:
    from ..codec import new_key

    print(new_key())
    return 0


async def cmd_schema(args: argparse.Namespace, settings: Settings) -> int:
    from ..schema import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)
    return 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from ..demo import run_demo

    return await run_demo(settings, host=args.host, size_mib=args.size_mib)


def register_processes(sub: Any, add: Adder) -> None:
    up = add(sub, "up", cmd_up, "start the embedded stack (dev server + worker) in the background")
    up.add_argument(
        "--no-workers", action="store_true", help="start only the dev server, no worker"
    )
    up.add_argument("--host", default=default_host(), help="the host queue its worker serves")
    up.add_argument("--concurrency", type=int, default=2, help="parallel backups of its worker")
    add(sub, "down", cmd_down, "stop the embedded stack started by 'up'")

    w = add(sub, "worker", cmd_worker, "run workers in the foreground")
    w.add_argument("--host", action="append", help="serve this hypervisor host's queue")
    w.add_argument("--backup", action="store_true", help="serve the backup pool")
    w.add_argument("--concurrency", type=int, default=2, help="parallel backups")
    w.add_argument(
        "--metrics-address",
        help="serve Prometheus metrics (Temporal SDK + snapferry) at this PORT or IP:PORT;"
        " a bare port binds 127.0.0.1 (default: SNAPFERRY_METRICS_ADDRESS, else off)",
    )


def register_tools(sub: Any, add: Adder) -> None:
    rp = add(sub, "replay", cmd_replay, "replay closed workflows' histories against this code")
    rp.add_argument("--limit", type=int, default=100, help="how many closed workflows")
    rp.add_argument("--export", help="also save the histories as JSON into this directory")

    cs = add(sub, "codec-server", cmd_codec_server, "decrypt payloads for the Web UI")
    cs.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    cs.add_argument("--port", type=int, default=8081, help="port to serve on")
    cs.add_argument("--ui-origin", default="http://localhost:8233", help="CORS: the UI's origin")
    cs.add_argument("--tls-cert-file", help="serve HTTPS with this certificate (PEM)")
    cs.add_argument("--tls-key-file", help="the certificate's private key (PEM)")
    cs.add_argument(
        "--tls-client-ca-file", help="mutual TLS: require client certificates from this CA"
    )
    cs.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without SNAPFERRY_CODEC_TOKEN_FILE or mutual TLS (loopback addresses only)",
    )
    add(sub, "codec-key", cmd_codec_key, "print a new AES-256 key for the codec keys file")

    sc = add(sub, "schema", cmd_schema, "write the payload JSON Schemas")
    sc.add_argument("--out", default="schemas", help="directory for the .json files")

    d = add(sub, "demo", cmd_demo, "the main job: demo VM, snapshot, backup, verify, serve")
    d.add_argument("--host", default=default_host(), help="the demo worker's host queue")
    d.add_argument("--size-mib", type=int, default=1024, help="the demo VM's disk size")
