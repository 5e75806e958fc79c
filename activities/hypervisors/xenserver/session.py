"""One XAPI session per process, shared by threads; the pool master it follows."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import logging
import re
import socket
import ssl
import threading
import urllib.parse
import xmlrpc.client
from collections.abc import Callable
from typing import Any

import XenAPI

from ...errors import (
    HypervisorUnavailable,
)
from ...settings import XenConfig
from ..endpoint import Endpoint
from .common import (
    _failure_error,
)

log = logging.getLogger(__name__)

_UNREACHABLE = (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError)
# Socket timeouts: an XML-RPC call (long work is an Async call: its task is polled), and a
# login or a probe of a pool member. A fenced master answers nothing at all.
CALL_TIMEOUT_S = 120.0
LOGIN_TIMEOUT_S = 10.0
_METHOD = re.compile(rb"<methodName>([^<]*)</methodName>")


def repeatable(method: str) -> bool:
    """Whether a call may be sent again when its outcome is unknown (the connection broke
    after it went out): a call that only reads (``*.get_*``, ``get_record``,
    ``get_all_records``) or a login, as Xen Orchestra re-sends only read-only calls
    (``packages/xen-api/index.mjs`` l.218-223, l.432-437). Anything else (``Async.*``, a
    snapshot, a destroy, ``set_*``, ``add_to_*``, ``task.create``) may have run once."""
    if method.startswith("Async."):
        return False
    name = method.rpartition(".")[2]
    return name.startswith("get_") or name in ("login_with_password", "logout")


class _Transport(xmlrpc.client.SafeTransport):
    """XML-RPC over HTTP(S) with a socket timeout, and without ``xmlrpc.client``'s silent
    re-send of a request on a kept-alive connection that was reset
    (``Transport.request``: "retry request once if cached connection has gone cold"): the
    request may have run. A call that is not ``repeatable`` goes on a connection opened for
    it, so that a refused connect is known to have sent nothing (``nothing_sent``)."""

    def __init__(self, https: bool, timeout: float, context: ssl.SSLContext | None) -> None:
        super().__init__(context=context)
        self.https, self.timeout = https, timeout
        self.method = ""  # the last request's method
        self.nothing_sent = False  # the last request failed before anything was sent

    def make_connection(  # type: ignore[override]
        self, host: Any
    ) -> http.client.HTTPConnection:
        if self.https:
            conn: http.client.HTTPConnection = super().make_connection(host)
        else:
            conn = xmlrpc.client.Transport.make_connection(self, host)
        conn.timeout = self.timeout
        return conn

    def request(self, host: Any, handler: Any, request_body: Any, verbose: bool = False) -> Any:
        found = _METHOD.search(request_body if isinstance(request_body, bytes) else b"")
        method = self.method = found.group(1).decode() if found else ""
        self.nothing_sent = False
        if repeatable(method):
            return super().request(host, handler, request_body, verbose)
        self.close()  # a connection of its own: no reset of a kept one, no re-send
        try:
            return self.single_request(host, handler, request_body, verbose)
        except ConnectionRefusedError:
            self.nothing_sent = True  # only a connect is refused
            raise


def _connecting(urls: list[str]) -> list[str]:
    """Those of ``urls`` a TCP connection opens to, in their order, all tried at once and
    each within ``LOGIN_TIMEOUT_S``: a host that is off or fenced answers nothing, and
    trying the members one after the other would add up their timeouts."""

    def opens(url: str) -> bool:
        endpoint = Endpoint.from_url(url, verify_tls=False)
        try:
            socket.create_connection((endpoint.host, endpoint.port), LOGIN_TIMEOUT_S).close()
        except OSError:
            return False
        return True

    if not urls:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(urls), 16)) as pool:
        return [u for u, ok in zip(urls, pool.map(opens, urls), strict=True) if ok]


def _xenapi(url: str, verify_tls: bool, timeout: float) -> Any:
    """A ``XenAPI.Session`` at ``url`` on ``_Transport``."""
    https = urllib.parse.urlsplit(url).scheme == "https"
    context = None
    if https and not verify_tls:
        context = ssl._create_unverified_context()
    return XenAPI.Session(url, transport=_Transport(https, timeout, context))


class _Unreachable(Exception):
    """Nothing answered at a URL (refused, reset, timed out): not an answer from XAPI."""


class XapiSession:
    """One logged-in XenAPI session per process, used from many threads at once.

    The XML-RPC transport of a ``XenAPI.Session`` (``xmlrpc.client.ServerProxy``) is not
    thread-safe, so each thread gets its own proxy carrying the one shared session
    reference: concurrent calls of one worker overlap instead of queueing behind a
    process-wide lock (XAPI serves each connection on its own thread). Only login is
    serialised. A proxy never logs in by itself: SESSION_INVALID comes back as XenAPI's
    ``Fault(401)``, and the shared session is renewed once for everyone.

    **The master moves.** A login answered ``HOST_IS_SLAVE [master address]`` goes to that
    master (``xapi_session.ml``). A master that does not answer at all (dead, with HA
    promoting a member: ``xapi_ha.ml`` ``on_master_failure``) is replaced by the first
    other pool member that does, a login there or its HOST_IS_SLAVE naming the new master,
    as Xen Orchestra's ``_failoverToSurvivor`` does. The members are learned from the host
    records at every login. ``Host.address`` is the management IP, which need not be the
    address this worker reaches a host by (NAT, a name): an address XAPI names that cannot
    be reached is tried through the URL we already reached that host by, if any."""

    def __init__(self, config: XenConfig) -> None:
        self.config = config
        self.master_url = config.url  # the pool master; it moves on HOST_IS_SLAVE or failover
        self.endpoint = Endpoint.from_url(config.url, verify_tls=config.verify_tls)
        self._ref: str | None = None  # the shared session reference
        self._lock = threading.Lock()  # guards login and the reference
        self._local = threading.local()
        self.members: list[str] = []  # the other pool hosts' URLs, from their host records
        self._reached: dict[str, str] = {}  # Host.address -> the URL that host answered at
        # Logins so far. Tasks are not in the database a master starts from (datamodel.ml
        # l.628-633, PersistNothing), nor are sessions: a task made before the current
        # session may be lost with the master it ran on (see ``XenCore._task_api``).
        self.generation = 0

    # -- login, following the master ------------------------------------------------------
    def _login(self) -> Any:
        """A session of the pool master: the one we talk to, else the first other member
        (the configured URL last) that answers, or the master it names."""
        self.generation += 1
        try:
            return self._login_via(self.master_url)
        except _Unreachable as exc:
            first = exc
        tried = {self.master_url}
        candidates = [u for u in dict.fromkeys([*self.members, self.config.url]) if u not in tried]
        tried.update(candidates)
        for url in _connecting(candidates):
            try:
                session = self._login_via(url)
            except _Unreachable:
                continue
            log.warning("XenServer: %s does not answer; now using %s", sorted(tried), url)
            return session
        raise HypervisorUnavailable(
            f"XenServer: no pool member answers (tried {', '.join(sorted(tried))}): {first}"
        )

    def _login_via(self, url: str) -> Any:
        """A login at ``url``, following HOST_IS_SLAVE (a few hops at most)."""
        targets = [url]
        for _ in range(3):
            session, named = self._login_first(targets)
            if session is not None:
                return session
            targets = self._urls_of(named)
        raise HypervisorUnavailable(f"XenServer at {url}: no pool master answers")

    def _login_first(self, targets: list[str]) -> tuple[Any, str]:
        """A login at the first of ``targets`` that answers: the session (now the master's),
        or ``(None, address)`` for a HOST_IS_SLAVE naming the master's address."""
        unreachable: list[str] = []
        for url in targets:
            session = _xenapi(url, self.config.verify_tls, LOGIN_TIMEOUT_S)
            try:
                session.xenapi.login_with_password(
                    self.config.user, self.config.password(), "2.0", "snapferry"
                )
            except XenAPI.Failure as exc:
                details = [str(x) for x in exc.details]
                if len(details) >= 2 and details[0] == "HOST_IS_SLAVE" and details[1]:
                    return None, details[1]
                raise _failure_error(exc, f"logging in to {url}") from exc
            except _UNREACHABLE as exc:
                unreachable.append(f"{url}: {exc}")
                continue
            self._use(url)
            self._learn(session, url)
            return session, ""
        raise _Unreachable("; ".join(unreachable) or "no address")

    def _urls_of(self, address: str) -> list[str]:
        """Where to reach a host XAPI names by its address: the address, with the scheme
        and port we use; then the URL that host answered at before, if another."""
        urls = [self._address_url(address)]
        if (known := self._reached.get(address)) and known not in urls:
            urls.append(known)
        return urls

    def _address_url(self, address: str) -> str:
        parts = urllib.parse.urlsplit(self.config.url)
        if address.count(":") > 1 and not address.startswith("["):  # an IPv6 literal
            address = f"[{address}]"
        if parts.port and not re.search(r":\d+$", address.rsplit("]", 1)[-1]):
            address = f"{address}:{parts.port}"
        return f"{parts.scheme or 'https'}://{address}"

    def _use(self, url: str) -> None:
        """Talk to the master at ``url``: XML-RPC (the proxies follow, ``_proxy``) and HTTP."""
        self.master_url = url
        self.endpoint = Endpoint.from_url(url, verify_tls=self.config.verify_tls)

    def _learn(self, session: Any, url: str) -> None:
        """The pool's hosts as the master we logged in to lists them, for a failover, and
        the address XAPI gives that master, which we reach at ``url``. Best effort: a pool
        we cannot list keeps what we knew."""
        try:
            this = session.xenapi.session.get_this_host(session._session)
            hosts = session.xenapi.host.get_all_records()
            address = str(hosts[this]["address"])
        except (XenAPI.Failure, xmlrpc.client.Fault, KeyError, *_UNREACHABLE) as exc:
            log.info("XenServer: cannot list the pool's hosts at %s: %s", url, exc)
            return
        # One URL leads to one host: a name that follows the master (a DNS alias, a load
        # balancer) led to another host before, and no longer does.
        for other in [a for a, u in self._reached.items() if u == url and a != address]:
            del self._reached[other]
        self._reached[address] = url
        members: list[str] = []
        for ref, record in hosts.items():
            if ref != this:
                members += [u for u in self._urls_of(str(record["address"])) if u not in members]
        self.members = members

    def reached_at(self, address: str) -> str | None:
        """The URL at which the host XAPI gives ``address`` (``Host.address``) answered
        us, if it did."""
        return self._reached.get(address)

    def reachable(self, endpoint: Endpoint, address: str, bare: str | None = None) -> Endpoint:
        """``endpoint`` (the address XAPI names: ``Host.address``, a 302's Location) when a
        TCP connection to it opens (nothing is requested: no export is started); else the
        URL that host answered us at (``address``, or ``bare``: the address without a
        port), if any, else ``endpoint`` all the same (its failure is the answer)."""
        try:
            socket.create_connection((endpoint.host, endpoint.port), LOGIN_TIMEOUT_S).close()
            return endpoint
        except OSError:
            pass
        known = self.reached_at(address) or (self.reached_at(bare) if bare else None)
        if known:
            return Endpoint.from_url(known, verify_tls=endpoint.verify_tls)
        return endpoint

    def _failed_over(self, url: str) -> bool:
        """After a call to ``url`` got no answer: whether the master is now elsewhere (we
        are logged in there). The master is asked first; only when it does not answer
        either are the other members tried."""
        with self._lock:
            if self.master_url != url:
                return True  # another thread moved already
            ref = self._ref
            try:
                probe = _xenapi(url, self.config.verify_tls, LOGIN_TIMEOUT_S)
                probe._session = ref
                probe.xenapi.session.get_this_host(ref)
                return False  # it answers: the call met a passing fault
            except (XenAPI.Failure, xmlrpc.client.Fault):
                return False  # it answers (our session may be gone: the 401 path renews it)
            except _UNREACHABLE:
                pass
            self._ref = None
            self._ref = str(self._login()._session)
            return self.master_url != url

    def _proxy(self) -> Any:
        """This thread's proxy, logged in as the shared session."""
        ref = self.session_ref()
        proxy = getattr(self._local, "proxy", None)
        if proxy is None or getattr(self._local, "url", None) != self.master_url:
            proxy = _xenapi(self.master_url, self.config.verify_tls, CALL_TIMEOUT_S)
            self._local.proxy, self._local.url = proxy, self.master_url
        proxy._session = ref
        return proxy

    def _renew(self, stale: str | None) -> None:
        """A new shared session, unless another thread renewed it already."""
        with self._lock:
            if self._ref == stale:
                self._ref = str(self._login()._session)

    def call(self, fn: Callable[[Any], Any], what: str) -> Any:
        """``fn(session.xenapi)`` with XAPI failures mapped to our errors."""
        for attempt in range(3):
            proxy = self._proxy()
            ref, url = proxy._session, self._local.url
            try:
                return fn(proxy.xenapi)
            except XenAPI.Failure as exc:
                details = [str(x) for x in exc.details]
                # HOST_IS_SLAVE when the master failed over: log in at the master, once.
                if attempt == 0 and len(details) >= 2 and details[0] == "HOST_IS_SLAVE":
                    with self._lock:
                        if self._ref == ref:
                            self._ref = None
                            self._use(self._urls_of(details[1])[0])
                    continue
                raise _failure_error(exc, what) from exc
            except xmlrpc.client.Fault as exc:
                if exc.faultCode == 401 and attempt < 2:  # SESSION_INVALID: XenAPI's 401
                    self._renew(ref)
                    continue
                # not XAPI's envelope: a proxy in between, a bad URL
                raise HypervisorUnavailable(f"{what}: XML-RPC fault {exc.faultString}") from exc
            except _UNREACHABLE as exc:
                self._local.proxy = None  # a broken connection: a new proxy next time
                moved = self._failed_over(url)
                # A call that only reads goes to the new master again; so does one whose
                # connection was refused (``_Transport``: nothing was sent). Any other
                # call cut by a break may have run: its outcome is unknown, and the
                # caller's retry decides (it finds what the call made by its marks).
                transport = proxy.transport
                again = repeatable(transport.method) or transport.nothing_sent
                if moved and again and attempt < 2:
                    continue
                where = f" (the pool master is now {self.master_url})" if moved else ""
                raise HypervisorUnavailable(f"{what}: XenServer unreachable: {exc}{where}") from exc
        raise HypervisorUnavailable(f"{what}: the session or the pool master kept changing")

    def relogin(self) -> None:
        """A fresh session (an HTTP 401: XenAPI re-logs in only for XML-RPC calls)."""
        self._renew(self._ref)

    def session_ref(self) -> str:
        with self._lock:
            if self._ref is None:
                self._ref = str(self._login()._session)
            return self._ref

    def connection(self) -> http.client.HTTPConnection:
        return self.endpoint.connection()

    def url(self, endpoint: str, **params: str) -> str:
        query = urllib.parse.urlencode({"session_id": self.session_ref(), **params})
        return f"/{endpoint}?{query}"


def _redirect_target(session: XapiSession, location: str, vdi: str) -> tuple[Endpoint, str]:
    """XAPI's 302 (``Importexport.return_302_redirect``) names the host that sees the VDI's
    SR, with the request's path and query (so the session goes along; added if missing)."""
    parts = urllib.parse.urlsplit(location)
    if not parts.hostname:
        raise HypervisorUnavailable(f"VDI {vdi}: bad redirect {location!r}")
    scheme = parts.scheme or session.endpoint.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    endpoint = Endpoint(scheme, parts.hostname, port, session.endpoint.verify_tls)
    # that Host.address need not be reachable from here (NAT): then the URL that host
    # answered us at (XAPI's Location is an address with no port)
    bare = parts.hostname if parts.port is None else None
    endpoint = session.reachable(endpoint, parts.netloc, bare)
    if "session_id" not in urllib.parse.parse_qs(parts.query):
        extra = urllib.parse.urlencode({"session_id": session.session_ref()})
        parts = parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra)
    return endpoint, f"{parts.path or '/export_raw_vdi'}?{parts.query}"


def _drop_task(session: XapiSession, task: str) -> None:
    """Destroy a task made for an HTTP call (``task_id=``). XAPI removes a task destroyed
    while pending only once it ends (xapi_task.ml ``destroy``), and a request that failed
    before it adopted the task (a 500 before the headers, a 401, a 302: those run in a
    task of their own, export_raw_vdi.ml ``handler``) never ends it; such a task is set
    ``cancelled`` first (``task.set_status``), so that the destroy removes it. Errors are
    ignored: XAPI drops a stale task by itself (24 h pending, 65 min ended)."""

    def drop(xenapi: Any) -> None:
        if xenapi.task.get_status(task) in ("pending", "cancelling"):
            xenapi.task.set_status(task, "cancelled")
        xenapi.task.destroy(task)

    with contextlib.suppress(Exception):
        session.call(drop, "task.destroy")
