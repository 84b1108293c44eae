"""The code location: assembles jobs, sensors, assets and resources. Nothing else lives here."""

from __future__ import annotations

import os

import dagster as dg

from bitloot_reconcile.alerts import needs_attention_alert_sensor, run_failure_alert_sensor
from bitloot_reconcile.assets import ASSETS, SCHEDULES
from bitloot_reconcile.jobs import fulfill_order
from bitloot_reconcile.resources.alerts import DEFAULT_WEBSERVER_URL, AlertsResource
from bitloot_reconcile.resources.kinguin import KinguinResource
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_reconcile.resources.policy import ReconcilePolicy
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.resend import ResendResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.sensors import stuck_orders_sensor
from bitloot_reconcile.settings import DEFAULTS


def _setting(name: str) -> str:
    """Non-secret settings are read at load time; secrets stay EnvVar so the UI shows only their names."""
    return os.environ.get(name) or DEFAULTS.get(name, "")


def build_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "store": StoreResource(database_url=dg.EnvVar("DATABASE_URL")),
        "kinguin": KinguinResource(base_url=_setting("KINGUIN_BASE_URL"), api_key=dg.EnvVar("KINGUIN_API_KEY")),
        "nowpayments": NowPaymentsResource(
            base_url=_setting("NOWPAYMENTS_BASE"), api_key=dg.EnvVar("NOWPAYMENTS_API_KEY")
        ),
        "r2": R2Resource(
            account_id=_setting("R2_ACCOUNT_ID"),
            endpoint=_setting("R2_ENDPOINT"),
            access_key_id=dg.EnvVar("R2_ACCESS_KEY_ID"),
            secret_access_key=dg.EnvVar("R2_SECRET_ACCESS_KEY"),
            bucket=_setting("R2_BUCKET"),
        ),
        "mailer": ResendResource(
            base_url=_setting("RESEND_BASE_URL"), api_key=dg.EnvVar("RESEND_API_KEY"), sender=_setting("EMAIL_FROM")
        ),
        "policy": ReconcilePolicy(frontend_url=_setting("FRONTEND_URL"), **ReconcilePolicy.overrides_from_env()),
        # Optional: without a webhook the alert sensors only log. EnvVar keeps the URL (a credential) out of the UI.
        "alerts": AlertsResource(
            webhook_url=dg.EnvVar("ALERT_WEBHOOK_URL") if os.environ.get("ALERT_WEBHOOK_URL") else None,
            dagster_base_url=_setting("DAGSTER_WEBSERVER_URL") or DEFAULT_WEBSERVER_URL,
        ),
    }


defs = dg.Definitions(
    assets=ASSETS,
    jobs=[fulfill_order],
    schedules=SCHEDULES,
    sensors=[stuck_orders_sensor, run_failure_alert_sensor, needs_attention_alert_sensor],
    resources=build_resources(),
)
