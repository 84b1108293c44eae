"""Sensors: thin shells over `domain.sweep` and the store's stuck-orders query."""

import datetime as dt
import os

import dagster as dg

from bitloot_reconcile.domain.sweep import plan_sweep
from bitloot_reconcile.domain.switches import read_switches
from bitloot_reconcile.jobs import fulfill_order
from bitloot_reconcile.resources.policy import ReconcilePolicy
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.repository import utcnow
from bitloot_reconcile.tags import TAG_ORDER_ID

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def orders_in_flight(instance: dg.DagsterInstance) -> set[str]:
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=fulfill_order.name, statuses=IN_FLIGHT))
    return {run.tags[TAG_ORDER_ID] for run in runs if TAG_ORDER_ID in run.tags}


# The daemon's floor between ticks; the demo shortens it through the environment.
SWEEP_INTERVAL_SECONDS = int(os.environ.get("RECONCILE_SWEEP_INTERVAL_SECONDS", "30"))


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
    stuck = store.get_store().find_stuck_orders(
        now=now,
        grace=dt.timedelta(minutes=policy.grace_minutes),
        max_age=dt.timedelta(days=policy.max_age_days),
        limit=policy.max_runs_per_tick,
    )
    requests = plan_sweep(stuck, in_flight=orders_in_flight(context.instance), now=now)
    if not requests:
        return dg.SkipReason(f"no stuck orders due ({len(stuck)} found, all in flight)" if stuck else "no stuck orders")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=r.run_key, run_config=r.run_config, tags=r.tags) for r in requests]
    )
