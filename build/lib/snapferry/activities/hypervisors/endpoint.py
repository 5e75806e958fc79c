"""Where a hypervisor manager (vCenter, a XenServer pool master) listens, and plain HTTP(S)
connections to it for the data paths its SOAP or XML-RPC API does not carry (datastore
files, VDI export and import)."""

from __future__ import annotations

import hashlib
import http.client
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..errors import HypervisorUnavailable

IO_CHUNK = 8 * 1024 * 1024


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

    def put_file(self, url: str, source: Path, headers: dict[str, str]) -> tuple[int, bytes, str]:
        """Stream ``source`` with a PUT; (status, start of the body, SHA-256 of what was
        sent), so that the caller can read it back and compare before trusting it."""
        digest = hashlib.sha256()
        conn = self.connection()
        try:
            conn.putrequest("PUT", url)
            for name, value in {
                "Content-Length": str(source.stat().st_size),
                "Content-Type": "application/octet-stream",
                **headers,
            }.items():
                conn.putheader(name, value)
            conn.endheaders()
            with open(source, "rb") as f:
                while block := f.read(IO_CHUNK):
                    digest.update(block)
                    conn.send(block)
            resp = conn.getresponse()
            return resp.status, resp.read()[:200], digest.hexdigest()
        except (OSError, http.client.HTTPException) as exc:
            raise HypervisorUnavailable(f"PUT {url.split('?')[0]} failed: {exc}") from exc
        finally:
            conn.close()

    def get_sha256(self, url: str, headers: dict[str, str]) -> tuple[int, str]:
        """(status, SHA-256 of the body) of a GET: the read-back half of a verified write."""
        digest = hashlib.sha256()
        conn = self.connection()
        try:
            conn.request("GET", url, None, headers)
            resp = conn.getresponse()
            while block := resp.read(IO_CHUNK):
                digest.update(block)
            return resp.status, digest.hexdigest()
        except (OSError, http.client.HTTPException) as exc:
            raise HypervisorUnavailable(f"GET {url.split('?')[0]} failed: {exc}") from exc
        finally:
            conn.close()
