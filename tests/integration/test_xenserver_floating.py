"""The configured URL is a name that follows the pool master (a DNS alias, a load
balancer), through the real XenAPI client and tests/xapi_sim. XAPI's 302 always names the
host that sees the SR by its ``Host.address`` (``importexport.ml`` ``return_302_redirect``,
``export_raw_vdi.ml`` l.133-135, ``import_raw_vdi.ml`` l.259-261)."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import replace

import pytest

from snapferry.activities.contracts import BackupPlan, new_snapshot_id
from snapferry.activities.hypervisors.xenserver import XenServerDriver
from snapferry.workers.demo_vm import MIB
from tests.xapi_sim.control import create_vm, guest_write, list_hosts, set_pool

from ..conftest import Xapi
from .test_xenserver_failover import take_allowing_one_retry, volume
from .test_xenserver_xapi import read_all

pytestmark = pytest.mark.integration


class FloatingName:
    """A TCP forwarder standing in for a name that follows the pool master (a DNS alias,
    a load-balanced name): the configured URL, whichever host it leads to."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(50)
        self.url = f"http://127.0.0.1:{self.srv.getsockname()[1]}"
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                client, _ = self.srv.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for one in (a, b):
                with contextlib.suppress(OSError):
                    one.shutdown(socket.SHUT_RDWR)


def test_a_redirect_goes_to_the_address_xapi_names_when_the_configured_name_moved(
    xapi: Xapi,
) -> None:
    """The configured URL follows the master. After a designated change it leads to host
    2, which answers an export of host 1's local VDI with a 302 to host 1's Host.address
    (``export_raw_vdi.ml`` l.133-135, ``Importexport.return_302_redirect``): reachable,
    so that is where the export goes, not back to the configured name (host 2 again)."""
    hosts = {h["host"]: h for h in list_hosts(xapi.port)}
    name = FloatingName(hosts[1]["port"])
    settings = replace(xapi.settings, xen=replace(xapi.settings.xen, url=name.url))
    d = XenServerDriver(settings)
    create_vm(xapi.port, "fl01", [4 * MIB])  # host 1's local SR
    guest_write(xapi.port, "fl01", 0, b"local")
    snap = d.take(volume=volume("fl01"), snapshot_id=new_snapshot_id())
    set_pool(xapi.port, master=2, down=[])  # designated: host 1 is a slave, alive
    name.target = hosts[2]["port"]
    snap = take_allowing_one_retry(d, "fl01")
    image, _ = read_all(d.open_reader(snap, BackupPlan()))
    assert image[:5] == b"local"
    assert len(set(d.session._reached.values())) == len(d.session._reached), d.session._reached
