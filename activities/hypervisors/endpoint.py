"""Where a hypervisor manager (vCenter, a XenServer pool master) listens, and plain HTTP(S)
connections to it for the data paths its SOAP or XML-RPC API does not carry (datastore
files, VDI export and import)."""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    verify_tls: bool

    @classmethod
    def from_url(cls, url: str, *, verify_tls: bool) -> Endpoint:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme or "https"
        port = parts.port or (443 if scheme == "https" else 80)
        return cls(scheme, parts.hostname or "127.0.0.1", port, verify_tls)

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        """A new connection; certificate checks follow ``verify_tls`` (off only for
        managers with self-signed certificates, as an operator chooses)."""
        if self.scheme == "https":
            ctx = ssl.create_default_context()
            if not self.verify_tls:
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)
