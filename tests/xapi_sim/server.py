"""HTTP front end: XML-RPC on ``POST /``, XAPI data endpoints, test control on ``/sim``.

One ThreadingHTTPServer on 127.0.0.1 with a thread per connection, so a throttled
export never blocks the XML-RPC calls a test makes while it runs.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from .control_api import ControlHandler
from .http_data import DataHandler
from .model import Store
from .xmlrpc_api import XapiService

RPC_PATHS = ("/", "/RPC2")  # XenAPI.Session("http://host:port") posts to /RPC2


class SimServer(ThreadingHTTPServer):
    """Loopback-only server holding the simulator's state."""

    daemon_threads = True

    def __init__(
        self, port: int, root: Path, user: str, password: str, *, member_of: SimServer | None = None
    ) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        if member_of is None:  # the pool master; its member serves on a port of its own
            self.store = Store(root, user, password)
            self.host_ref = self.store.host_ref
            self.member = SimServer(0, root, user, password, member_of=self)
            threading.Thread(target=self.member.serve_forever, daemon=True).start()
        else:  # a pool member: the same database, its own host and local SR
            self.store = member_of.store
            self.host_ref = self.store.host2_ref
        self.store.host_address[self.host_ref] = f"127.0.0.1:{self.server_address[1]}"
        self.store.servers[self.host_ref] = self
        self.xapi = XapiService(self.store, self.host_ref)
        self._up = threading.Event()  # set while a host that went down is back
        self._closing = False

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serves until closed; a host that goes down (``go_down``) stops listening, so
        that connecting to it is refused, and listens again on the same port once up."""
        while True:
            super().serve_forever(poll_interval)
            while not self._up.wait(1.0):
                if self._closing:
                    return
            self._up.clear()

    def go_down(self) -> None:
        """A dead host: nothing listens on its port any more (a connect is refused), and
        connections already open are reset at their next request (``Handler``)."""
        self.shutdown()
        self.socket.close()

    def come_up(self) -> None:
        self.socket = socket.socket(self.address_family, self.socket_type)
        self.server_bind()
        self.server_activate()
        self._up.set()

    def server_close(self) -> None:
        self._closing = True
        if getattr(self, "member", None) is not None:
            self.member.shutdown()
            self.member.server_close()
        super().server_close()


class Handler(DataHandler, ControlHandler):
    """Routes by path; everything not listed here is a 404. A host that is down answers
    nothing: the connection is reset."""

    def _down(self) -> bool:
        if self.server.host_ref not in self.server.store.down:
            return False
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        return True

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:  # noqa: N802
        if self._down():
            return
        path = urlsplit(self.path).path
        if path == "/export_raw_vdi":
            self.export_raw_vdi()
        elif path.startswith("/sim/"):
            self.sim_get(path[len("/sim/") :])
        else:
            self._reply(404, b"not found")

    def do_PUT(self) -> None:  # noqa: N802
        if self._down():
            return
        if urlsplit(self.path).path == "/import_raw_vdi":
            self.import_raw_vdi()
        else:
            self.close_connection = True
            self._reply(404, b"not found")

    def do_POST(self) -> None:  # noqa: N802
        if self._down():
            return
        path = urlsplit(self.path).path
        body = self._body()
        if path in RPC_PATHS:
            self._reply(200, self.server.xapi.handle(body), "text/xml")
        elif path.startswith("/sim/"):
            try:
                self.sim_post(path[len("/sim/") :], json.loads(body or b"{}"))
            except (KeyError, TypeError, ValueError) as exc:
                self._json(400, {"error": f"bad control request: {exc!r}"})
        else:
            self._reply(404, b"not found")
