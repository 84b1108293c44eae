"""The code location: assembles jobs, sensors, assets and resources. Nothing else lives here."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from bitloot_reconcile.assets.order_backlog import build_order_backlog, order_backlog_job, order_backlog_schedule
from bitloot_reconcile.assets.order_history import order_attempts
from bitloot_reconcile.assets.reconciliation_report import reconciliation_report, reconciliation_report_schedule
from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order, prune_order_history, prune_order_history_schedule
from bitloot_reconcile.resources.alerts import DEFAULT_WEBSERVER_URL, AlertsResource
from bitloot_reconcile.resources.kinguin import KinguinResource
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.resend import ResendResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.sensors import build_sensors
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
        "policy": RecoveryPolicyResource.from_settings(settings),
        # Optional: without a webhook the alert sensors only log.
        "alerts": AlertsResource(
            webhook_url=dg.EnvVar("ALERT_WEBHOOK_URL") if settings.alert_webhook_url else None,
            dagster_base_url=settings.dagster_webserver_url or DEFAULT_WEBSERVER_URL,
        ),
    }


def build_definitions(settings: Settings) -> dg.Definitions:
    """The code location from one `Settings`: every module below takes its values from here."""
    tunables = settings.reconcile
    return dg.Definitions(
        assets=[reconciliation_report, build_order_backlog(sla=dt.timedelta(minutes=tunables.board_sla_minutes)),
                order_attempts],
        jobs=[fulfill_order, fulfill_backlog, prune_order_history, order_backlog_job],
        schedules=[reconciliation_report_schedule, order_backlog_schedule, prune_order_history_schedule],
        sensors=build_sensors(sweep_interval_seconds=tunables.sweep_interval_seconds,
                              alert_interval_seconds=tunables.alert_interval_seconds),
        resources=build_resources(settings),
    )


@dg.definitions
def defs() -> dg.Definitions:
    """What Dagster loads (lazily: the settings are read when the code location loads, not at import)."""
    return build_definitions(load_settings())
