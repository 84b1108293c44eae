"""Alerting sensors: tell a person when an order needs one, once per state change, and when a run fails.

- `run_failure_alert_sensor` posts one message per failed `fulfill_order` run.
- `needs_attention_alert_sensor` posts one message per order that entered an alerting outcome (every order
  ends fulfilled or in a recorded "needs attention" state with a reason and an alert: docs/design.md
  section 5), and re-sends run-failure alerts that did not go out.

A run status sensor moves its cursor past a run even when the sensor raises, so a failed post could not be
retried from there. Instead the failed run carries the tag `bitloot/alert=pending` until its alert went out
(`sent`); the needs-attention sensor picks pending ones up on its ticks. Delivery is at least once: a crash
between posting and marking repeats one message, never loses it.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from functools import partial

import dagster as dg

from bitloot_reconcile.adapters.errors import PermanentError, TransientError
from bitloot_reconcile.domain.alerting import ALERT_OUTCOMES, RUN_FAILED, Alert, clean, first_line
from bitloot_reconcile.jobs import fulfill_order
from bitloot_reconcile.resources.alerts import AlertsResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.settings import load_settings
from bitloot_reconcile.store.repository import utcnow
from bitloot_reconcile.tags import TAG_ORDER_ID

TAG_ALERT = "bitloot/alert"
ALERT_PENDING, ALERT_SENT = "pending", "sent"
MAX_ALERTS_PER_TICK = 20
# Sensor evaluations time out after 60 s; stop posting well before, the rest goes out next tick.
TICK_BUDGET_SECONDS = 30.0
# Floor between needs-attention ticks, fixed when the code location loads; the end-to-end test shortens it.
ALERT_INTERVAL_SECONDS = load_settings().reconcile.alert_interval_seconds
# A run tagged pending this recently may still be in the failure sensor's hands (sensors run in parallel).
RETRY_PENDING_AFTER = dt.timedelta(seconds=60)

Delivery = tuple[Alert, Callable[[], object]]  # the alert, and how to record that it went out


def failed_run_alert(instance: dg.DagsterInstance, run: dg.DagsterRun) -> Alert:
    """Order id from the run's tag (or its flat config when it failed before tagging itself), and the first
    step failure's message, else the run failure's (e.g. a run monitoring timeout)."""
    records = instance.get_records_for_run(
        run.run_id, of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE}
    ).records
    message = ""
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.step_failure_data if event and event.is_step_failure else None
        if data:
            detail = (data.user_failure_data and data.user_failure_data.description) or (
                data.error and data.error.message
            )
            message = f"{event.step_key}: {first_line(detail)}"
            break
        message = message or first_line(record.event_log_entry.message)
    order_id = run.tags.get(TAG_ORDER_ID) or str((run.run_config or {}).get("order_id") or "")
    return Alert(order_id=order_id, outcome=RUN_FAILED, reason=message, run_id=run.run_id)


def deliver(log: dg.DagsterLogManager, alerts: AlertsResource, batch: list[Delivery]) -> int:
    """Post each alert, then record it. A transient webhook failure ends the tick (the rest waits for the
    next); a refused message is skipped and retried next tick. Returns how many went out."""
    if not alerts.enabled:
        for alert, mark in batch:
            log.warning(f"alert (ALERT_WEBHOOK_URL not set, logged only): {alerts.message(alert)['text']}")
            mark()
        return len(batch)
    sent, deadline = 0, time.monotonic() + TICK_BUDGET_SECONDS
    with alerts.get_client() as client:
        for alert, mark in batch:
            if time.monotonic() > deadline:
                break
            try:
                client.post(alerts.message(alert))
            except TransientError as exc:
                log.warning(f"alert for order {clean(alert.order_id, 64)} not delivered, retrying next tick: {exc}")
                break
            except PermanentError as exc:
                log.error(f"alert for order {clean(alert.order_id, 64)} refused, retrying next tick: {exc}")
                continue
            mark()
            sent += 1
    return sent


def _tag_run(instance: dg.DagsterInstance, run_id: str, value: str) -> None:
    instance.add_run_tags(run_id, {TAG_ALERT: value})


@dg.run_failure_sensor(
    monitored_jobs=[fulfill_order],
    minimum_interval_seconds=min(30, ALERT_INTERVAL_SECONDS),  # Dagster's default 30 s, or faster when tuned
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts an alert for every failed fulfill_order run (order, failure, run link).",
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext, alerts: AlertsResource) -> None:
    run = context.dagster_run
    _tag_run(context.instance, run.run_id, ALERT_PENDING)  # first, so a crash below cannot lose the alert
    alert = failed_run_alert(context.instance, run)
    deliver(context.log, alerts, [(alert, partial(_tag_run, context.instance, run.run_id, ALERT_SENT))])


@dg.sensor(
    minimum_interval_seconds=ALERT_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts one alert per order that needs a person (once per state change) and re-sends "
    "run-failure alerts that did not go out.",
)
def needs_attention_alert_sensor(
    context: dg.SensorEvaluationContext, store: StoreResource, alerts: AlertsResource
) -> dg.SkipReason:
    repo = store.get_store()
    repo.clear_resolved_alerts(ALERT_OUTCOMES)
    batch: list[Delivery] = [
        (Alert(state.order_id, state.last_outcome or "", state.last_reason, state.last_run_id),
         partial(repo.mark_alerted, state))
        for state in repo.pending_alerts(ALERT_OUTCOMES, limit=MAX_ALERTS_PER_TICK)
    ]
    unsent_failures = context.instance.get_runs(
        filters=dg.RunsFilter(
            job_name=fulfill_order.name,
            statuses=[dg.DagsterRunStatus.FAILURE],
            tags={TAG_ALERT: ALERT_PENDING},
            updated_before=utcnow() - RETRY_PENDING_AFTER,
        ),
        limit=MAX_ALERTS_PER_TICK,
    )
    batch += [
        (failed_run_alert(context.instance, run), partial(_tag_run, context.instance, run.run_id, ALERT_SENT))
        for run in unsent_failures
    ]
    if not batch:
        return dg.SkipReason("nothing to alert")
    sent = deliver(context.log, alerts, batch)
    return dg.SkipReason(f"{sent} of {len(batch)} alerts sent")
