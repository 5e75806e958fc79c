"""XapiSession over real sockets: what is sent again after the connection to the master
breaks. XAPI may have run a call whose reply was lost (the master's xapi exits on an HA or
designated transition, ``xapi_ha.ml`` l.142-162, ``xapi_pool_transition.ml`` l.190-203);
only calls that read nothing but state are sent again, as Xen Orchestra re-sends only
read-only calls on ECONNRESET (``packages/xen-api/index.mjs`` l.218-223, l.432-437).
CPython's ``xmlrpc.client.Transport.request`` re-sends once by itself on a kept-alive
connection that was reset ("retry request once if cached connection has gone cold")."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import xmlrpc.client
from typing import Any

import pytest

from snapferry.activities.errors import HypervisorUnavailable
from snapferry.activities.hypervisors.xenserver import session as xsession
from snapferry.activities.hypervisors.xenserver.session import XapiSession


class FakeMaster:
    """Answers XML-RPC with XAPI's envelope (``{"Status": "Success", "Value": …}``) and
    records each call it read; on ``die_on`` it reads the call, then closes the
    connection and stops listening, as a master whose xapi exits after running it."""

    def __init__(
        self,
        ran: list[tuple[int, str]],
        die_on: str | None = None,
        values: dict[str, Any] | None = None,
    ) -> None:
        self.ran, self.die_on, self.values = ran, die_on, values or {}
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(5)
        self.port = self.srv.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._loop, daemon=True).start()

    def stop(self) -> None:
        """Stop listening (a connect is refused), also for a thread blocked in accept."""
        with contextlib.suppress(OSError):
            self.srv.shutdown(socket.SHUT_RDWR)
        self.srv.close()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                ch = f.read(1)
                if not ch:
                    conn.close()
                    return
                head += ch
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            method = xmlrpc.client.loads(f.read(length))[1] or ""
            self.ran.append((self.port, method))
            if method == self.die_on:
                self.stop()
                conn.close()
                return
            body = xmlrpc.client.dumps(
                ({"Status": "Success", "Value": self.values.get(method, "OpaqueRef:x")},),
                methodresponse=True,
            ).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n"
                % len(body)
                + body
            )


class Config:
    """What XapiSession reads of XenConfig."""

    def __init__(self, url: str) -> None:
        self.url, self.verify_tls, self.user = url, False, "root"

    def password(self) -> str:
        return "x"


def failed_over_to(s: XapiSession, new: str) -> Any:
    """What ``_failed_over`` does once a member answers as the new master."""

    def failed_over(url: str) -> bool:
        s._use(new)
        s._ref = "OpaqueRef:session2"
        return True

    return failed_over


def session_at(url: str) -> XapiSession:
    s = XapiSession(Config(url))  # type: ignore[arg-type]
    s._ref = "OpaqueRef:session"
    return s


@pytest.mark.parametrize(
    "method",
    ["VM.snapshot", "Async.VDI.snapshot", "VDI.destroy", "VDI.add_to_other_config"],
)
def test_a_call_xapi_read_before_the_master_went_away_is_not_sent_again(method: str) -> None:
    ran: list[tuple[int, str]] = []
    old = FakeMaster(ran, die_on=method)
    new = FakeMaster(ran)
    s = session_at(old.url)
    s.call(lambda x: x.VM.get_power_state("OpaqueRef:vm"), "VM.get_power_state")  # kept
    s._failed_over = failed_over_to(s, new.url)  # type: ignore[method-assign]
    cls, _, name = method.rpartition(".")

    def fn(x: Any) -> Any:
        target = x
        for part in cls.split("."):
            target = getattr(target, part)
        return getattr(target, name)("OpaqueRef:vm", "arg")

    with pytest.raises(HypervisorUnavailable, match="unreachable"):
        s.call(fn, method)
    assert [m for _, m in ran].count(method) == 1, ran


def test_a_read_cut_by_the_master_going_away_is_read_again_at_the_new_master() -> None:
    ran: list[tuple[int, str]] = []
    old = FakeMaster(ran, die_on="task.get_status")
    new = FakeMaster(ran)
    s = session_at(old.url)
    s.call(lambda x: x.VM.get_power_state("OpaqueRef:vm"), "VM.get_power_state")
    s._failed_over = failed_over_to(s, new.url)  # type: ignore[method-assign]
    assert s.call(lambda x: x.task.get_status("OpaqueRef:t"), "task.get_status") == "OpaqueRef:x"
    assert (new.port, "task.get_status") in ran


def test_a_refused_connection_sends_nothing_so_any_call_goes_to_the_new_master() -> None:
    """A call that is not repeatable goes on a connection of its own, opened for it: a
    refused connect is then known to have sent nothing."""
    ran: list[tuple[int, str]] = []
    old = FakeMaster(ran)
    new = FakeMaster(ran)
    s = session_at(old.url)
    s.call(lambda x: x.VM.get_power_state("OpaqueRef:vm"), "VM.get_power_state")
    old.stop()
    s._failed_over = failed_over_to(s, new.url)  # type: ignore[method-assign]
    s.call(lambda x: x.VM.snapshot("OpaqueRef:vm", "snap"), "VM.snapshot")
    assert [m for _, m in ran].count("VM.snapshot") == 1
    assert (new.port, "VM.snapshot") in ran


def test_repeatable_calls() -> None:
    for method in ("VM.get_record", "host.get_all_records", "task.get_status", "pool.get_all"):
        assert xsession.repeatable(method), method
    for method in (
        "VM.snapshot",
        "Async.VM.get_record",
        "VDI.destroy",
        "VDI.set_name_label",
        "VDI.add_to_other_config",
        "task.create",
    ):
        assert not xsession.repeatable(method), method


def test_a_master_that_answers_nothing_times_out() -> None:
    """A fenced master answers nothing: a call ends within the call timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)  # connects complete into the backlog; nothing is ever read or answered
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    s = session_at(url)
    s._failed_over = lambda url: False  # type: ignore[method-assign]
    start = time.monotonic()
    old = xsession.CALL_TIMEOUT_S
    xsession.CALL_TIMEOUT_S = 1.0
    try:
        with pytest.raises(HypervisorUnavailable):
            s.call(lambda x: x.task.get_status("OpaqueRef:t"), "task.get_status")
    finally:
        xsession.CALL_TIMEOUT_S = old
        srv.close()
    assert time.monotonic() - start < 10


class Silent:
    """A host that answers nothing, as one powered off or fenced (``xapi_ha.ml``
    l.2129-2150, "self-fence"): its listen queue is full, so a connect hangs."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(0)
        self.fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(self.srv.getsockname())
            self.fillers.append(filler)
        self.url = f"http://127.0.0.1:{self.srv.getsockname()[1]}"

    def close(self) -> None:
        for one in [*self.fillers, self.srv]:
            one.close()


def test_pool_members_that_answer_nothing_cost_one_timeout_in_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The master is gone and three members answer nothing: they are tried at once,
    each within the login timeout, so the member that answers is reached after about
    one timeout, not three."""
    monkeypatch.setattr(xsession, "LOGIN_TIMEOUT_S", 1.0)
    silent = [Silent() for _ in range(3)]
    time.sleep(0.2)
    with pytest.raises(OSError):  # the premise: a connect hangs
        socket.create_connection(("127.0.0.1", silent[0].srv.getsockname()[1]), 0.5)
    ran: list[tuple[int, str]] = []
    good = FakeMaster(ran, values={"host.get_all_records": {}})
    gone = FakeMaster(ran)
    gone.stop()
    s = XapiSession(Config(gone.url))  # type: ignore[arg-type]
    s.members = [one.url for one in silent] + [good.url]
    start = time.monotonic()
    try:
        s._login()
    finally:
        for one in silent:
            one.close()
    assert s.master_url == good.url
    assert time.monotonic() - start < 2.5
