"""Shared HTTP plumbing for the request-handler mixins (keep-alive safe replies)."""

from __future__ import annotations

import os
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import SimServer


class ReplyHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with Content-Length on every reply, because XenAPI.py keeps connections."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the second waits for
    # the client's delayed ACK (40 ms on Linux) on every call. XAPI's replies do not.
    disable_nagle_algorithm = True
    server: SimServer

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("XAPI_SIM_VERBOSE"):
            super().log_message(format, *args)

    def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
