"""TLS and mutual TLS to Temporal. The dev server has no TLS options, so the test puts a
TLS-terminating proxy (tests/tls_proxy.py; stunnel cannot offer the ALPN h2 that gRPC needs)
in front of it, started here and stopped by its PID, with certificates made by openssl.
The right certificates connect, for workers and CLI alike; wrong ones fail fast and clearly.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from snapferry.activities.settings import Settings
from snapferry.workers.client import connect
from snapferry.workers.stack import free_port, spawn, terminate, wait_for_port

from ..conftest import snapferry_cli

pytestmark = pytest.mark.integration


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        cwd=d,
    )


def make_cert(d: Path, name: str, ca: str, *, san: str | None = None) -> None:
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=d,
    )
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext.name,
        "-out",
        f"{name}.pem",
        cwd=d,
    )


@pytest.fixture
def tls_proxy(tmp_path: Path, dev_server) -> tuple[Path, int]:
    """TLS on a free port, client certificates from our CA required, forwarding to the
    dev server."""
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d, "ca")
    make_ca(d, "rogue")
    make_cert(d, "server", "ca", san="DNS:temporal.test,IP:127.0.0.1")
    make_cert(d, "worker", "ca")
    make_cert(d, "intruder", "rogue")
    port = free_port()
    cmd = [sys.executable, "-m", "tests.tls_proxy", "--port", str(port)]
    cmd += ["--target", dev_server.address, "--ca", str(d / "ca.pem")]
    cmd += ["--cert", str(d / "server.pem"), "--key", str(d / "server.key")]
    pid = spawn(cmd, tmp_path / "tls-proxy.log")
    try:
        wait_for_port("127.0.0.1", port)
        yield d, port
    finally:
        terminate(pid)


async def test_mutual_tls_connects_and_wrong_certificates_fail_cleanly(
    settings: Settings, tls_proxy: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    pki, port = tls_proxy
    through_tls = replace(settings, temporal_address=f"127.0.0.1:{port}")
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_ADDRESS", through_tls.temporal_address)
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_TLS_CA_FILE", str(pki / "ca.pem"))
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_TLS_SERVER_NAME", "temporal.test")
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_TLS_CERT_FILE", str(pki / "worker.pem"))
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_TLS_KEY_FILE", str(pki / "worker.key"))

    client = await connect(through_tls, wait_s=5)  # what a worker does
    assert [w async for w in client.list_workflows()] == []
    listed = await snapferry_cli("snapshot", "list", "--json")  # what the CLI does
    assert listed.returncode == 0 and listed.stdout.strip() == "[]", listed.stderr

    # A client certificate from another CA: the proxy refuses the handshake.
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_TLS_CERT_FILE", str(pki / "intruder.pem"))
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_TLS_KEY_FILE", str(pki / "intruder.key"))
    refused = await snapferry_cli("snapshot", "list", timeout=60)
    assert refused.returncode == 1 and "cannot connect to Temporal" in refused.stderr, refused

    # A server we do not trust (our CA file is the rogue one): the client refuses it.
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_TLS_CERT_FILE", str(pki / "worker.pem"))
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_TLS_KEY_FILE", str(pki / "worker.key"))
    monkeypatch.setenv("SNAPFERRY_TEMPORAL_TLS_CA_FILE", str(pki / "rogue.pem"))
    untrusted = await snapferry_cli("snapshot", "list", timeout=60)
    assert untrusted.returncode == 1 and "cannot connect to Temporal" in untrusted.stderr
    assert "Traceback" not in untrusted.stderr + refused.stderr

    # Half a client identity is a configuration error, said as such.
    monkeypatch.delenv("SNAPFERRY_TEMPORAL_TLS_KEY_FILE")
    half = await snapferry_cli("snapshot", "list")
    assert half.returncode == 1 and "needs both" in half.stderr
