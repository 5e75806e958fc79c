"""Payload encryption: AES-256-GCM with key rotation, and the codec server for the Web UI.

Every payload (inputs, results, records, signals, update arguments) is serialised by the
pydantic converter, then encrypted here before it leaves the process, so the Temporal server
and its database only ever hold ciphertext: no snapshot path, VM name or host in a payload.

Keys come from a JSON file named by ``SNAPFERRY_CODEC_KEYS_FILE``::

    {"current": "2026-11", "keys": {"2026-10": "<base64 32 bytes>", "2026-11": "<...>"},
     "routing_key": "<base64, never rotated>"}

New payloads are encrypted with ``current``; the key ID travels in the payload's metadata,
so payloads written under an older key still decrypt after a rotation, as long as that key
stays in the file. Retire a key only once no open workflow history still needs it.

Hosts are routed under an alias while encryption is on (``KeyRing.host_alias``): task queue
names are not payloads, and ``snapferry-host-<name>`` would otherwise show every host's
name in every history. The starter and the workers apply it, so workflows never see it.

``snapferry codec-server`` serves Temporal's remote codec protocol (``POST /encode``,
``POST /decode``) so that the Web UI (``--ui-codec-endpoint``) can show decrypted payloads to
an operator's browser; it answers CORS only for the UI's own origin. CORS only restrains
browsers, so the server is no open decryption oracle: every ``/encode`` and ``/decode`` must
carry the token of ``SNAPFERRY_CODEC_TOKEN_FILE`` (as ``Authorization: Bearer <token>``, or in
the path of the capability URL ``http://host:port/<token>/decode`` that the UI, which cannot
send a static header, is given as its codec endpoint), or come over mutual TLS
(``--tls-client-ca-file``). Without either it refuses to start, unless ``--insecure-no-auth``
is given for a loopback address. It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import PayloadCodec

from snapferry.workflows.routing import host_alias

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12


class CodecKeyError(Exception):
    """The keys file is missing, malformed, or lacks the key a payload names."""


@dataclass(frozen=True)
class KeyRing:
    current: str
    keys: dict[str, bytes]
    routing_key: bytes | None = None

    def host_alias(self, host: str) -> str:
        """See :func:`workflows.routing.host_alias`."""
        return host_alias(host, self.routing_key)

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        try:
            raw = json.loads(Path(path).read_text())
            keys = {kid: base64.b64decode(value) for kid, value in raw["keys"].items()}
            current = raw["current"]
            routing = base64.b64decode(raw["routing_key"]) if raw.get("routing_key") else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CodecKeyError(f"cannot read codec keys from {path}: {exc}") from exc
        if current not in keys:
            raise CodecKeyError(f"codec keys file {path}: current key {current!r} is not in it")
        bad = [kid for kid, key in keys.items() if len(key) != 32]
        if bad:
            raise CodecKeyError(f"codec keys file {path}: keys {bad} are not 32 bytes (AES-256)")
        return cls(current=current, keys=keys, routing_key=routing)

    @classmethod
    def from_env(cls) -> KeyRing | None:
        path = os.environ.get("SNAPFERRY_CODEC_KEYS_FILE")
        return cls.from_file(path) if path else None


def new_key() -> str:
    """A fresh AES-256 key, base64, for the keys file."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


class EncryptionCodec(PayloadCodec):
    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    def encrypt(self, payload: Payload) -> Payload:
        kid = self.ring.current
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.ring.keys[kid]).encrypt(
            nonce, payload.SerializeToString(), kid.encode()
        )
        return Payload(metadata={"encoding": ENCODING, KEY_ID: kid.encode()}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # written before encryption was turned on
        kid = payload.metadata.get(KEY_ID, b"").decode()
        if kid not in self.ring.keys:
            raise CodecKeyError(f"payload was encrypted with key {kid!r}, which is not loaded")
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        return Payload.FromString(AESGCM(self.ring.keys[kid]).decrypt(nonce, sealed, kid.encode()))

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]


# -- the codec server's authentication ---------------------------------------------------------
TOKEN_FILE_ENV = "SNAPFERRY_CODEC_TOKEN_FILE"
TOKEN_MIN_CHARS = 32
# RFC 3986 unreserved characters only: the token is also a path segment of the capability URL.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~-]+")
OPERATIONS = ("encode", "decode")
DRAIN_LIMIT = 1 << 20  # the body of a refused request is read (and dropped) up to this size


class CodecAuthError(Exception):
    """The codec server's authentication is missing, unsafe or unreadable: it does not start."""


def read_token(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace dropped). Errors name the file and what is
    wrong with it, never its content."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CodecAuthError(f"cannot read the codec token file {path}: {reason}") from exc
    if not token:
        raise CodecAuthError(f"the codec token file {path} is empty")
    if not _TOKEN_CHARS.fullmatch(token):
        raise CodecAuthError(
            f"the codec token file {path} holds characters other than A-Z a-z 0-9 . _ ~ - "
            "(the token is also a path segment of the capability URL)"
        )
    if len(token) < TOKEN_MIN_CHARS:
        raise CodecAuthError(
            f"the codec token in {path} has {len(token)} characters; at least "
            f"{TOKEN_MIN_CHARS} are needed (`openssl rand -hex 32` makes one)"
        )
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "" (every interface), 0.0.0.0 is an address; other names: not trusted
        return False


@dataclass(frozen=True)
class CodecAuth:
    """How the codec server authenticates its callers. Every configured check must pass."""

    token: str | None = field(default=None, repr=False)  # never in a repr, a log or a message
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # mutual TLS: a client certificate from this CA is required
    insecure_no_auth: bool = False

    @property
    def authenticated(self) -> bool:
        return bool(self.token or self.client_ca)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @classmethod
    def from_env(
        cls,
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        client_ca: str | None = None,
        insecure_no_auth: bool = False,
    ) -> CodecAuth:
        path = os.environ.get(TOKEN_FILE_ENV)
        return cls(
            token=read_token(path) if path else None,
            tls_cert=Path(tls_cert) if tls_cert else None,
            tls_key=Path(tls_key) if tls_key else None,
            client_ca=Path(client_ca) if client_ca else None,
            insecure_no_auth=insecure_no_auth,
        )

    def describe(self, host: str, port: int) -> str:
        """What the startup line says about authentication (the token itself never)."""
        if self.insecure_no_auth:
            return "NO authentication (--insecure-no-auth, loopback only)"
        parts = []
        if self.token:
            parts.append(
                f"token from {TOKEN_FILE_ENV} as 'Authorization: Bearer <token>' or the "
                f"capability URL {self.scheme}://{host}:{port}/<token>"
            )
        if self.client_ca:
            parts.append(f"mutual TLS, client certificates from {self.client_ca}")
        return " and ".join(parts)


def startup_problem(host: str, auth: CodecAuth) -> str | None:
    """Why a codec server with ``auth`` must not serve on ``host``, or None. The same rule the
    server applies at startup checks the deployment files offline (tests/unit/test_deploy.py)."""
    if auth.client_ca and not auth.tls_cert:
        return "--tls-client-ca-file needs --tls-cert-file and --tls-key-file (mutual TLS is TLS)"
    if bool(auth.tls_cert) != bool(auth.tls_key):
        return "--tls-cert-file and --tls-key-file go together"
    if auth.insecure_no_auth:
        if auth.authenticated:
            given = f"{TOKEN_FILE_ENV}" if auth.token else "--tls-client-ca-file"
            return f"--insecure-no-auth contradicts {given}: give one or the other"
        if not is_loopback(host):
            return (
                f"--insecure-no-auth is allowed on a loopback address only (127.0.0.1, ::1, "
                f"localhost), not on {host or 'every interface'}: set {TOKEN_FILE_ENV} to a "
                "token file (or use --tls-client-ca-file) to serve other interfaces"
            )
        return None
    if not auth.authenticated:
        return (
            "the codec server decrypts for whoever reaches it, so it needs authentication: set "
            f"{TOKEN_FILE_ENV} to a file holding a token (at least {TOKEN_MIN_CHARS} of "
            "A-Z a-z 0-9 . _ ~ -; `openssl rand -hex 32` makes one), or give "
            "--tls-client-ca-file (with --tls-cert-file, --tls-key-file) for mutual TLS; "
            "--insecure-no-auth serves a loopback address without either"
        )
    return None


def _tls_context(auth: CodecAuth) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(auth.tls_cert), str(auth.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise CodecAuthError(
            f"cannot load the TLS certificate {auth.tls_cert} with key {auth.tls_key}: {exc}"
        ) from exc
    if auth.client_ca:
        try:
            context.load_verify_locations(cafile=str(auth.client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise CodecAuthError(
                f"cannot load the client CA {auth.client_ca} for mutual TLS: {exc}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _codec_handler(
    codec: EncryptionCodec, ui_origin: str, auth: CodecAuth
) -> type[BaseHTTPRequestHandler]:
    token = auth.token.encode() if auth.token else None

    class Handler(BaseHTTPRequestHandler):
        """Temporal's remote codec protocol: a JSON ``{"payloads": [...]}`` in and out."""

        timeout = 60  # a client that stalls (in the TLS handshake too) is dropped

        def setup(self) -> None:
            super().setup()
            if isinstance(self.request, ssl.SSLSocket):
                # Here, in the request's thread, not in accept(): a slow or refused handshake
                # (no client certificate, another CA) holds up no other client.
                self.request.do_handshake()

        def _cors(self) -> None:
            # Only the Web UI's own origin may call us from a browser.
            if self.headers.get("Origin") == ui_origin:
                self.send_header("Access-Control-Allow-Origin", ui_origin)
                self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
                # Whatever headers the UI's preflight asks for (X-Namespace, Caller-Type...).
                requested = self.headers.get("Access-Control-Request-Headers")
                self.send_header(
                    "Access-Control-Allow-Headers",
                    requested or "Content-Type, X-Namespace, Authorization",
                )
                self.send_header("Access-Control-Allow-Credentials", "true")
                self.send_header("Vary", "Origin")

        def _foreign_origin(self) -> str | None:
            """The refusal for a browser page of another origin than the UI's, or None."""
            origin = self.headers.get("Origin")
            if origin is None or origin == ui_origin:
                return None
            return f"origin {origin} is not allowed: this codec server answers {ui_origin} only"

        def do_OPTIONS(self) -> None:  # noqa: N802 (the http.server naming)
            # A CORS preflight never carries credentials, and decrypts nothing: no token here.
            if self.headers.get("Origin") is None:
                return self._reply(403, {"error": "not a CORS preflight: no Origin header"})
            refused = self._foreign_origin()
            if refused:
                return self._reply(403, {"error": refused})
            self.send_response(200)
            self._cors()
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _authenticate(self, prefix: list[str]) -> str | None:
            """The refusal (401) for a request without the right token, or None. Mutual TLS,
            when configured, was already required by the handshake."""
            if token is None:
                return None
            presented: list[str] = []
            header = self.headers.get("Authorization")
            malformed = False
            if header is not None:
                scheme, _, value = header.strip().partition(" ")
                if scheme.lower() == "bearer" and value.strip():
                    presented.append(value.strip())
                else:
                    malformed = True
            if len(prefix) == 1:  # the capability URL: /<token>/decode
                presented.append(prefix[0])
            # Each one compared, in constant time; one right token is enough (the UI may send
            # its user's own OIDC access token in the header along with the capability URL).
            matches = [hmac.compare_digest(p.encode("utf-8"), token) for p in presented]
            if any(matches):
                return None
            if presented:
                return "wrong token"
            if len(prefix) > 1:
                return "no token: a capability URL is /<token>/encode or /<token>/decode"
            if malformed:
                return "the Authorization header is not 'Bearer <token>'"
            return (
                "missing token: send 'Authorization: Bearer <token>', or call the capability "
                f"URL {auth.scheme}://<this host>/<token>/{'|'.join(OPERATIONS)}"
            )

        def do_POST(self) -> None:  # noqa: N802
            refused = self._foreign_origin()
            if refused:
                return self._refuse(403, refused)
            parts = [p for p in urlsplit(self.path).path.split("/") if p]  # ?query ignored
            op, prefix = (parts[-1], parts[:-1]) if parts else ("", [])
            problem = self._authenticate(prefix)
            if problem:
                return self._refuse(401, problem)
            if op not in OPERATIONS or len(prefix) > (1 if token else 0):
                # The path is not echoed: it may hold a token.
                return self._refuse(404, "unknown path: only /encode and /decode are served")
            try:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                payloads = json_format.Parse(body, Payloads())
                fn = codec.encrypt if op == "encode" else codec.decrypt
                out = Payloads(payloads=[fn(p) for p in payloads.payloads])
            except (CodecKeyError, ValueError, json_format.ParseError) as exc:
                return self._reply(400, {"error": str(exc)})
            except Exception as exc:  # a tampered ciphertext (InvalidTag) and the like
                return self._reply(400, {"error": f"cannot {op}: {type(exc).__name__}"})
            self._reply(200, json.loads(json_format.MessageToJson(out)))

        def _refuse(self, status: int, error: str) -> None:
            """Refuse before anything is decoded; the body is read and dropped, so that the
            client reads the answer rather than a reset connection."""
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            if 0 < length <= DRAIN_LIMIT:
                self.rfile.read(length)
            extra = {}
            if status == 401:
                challenge = 'Bearer realm="snapferry codec server"'
                if error == "wrong token":
                    challenge += ', error="invalid_token"'
                extra["WWW-Authenticate"] = challenge
            self._reply(status, {"error": error}, extra)

        def _reply(
            self, status: int, doc: dict[str, Any], extra: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self._cors()
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # payloads are secrets, and so is the path of a capability URL: log nothing

    return Handler


class _CodecHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, OSError)):  # a refused handshake, a dropped client
            reason = getattr(exc, "reason", None) or exc
            print(
                f"codec server: dropped a connection from {client_address[0]}: {reason}",
                file=sys.stderr,
                flush=True,
            )
        else:
            super().handle_error(request, client_address)


class _CodecHTTPServer6(_CodecHTTPServer):
    address_family = socket.AF_INET6


def codec_server(
    ring: KeyRing, *, host: str, port: int, ui_origin: str, auth: CodecAuth
) -> ThreadingHTTPServer:
    """The codec server, bound but not yet serving. Raises CodecAuthError, before binding
    anything, for a configuration that would serve unauthenticated beyond loopback or whose
    TLS files do not load."""
    problem = startup_problem(host, auth)
    if problem:
        raise CodecAuthError(problem)
    context = _tls_context(auth) if auth.tls_cert else None
    server_class = _CodecHTTPServer6 if ":" in host else _CodecHTTPServer
    server = server_class((host, port), _codec_handler(EncryptionCodec(ring), ui_origin, auth))
    if context is not None:
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    return server
