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
an operator's browser; it answers CORS only for the UI's own origin.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import PayloadCodec

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
        """The name a host is routed under while encryption is on, so that no history
        (task queue names are not payloads) carries a host name. Keyed with the file's
        ``routing_key``, which must never change while workflows run (unlike the
        encryption keys, which rotate); without one, a plain SHA-256."""
        import hashlib
        import hmac

        if self.routing_key:
            digest = hmac.new(self.routing_key, host.encode(), hashlib.sha256).hexdigest()
        else:
            digest = hashlib.sha256(host.encode()).hexdigest()
        return f"h{digest[:20]}"

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


def routed_host(host: str) -> str:
    """``host`` as it is routed: its alias when encryption is on, else itself."""
    ring = KeyRing.from_env()
    return ring.host_alias(host) if ring else host


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


def _codec_handler(codec: EncryptionCodec, ui_origin: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """Temporal's remote codec protocol: a JSON ``{"payloads": [...]}`` in and out."""

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

        def do_OPTIONS(self) -> None:  # noqa: N802 (the http.server naming)
            self.send_response(200 if self.headers.get("Origin") == ui_origin else 403)
            self._cors()
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            op = urlsplit(self.path).path.rstrip("/").rsplit("/", 1)[-1]  # ?query ignored
            if op not in ("encode", "decode"):
                return self._reply(404, {"error": f"unknown path {self.path}"})
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

        def _reply(self, status: int, doc: dict) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self._cors()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # payloads are secrets; keep them (and their sizes) out of logs

    return Handler


def codec_server(ring: KeyRing, *, host: str, port: int, ui_origin: str) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), _codec_handler(EncryptionCodec(ring), ui_origin))
