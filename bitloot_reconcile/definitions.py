"""The code location: assembles jobs, sensors, assets and resources. Nothing else lives here."""

from __future__ import annotations

import dagster as dg

from bitloot_reconcile.assets import ASSETS, SCHEDULES
from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order, prune_order_history, prune_order_history_schedule
from bitloot_reconcile.resources.alerts import DEFAULT_WEBSERVER_URL, AlertsResource
from bitloot_reconcile.resources.kinguin import KinguinResource
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_reconcile.resources.policy import ReconcilePolicy
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.resend import ResendResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.sensors import SENSORS
from bitloot_reconcile.settings import Settings, load_settings


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Non-secret settings are given as values; secrets as EnvVar, so the UI shows only their names."""
    return {
        "store": StoreResource(database_url=dg.EnvVar("DATABASE_URL"), pool_size=settings.reconcile.batch_workers + 2),
        "kinguin": KinguinResource(base_url=settings.kinguin_base_url, api_key=dg.EnvVar("KINGUIN_API_KEY")),
        "nowpayments": NowPaymentsResource(
            base_url=settings.nowpayments_base, api_key=dg.EnvVar("NOWPAYMENTS_API_KEY")
        ),
        "r2": R2Resource(
            account_id=settings.r2_account_id,
            endpoint=settings.r2_endpoint,
            access_key_id=dg.EnvVar("R2_ACCESS_KEY_ID"),
            secret_access_key=dg.EnvVar("R2_SECRET_ACCESS_KEY"),
            bucket=settings.r2_bucket,
        ),
        "mailer": ResendResource(
            base_url=settings.resend_base_url, api_key=dg.EnvVar("RESEND_API_KEY"), sender=settings.email_from
        ),
        "policy": ReconcilePolicy.from_settings(settings),
        # Optional: without a webhook the alert sensors only log.
        "alerts": AlertsResource(
            webhook_url=dg.EnvVar("ALERT_WEBHOOK_URL") if settings.alert_webhook_url else None,
            dagster_base_url=settings.dagster_webserver_url or DEFAULT_WEBSERVER_URL,
        ),
    }


defs = dg.Definitions(
    assets=ASSETS,
    jobs=[fulfill_order, fulfill_backlog, prune_order_history],
    schedules=[*SCHEDULES, prune_order_history_schedule],
    sensors=SENSORS,
    resources=build_resources(load_settings()),
)
