"""``python -m tests.xapi_sim --port P --root DIR [--user U --password-file F]``.

Binds 127.0.0.1 only and prints ``ready <port>`` once listening (``--port 0`` picks
a free port). The password comes from a file so it never shows up in ``ps``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .server import SimServer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.xapi_sim")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--root", type=Path, required=True, help="VDI files live under it")
    ap.add_argument("--user", default="root")
    ap.add_argument("--password-file", type=Path)
    args = ap.parse_args(argv)
    password = args.password_file.read_text().rstrip("\r\n") if args.password_file else ""
    args.root.mkdir(parents=True, exist_ok=True)
    server = SimServer(args.port, args.root, args.user, password)
    # SIGTERM -> SystemExit so serve_forever unwinds and the socket is closed cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"ready {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
