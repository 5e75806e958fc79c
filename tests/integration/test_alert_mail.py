"""Alerts by mail, against a real SMTP server the test starts (aiosmtpd on
127.0.0.1, with login): the mail arrives with the alert, the password is read from its file
and appears in no history, and a retry for another sink's failure does not mail twice."""

from __future__ import annotations

import asyncio
import dataclasses
import email
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from snapferry.activities.alerts import AlertActivities
from snapferry.activities.contracts import Alert, AlertSeverity, new_snapshot_id
from snapferry.activities.errors import AlertSinkUnavailable
from snapferry.activities.settings import Settings, SmtpConfig
from snapferry.workers import starter
from snapferry.workers.stack import free_port
from snapferry.workers.worker import running_workers

from .helpers import request_for

pytestmark = pytest.mark.integration

SMTP_PASSWORD = "m4il s3cret"


class Inbox:
    def __init__(self) -> None:
        self.mails: list[Message] = []
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]  # noqa: N802
        self.mails.append(email.message_from_bytes(envelope.content))
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        assert isinstance(auth_data, LoginPassword)
        login = (auth_data.login.decode(), auth_data.password.decode())
        self.logins.append(login)
        # handled=False: aiosmtpd answers 535 itself when the login is refused.
        return AuthResult(success=login == ("alerts", SMTP_PASSWORD), handled=False)


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[tuple[Inbox, SmtpConfig]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        authenticator=inbox.authenticate,
        auth_require_tls=False,  # loopback only, in a test
    )
    controller.start()
    password = tmp_path / "smtp.password"
    password.write_text(SMTP_PASSWORD + "\n")
    password.chmod(0o600)
    config = SmtpConfig(
        host="127.0.0.1",
        port=port,
        sender="snapferry@cloud.example",
        recipients=("ops@cloud.example", "oncall@cloud.example"),
        user="alerts",
        password_file=str(password),
    )
    try:
        yield inbox, config
    finally:
        controller.stop()


def alert() -> Alert:
    return Alert(
        event="SNAPSHOT.BACKUP.FAILED",
        severity=AlertSeverity.ERROR,
        snapshot_id=new_snapshot_id(),
        vm="web01",
        disk="vda",
        message="backup failed after retries: store full",
    )


def test_an_alert_is_mailed_once_even_when_another_sink_makes_it_retry(
    settings: Settings, smtp: tuple[Inbox, SmtpConfig], tmp_path: Path
) -> None:
    inbox, config = smtp
    local = dataclasses.replace(
        settings,
        alert_smtp=config,
        alert_log=tmp_path / "ms.log",
        alert_webhook=None,
    )
    beats: list[object] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details[0])
    a = alert()
    env.run(AlertActivities(local).raise_alert, a)
    assert len(inbox.mails) == 1 and inbox.logins == [("alerts", SMTP_PASSWORD)]
    mail = inbox.mails[0]
    assert mail["Subject"] == "[snapferry] ERROR SNAPSHOT.BACKUP.FAILED web01/vda"
    assert mail["To"] == "ops@cloud.example, oncall@cloud.example"
    assert a.snapshot_id in mail.get_payload() and "store full" in mail.get_payload()
    assert mail["Message-ID"].startswith("<alert-") and beats == [["smtp"]]

    # The retry of an attempt whose mail went out (heartbeated), for a failed webhook:
    # the webhook is tried again, the mail is not sent again.
    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(retry.info, attempt=2, heartbeat_details=[["smtp"]])
    webhook = dataclasses.replace(local, alert_webhook=f"http://127.0.0.1:{free_port()}/down")
    with pytest.raises(Exception, match="alert webhook failed"):
        retry.run(AlertActivities(webhook).raise_alert, a)
    assert len(inbox.mails) == 1


def test_a_refused_login_is_a_clear_alert_sink_error(
    settings: Settings, smtp: tuple[Inbox, SmtpConfig], tmp_path: Path
) -> None:
    inbox, config = smtp
    wrong = tmp_path / "wrong.password"
    wrong.write_text("nope")
    local = dataclasses.replace(
        settings,
        alert_smtp=dataclasses.replace(config, password_file=str(wrong)),
        alert_log=tmp_path / "ms.log",
        alert_webhook=None,
    )
    with pytest.raises(Exception, match="refused our login") as err:
        ActivityEnvironment().run(AlertActivities(local).raise_alert, alert())
    assert AlertSinkUnavailable.__name__ in repr(err.value) and "nope" not in str(err.value)
    assert not inbox.mails


async def test_a_failed_take_mails_its_alert_and_no_history_holds_the_password(
    client: Client,
    settings: Settings,
    smtp: tuple[Inbox, SmtpConfig],
    host_name: str,
) -> None:
    inbox, config = smtp
    local = dataclasses.replace(settings, alert_smtp=config)
    async with running_workers(client, local, hosts=[host_name], backup=True):
        with pytest.raises(starter.SnapferryClientError):
            await starter.create_snapshot(client, request_for("no-such-vm", host_name, local))
        for _ in range(100):
            if inbox.mails:
                break
            await asyncio.sleep(0.1)
    assert len(inbox.mails) == 1
    assert "SNAPSHOT.TAKE.FAILED" in inbox.mails[0]["Subject"]
    assert "no-such-vm" in inbox.mails[0].get_payload()
    async for wf in client.list_workflows():
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        assert SMTP_PASSWORD not in history.to_json()
