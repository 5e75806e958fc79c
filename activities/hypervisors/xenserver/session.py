"""One XAPI session per process, shared by threads; the pool master it follows."""

from __future__ import annotations

import contextlib
import http.client
import re
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


class XapiSession:
    """One logged-in XenAPI session per process, used from many threads at once.

    The XML-RPC transport of a ``XenAPI.Session`` (``xmlrpc.client.ServerProxy``) is not
    thread-safe, so each thread gets its own proxy carrying the one shared session
    reference: concurrent calls of one worker overlap instead of queueing behind a
    process-wide lock (XAPI serves each connection on its own thread). Only login is
    serialised. A proxy never logs in by itself: SESSION_INVALID comes back as XenAPI's
    ``Fault(401)``, and the shared session is renewed once for everyone."""

    def __init__(self, config: XenConfig) -> None:
        self.config = config
        self.master_url = config.url  # the pool master; it moves on HOST_IS_SLAVE
        self.endpoint = Endpoint.from_url(config.url, verify_tls=config.verify_tls)
        self._ref: str | None = None  # the shared session reference
        self._lock = threading.Lock()  # guards login and the reference
        self._local = threading.local()

    def _login(self) -> Any:
        for _ in range(3):
            session = XenAPI.Session(self.master_url, ignore_ssl=not self.config.verify_tls)
            try:
                session.xenapi.login_with_password(
                    self.config.user, self.config.password(), "2.0", "snapferry"
                )
            except XenAPI.Failure as exc:
                if self._follow_master(exc):
                    continue
                raise _failure_error(exc, f"logging in to {self.master_url}") from exc
            except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
                raise HypervisorUnavailable(
                    f"cannot reach XenServer at {self.master_url}: {exc}"
                ) from exc
            return session
        raise HypervisorUnavailable(f"XenServer at {self.master_url}: no pool master answers")

    def _follow_master(self, exc: XenAPI.Failure) -> bool:
        """``HOST_IS_SLAVE [master address]``: this host is a pool member now (a master
        failover); talk to the master it names, with the configured scheme and port."""
        details = [str(x) for x in exc.details]
        if len(details) < 2 or details[0] != "HOST_IS_SLAVE" or not details[1]:
            return False
        parts = urllib.parse.urlsplit(self.master_url)
        address = details[1]
        if address.count(":") > 1 and not address.startswith("["):  # an IPv6 literal
            address = f"[{address}]"
        if parts.port and not re.search(r":\d+$", address.rsplit("]", 1)[-1]):
            address = f"{address}:{parts.port}"
        self.master_url = f"{parts.scheme or 'https'}://{address}"
        self.endpoint = Endpoint.from_url(self.master_url, verify_tls=self.config.verify_tls)
        self._ref = None  # the proxies follow: _proxy() compares their URL
        return True

    def _proxy(self) -> Any:
        """This thread's proxy, logged in as the shared session."""
        ref = self.session_ref()
        proxy = getattr(self._local, "proxy", None)
        if proxy is None or getattr(self._local, "url", None) != self.master_url:
            proxy = XenAPI.Session(self.master_url, ignore_ssl=not self.config.verify_tls)
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
            ref = proxy._session
            try:
                return fn(proxy.xenapi)
            except XenAPI.Failure as exc:
                # HOST_IS_SLAVE when the master failed over: follow it, once.
                if attempt == 0 and self._follow_master(exc):
                    continue
                raise _failure_error(exc, what) from exc
            except xmlrpc.client.Fault as exc:
                if exc.faultCode == 401 and attempt < 2:  # SESSION_INVALID: XenAPI's 401
                    self._renew(ref)
                    continue
                # not XAPI's envelope: a proxy in between, a bad URL
                raise HypervisorUnavailable(f"{what}: XML-RPC fault {exc.faultString}") from exc
            except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
                self._local.proxy = None  # a broken connection: a new proxy next time
                raise HypervisorUnavailable(f"{what}: XenServer unreachable: {exc}") from exc
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
