"""The Temporal Web UI in a real browser (Debian's chromium, headless, driven by Selenium
through chromedriver), on a dev server whose payloads are encrypted and whose UI decodes
them through our codec server, authenticated by its capability URL (the token in the
endpoint's path). One screenshot per run is kept in ``test-output/``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapferry.activities.contracts import SnapshotState
from snapferry.activities.settings import Settings
from snapferry.workers import starter
from snapferry.workers.client import connect
from snapferry.workers.codec import KeyRing, new_key
from snapferry.workers.demo_vm import MIB
from snapferry.workers.stack import dev_server_command, free_port, spawn, terminate, wait_for_port
from snapferry.workers.worker import running_workers
from snapferry.workflows.snapshot import DELETE_UPDATE

from .helpers import request_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1500,1100",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()  # chromedriver stops the browser it started


def codec_status(url: str, *, origin: str) -> int:
    """The status of a decode request, made as the browser would but without the token."""
    req = urllib.request.Request(
        url,
        data=b'{"payloads": []}',
        headers={"Content-Type": "application/json", "Origin": origin},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def visible_text(driver) -> str:  # type: ignore[no-untyped-def]
    """The page's text, including the sandboxed frames in which the UI renders markdown
    (a workflow's summary and details)."""
    parts = [driver.execute_script("return document.body.textContent")]
    for frame in driver.find_elements("tag name", "iframe"):
        try:
            driver.switch_to.frame(frame)
            parts.append(driver.execute_script("return document.body.textContent") or "")
        except Exception:  # a frame that went away while the app re-rendered
            pass
        finally:
            driver.switch_to.default_content()
    return "\n".join(parts)


def page_text(driver, url: str, *, expect: list[str], timeout: float = 60) -> str:  # type: ignore[no-untyped-def]
    """Open ``url`` and wait until every string in ``expect`` is on the page (the UI is a
    single-page app that fills itself in after load, and shows payloads in code editors,
    hence ``textContent``); return the page's text."""
    driver.get(url)
    deadline = time.monotonic() + timeout
    while True:
        text = visible_text(driver)
        if all(e in text for e in expect):
            return text
        if time.monotonic() > deadline:
            console = "\n".join(str(e) for e in driver.get_log("browser"))[-3000:]
            raise AssertionError(
                f"{url}: never showed {expect}; it showed:\n{text[:3000]}\nconsole:\n{console}"
            )
        time.sleep(0.3)


async def test_operators_find_filter_and_read_snapshots_in_the_web_ui(
    settings: Settings, make_vm, host_name: str, tmp_path: Path, monkeypatch, browser
) -> None:
    # Encryption on: the keys file for workers, the codec server for the browser. The codec
    # server takes a token (by reference), and the UI, which cannot send a static header,
    # is given the capability URL <codec>/<token> as its codec endpoint.
    keys = tmp_path / "codec-keys.json"
    keys.write_text(json.dumps({"current": "k1", "keys": {"k1": new_key()}}))
    monkeypatch.setenv("SNAPFERRY_CODEC_KEYS_FILE", str(keys))
    token = secrets.token_urlsafe(32)
    token_file = tmp_path / "codec-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    monkeypatch.setenv("SNAPFERRY_CODEC_TOKEN_FILE", str(token_file))
    port, ui, codec_port = free_port(), free_port(), free_port()
    ui_origin = f"http://127.0.0.1:{ui}"
    codec_url = f"http://127.0.0.1:{codec_port}"
    codec = spawn(
        [
            sys.executable,
            "-m",
            "snapferry.workers.cli",
            "codec-server",
            "--port",
            str(codec_port),
            "--ui-origin",
            ui_origin,
        ],
        tmp_path / "codec.log",
    )
    cmd = dev_server_command(db=tmp_path / "ui.db", host="127.0.0.1", port=port, ui_port=ui)
    cmd += ["--ui-ip", "127.0.0.1", "--ui-codec-endpoint", f"{codec_url}/{token}"]
    server = spawn(cmd, tmp_path / "temporal-ui.log")
    try:
        for p in (port, ui, codec_port):
            wait_for_port("127.0.0.1", p)
        # The endpoint the UI decodes through refuses whoever lacks the token.
        assert codec_status(f"{codec_url}/decode", origin=ui_origin) == 401
        assert codec_status(f"{codec_url}/{token[::-1]}/decode", origin=ui_origin) == 401
        local = dataclasses.replace(
            settings, temporal_address=f"127.0.0.1:{port}", backup_rate_limit_bps=3e6
        )
        client = await connect(local)
        vm = make_vm(size=512 * MIB, data_bytes=384 * MIB)
        async with running_workers(client, local, hosts=[host_name], backup=True):
            answer = await starter.create_snapshot(client, request_for(vm.name, host_name, local))
            await starter.wait_for_state(client, answer.id, SnapshotState.BACKING_UP)
            await asyncio.sleep(2)  # a progress signal or two, for the details
            record = await starter.get_record(client, answer.id)
            backup_id = record.backup_workflow_id
            assert backup_id
            base = f"{ui_origin}/namespaces/default/workflows"
            volume = urllib.parse.quote(f'VolumeId="{vm.name}:vda"')
            by_volume = await asyncio.to_thread(
                page_text,
                browser,
                f"{base}?query={volume}",
                expect=[f"volume-snapshot-{answer.id}", backup_id],
            )
            assert "VolumeSnapshot" in by_volume and "BackupSnapshot" in by_volume
            backing_up = urllib.parse.quote('SnapshotState="BackingUp"')
            listed = await asyncio.to_thread(
                page_text, browser, f"{base}?query={backing_up}", expect=[backup_id]
            )
            assert "running" in listed.lower()
            # The backup's page: its summary and, while it runs, the progress bar in its
            # current details (both are payloads: shown decoded by the codec server).
            run_id = (await client.get_workflow_handle(backup_id).describe()).run_id
            detail = await asyncio.to_thread(
                page_text,
                browser,
                f"{base}/{backup_id}/{run_id}/user-metadata",  # the "User Metadata" tab
                expect=[f"Backup of {vm.name}/vda snapshot {answer.id}", "MiB", "attempt 1"],
                timeout=90,
            )
            OUTPUT.mkdir(exist_ok=True)
            browser.save_screenshot(str(OUTPUT / "web-ui-backup.png"))  # type: ignore[attr-defined]
            assert "[#" in detail or "%" in detail  # the progress bar in current details
            # The input payload is ciphertext on the server; the UI shows it decoded,
            # through the codec server, in the operator's browser.
            decoded = await asyncio.to_thread(
                page_text,
                browser,
                f"{base}/volume-snapshot-{answer.id}",
                expect=[vm.name, KeyRing.from_file(keys).host_alias(host_name)],
                timeout=90,
            )
            assert "snapshot_id" in decoded or answer.id in decoded
            # Done looking: delete it, which cancels the (throttled) backup at once.
            gone = await starter.snapshot_operation(client, answer.id, DELETE_UPDATE)
            assert gone.state == SnapshotState.DESTROYED
    finally:
        terminate(server)
        terminate(codec)
    assert token not in (tmp_path / "codec.log").read_text()  # the codec server logs no token
    print(f"\nscreenshot: {OUTPUT / 'web-ui-backup.png'}")
    assert (OUTPUT / "web-ui-backup.png").stat().st_size > 10_000
