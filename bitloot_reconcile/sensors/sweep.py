"""The sweep sensor: a thin shell over `domain.sweep` and the store's stuck-orders query."""

import datetime as dt

import dagster as dg

from bitloot_reconcile.domain.board import load_board, skipped_summary
from bitloot_reconcile.domain.sweep import plan_sweep, run_worker_gone
from bitloot_reconcile.domain.switches import read_switches
from bitloot_reconcile.jobs import fulfill_order
from bitloot_reconcile.resources.policy import ReconcilePolicy
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.settings import load_settings
from bitloot_reconcile.store.repository import ReconcileState, Store, utcnow
from bitloot_reconcile.tags import TAG_ORDER_ID

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _in_flight_records(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    records = instance.get_run_records(filters=dg.RunsFilter(job_name=fulfill_order.name, statuses=IN_FLIGHT))
    return [r for r in records if TAG_ORDER_ID in r.dagster_run.tags]


def runs_in_flight(instance: dg.DagsterInstance) -> dict[str, str]:
    """Order id -> its queued or running `fulfill_order` run, as Dagster shows them (reads only: the board)."""
    return {r.dagster_run.tags[TAG_ORDER_ID]: r.dagster_run.run_id for r in _in_flight_records(instance)}


def orders_in_flight(
    instance: dg.DagsterInstance, store: Store, *, lease_ttl: dt.timedelta, now: dt.datetime
) -> dict[str, str]:
    """Order id -> its queued or running `fulfill_order` run. A launched run whose worker is gone (see
    `run_worker_gone`) is marked failed here, which frees its order for a new run in this same tick. Queued
    runs are left alone: they wait for a slot, not for a worker."""
    tagged = _in_flight_records(instance)
    launched = [r for r in tagged if r.dagster_run.status != dg.DagsterRunStatus.QUEUED]
    states = store.states_of({r.dagster_run.tags[TAG_ORDER_ID] for r in launched})
    gone = set()
    for record in launched:
        run = record.dagster_run
        order_id = run.tags[TAG_ORDER_ID]
        state = states.get(order_id) or ReconcileState(order_id=order_id)  # never claimed yet
        # Started: since its start; still starting (the worker died while loading): since its last change.
        since = (dt.datetime.fromtimestamp(record.start_time, dt.UTC) if record.start_time
                 else record.update_timestamp.astimezone(dt.UTC))
        if run_worker_gone(run.run_id, since, state, lease_ttl=lease_ttl, now=now):
            instance.report_run_failed(
                run,
                message=f"run worker gone: it stopped renewing the lease on order {order_id}; "
                "the sweep takes the order up again",
            )
            gone.add(run.run_id)
    return {r.dagster_run.tags[TAG_ORDER_ID]: r.dagster_run.run_id for r in tagged if r.dagster_run.run_id not in gone}


def nothing_due(store: Store, in_flight: dict[str, str], policy: ReconcilePolicy, now: dt.datetime) -> str:
    """The skip message: what the sweep left alone and why, counted and named (one more bounded read, only on
    ticks that launch nothing)."""
    grace = dt.timedelta(minutes=policy.grace_minutes)
    found = load_board(store, in_flight=in_flight, now=now, grace=grace,
                       max_age=dt.timedelta(days=policy.max_age_days), with_trend=False)
    skipped = skipped_summary(found.rows, grace=grace)
    return f"no stuck orders due; {skipped}" if skipped else "no stuck orders"


# The daemon's floor between ticks, fixed when the code location loads; the demo shortens it.
SWEEP_INTERVAL_SECONDS = load_settings().reconcile.sweep_interval_seconds


@dg.sensor(
    job=fulfill_order, minimum_interval_seconds=SWEEP_INTERVAL_SECONDS, default_status=dg.DefaultSensorStatus.RUNNING
)
def stuck_orders_sensor(
    context: dg.SensorEvaluationContext, store: StoreResource, policy: ReconcilePolicy
) -> dg.SensorResult | dg.SkipReason:
    """Each tick: the oldest stuck orders (bounded), one `fulfill_order` run each, unless BitLoot's own
    switches stop automatic fulfilment."""
    held = read_switches(store.get_store()).sweep_hold
    if held:
        return dg.SkipReason(f"launching nothing: {held}")
    now = utcnow()
    repo = store.get_store()
    in_flight = orders_in_flight(context.instance, repo, lease_ttl=policy.lease_ttl, now=now)
    # Orders with a run in flight are still stuck in the store: read past them, so they never use up the tick.
    stuck = repo.find_stuck_orders(
        now=now,
        grace=dt.timedelta(minutes=policy.grace_minutes),
        max_age=dt.timedelta(days=policy.max_age_days),
        limit=policy.max_runs_per_tick + len(in_flight),
    )
    requests = plan_sweep(stuck, in_flight=set(in_flight), now=now, lease_ttl=policy.lease_ttl)[
        : policy.max_runs_per_tick]
    if not requests:
        return dg.SkipReason(nothing_due(repo, in_flight, policy, now))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=r.run_key, run_config=r.run_config, tags=r.tags) for r in requests]
    )
