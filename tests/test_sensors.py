"""`stuck_orders_sensor` on a real PostgreSQL store, evaluated with `build_sensor_context`."""

from __future__ import annotations

import datetime as dt
import re
import time

import dagster as dg
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType

from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.repository import ProjectTablesMissing, Store, utcnow
from bitloot_standins.seed import SeedProduct, insert_order, insert_product
from tests.fixtures.board import seed_every_state
from tests.fixtures.definitions import stuck_orders_sensor
from tests.fixtures.world import backlog_config
from tests.store import bitloot_ddl


@pytest.fixture
def sweep(store_engine, app_store_url, dagster_instance):
    product = insert_product(store_engine, SeedProduct("5c9b68662539a4e8f17ae2fe", "Game"))

    class Sweep:
        store = Store(store_engine)

        @staticmethod
        def order(**kwargs) -> str:
            return insert_order(store_engine, [product], **kwargs)

        @staticmethod
        def tick(**policy) -> list[dg.RunRequest]:
            context = dg.build_sensor_context(
                instance=dagster_instance,
                resources={
                    "store": StoreResource(database_url=app_store_url),
                    "policy": RecoveryPolicyResource(**policy),
                },
            )
            result = stuck_orders_sensor(context)
            return [] if isinstance(result, dg.SkipReason) else result.run_requests

    return Sweep


def ids(requests: list[dg.RunRequest]) -> list[str]:
    return [r.tags["bitloot/order_id"] for r in requests]


ids_of = ids


def test_selects_each_stuck_status_after_the_grace_period(sweep):
    stuck = [sweep.order(status=s, age=dt.timedelta(minutes=20)) for s in ("paid", "failed", "waiting", "confirming")]
    recent = sweep.order(status="paid", age=dt.timedelta(minutes=5))  # inside the grace period
    for status in ("created", "expired", "underpaid", "refunded", "cancelled"):
        sweep.order(status=status, age=dt.timedelta(hours=2))
    sweep.order(status="fulfilled", completion_email_sent=True, age=dt.timedelta(hours=2))
    assert sorted(ids(sweep.tick())) == sorted(stuck)
    assert sorted(ids(sweep.tick(grace_minutes=1))) == sorted([*stuck, recent])  # grace is configurable


def test_fulfilled_without_email_is_stuck(sweep):
    order_id = sweep.order(status="fulfilled", completion_email_sent=False, age=dt.timedelta(minutes=30))
    (request,) = sweep.tick()
    assert request.tags["bitloot/order_id"] == order_id
    assert "email was never sent" in request.run_config["reason"]


def test_oldest_first_and_bounded_per_tick(sweep):
    orders = [sweep.order(age=dt.timedelta(minutes=20 + n)) for n in range(6)]
    assert ids(sweep.tick(max_runs_per_tick=3)) == list(reversed(orders))[:3]


def test_orders_older_than_the_age_window_are_left_alone(sweep):
    sweep.order(age=dt.timedelta(days=40))
    assert sweep.tick() == []


def test_leased_backing_off_quarantined_and_resolved_orders_are_excluded(sweep):
    leased, backing_off, quarantined, expired_lease, due, resolved = (sweep.order() for _ in range(6))
    now = utcnow()
    sweep.store.update_state(resolved, last_outcome="resolved")  # an admin closed it by hand: never again
    sweep.store.claim(leased, "run-a", dt.timedelta(minutes=10))
    sweep.store.update_state(backing_off, next_attempt_at=now + dt.timedelta(minutes=5))
    sweep.store.update_state(quarantined, last_outcome="needs_attention")
    sweep.store.update_state(expired_lease, lease_owner="dead-run", lease_expires_at=now - dt.timedelta(seconds=1))
    sweep.store.update_state(due, next_attempt_at=now - dt.timedelta(seconds=1), last_outcome="retry_later")
    assert sorted(ids(sweep.tick())) == sorted([expired_lease, due])


def test_run_request_carries_tags_config_and_an_attempt_numbered_key(sweep):
    order_id = sweep.order()
    (first,) = sweep.tick()
    bucket = int(utcnow().timestamp() // RecoveryPolicyResource().lease_seconds)  # one lease period
    assert first.run_key == f"{order_id}:1:{bucket}"
    assert first.tags == {
        "bitloot/order_id": order_id,
        "bitloot/trigger": "sensor",
        "bitloot/reason": first.run_config["reason"],
        "bitloot/requested_by": "stuck_orders_sensor",
        "bitloot/attempt": "1",
    }
    assert dg.validate_run_config(fulfill_order, first.run_config)
    # After a run claimed the order (attempt 1 done) the next request is attempt 2, with a new key.
    sweep.store.claim(order_id, "run-1", dt.timedelta(minutes=1))
    sweep.store.finish_run(order_id, "run-1")
    (second,) = sweep.tick()
    assert second.run_key == f"{order_id}:2:{bucket}" and second.tags["bitloot/attempt"] == "2"


def test_orders_with_a_run_in_flight_are_skipped(sweep, dagster_instance):
    order_id = sweep.order()
    run = dagster_instance.create_run_for_job(
        fulfill_order, run_config={"order_id": order_id, "reason": "x", "requested_by": "y"},
        tags={"bitloot/order_id": order_id},
    )
    assert dagster_instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.NOT_STARTED
    assert sweep.tick() == []
    dagster_instance.delete_run(run.run_id)
    assert ids(sweep.tick()) == [order_id]


def started_run(instance: dg.DagsterInstance, order_id: str, *, started: dt.datetime) -> dg.DagsterRun:
    """A run Dagster shows as started at `started`, as a run worker leaves it when it dies."""
    run = instance.create_run_for_job(
        fulfill_order, run_config={"order_id": order_id, "reason": "x", "requested_by": "y"},
        tags={"bitloot/order_id": order_id},
    )
    instance.report_dagster_event(
        DagsterEvent(DagsterEventType.RUN_START.value, job_name=fulfill_order.name), run.run_id,
        timestamp=started.timestamp(),
    )
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    return run


def test_a_run_whose_worker_died_is_failed_and_its_order_taken_up_next_tick(sweep, dagster_instance):
    lease = dt.timedelta(seconds=60)
    now = utcnow()
    died = sweep.order()  # its run claimed the order, then the worker was killed: the lease lapsed
    dead_run = started_run(dagster_instance, died, started=now - dt.timedelta(minutes=5))
    sweep.store.claim(died, dead_run.run_id, dt.timedelta(seconds=-1))
    working = sweep.order()  # its run renews the lease at every step
    live_run = started_run(dagster_instance, working, started=now - dt.timedelta(minutes=5))
    sweep.store.claim(working, live_run.run_id, lease)
    never_claimed = sweep.order()  # its run died while starting, longer ago than a lease
    unclaimed_run = started_run(dagster_instance, never_claimed, started=now - 2 * lease)
    starting = sweep.order()  # its run started a moment ago and is about to claim
    starting_run = started_run(dagster_instance, starting, started=now)

    requests = sweep.tick(lease_seconds=60, max_retry_wait_seconds=20)
    ticked = utcnow()
    assert sorted(ids(requests)) == sorted([died, never_claimed])
    # The run that never claimed was requested under attempt 1 in the bucket it started in; its successor's
    # key is for the same attempt, so only the bucket (one lease long) keeps it from being a used key.
    (retry,) = [r for r in requests if r.tags["bitloot/order_id"] == never_claimed]
    assert retry.run_key in {f"{never_claimed}:1:{int(moment.timestamp() // 60)}" for moment in (now, ticked)}
    status = {run.run_id: dagster_instance.get_run_by_id(run.run_id).status
              for run in (dead_run, live_run, unclaimed_run, starting_run)}
    assert status == {dead_run.run_id: dg.DagsterRunStatus.FAILURE, live_run.run_id: dg.DagsterRunStatus.STARTED,
                      unclaimed_run.run_id: dg.DagsterRunStatus.FAILURE,
                      starting_run.run_id: dg.DagsterRunStatus.STARTED}
    failure = dagster_instance.all_logs(dead_run.run_id, of_type=DagsterEventType.RUN_FAILURE)
    assert "run worker gone" in failure[0].message
    for run in (dead_run, live_run, unclaimed_run, starting_run):
        dagster_instance.delete_run(run.run_id)


def test_a_run_that_never_got_its_worker_started_is_failed_after_a_lease_period(sweep, dagster_instance):
    order_id = sweep.order()
    run = dagster_instance.create_run_for_job(
        fulfill_order, run_config={"order_id": order_id, "reason": "x", "requested_by": "y"},
        tags={"bitloot/order_id": order_id},
    )
    short = {"lease_seconds": 2, "max_retry_wait_seconds": 1, "supplier_poll_seconds": 1}
    assert sweep.tick(**short) == []  # launched a moment ago: its worker may still be loading
    time.sleep(3.1)
    assert ids(sweep.tick(**short)) == [order_id]
    assert dagster_instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    dagster_instance.delete_run(run.run_id)


def test_orders_in_flight_do_not_use_up_the_tick(sweep, dagster_instance):
    oldest, older, young = (sweep.order(age=dt.timedelta(minutes=m)) for m in (50, 40, 30))
    run = dagster_instance.create_run_for_job(
        fulfill_order, run_config={"order_id": oldest, "reason": "x", "requested_by": "y"},
        tags={"bitloot/order_id": oldest},
    )
    assert ids(sweep.tick(max_runs_per_tick=2)) == [older, young]
    dagster_instance.delete_run(run.run_id)


def test_skip_reason_when_nothing_is_stuck(sweep, dagster_instance, app_store_url):
    context = dg.build_sensor_context(
        instance=dagster_instance,
        resources={"store": StoreResource(database_url=app_store_url), "policy": RecoveryPolicyResource()},
    )
    result = stuck_orders_sensor(context)
    assert isinstance(result, dg.SkipReason) and "no stuck orders" in result.skip_message


def test_a_store_without_the_project_tables_fails_the_tick_with_what_to_do(empty_pg_url, dagster_instance):
    bitloot_ddl.populate_bitloot_database(empty_pg_url)
    context = dg.build_sensor_context(
        instance=dagster_instance,
        resources={"store": StoreResource(database_url=empty_pg_url), "policy": RecoveryPolicyResource()},
    )
    with pytest.raises(ProjectTablesMissing, match="run `bitloot-reconcile db upgrade` first"):
        stuck_orders_sensor(context)


def test_skip_message_counts_and_names_what_was_skipped_and_why(sweep, dagster_instance, app_store_url):
    ids = seed_every_state(sweep.store.engine)
    due = sorted(ids[s] for s in ("stuck", "email_pending"))
    assert sorted(ids_of(sweep.tick())) == due  # the sweep launches the due ones, and only those
    for order_id in due:  # now their runs hold the leases
        sweep.store.claim(order_id, f"run-{order_id[:8]}", dt.timedelta(minutes=10))
    context = dg.build_sensor_context(
        instance=dagster_instance,
        resources={"store": StoreResource(database_url=app_store_url), "policy": RecoveryPolicyResource()},
    )

    result = stuck_orders_sensor(context)

    assert isinstance(result, dg.SkipReason)
    message = result.skip_message
    assert message.startswith("no stuck orders due; 11 skipped: ")
    parts = dict(part.split(" (", 1) for part in message.split(": ", 1)[1].split("; "))
    next_at = re.escape(", next attempt from ") + r"\d\d:\d\d UTC"
    expected = {
        "in flight": (3, "", [*due, ids["in_flight"]]),
        "needing a person": (1, "", [ids["needs_attention"]]),
        "quarantined": (1, "", [ids["quarantined"]]),
        "waiting for the supplier": (1, next_at, [ids["waiting_for_supplier"]]),
        "payment not confirmed": (1, next_at, [ids["payment_not_confirmed"]]),
        "held by a BitLoot switch": (1, next_at, [ids["held"]]),
        "backing off": (1, next_at, [ids["backing_off"]]),
        "inside the grace period": (1, re.escape(", due from ") + r"\d\d:\d\d UTC", [ids["inside_grace"]]),
        "past the age window": (1, "", [ids["past_age_window"]]),
    }
    assert len(parts) == len(expected)
    for label, (count, when, orders) in expected.items():
        (head,) = [h for h in parts if re.fullmatch(rf"{count} {re.escape(label)}{when}", h)]
        assert sorted(parts[head].rstrip(")").split(", ")) == sorted(orders), label


def test_skip_message_names_at_most_five_orders_per_reason(sweep, dagster_instance, app_store_url):
    later = utcnow() + dt.timedelta(minutes=10)
    backing_off = [sweep.order(age=dt.timedelta(minutes=60 - n)) for n in range(7)]
    for order_id in backing_off:
        sweep.store.update_state(order_id, last_outcome="retry_later", next_attempt_at=later)
    context = dg.build_sensor_context(
        instance=dagster_instance,
        resources={"store": StoreResource(database_url=app_store_url), "policy": RecoveryPolicyResource()},
    )

    message = stuck_orders_sensor(context).skip_message

    assert message == (f"no stuck orders due; 7 skipped: 7 backing off, next attempt from {later:%H:%M} UTC "
                       f"({', '.join(backing_off[:5])}, ...)")


# -- the backlog path -------------------------------------------------------------------------------------------
def test_above_the_threshold_one_batch_run_of_the_oldest_due_orders(sweep):
    orders = [sweep.order(age=dt.timedelta(minutes=20 + n)) for n in range(5)]
    oldest_first = list(reversed(orders))

    assert sorted(ids(sweep.tick(batch_threshold=5))) == sorted(orders)  # at the threshold: one run each
    (batch,) = sweep.tick(batch_threshold=4)
    assert batch.job_name == "fulfill_backlog"
    due = batch.run_config["ops"]["work_backlog"]["config"]["orders"]
    assert [d["order_id"] for d in due] == oldest_first
    assert all(d["reason"].startswith("stuck in paid for") for d in due)
    assert "bitloot/order_id" not in batch.tags  # no per-order launch limit: the leases guard each order
    assert batch.tags["bitloot/trigger"] == "sensor" and batch.tags["bitloot/batch_size"] == "5"
    assert dg.validate_run_config(fulfill_backlog, batch.run_config)
    (bounded,) = sweep.tick(batch_threshold=2, batch_max_orders=3, batch_max_runs=1)
    assert [d["order_id"] for d in bounded.run_config["ops"]["work_backlog"]["config"]["orders"]] == oldest_first[:3]
    assert bounded.run_key != batch.run_key
    # More than one batch's worth and two slots: both batches at once, the oldest orders first.
    first, second = sweep.tick(batch_threshold=2, batch_max_orders=3, batch_max_runs=2)
    assert [[d["order_id"] for d in b.run_config["ops"]["work_backlog"]["config"]["orders"]] for b in (first, second)
            ] == [oldest_first[:3], oldest_first[3:]]
    assert sweep.tick(batch_threshold=4)[0].run_key == batch.run_key  # the same due orders: the same key


def batch_run(instance: dg.DagsterInstance, order_ids: list[str], *, started: dt.datetime | None = None
              ) -> dg.DagsterRun:
    run = instance.create_run_for_job(fulfill_backlog, run_config=backlog_config(order_ids))
    if started:
        instance.report_dagster_event(
            DagsterEvent(DagsterEventType.RUN_START.value, job_name=fulfill_backlog.name), run.run_id,
            timestamp=started.timestamp(),
        )
    return run


def test_orders_inside_a_batch_in_flight_are_skipped(sweep, dagster_instance):
    inside = [sweep.order() for _ in range(2)]
    outside = sweep.order()
    run = batch_run(dagster_instance, inside)
    try:
        assert ids(sweep.tick()) == [outside]
    finally:
        dagster_instance.delete_run(run.run_id)
    assert sorted(ids(sweep.tick())) == sorted([*inside, outside])


def test_the_next_batch_waits_while_batch_max_runs_batches_are_in_flight(sweep, dagster_instance, app_store_url):
    running = [batch_run(dagster_instance, [sweep.order()]) for _ in range(2)]
    due = [sweep.order() for _ in range(3)]

    def tick(max_runs: int) -> dg.SensorResult | dg.SkipReason:
        context = dg.build_sensor_context(instance=dagster_instance, resources={
            "store": StoreResource(database_url=app_store_url),
            "policy": RecoveryPolicyResource(batch_threshold=2, batch_max_runs=max_runs)})
        return stuck_orders_sensor(context)

    try:
        waiting = tick(2)
        assert isinstance(waiting, dg.SkipReason)
        assert waiting.skip_message == ("3 due orders wait for a batch: 2 fulfill_backlog run(s) in flight, "
                                        "at most 2 at once")
        (batch,) = tick(3).run_requests
        assert sorted(o["order_id"] for o in batch.run_config["ops"]["work_backlog"]["config"]["orders"]) == sorted(due)
    finally:
        for run in running:
            dagster_instance.delete_run(run.run_id)


def test_a_batch_whose_worker_died_is_failed_and_its_orders_taken_up(sweep, dagster_instance):
    lease = {"lease_seconds": 60, "max_retry_wait_seconds": 20}
    now = utcnow()
    worked, held, never = (sweep.order() for _ in range(3))
    dead = batch_run(dagster_instance, [worked, held, never], started=now - dt.timedelta(minutes=5))
    sweep.store.claim(worked, dead.run_id, dt.timedelta(seconds=60))
    sweep.store.append_audit(order_id=worked, action="fulfill_order", trigger="sensor", actor=None, reason=None,
                             run_id=dead.run_id, outcome="retry_later")
    sweep.store.finish_run(worked, dead.run_id, last_outcome="retry_later", last_run_id=dead.run_id,
                           next_attempt_at=now + dt.timedelta(hours=1))
    sweep.store.claim(held, dead.run_id, dt.timedelta(seconds=60))
    alive_other = [sweep.order() for _ in range(2)]
    alive = batch_run(dagster_instance, alive_other, started=now - dt.timedelta(minutes=5))
    sweep.store.claim(alive_other[0], alive.run_id, dt.timedelta(seconds=60))
    try:
        # The dead batch still holds a live lease on `held`: it counts as working.
        assert ids(sweep.tick(**lease)) == []
        sweep.store.update_state(held, lease_expires_at=now - dt.timedelta(seconds=1))  # its lease lapsed

        assert sorted(ids(sweep.tick(**lease))) == sorted([held, never])
        assert dagster_instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        assert dagster_instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.STARTED
        failure = dagster_instance.all_logs(dead.run_id, of_type=DagsterEventType.RUN_FAILURE)
        assert "run worker gone" in failure[0].message and "2 of its orders" in failure[0].message
    finally:
        for run in (dead, alive):
            dagster_instance.delete_run(run.run_id)


def test_a_batch_killed_after_it_got_to_every_order_is_failed_once_its_leases_lapse(sweep, dagster_instance):
    """Killed while working its last orders: every order has an audit row of the batch (its claim), so none is
    "never attempted"; the leases it still holds lapse, and that alone says its worker is gone."""
    lease = {"lease_seconds": 60, "max_retry_wait_seconds": 20}
    now = utcnow()
    orders = [sweep.order() for _ in range(2)]
    dead = batch_run(dagster_instance, orders, started=now - dt.timedelta(minutes=5))
    for order_id in orders:
        sweep.store.claim(order_id, dead.run_id, dt.timedelta(seconds=60))
        sweep.store.append_audit(order_id=order_id, action="requested", trigger="sensor", actor=None, reason=None,
                                 run_id=dead.run_id, outcome=None)
    try:
        assert ids(sweep.tick(**lease)) == []  # live leases: still working
        for order_id in orders:
            sweep.store.update_state(order_id, lease_expires_at=now - dt.timedelta(seconds=1))

        assert sorted(ids(sweep.tick(**lease))) == sorted(orders)
        assert dagster_instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        failure = dagster_instance.all_logs(dead.run_id, of_type=DagsterEventType.RUN_FAILURE)
        assert "0 of its orders never attempted, 2 left on a lapsed lease" in failure[0].message
    finally:
        dagster_instance.delete_run(dead.run_id)


def test_runs_whose_workers_are_still_starting_are_left_to_dagsters_start_timeout(sweep, dagster_instance):
    """On a loaded host a launched worker may take longer than a lease to load the code location; failing it
    then would have the sweep and Dagster's run retry launch more workers onto the same host. A run stuck in
    STARTING is failed by Dagster's run monitoring (`start_timeout_seconds` in dagster.yaml) instead."""
    short = {"lease_seconds": 2, "max_retry_wait_seconds": 1, "supplier_poll_seconds": 1}
    alone, batched = sweep.order(), [sweep.order() for _ in range(2)]
    runs = [dagster_instance.create_run_for_job(
        fulfill_order, run_config={"order_id": alone, "reason": "x", "requested_by": "y"},
        tags={"bitloot/order_id": alone}), batch_run(dagster_instance, batched)]
    for run in runs:
        dagster_instance.report_dagster_event(
            DagsterEvent(DagsterEventType.RUN_STARTING.value, job_name=run.job_name), run.run_id)
        assert dagster_instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTING
    try:
        time.sleep(3.1)  # longer than a lease
        assert sweep.tick(**short) == []
        assert {dagster_instance.get_run_by_id(r.run_id).status for r in runs} == {dg.DagsterRunStatus.STARTING}
    finally:
        for run in runs:
            dagster_instance.delete_run(run.run_id)
