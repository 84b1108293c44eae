"""The sweep sensor: a thin shell over `domain.sweep` and the store's stuck-orders query."""

import datetime as dt

import dagster as dg

from bitloot_reconcile.domain.board import load_board, skipped_summary
from bitloot_reconcile.domain.sweep import batch_worker_gone, plan_sweep, run_worker_gone, split_backlog
from bitloot_reconcile.domain.switches import read_switches
from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.runs_in_flight import batch_order_ids, batch_run_records, order_run_records
from bitloot_reconcile.store.repository import ReconcileState, Store, utcnow
from bitloot_reconcile.tags import TAG_ORDER_ID

_WAITING = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING)  # for a slot, for its worker to load


def _since(record: dg.RunRecord) -> dt.datetime:
    """Started: since its start; never launched (created, not started): since its last change."""
    return (dt.datetime.fromtimestamp(record.start_time, dt.UTC) if record.start_time
            else record.update_timestamp.astimezone(dt.UTC))


def orders_in_flight(
    instance: dg.DagsterInstance, store: Store, *, lease_ttl: dt.timedelta, now: dt.datetime
) -> dict[str, str]:
    """Order id -> its queued or running `fulfill_order` run, or the `fulfill_backlog` run it is in. A launched
    run whose worker is gone (see `run_worker_gone`, `batch_worker_gone`) is marked failed here, which frees
    its orders for new runs in this same tick. Queued runs are left alone: they wait for a slot, not a worker; so
    are starting ones: a worker still loading the code location (longer than a lease on a loaded host) is Dagster's
    run monitoring's to fail (`start_timeout_seconds`), else the sweep and the run retry launch more onto it."""
    tagged = order_run_records(instance)
    launched = [r for r in tagged if r.dagster_run.status not in _WAITING]
    batches = batch_run_records(instance)
    launched_batches = [r for r in batches if r.dagster_run.status not in _WAITING]
    states = store.states_of({r.dagster_run.tags[TAG_ORDER_ID] for r in launched}
                             | {o for r in launched_batches for o in batch_order_ids(r.dagster_run)})
    gone = set()
    for record in launched:
        run = record.dagster_run
        order_id = run.tags[TAG_ORDER_ID]
        state = states.get(order_id) or ReconcileState(order_id=order_id)  # never claimed yet
        if run_worker_gone(run.run_id, _since(record), state, lease_ttl=lease_ttl, now=now):
            instance.report_run_failed(
                run,
                message=f"run worker gone: it stopped renewing the lease on order {order_id}; "
                "the sweep takes the order up again",
            )
            gone.add(run.run_id)
    for record in launched_batches:
        run = record.dagster_run
        order_ids = batch_order_ids(run)
        if _since(record) + lease_ttl >= now:
            continue  # young: not worth the audit read
        attempted = store.attempted_by(run.run_id, set(order_ids))
        if batch_worker_gone(run.run_id, _since(record), order_ids, states, attempted, lease_ttl=lease_ttl, now=now):
            lapsed = sum(1 for o in order_ids if (state := states.get(o)) and state.lease_owner == run.run_id)
            instance.report_run_failed(
                run,
                message=f"run worker gone: it holds no live lease ({len(set(order_ids) - attempted)} of its orders "
                f"never attempted, {lapsed} left on a lapsed lease); the sweep takes them up again",
            )
            gone.add(run.run_id)
    in_flight = {order_id: r.dagster_run.run_id for r in batches if r.dagster_run.run_id not in gone
                 for order_id in batch_order_ids(r.dagster_run)}
    in_flight.update({r.dagster_run.tags[TAG_ORDER_ID]: r.dagster_run.run_id for r in tagged
                      if r.dagster_run.run_id not in gone})
    return in_flight


def nothing_due(store: Store, in_flight: dict[str, str], policy: RecoveryPolicyResource, now: dt.datetime) -> str:
    """The skip message: what the sweep left alone and why, counted and named (one more bounded read, only on
    ticks that launch nothing)."""
    grace = dt.timedelta(minutes=policy.grace_minutes)
    found = load_board(store, in_flight=in_flight, now=now, grace=grace,
                       max_age=dt.timedelta(days=policy.max_age_days), with_trend=False)
    skipped = skipped_summary(found.rows, grace=grace)
    return f"no stuck orders due; {skipped}" if skipped else "no stuck orders"


SWEEP_SENSOR_NAME = "stuck_orders_sensor"


def build_stuck_orders_sensor(interval_seconds: int) -> dg.SensorDefinition:
    """The sweep sensor; `interval_seconds` is the daemon's floor between its ticks
    (RECONCILE_SWEEP_INTERVAL_SECONDS, fixed when the code location loads; the demo shortens it)."""
    return dg.sensor(name=SWEEP_SENSOR_NAME, jobs=[fulfill_order, fulfill_backlog],
                     minimum_interval_seconds=interval_seconds,
                     default_status=dg.DefaultSensorStatus.RUNNING)(sweep_tick)


def sweep_tick(
    context: dg.SensorEvaluationContext, store: StoreResource, policy: RecoveryPolicyResource
) -> dg.SensorResult | dg.SkipReason:
    """Each tick: the oldest stuck orders (bounded), one `fulfill_order` run each; or, when more are due than
    `batch_threshold`, `fulfill_backlog` runs of them (bounded in size and number); unless BitLoot's own
    switches stop automatic fulfilment."""
    held = read_switches(store.get_store()).sweep_hold
    if held:
        return dg.SkipReason(f"launching nothing: {held}")
    now = utcnow()
    repo = store.get_store()
    in_flight = orders_in_flight(context.instance, repo, lease_ttl=policy.lease_ttl, now=now)
    # Orders with a run in flight are still stuck in the store: read past them, so they never use up the tick.
    wanted = max(policy.max_runs_per_tick, policy.batch_max_orders * policy.batch_max_runs, policy.batch_threshold + 1)
    stuck = repo.find_stuck_orders(
        now=now,
        grace=dt.timedelta(minutes=policy.grace_minutes),
        max_age=dt.timedelta(days=policy.max_age_days),
        limit=wanted + len(in_flight),
    )
    due = plan_sweep(stuck, in_flight=set(in_flight), now=now, lease_ttl=policy.lease_ttl)
    # One more read of the runs, made only on ticks that want a batch.
    running = len(batch_run_records(context.instance)) if len(due) > policy.batch_threshold else 0
    requests, batches = split_backlog(due, threshold=policy.batch_threshold, max_orders=policy.batch_max_orders,
                                      max_runs=policy.max_runs_per_tick, batch_slots=policy.batch_max_runs - running)
    if batches:
        return dg.SensorResult(run_requests=[dg.RunRequest(
            run_key=batch.run_key, job_name=fulfill_backlog.name, tags=batch.tags,
            run_config={"ops": {"work_backlog": {"config": {"orders": batch.orders}}}},
        ) for batch in batches])
    if len(due) > policy.batch_threshold:  # the batches' workers are the load on Kinguin and on this host
        return dg.SkipReason(f"{len(due)} due orders wait for a batch: {running} fulfill_backlog run(s) in "
                             f"flight, at most {policy.batch_max_runs} at once")
    if not requests:
        return dg.SkipReason(nothing_due(repo, in_flight, policy, now))
    return dg.SensorResult(run_requests=[
        dg.RunRequest(run_key=r.run_key, job_name=fulfill_order.name, run_config=r.run_config, tags=r.tags)
        for r in requests
    ])
