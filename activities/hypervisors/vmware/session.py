"""The vCenter session: one logged-in pyvmomi connection per process, and vSphere faults
as the project's typed errors."""

from __future__ import annotations

import contextlib
import http.client
import logging
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from ...errors import (
    CredentialsRejected,
    HypervisorUnavailable,
    InvalidInput,
    PermissionDenied,
    PrimaryStoreFull,
    SourceGone,
)
from ...settings import VcenterConfig
from ..endpoint import Endpoint

log = logging.getLogger(__name__)


def fault_error(fault: Any, what: str) -> Exception:
    """A vSphere fault as our typed error: missing files, missing privileges and full
    datastores are permanent (an operator must act; a retry of a clone would copy the disk
    again only to fail the same way), the rest transient.

    ``NoPermission`` carries ``privilegeId``, "The privilege identifier required" (vSphere
    API reference, vim.fault.NoPermission), which the error names; ``NoDiskSpace`` ("an
    operation fails because of insufficient disk space") its ``datastore``."""
    message = getattr(fault, "msg", None) or type(fault).__name__
    if isinstance(fault, vim.fault.InvalidLogin):
        return CredentialsRejected(f"vCenter rejected the credentials: {message}")
    if isinstance(fault, vim.fault.NoPermission):
        missing = [
            p for m in getattr(fault, "missingPrivileges", None) or [] for p in m.privileges or []
        ]
        names = [getattr(fault, "privilegeId", None), *missing]
        privileges = ", ".join(dict.fromkeys(n for n in names if n))
        on = getattr(getattr(fault, "object", None), "_moId", None)
        return PermissionDenied(
            f"{what}: the vCenter login lacks the privilege {privileges or '(not named)'}"
            f"{f' on {on}' if on else ''}: grant it to the login's role ({message})"
        )
    if isinstance(
        fault,
        vim.fault.NoDiskSpace | vim.fault.InsufficientDisks | vim.fault.InsufficientStorageSpace,
    ):
        where = getattr(fault, "datastore", None)
        return PrimaryStoreFull(
            f"{what}: {type(fault).__name__}: {message}"
            f"{f' (datastore {where})' if where else ''}: free space there, then try again"
        )
    if isinstance(fault, vim.fault.FileNotFound | vim.fault.NotFound):
        return SourceGone(f"{what}: {type(fault).__name__}: {message}")
    if isinstance(fault, vim.fault.InvalidPowerState):
        return InvalidInput(f"{what}: the VM is in the wrong power state ({message})")
    if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
        return SourceGone(f"{what}: the object is gone ({message})")
    return HypervisorUnavailable(f"{what}: {type(fault).__name__}: {message}")


def file_access_denied(verb: str, ds: str, path: str) -> PermissionDenied:
    """A ``/folder`` transfer answered 403: HTTP access to a datastore file needs
    Datastore.Browse and Datastore.FileManagement on the datacenter and the datastore
    ("Privilege Requirements for HTTP Access", vSphere Web Services SDK Programming
    Guide). Permanent until an operator grants them, so never retried."""
    return PermissionDenied(
        f"datastore {verb} of [{ds}] {path} answered 403 Forbidden: the vCenter login lacks"
        f" the privileges Datastore.Browse and Datastore.FileManagement on datastore {ds}"
        " (and its datacenter): grant them to the login's role"
    )


class VsphereSession:
    """One logged-in pyvmomi connection per process: one stub, logged in again in place
    when vCenter drops its session.

    vCenter ends a session after it has been idle for a while (30 minutes by default:
    virt-v2v renews its cookie because "VMware authentication expires after 30 minutes",
    input/vCenter.ml; govmomi's simulator expires a session ``SessionIdleTimeout`` after
    its last SOAP call, simulator/session_manager.go ``expiredSession``), when vpxd
    restarts, or when an administrator terminates it. A pyvmomi managed object is bound
    to the stub it came from (``ManagedObject.__init__(self, moId, stub=None, ...)``,
    pyVmomi/VmomiSupport.py), so a new ``SmartConnect`` would leave every object the
    operation holds (its VM, its clone task) on the dead session. The login goes again
    over the *same* stub instead, which takes the new session's cookie from the answer's
    ``Set-Cookie`` (SoapStubAdapter.InvokeMethod), so every object bound to it works on;
    pyVim's own ``VimSessionOrientedStub`` logs in again the same way
    (``makeUserLoginMethod``: ``si.content.sessionManager.Login`` on the same soapStub).
    That class is not used: it also re-sends a call after a socket error, which for a
    ``CloneVM_Task`` whose answer was lost would start a second full clone.

    The session being replaced is logged out first (``SessionManager.Logout``; a no-op
    fault when it has already expired), so that vpxd, whose sessions are a bounded
    resource, never holds two of this process's. Several threads that meet the same dead
    session renew it once: a renewal asked for with a cookie that is no longer the
    current one only means the caller should use the new one."""

    def __init__(self, config: VcenterConfig) -> None:
        self.config = config
        self.endpoint = Endpoint.from_url(config.url, verify_tls=config.verify_tls)
        self._si: Any = None
        self._lock = threading.Lock()
        self.renewals = 0  # logins after the first (tests and logs count them)

    def service(self) -> Any:
        with self._lock:
            if self._si is None:
                self._si = self._connect()
            return self._si

    def _connect(self) -> Any:
        try:
            return SmartConnect(
                protocol=self.endpoint.scheme,
                host=self.endpoint.host,
                port=self.endpoint.port,
                user=self.config.user,
                pwd=self.config.password(),
                disableSslCertValidation=not self.config.verify_tls,
            )
        except vim.fault.InvalidLogin as exc:
            raise CredentialsRejected(
                f"vCenter {self.config.url} rejected user {self.config.user!r}"
            ) from exc
        except OSError as exc:
            raise HypervisorUnavailable(
                f"cannot reach vCenter at {self.config.url}: {exc}"
            ) from exc

    def renew(self, stale_cookie: str | None) -> None:
        """Log in again on the same stub, unless the session that failed with
        ``stale_cookie`` was already replaced (by another thread): see the class."""
        with self._lock:
            si = self._si
            if si is None:
                self._si = self._connect()
                return
            if stale_cookie is not None and str(si._stub.cookie) != stale_cookie:
                return
            try:
                manager = si.RetrieveContent().sessionManager  # needs no session
                with contextlib.suppress(vmodl.MethodFault):
                    manager.Logout()  # NotAuthenticated once it has expired
                manager.Login(userName=self.config.user, password=self.config.password())
            except vim.fault.InvalidLogin as exc:
                raise CredentialsRejected(
                    f"vCenter {self.config.url} rejected user {self.config.user!r} when its"
                    " session was renewed (was the password changed?)"
                ) from exc
            except vmodl.MethodFault as fault:
                raise fault_error(fault, "logging in to vCenter again") from fault
            except OSError as exc:
                raise HypervisorUnavailable(
                    f"cannot reach vCenter at {self.config.url}: {exc}"
                ) from exc
            self.renewals += 1
            log.info("vCenter session renewed (%d so far)", self.renewals)

    def call(self, fn: Callable[[Any], Any], what: str) -> Any:
        """Run ``fn(service_instance)``; log in again once if the session expired."""
        for attempt in (0, 1):
            si = self.service()
            seen = str(si._stub.cookie)
            try:
                return fn(si)
            except vim.fault.NotAuthenticated:
                if attempt:
                    raise HypervisorUnavailable(f"{what}: vCenter session keeps expiring") from None
                self.renew(seen)
            except vmodl.MethodFault as fault:
                raise fault_error(fault, what) from fault
            except OSError as exc:
                raise HypervisorUnavailable(f"{what}: vCenter unreachable: {exc}") from exc
        raise AssertionError("unreachable")

    def cookie(self) -> str:
        """The session cookie for a datastore transfer (``/folder``), which sends it as
        its ``Cookie`` header (pyVmomi sends the same value, SoapAdapter.InvokeMethod)."""
        return str(self.service()._stub.cookie)

    def live_cookie(self) -> str:
        """The cookie of a session known to be alive now: before a transfer that cannot be
        sent twice cheaply (a PUT of a whole disk), whose 401 would come only after its
        body. ``SessionManager.currentSession`` is unset, or NotAuthenticated, once the
        session has expired (pyVim's makeUserLoginMethod logs in when it is unset)."""
        current = self.call(
            lambda si: si.RetrieveContent().sessionManager.currentSession,
            "checking the vCenter session",
        )
        if current is None:
            self.renew(self.cookie())
        return self.cookie()

    def transfer(self, send: Callable[[str], Any], status: Callable[[Any], int]) -> Any:
        """``send(cookie)`` over ``/folder``; if it answers 401 (the session expired since,
        whatever the transfer), log in again and send it once more with the new cookie."""
        cookie = self.cookie()
        answer = send(cookie)
        if status(answer) != 401:
            return answer
        self.renew(cookie)
        return send(self.cookie())

    def connection(self) -> http.client.HTTPConnection:
        return self.endpoint.connection()

    def file_url(self, ds: str, path: str) -> str:
        query = urllib.parse.urlencode({"dcPath": self.config.datacenter, "dsName": ds})
        return f"/folder/{urllib.parse.quote(path)}?{query}"

    def close(self) -> None:
        with self._lock:
            if self._si is not None:
                with contextlib.suppress(Exception):
                    Disconnect(self._si)
                self._si = None
