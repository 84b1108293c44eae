"""Alerting sensors: tell a person when an order needs one, once per state change, and when a run fails.

- `run_failure_alert_sensor` posts one message per failed run: for `fulfill_order`, the order, the cause in words
  and what happens next (from the order's reconcile state when the run recorded it); for a `fulfill_backlog`
  batch, how many orders it held and that the sweep takes them up again (also when the sweep failed it as
  "run worker gone"); for the report and board jobs, the cause and their next scheduled run. Each with the run link.
- `needs_attention_alert_sensor` posts one message per order that entered an alerting outcome (every order
  ends fulfilled or in a recorded "needs attention" state with a reason and an alert: docs/design.md
  section 5), and re-sends run-failure alerts that did not go out.

A run refused for an operator's input error (tag `bitloot/outcome=refused`) is logged, not alerted, and tagged
`bitloot/alert=input_error` so it is never picked up again.

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
from bitloot_reconcile.domain import alerting
from bitloot_reconcile.domain.alerting import ALERT_OUTCOMES, Alert, clean, error_words, first_line
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.fulfilment import parse_order_id
from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order
from bitloot_reconcile.resources.alerts import AlertsResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.repository import ReconcileState, Store, utcnow
from bitloot_reconcile.tags import TAG_ALERT, TAG_ORDER_ID

ALERT_PENDING, ALERT_SENT = "pending", "sent"
ALERT_INPUT_ERROR = "input_error"  # an operator's input error: logged, never alerted
MAX_ALERTS_PER_TICK = 20
# Sensor evaluations time out after 60 s; stop posting well before, the rest goes out next tick.
TICK_BUDGET_SECONDS = 30.0
# A run tagged pending this recently may still be in the failure sensor's hands (sensors run in parallel).
RETRY_PENDING_AFTER = dt.timedelta(seconds=60)

Delivery = tuple[Alert, Callable[[], object]]  # the alert, and how to record that it went out
# Wrappers whose cause says best what failed: once retries run out, Dagster records a retry request as
# "Exceeded max_retries of N" with the step's own error as its cause; a step failure raised for a permanent
# refusal keeps the service's error as its cause, and so does a user-code error Dagster wrapped. Much like
# `describe_error`, on recorded errors.
_WRAPPERS = frozenset({"RetryRequested", "RetryRequestedFromPolicy", "Failure", "DagsterExecutionStepExecutionError"})


def step_failure(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    """What the first failed step says went wrong (following a retry request to the error that caused it),
    else the run failure's message (e.g. a run monitoring timeout)."""
    records = instance.get_records_for_run(
        run.run_id, of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE}
    ).records
    message = ""
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.step_failure_data if event and event.is_step_failure else None
        if data:
            error = data.error
            while error is not None and error.cls_name in _WRAPPERS and error.cause is not None:
                error = error.cause
            detail = data.user_failure_data and data.user_failure_data.description
            if error is not None and error.cls_name not in _WRAPPERS:
                words = error_words(error.cls_name, error.message)
            else:
                words = first_line(detail) or (first_line(error.message) if error else "")
            return f"{event.step_key} failed: {words or 'no error recorded'}"
        message = message or first_line(record.event_log_entry.message)
    return message


def _order_id(run: dg.DagsterRun) -> str:
    """The run's order: its tag, or its flat config when it failed before tagging itself (any typed text)."""
    return run.tags.get(TAG_ORDER_ID) or str((run.run_config or {}).get("order_id") or "")


def _order_state(log: dg.DagsterLogManager, repo: Store, order_id: str) -> ReconcileState | None:
    """The order's reconcile state; None for text that is no order id, or when the store cannot be read
    (the alert then goes out with the step failure's words rather than not at all)."""
    try:
        return repo.get_state(parse_order_id(order_id))
    except InvalidRequest:
        return None
    except Exception as exc:  # the store may be what is down
        log.warning(f"order state not read for the alert, using the run's failure instead: {type(exc).__name__}")
        return None


def failed_run_delivery(
    log: dg.DagsterLogManager, instance: dg.DagsterInstance, repo: Store, run: dg.DagsterRun
) -> Delivery | None:
    """The alert for a failed run and how to mark it sent; None for an operator's input error, which is
    logged and marked so it is never picked up again."""
    order_id = _order_id(run)
    if alerting.is_input_error(run.tags):
        log.info(f"run {run.run_id} of {run.job_name} for order {clean(order_id, 64)} refused an operator's input, "
                 f"not alerted: {clean(step_failure(instance, run))}")
        _tag_run(instance, run.run_id, ALERT_INPUT_ERROR)
        return None
    if run.job_name != fulfill_order.name:
        job_alert = alerting.failed_job_alert(job_name=run.job_name, batch=run.job_name == fulfill_backlog.name,
                                              run_id=run.run_id, run_tags=run.tags,
                                              step_failure=step_failure(instance, run))
        return job_alert, partial(_tag_run, instance, run.run_id, ALERT_SENT)
    state = _order_state(log, repo, order_id)
    alert = alerting.failed_run_alert(order_id=order_id, run_id=run.run_id, run_tags=run.tags,
                                      step_failure=step_failure(instance, run), state=state, now=utcnow())

    def mark() -> None:
        _tag_run(instance, run.run_id, ALERT_SENT)
        if state is not None and state.last_run_id == run.run_id and state.last_outcome in ALERT_OUTCOMES:
            repo.mark_alerted(state)  # this alert told of the quarantine: the needs-attention one stays quiet

    return alert, mark


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


def build_run_failure_alert_sensor(interval_seconds: int) -> dg.RunStatusSensorDefinition:
    """The run-failure alert sensor; it ticks every 30 s (Dagster's default), or every `interval_seconds`
    (RECONCILE_ALERT_INTERVAL_SECONDS) when that is shorter."""
    return dg.run_failure_sensor(  # no monitored_jobs: every job of this code location
        name="run_failure_alert_sensor",
        minimum_interval_seconds=min(30, interval_seconds),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Posts an alert for every failed run of this code location (fulfill_order: order, cause, what "
        "happens next; fulfill_backlog: how many orders it held; the report and board jobs), with the run link; "
        "an operator's input error is logged only.",
    )(alert_failed_run)


def build_needs_attention_alert_sensor(interval_seconds: int) -> dg.SensorDefinition:
    """The needs-attention alert sensor; `interval_seconds` is the floor between its ticks
    (RECONCILE_ALERT_INTERVAL_SECONDS, fixed when the code location loads; the end-to-end test shortens it)."""
    return dg.sensor(
        name="needs_attention_alert_sensor",
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Posts one alert per order that needs a person (once per state change) and re-sends "
        "run-failure alerts that did not go out.",
    )(alert_needs_attention)


def alert_failed_run(
    context: dg.RunFailureSensorContext, store: StoreResource, alerts: AlertsResource
) -> None:
    run = context.dagster_run
    if not alerting.is_input_error(run.tags):
        _tag_run(context.instance, run.run_id, ALERT_PENDING)  # first, so a crash below cannot lose the alert
    delivery = failed_run_delivery(context.log, context.instance, store.get_store(), run)
    if delivery:
        deliver(context.log, alerts, [delivery])


def alert_needs_attention(
    context: dg.SensorEvaluationContext, store: StoreResource, alerts: AlertsResource
) -> dg.SkipReason:
    repo = store.get_store()
    repo.clear_resolved_alerts(ALERT_OUTCOMES)
    batch: list[Delivery] = [
        (alerting.needs_attention_alert(state), partial(repo.mark_alerted, state))
        for state in repo.pending_alerts(ALERT_OUTCOMES, limit=MAX_ALERTS_PER_TICK)
    ]
    unsent_failures = context.instance.get_runs(
        filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.FAILURE],
            tags={TAG_ALERT: ALERT_PENDING},
            updated_before=utcnow() - RETRY_PENDING_AFTER,
        ),
        limit=MAX_ALERTS_PER_TICK,
    )
    for run in unsent_failures:
        delivery = failed_run_delivery(context.log, context.instance, repo, run)
        if delivery:
            batch.append(delivery)
    if not batch:
        return dg.SkipReason("nothing to alert")
    sent = deliver(context.log, alerts, batch)
    return dg.SkipReason(f"{sent} of {len(batch)} alerts sent")
