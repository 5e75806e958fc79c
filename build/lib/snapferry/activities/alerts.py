"""Alert sinks: one line per event in a rotating management-server.log, a webhook, mail.

CloudStack logs every error to management-server.log and raises no alert when a backup is
finally given up; snapferry does both, and mails it as CloudStack mails its alerts. The log
line is written on the first attempt only, and a sink that took the alert is recorded in the
heartbeat details, so a retry for a failed sink does not repeat the others; every mail also
has a stable Message-ID (per alert activity), so a duplicate can be told apart.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import smtplib
import ssl
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate

from temporalio import activity

from .contracts import Alert
from .errors import AlertSinkUnavailable, converts_errors
from .names import RAISE_ALERT
from .settings import Settings, SmtpConfig


def alert_logger(settings: Settings) -> logging.Logger:
    """The management-server.log logger, rotating at 10 MiB with 5 old files kept."""
    logger = logging.getLogger(f"snapferry.alerts.{settings.alert_log}")
    if not logger.handlers:
        settings.alert_log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            settings.alert_log, maxBytes=10 * 1024 * 1024, backupCount=5
        )
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [snapferry] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def format_alert(alert: Alert) -> str:
    fields = [alert.event]
    for key in ("snapshot_id", "vm", "disk"):
        value = getattr(alert, key)
        if value:
            fields.append(f"{key}={value}")
    fields.append(alert.message.replace("\n", " "))
    return " ".join(fields)


class AlertActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @activity.defn(name=RAISE_ALERT)
    @converts_errors
    def raise_alert(self, alert: Alert) -> None:
        if activity.info().attempt == 1:
            level = logging.ERROR if alert.severity == "ERROR" else logging.WARNING
            alert_logger(self.settings).log(level, format_alert(alert))
            for handler in alert_logger(self.settings).handlers:
                handler.flush()
        info = activity.info()
        done: set[str] = set(info.heartbeat_details[0]) if info.heartbeat_details else set()
        if self.settings.alert_webhook and "webhook" not in done:
            self._post(alert)
            done.add("webhook")
            activity.heartbeat(sorted(done))
        if self.settings.alert_smtp and "smtp" not in done:
            send_mail(self.settings.alert_smtp, alert, message_id=_message_id(info))
            done.add("smtp")
            activity.heartbeat(sorted(done))

    def _post(self, alert: Alert) -> None:
        if self.settings.alert_webhook:
            body = json.dumps(alert.model_dump(mode="json")).encode()
            req = urllib.request.Request(
                self.settings.alert_webhook,
                data=body,
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
            except (urllib.error.URLError, OSError) as exc:
                raise AlertSinkUnavailable(f"alert webhook failed: {exc}") from exc


def _message_id(info: activity.Info) -> str:
    return f"<alert-{info.workflow_run_id}-{info.activity_id}@snapferry>"


def send_mail(smtp: SmtpConfig, alert: Alert, *, message_id: str) -> None:
    """One mail per alert: the management-server.log line as its body's first line."""
    msg = EmailMessage()
    msg["Subject"] = f"[snapferry] {alert.severity} {alert.event}" + (
        f" {alert.vm}/{alert.disk}" if alert.vm and alert.disk else ""
    )
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(smtp.recipients)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = message_id
    msg.set_content(
        format_alert(alert) + "\n\n" + json.dumps(alert.model_dump(mode="json"), indent=2)
    )
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_s) as client:
            if smtp.starttls:
                client.starttls(context=ssl.create_default_context())
            if smtp.user:
                client.login(smtp.user, smtp.password() or "")
            client.send_message(msg)
    except smtplib.SMTPAuthenticationError as exc:
        # A wrong password does not get better by retrying, but the alert must still reach
        # the log (it did, on attempt 1): say so plainly and let the workflow log it.
        raise AlertSinkUnavailable(
            f"alert mail to {smtp.host}:{smtp.port} refused our login ({exc.smtp_code})"
        ) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise AlertSinkUnavailable(f"alert mail to {smtp.host}:{smtp.port} failed: {exc}") from exc
