"""Payload encryption end to end: AES-GCM with key rotation, the codec server the Web UI
calls (CORS for the UI's origin only), and histories that hold no plaintext path.

What stays readable without the key, by Temporal's design: search attribute values (the
server indexes VmId, VolumeId... for the UI's filters) and workflow IDs (snapshot UUIDs).
Task queue names would carry host names, so hosts are routed under keyed aliases."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from temporalio.api.common.v1 import Payload
from temporalio.client import Client

from activities.contracts import SnapshotState, VmRef, VmSnapshotRequest, new_snapshot_id
from activities.settings import Settings
from workers import starter
from workers.client import connect
from workers.codec import ENCODING, CodecKeyError, EncryptionCodec, KeyRing, new_key
from workers.demo_vm import MIB
from workers.stack import free_port, terminate, wait_for_port
from workers.worker import running_workers

from .helpers import request_for

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


def test_codec_server_decodes_for_the_ui_origin_only(tmp_path: Path, monkeypatch) -> None:
    keys = write_keys(tmp_path / "keys.json", "k1", {"k1": new_key()})
    monkeypatch.setenv("SNAPFERRY_CODEC_KEYS_FILE", str(keys))
    port = free_port()
    ui = "http://127.0.0.1:8233"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "codec-server",
            "--port",
            str(port),
            "--ui-origin",
            ui,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port)
        codec = EncryptionCodec(KeyRing.from_file(keys))
        secret = Payload(metadata={"encoding": b"json/plain"}, data=b'"web01"')
        sealed = codec.encrypt(secret)
        body = json.dumps(
            {
                "payloads": [
                    {
                        "metadata": {
                            k: base64.b64encode(v).decode() for k, v in sealed.metadata.items()
                        },
                        "data": base64.b64encode(sealed.data).decode(),
                    }
                ]
            }
        ).encode()

        def post(path: str, origin: str) -> tuple[int, dict, dict]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}",
                data=body,
                headers={"Content-Type": "application/json", "Origin": origin},
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, dict(resp.headers), json.loads(resp.read())
            except urllib.error.HTTPError as err:
                return err.code, dict(err.headers), json.loads(err.read() or b"{}")

        status, headers, doc = post("/decode", ui)
        assert status == 200 and headers.get("Access-Control-Allow-Origin") == ui
        assert base64.b64decode(doc["payloads"][0]["data"]) == b'"web01"'
        status, headers, _ = post("/decode", "http://evil.example")
        assert "Access-Control-Allow-Origin" not in headers  # a browser will refuse it
        preflight = urllib.request.Request(
            f"http://127.0.0.1:{port}/decode",
            method="OPTIONS",
            headers={"Origin": "http://evil.example"},
        )
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(preflight, timeout=10)
        assert denied.value.code == 403
        status, _, doc = post("/encode", ui)  # encode works too (the UI's signal/update input)
        assert status == 200 and doc["payloads"][0]["metadata"]["encoding"]
    finally:
        terminate(proc.pid)


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
