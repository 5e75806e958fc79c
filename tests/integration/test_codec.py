"""Payload encryption end to end: AES-GCM with key rotation, the codec server the Web UI
calls (a token or mutual TLS on every call, CORS for the UI's origin only, no start without
authentication beyond loopback), and histories that hold no plaintext path.

What stays readable without the key, by Temporal's design: search attribute values (the
server indexes VmId, VolumeId... for the UI's filters) and workflow IDs (snapshot UUIDs).
Task queue names would carry host names, so hosts are routed under keyed aliases."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from temporalio.api.common.v1 import Payload
from temporalio.client import Client

from snapferry.activities.contracts import SnapshotState, VmRef, VmSnapshotRequest, new_snapshot_id
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.client import connect
from snapferry.workers.codec import ENCODING, CodecKeyError, EncryptionCodec, KeyRing, new_key
from snapferry.workers.demo_vm import MIB
from snapferry.workers.stack import free_port, port_open, terminate, wait_for_port
from snapferry.workers.worker import running_workers

from .helpers import request_for
from .test_tls import make_ca, make_cert

pytestmark = pytest.mark.integration


def write_keys(path: Path, current: str, keys: dict[str, str]) -> Path:
    path.write_text(json.dumps({"current": current, "keys": keys}))
    path.chmod(0o600)
    return path


def test_rotation_keeps_old_payloads_readable_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    k1, k2 = new_key(), new_key()
    old = EncryptionCodec(KeyRing.from_file(write_keys(tmp_path / "a.json", "k1", {"k1": k1})))
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"image": "/primary/vm1.qcow2"}')
    sealed = old.encrypt(plain)
    assert sealed.metadata["encoding"] == ENCODING and sealed.metadata["encryption-key-id"] == b"k1"
    assert b"/primary" not in sealed.data
    rotated = EncryptionCodec(
        KeyRing.from_file(write_keys(tmp_path / "b.json", "k2", {"k1": k1, "k2": k2}))
    )
    assert rotated.decrypt(sealed) == plain  # written under k1, read after the rotation
    assert rotated.encrypt(plain).metadata["encryption-key-id"] == b"k2"
    only_k2 = EncryptionCodec(KeyRing.from_file(write_keys(tmp_path / "c.json", "k2", {"k2": k2})))
    with pytest.raises(CodecKeyError, match="'k1', which is not loaded"):
        only_k2.decrypt(sealed)
    tampered = Payload(metadata=sealed.metadata, data=sealed.data[:-1] + b"\x00")
    with pytest.raises(InvalidTag):
        rotated.decrypt(tampered)
    assert rotated.decrypt(plain) == plain  # unencrypted (older) payloads pass through
    for bad in (
        {"current": "x", "keys": {}},
        {"keys": {"k": k1}},
        {"current": "k", "keys": {"k": "c2hvcnQ="}},
    ):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(CodecKeyError):
            KeyRing.from_file(tmp_path / "bad.json")


UI = "http://127.0.0.1:8233"
SECRET = b'"web01"'  # what the sealed payload decodes to


def codec_command(port: int, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "snapferry.workers.cli", "codec-server", "--port", str(port)]
    return cmd + ["--ui-origin", UI, *args]


def codec_env(keys: Path, token_file: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFERRY_CODEC_")}
    env["SNAPFERRY_CODEC_KEYS_FILE"] = str(keys)
    if token_file is not None:
        env["SNAPFERRY_CODEC_TOKEN_FILE"] = str(token_file)
    return env


@dataclass
class Codec:
    """A real ``snapferry codec-server`` process on 127.0.0.1, and a sealed payload for it."""

    proc: subprocess.Popen[bytes]
    port: int
    token: str
    body: bytes
    scheme: str = "http"
    context: ssl.SSLContext | None = None

    def request(
        self,
        path: str,
        *,
        method: str = "POST",
        token: str | None = None,
        headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            f"{self.scheme}://127.0.0.1:{self.port}{path}",
            data=self.body if method == "POST" else None,
            headers=sent,
            method=method,
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=context or self.context) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def refused(self, status: int, raw: bytes, headers: dict[str, str]) -> str:
        """The error of a refusal, after checking that nothing was decoded."""
        doc = json.loads(raw)
        assert "payloads" not in doc, doc
        assert base64.b64encode(SECRET) not in raw and SECRET not in raw
        assert headers.get("Content-Type") == "application/json"
        return str(doc["error"])

    def decoded(self, status: int, raw: bytes) -> bytes:
        assert status == 200, raw
        return base64.b64decode(json.loads(raw)["payloads"][0]["data"])

    def output(self) -> str:
        terminate(self.proc.pid)
        assert self.proc.stdout is not None
        return self.proc.stdout.read().decode()


def sealed_body(keys: Path) -> bytes:
    sealed = EncryptionCodec(KeyRing.from_file(keys)).encrypt(
        Payload(metadata={"encoding": b"json/plain"}, data=SECRET)
    )
    payload = {
        "metadata": {k: base64.b64encode(v).decode() for k, v in sealed.metadata.items()},
        "data": base64.b64encode(sealed.data).decode(),
    }
    return json.dumps({"payloads": [payload]}).encode()


def start_codec(
    tmp_path: Path, *args: str, token: str | None = None, scheme: str = "http"
) -> Codec:
    keys = write_keys(tmp_path / "keys.json", "k1", {"k1": new_key()})
    token_file = None
    if token is not None:
        token_file = tmp_path / "codec-token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen(
        codec_command(port, *args),
        env=codec_env(keys, token_file),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=20)
    except TimeoutError:
        terminate(proc.pid)
        assert proc.stdout is not None
        pytest.fail(f"the codec server did not start: {proc.stdout.read().decode()}")
    return Codec(proc=proc, port=port, token=token or "", body=sealed_body(keys), scheme=scheme)


@pytest.fixture
def codec(tmp_path: Path) -> Iterator[Codec]:
    server = start_codec(tmp_path, token=secrets.token_urlsafe(32))
    try:
        yield server
    finally:
        terminate(server.proc.pid)


def test_a_request_without_a_token_is_refused_and_nothing_is_decoded(codec: Codec) -> None:
    for path in ("/decode", "/encode", "/decode?preserveStorageRefs=true"):
        status, headers, raw = codec.request(path, headers={"Origin": UI})
        assert status == 401, (path, raw)
        assert "missing token" in codec.refused(status, raw, headers)
        assert headers["WWW-Authenticate"].startswith("Bearer ")
        assert headers.get("Access-Control-Allow-Origin") == UI  # so the UI can read why
    # The same from a script (no Origin), and to a path that is no operation at all.
    status, headers, raw = codec.request("/decode")
    assert status == 401 and "missing token" in codec.refused(status, raw, headers)
    status, headers, raw = codec.request("/download")
    assert status == 401, "an unknown path tells an unauthenticated caller nothing either"


def test_a_wrong_token_is_refused(codec: Codec) -> None:
    wrong = [
        secrets.token_urlsafe(32),  # another token
        codec.token[:-1],  # all but its last character
        codec.token + "x",
        codec.token.upper() if codec.token.upper() != codec.token else codec.token.lower(),
    ]
    for bad in wrong:
        status, headers, raw = codec.request("/decode", token=bad)
        assert status == 401 and codec.refused(status, raw, headers) == "wrong token"
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        status, headers, raw = codec.request(f"/{bad}/decode")  # as a capability URL
        assert status == 401 and codec.refused(status, raw, headers) == "wrong token"
    for header in (f"Basic {codec.token}", codec.token, "Bearer", "Bearer "):
        status, headers, raw = codec.request("/decode", headers={"Authorization": header})
        assert status == 401, header
        assert "not 'Bearer <token>'" in codec.refused(status, raw, headers), header
    # The right token one level too deep in the path is no capability URL.
    status, headers, raw = codec.request(f"/x/{codec.token}/decode")
    assert status == 401
    assert "a capability URL is /<token>/encode" in codec.refused(status, raw, headers)
    assert codec.token not in codec.output()  # never printed, whatever was sent


def test_the_right_token_decodes_by_header_and_by_capability_url(codec: Codec) -> None:
    assert codec.decoded(*codec.request("/decode", token=codec.token)[::2]) == SECRET
    assert codec.request("/decode")[0] == 401  # the same request without it
    # The capability URL, as the UI calls it: <endpoint>/decode?preserveStorageRefs=true,
    # with or without a trailing slash on the endpoint.
    for path in (
        f"/{codec.token}/decode",
        f"/{codec.token}/decode?preserveStorageRefs=true",
        f"/{codec.token}//decode",
    ):
        status, headers, raw = codec.request(path, headers={"Origin": UI, "X-Namespace": "ns"})
        assert codec.decoded(status, raw) == SECRET, path
        assert headers.get("Access-Control-Allow-Origin") == UI
    # With "pass access token" on, the UI also sends its user's own OIDC token: the right
    # capability URL still decodes.
    status, _, raw = codec.request(f"/{codec.token}/decode", token="eyJ-an-oidc-access-token")
    assert codec.decoded(status, raw) == SECRET
    status, _, raw = codec.request("/encode", token=codec.token)  # the UI's signal/update input
    assert status == 200 and json.loads(raw)["payloads"][0]["metadata"]["encoding"]
    status, headers, raw = codec.request(f"/{codec.token}/download")
    assert status == 404 and codec.token not in codec.refused(status, raw, headers)
    output = codec.output()
    assert "auth: token from SNAPFERRY_CODEC_TOKEN_FILE" in output
    assert codec.token not in output


def test_cors_preflight_answers_the_ui_origin_only(codec: Codec) -> None:
    asked = {"Access-Control-Request-Method": "POST"}
    asked["Access-Control-Request-Headers"] = "authorization,content-type,x-namespace"
    for path in ("/decode", f"/{codec.token}/decode"):
        status, headers, raw = codec.request(
            path, method="OPTIONS", headers={"Origin": UI, **asked}
        )
        assert status == 200 and raw == b""  # a preflight carries no credentials: none needed
        assert headers["Access-Control-Allow-Origin"] == UI
        assert "authorization" in headers["Access-Control-Allow-Headers"]
        assert "POST" in headers["Access-Control-Allow-Methods"]
    evil = {"Origin": "http://evil.example", **asked}
    status, headers, raw = codec.request("/decode", method="OPTIONS", headers=evil)
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert "origin http://evil.example is not allowed" in codec.refused(status, raw, headers)
    status, headers, raw = codec.request("/decode", method="OPTIONS", headers=asked)
    assert status == 403 and "no Origin header" in codec.refused(status, raw, headers)
    # Another origin's page is refused even with the right token (a "simple" request needs
    # no preflight), and is told why; nothing is decoded.
    status, headers, raw = codec.request(
        "/decode", token=codec.token, headers={"Origin": "http://evil.example"}
    )
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert "is not allowed" in codec.refused(status, raw, headers)


@pytest.mark.parametrize(
    "args,token,expected",
    [
        ([], None, "needs authentication: set SNAPFERRY_CODEC_TOKEN_FILE"),
        (["--host", "0.0.0.0"], None, "needs authentication"),
        (["--host", "0.0.0.0", "--insecure-no-auth"], None, "loopback address only"),
        (["--host", "", "--insecure-no-auth"], None, "not on every interface"),
        (["--insecure-no-auth"], "t" * 40, "--insecure-no-auth contradicts"),
        (["--host", "0.0.0.0"], "too-short", "has 9 characters; at least 32"),
        (["--host", "0.0.0.0"], "with/slash/" + "x" * 32, "characters other than"),
        (["--host", "0.0.0.0"], "", "is empty"),
        (["--tls-client-ca-file", "/nonexistent/ca.pem"], None, "needs --tls-cert-file"),
        (["--tls-cert-file", "/nonexistent/c.pem"], "t" * 40, "go together"),
        (
            ["--tls-cert-file", "/nonexistent/c.pem", "--tls-key-file", "/nonexistent/c.key"],
            "t" * 40,
            "cannot load the TLS certificate /nonexistent/c.pem",
        ),
    ],
    ids=[
        "no-token",
        "exposed-no-token",
        "exposed-insecure",
        "every-interface-insecure",
        "token-and-insecure",
        "short-token",
        "token-not-url-safe",
        "empty-token-file",
        "client-ca-without-tls",
        "cert-without-key",
        "unreadable-cert",
    ],
)
def test_the_server_refuses_to_start_exposed_or_without_a_token(
    tmp_path: Path, args: list[str], token: str | None, expected: str
) -> None:
    keys = write_keys(tmp_path / "keys.json", "k1", {"k1": new_key()})
    token_file = None
    if token is not None:
        token_file = tmp_path / "codec-token"
        token_file.write_text(token)
    port = free_port()
    done = subprocess.run(
        codec_command(port, *args),
        env=codec_env(keys, token_file),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("snapferry: error: codec server not started: "), done.stderr
    assert expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not done.stdout
    if token:
        assert token not in done.stderr  # a bad token is described, never shown
    assert not port_open("127.0.0.1", port)  # nothing was bound
    # The missing file is named, too.
    done = subprocess.run(
        codec_command(port, "--host", "0.0.0.0"),
        env=codec_env(keys, tmp_path / "no-such-token"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"cannot read the codec token file {tmp_path / 'no-such-token'}" in done.stderr


def test_insecure_no_auth_serves_loopback_only(tmp_path: Path) -> None:
    codec = start_codec(tmp_path, "--insecure-no-auth")
    try:
        assert codec.decoded(*codec.request("/decode")[::2]) == SECRET
        status, headers, raw = codec.request(f"/{secrets.token_urlsafe(32)}/decode")
        assert status == 404  # no token is configured, so no capability URL either
        assert "NO authentication" in codec.output()
    finally:
        terminate(codec.proc.pid)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki, "ca")
    make_ca(pki, "rogue")
    make_cert(pki, "server", "ca", san="IP:127.0.0.1")
    make_cert(pki, "operator", "ca")
    make_cert(pki, "intruder", "rogue")
    tls = ["--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key")]
    tls += ["--tls-client-ca-file", str(pki / "ca.pem")]

    def client(name: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        if name:
            context.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))
        return context

    codec = start_codec(tmp_path, *tls, scheme="https")
    try:
        status, _, raw = codec.request("/decode", context=client("operator"))
        assert codec.decoded(status, raw) == SECRET
        for name in (None, "intruder"):  # no certificate; one from another CA
            with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
                codec.request("/decode", context=client(name))
        output = codec.output()
        assert "auth: mutual TLS, client certificates from" in output
        assert "dropped a connection from 127.0.0.1" in output and "Traceback" not in output
    finally:
        terminate(codec.proc.pid)
    # TLS and the token together: both are required.
    codec = start_codec(tmp_path, *tls, token=secrets.token_urlsafe(32), scheme="https")
    try:
        operator = client("operator")
        status, headers, raw = codec.request("/decode", context=operator)
        assert status == 401 and "missing token" in codec.refused(status, raw, headers)
        status, _, raw = codec.request("/decode", token=codec.token, context=operator)
        assert codec.decoded(status, raw) == SECRET
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            codec.request("/decode", token=codec.token, context=client(None))
    finally:
        terminate(codec.proc.pid)


async def test_histories_hold_no_plaintext_paths_or_names(
    settings: Settings, make_vm, host_name: str, tmp_path: Path, monkeypatch, dev_server
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps({"current": "k1", "keys": {"k1": new_key()}, "routing_key": new_key()})
    )
    monkeypatch.setenv("SNAPFERRY_CODEC_KEYS_FILE", str(keys))
    client = await connect(settings)  # with the codec
    vm = make_vm(size=16 * MIB, data_bytes=4 * MIB)
    async with running_workers(client, settings, hosts=[host_name], backup=True):
        answer = await starter.create_snapshot(client, request_for(vm.name, host_name, settings))
        record = await starter.wait_settled(client, answer.id)
        assert record.state == SnapshotState.BACKED_UP and record.backup
        vm_snap = await starter.create_vm_snapshot(
            client,
            VmSnapshotRequest(
                snapshot_id=new_snapshot_id(), vm=VmRef(name=vm.name, host=host_name)
            ),
        )
    # What the server stores, read without the key.
    blind = await Client.connect(dev_server.address)
    secrets = {
        str(vm.disk.parent),  # primary paths
        str(settings.secondary),  # secondary paths
        record.backup.checksum.split(":")[-1],  # what was backed up
    }
    exported = []
    async for wf in blind.list_workflows():
        history = await blind.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        exported.append(history.to_json())
    text = "\n".join(exported)
    assert len(exported) >= 3  # the volume snapshot, its backup, the VM snapshot
    for secret in secrets:
        assert secret not in text, f"{secret!r} is in a stored history"
    payloads = json.loads("[" + ",".join(exported) + "]")
    encodings = set()

    plain_at: set[str] = set()

    def walk(node: object, where: str = "") -> None:
        if isinstance(node, dict):
            if "data" in node and "metadata" in node and "encoding" in node["metadata"]:
                encoding = base64.b64decode(node["metadata"]["encoding"])
                encodings.add(encoding)
                if encoding != ENCODING:
                    plain_at.add(where)
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    walk(payloads)

    def without_search_attributes(node: object) -> object:
        if isinstance(node, dict):
            return {
                k: without_search_attributes(v) for k, v in node.items() if k != "searchAttributes"
            }
        if isinstance(node, list):
            return [without_search_attributes(v) for v in node]
        return node

    # Hosts are routed under an alias, so not even a task queue names one; the VM's name is
    # left only where operators filter by it (search attributes).
    rest = json.dumps(without_search_attributes(payloads))
    assert host_name not in text, "a host name is in a stored history"
    assert vm.name not in rest, "a VM name is in a stored history outside its search attributes"
    print(f"\npayload encodings in the stored histories: {sorted(encodings)}")
    # Every payload is ciphertext, except what the server itself must read: search
    # attributes (it indexes them for the UI's filters) and the SDK's patch markers.
    assert ENCODING in encodings
    assert all(
        ".searchAttributes.indexedFields." in where or where.endswith("patch-data.payloads")
        for where in plain_at
    ), plain_at
    assert vm_snap.state == "Ready"
    await asyncio.sleep(0)
