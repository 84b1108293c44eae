"""`board_check_alert_sensor`: a check of the stuck-orders board that turns failed reaches the alert webhook once.

Each tick reads the latest evaluation of each `order_backlog` check. The cursor remembers, per check, the state
last told (failed) or seen (passed): a check that fails again at the next refresh stays quiet, one that passes
and then fails again alerts again. Posting goes through the alert sensors' `deliver`, so an alert the webhook
did not take is tried again on the next tick (the cursor only moves for alerts that went out).
"""

import json

import dagster as dg

from bitloot_reconcile.domain import board as bd
from bitloot_reconcile.domain.alerting import Alert
from bitloot_reconcile.resources.alerts import AlertsResource
from bitloot_reconcile.sensors.alerts import deliver

PASSED, FAILED = "passed", "failed"
CHECK_KEYS = [dg.AssetCheckKey(dg.AssetKey(bd.ASSET_NAME), name) for name in bd.CHECK_DESCRIPTIONS]


def check_alert(record) -> Alert:
    """The failed check, in the words its evaluation gave, with the first order it names and the run link."""
    evaluation = record.evaluation
    orders = (evaluation.metadata.get("orders").value if evaluation and "orders" in evaluation.metadata else [])
    return Alert(
        order_id=orders[0] if orders else "",
        outcome=f"check {record.key.name} failed",  # the message keeps 40 characters of it
        reason=(evaluation.description if evaluation else None) or bd.CHECK_DESCRIPTIONS[record.key.name],
        run_id=record.run_id,
    )


def build_board_check_alert_sensor(interval_seconds: int) -> dg.SensorDefinition:
    """The board-check alert sensor; `interval_seconds` is the floor between its ticks
    (RECONCILE_ALERT_INTERVAL_SECONDS)."""
    return dg.sensor(
        name="board_check_alert_sensor",
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Posts one alert when a check of the order_backlog board turns failed (once per state change).",
    )(alert_failed_checks)


def alert_failed_checks(context: dg.SensorEvaluationContext, alerts: AlertsResource) -> dg.SkipReason:
    told: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    batch = []
    for key in CHECK_KEYS:
        record = context.instance.get_latest_asset_check_evaluation_record(key)
        status = record.status.value if record else None  # PLANNED while a refresh runs: wait for its verdict
        if status == "SUCCEEDED":
            told[key.name] = PASSED
        elif status == "FAILED" and told.get(key.name) != FAILED:
            batch.append((check_alert(record), lambda name=key.name: told.__setitem__(name, FAILED)))
    sent = deliver(context.log, alerts, batch) if batch else 0
    context.update_cursor(json.dumps(told, sort_keys=True))
    failing = sorted(name for name, state in told.items() if state == FAILED)
    return dg.SkipReason(f"{sent} of {len(batch)} board alerts sent; failed and told: {', '.join(failing) or 'none'}")
