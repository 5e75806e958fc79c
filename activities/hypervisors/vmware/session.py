"""The vCenter session: one logged-in pyvmomi connection per process, and vSphere faults
as the project's typed errors."""

from __future__ import annotations

import http.client
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


class VsphereSession:
    """One logged-in pyvmomi connection per process, re-established when it drops."""

    def __init__(self, config: VcenterConfig) -> None:
        self.config = config
        self.endpoint = Endpoint.from_url(config.url, verify_tls=config.verify_tls)
        self._si: Any = None
        self._lock = threading.Lock()

    def service(self, *, fresh: bool = False) -> Any:
        with self._lock:
            if self._si is None or fresh:
                try:
                    self._si = SmartConnect(
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
            return self._si

    def call(self, fn: Callable[[Any], Any], what: str) -> Any:
        """Run ``fn(service_instance)``; log in again once if the session expired."""
        for attempt in (0, 1):
            si = self.service(fresh=attempt == 1)
            try:
                return fn(si)
            except vim.fault.NotAuthenticated:
                if attempt:
                    raise HypervisorUnavailable(f"{what}: vCenter session keeps expiring") from None
            except vmodl.MethodFault as fault:
                raise fault_error(fault, what) from fault
            except OSError as exc:
                raise HypervisorUnavailable(f"{what}: vCenter unreachable: {exc}") from exc
        raise AssertionError("unreachable")

    def cookie(self) -> str:
        return str(self.service()._stub.cookie)

    def connection(self) -> http.client.HTTPConnection:
        return self.endpoint.connection()

    def file_url(self, ds: str, path: str) -> str:
        query = urllib.parse.urlencode({"dcPath": self.config.datacenter, "dsName": ds})
        return f"/folder/{urllib.parse.quote(path)}?{query}"

    def close(self) -> None:
        with self._lock:
            if self._si is not None:
                Disconnect(self._si)
                self._si = None
