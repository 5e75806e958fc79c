"""One way to get a Temporal client: the pydantic converter every payload needs, optional
payload encryption, and TLS, mutual TLS or an API key for a Temporal cluster.

Connection security comes from the environment, by reference, and is the same for workers
and the CLI:

* ``SNAPFERRY_TEMPORAL_TLS_CA_FILE``: trust this CA (TLS on). ``SNAPFERRY_TEMPORAL_TLS=1``
  turns TLS on with the system's roots instead.
* ``SNAPFERRY_TEMPORAL_TLS_CERT_FILE`` + ``SNAPFERRY_TEMPORAL_TLS_KEY_FILE``: mutual TLS.
* ``SNAPFERRY_TEMPORAL_TLS_SERVER_NAME``: the name to verify, if not the address's host.
* ``SNAPFERRY_TEMPORAL_API_KEY_FILE`` (or ``SNAPFERRY_TEMPORAL_API_KEY``): an API key.
* ``SNAPFERRY_CODEC_KEYS_FILE``: encrypt every payload (see :mod:`workers.codec`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig

from snapferry.activities.settings import Settings

from .codec import EncryptionCodec, KeyRing
from .converter import DATA_CONVERTER


def _read(var: str) -> bytes | None:
    path = os.environ.get(var)
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConnectionError(f"{var}={path}: {exc.strerror}") from exc


def tls_config() -> TLSConfig | bool:
    ca = _read("SNAPFERRY_TEMPORAL_TLS_CA_FILE")
    cert = _read("SNAPFERRY_TEMPORAL_TLS_CERT_FILE")
    key = _read("SNAPFERRY_TEMPORAL_TLS_KEY_FILE")
    if (cert is None) != (key is None):
        raise ConnectionError(
            "mutual TLS needs both SNAPFERRY_TEMPORAL_TLS_CERT_FILE and _KEY_FILE"
        )
    if ca is None and cert is None and os.environ.get("SNAPFERRY_TEMPORAL_TLS") != "1":
        return False
    return TLSConfig(
        server_root_ca_cert=ca,
        client_cert=cert,
        client_private_key=key,
        domain=os.environ.get("SNAPFERRY_TEMPORAL_TLS_SERVER_NAME") or None,
    )


def api_key() -> str | None:
    key = _read("SNAPFERRY_TEMPORAL_API_KEY_FILE")
    if key is not None:
        return key.decode().strip()
    return os.environ.get("SNAPFERRY_TEMPORAL_API_KEY") or None


def data_converter() -> DataConverter:
    ring = KeyRing.from_env()
    if ring is None:
        return DATA_CONVERTER
    return dataclasses.replace(DATA_CONVERTER, payload_codec=EncryptionCodec(ring))


def client_options() -> dict[str, Any]:
    return {"tls": tls_config(), "api_key": api_key(), "data_converter": data_converter()}


async def connect(
    settings: Settings, *, wait_s: float = 15.0, runtime: Runtime | None = None
) -> Client:
    """Connect, retrying for ``wait_s``: a server that has just opened its port answers
    "Frontend is not healthy yet" for a moment, and workers may start before it. A TLS
    handshake that fails for good (a wrong certificate) fails fast with the reason."""
    options = client_options()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await Client.connect(
                settings.temporal_address,
                namespace=settings.namespace,
                runtime=runtime or Runtime.default(),
                **options,
            )
        except RuntimeError as exc:
            if time.monotonic() > deadline or "certificate" in str(exc).lower():
                raise ConnectionError(
                    f"cannot connect to Temporal at {settings.temporal_address}: {exc}"
                ) from exc
            await asyncio.sleep(0.2)
