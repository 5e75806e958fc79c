"""Alert sinks: one line per event in a rotating management-server.log, and a webhook.

CloudStack logs every error to management-server.log and raises no alert when a backup is
finally given up; snapferry does both. The log line is written on the first attempt only, so
a retried webhook never duplicates it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import urllib.error
import urllib.request

from temporalio import activity

from .contracts import Alert
from .errors import AlertSinkUnavailable, converts_errors
from .names import RAISE_ALERT
from .settings import Settings


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
