"""Where alerts go: a Slack-compatible webhook (ALERT_WEBHOOK_URL), or only the sensor's log when none is set."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from bitloot_reconcile.adapters.webhook import WebhookClient
from bitloot_reconcile.domain.alerting import Alert, build_message

DEFAULT_WEBSERVER_URL = "http://localhost:3000"


class AlertsResource(dg.ConfigurableResource):
    webhook_url: str | None = Field(
        default=None, repr=False,
        description="Incoming webhook (ALERT_WEBHOOK_URL); a credential, give it as an EnvVar. Unset: log only.",
    )
    dagster_base_url: str = Field(
        default=DEFAULT_WEBSERVER_URL,
        description="Webserver URL people open, for run links in alerts (DAGSTER_WEBSERVER_URL).",
    )
    timeout_seconds: float = Field(default=10.0, gt=0, description="Timeout of every webhook call, in seconds.")

    @property
    def enabled(self) -> bool:
        return bool(self.webhook_url)

    def message(self, alert: Alert) -> dict:
        return build_message(alert, self.dagster_base_url or DEFAULT_WEBSERVER_URL)

    def get_client(self) -> WebhookClient:
        """Only when `enabled`. Raises adapters.errors.TransientError / PermanentError from `post`."""
        assert self.webhook_url, "no webhook configured"
        return WebhookClient(self.webhook_url, timeout=self.timeout_seconds)
