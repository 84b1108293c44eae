"""`fulfill_backlog` executed for real against PostgreSQL, SeaweedFS and the HTTP simulators: each order of a
batch ends as its own `fulfill_order` run would, and no order's trouble reaches another."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable

import dagster as dg
import pytest
import sqlalchemy as sa

from bitloot_reconcile.adapters.errors import PermanentError
from bitloot_reconcile.assets.order_history import ORDER_ATTEMPTS_KEY, ORDER_IDS
from bitloot_reconcile.domain import fulfilment
from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.store.schema import orders
from bitloot_standins.httpserver import Fault
from bitloot_standins.s3_proxy import FaultyS3Proxy
from tests.fixtures.runs import assert_fully_delivered
from tests.fixtures.world import FRONTEND, World, backlog_config

SWEEP = {"bitloot/trigger": "sensor"}


def mixed_backlog(world: World, tag: str) -> dict[str, str]:
    """One order of each kind the sweep finds, by what should become of it."""
    payment = f"{abs(hash(tag)) % 10**9}"
    waiting = world.order([world.product()], status="waiting", payment_status="waiting", payment_id=payment)
    world.nowpayments.set_payment(payment, "finished", order_id=waiting)
    unconfirmed = world.order([world.product()], status="waiting", payment_status="waiting",
                              payment_id=payment + "1")
    world.nowpayments.set_payment(payment + "1", "waiting", order_id=unconfirmed)
    # Fulfilled by an earlier run whose completion email never went out.
    email_pending = world.order([world.product()], status="fulfilled", completion_email_sent=False)
    return {
        "plain": world.order([world.product()]),
        "multi": world.order([world.product(), world.product(key_type="image/png"), world.product()]),
        "paid_at_nowpayments": waiting,
        "unconfirmed": unconfirmed,
        "manual_delivery": world.order([world.product(delivery_mode="manual")]),
        "price_above_cost": world.order([world.product(price=9.0, cost=5.0)]),
        "custom_inventory": world.order([world.product(source_type="custom")]),
        "email_pending": email_pending,
    }


EXPECTED = {
    "plain": "fulfilled", "multi": "fulfilled", "paid_at_nowpayments": "fulfilled",
    "unconfirmed": "payment_not_confirmed", "manual_delivery": "waiting_for_supplier",
    "price_above_cost": "needs_attention", "custom_inventory": "needs_attention", "email_pending": "fulfilled",
}


def outcomes(world: World, orders: dict[str, str]) -> dict[str, str]:
    return {kind: world.store.get_state(order_id).last_outcome for kind, order_id in orders.items()}


def test_a_mixed_batch_ends_each_order_as_its_own_run_would(world: World):
    batched, single = mixed_backlog(world, "batch"), mixed_backlog(world, "single")

    result = world.batch(list(batched.values()))
    for order_id in single.values():
        world.run(order_id, reason="stuck", tags=SWEEP)

    assert result.success
    assert outcomes(world, batched) == outcomes(world, single) == EXPECTED
    for kind in ("plain", "multi", "paid_at_nowpayments"):
        assert_fully_delivered(world, batched[kind])
    for kind in ("plain", "multi", "paid_at_nowpayments", "email_pending"):
        assert world.store.load_order(batched[kind]).completion_email_sent
    assert len(world.resend.sent) == 2 * 4  # one email per fulfilled order, never two
    for order_id in batched.values():
        assert len(world.kinguin.orders_for_external_id(order_id)) <= 1
        state = world.store.get_state(order_id)
        assert state.lease_owner is None and state.last_run_id in (result.run_id, None)
        rows = [r for r in world.store.audit_trail(order_id) if r["run_id"] == result.run_id]
        assert [r["action"] for r in rows] == ["requested", "fulfill_order"]
        assert {r["trigger"] for r in rows} == {"sensor"} and rows[-1]["actor"] == "stuck_orders_sensor"
        assert rows[0]["reason"] == "stuck in paid for 20 min"
    assert result.output_for_node("work_backlog") == {"fulfilled": 4, "payment_not_confirmed": 1,
                                                      "waiting_for_supplier": 1, "needs_attention": 2}


def test_every_attempt_is_an_event_on_the_orders_partition_whatever_run_made_it(world: World):
    order_id = world.order([world.product(delivery_mode="manual")])
    first = world.run(order_id, tags=SWEEP)
    (supplier_order,) = world.kinguin.orders_for_external_id(order_id)
    world.kinguin.deliver(supplier_order.order_id)
    batch = world.batch([order_id])

    assert world.instance.has_dynamic_partition(ORDER_IDS.name, order_id)
    records = world.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=ORDER_ATTEMPTS_KEY, asset_partitions=[order_id]), limit=10, ascending=True
    ).records
    seen = [(r.run_id, r.asset_materialization.metadata) for r in records]
    assert [(run_id, meta["outcome"].value, meta["job"].value) for run_id, meta in seen] == [
        (first.run_id, "waiting_for_supplier", "fulfill_order"), (batch.run_id, "fulfilled", "fulfill_backlog")]
    assert seen[1][1]["run"].value == batch.run_id and seen[1][1]["trigger"].value == "sensor"
    assert seen[0][1]["actor"].value == "admin@bitloot.io"
    text = repr(seen)
    for key in supplier_order.keys:
        assert key.serial not in text
    assert "X-Amz-Signature" not in text


def test_a_batch_logs_one_attempt_event_per_order_in_its_run(world: World):
    orders = [world.order([world.product()]) for _ in range(30)]

    result = world.batch(orders)

    assert result.success
    for order_id in orders:
        (record,) = world.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=ORDER_ATTEMPTS_KEY, asset_partitions=[order_id]), limit=5).records
        assert record.asset_materialization.metadata["outcome"].value == "fulfilled"
        assert record.run_id == result.run_id


def test_answers_lost_inside_a_batch_buy_once_and_email_once(world: World):
    lost_order, lost_email, plain = (world.order([world.product()]) for _ in range(3))
    world.kinguin.inject("place_order_v2", Fault(lose_response=True,
                                                 match=lambda body: body.get("orderExternalId") == lost_order))
    world.resend.inject("send_email", Fault(lose_response=True,
                                            match=lambda body: lost_email[:8].upper() in body.get("subject", "")))

    result = world.batch([lost_order, lost_email, plain])

    assert result.success
    for order_id in (lost_order, lost_email, plain):
        assert world.store.get_state(order_id).last_outcome == "fulfilled"
        assert len(world.kinguin.orders_for_external_id(order_id)) == 1
        assert_fully_delivered(world, order_id)
        subject = f"#{order_id[:8].upper()}"
        assert len([m for m in world.resend.sent if subject in m["subject"]]) == 1
    assert world.kinguin_calls().count("search_orders") == 1  # the lost placement is adopted, not bought again
    tries = [r for r in world.resend.requests_to("send_email") if lost_email[:8].upper() in r.body["subject"]]
    assert len(tries) == 2  # the answer was lost once; the retry under the same key sent nothing again


def test_an_email_bitloot_sent_while_the_batch_worked_the_order_is_not_sent_again(world: World):
    """The attempt keeps the order it read at the claim, but reads it fresh before the email."""
    order_id = world.order([world.product()])

    def bitloot_sends_the_email(request) -> bool:  # BitLoot's own worker, while the batch fetches the keys
        with world.engine.begin() as conn:
            conn.execute(sa.update(orders).where(orders.c.id == order_id).values(completionEmailSent=True))
        return True

    world.kinguin.inject("get_keys", Fault(where=bitloot_sends_the_email))
    result = world.batch([order_id])

    assert result.success
    assert world.store.get_state(order_id).last_outcome == "fulfilled"
    assert_fully_delivered(world, order_id)
    assert [m for m in world.resend.sent if f"#{order_id[:8].upper()}" in m["subject"]] == []


def test_r2_down_for_one_order_leaves_the_others_alone(world: World, seaweed):
    orders = [world.order([world.product()]) for _ in range(4)]
    proxy = FaultyS3Proxy(seaweed.endpoint_url).start()
    try:
        proxied = R2Resource(endpoint=proxy.url, access_key_id=seaweed.access_key_id,
                             secret_access_key=seaweed.secret_access_key, bucket=world.r2.bucket)
        proxy.fail(orders[0], times=1000)
        result = world.batch(orders, r2=proxied)
    finally:
        proxy.stop()

    assert result.success
    broken = world.store.get_state(orders[0])
    assert broken.last_outcome == "retry_later" and broken.lease_owner is None
    assert "store_keys failed" in broken.last_reason and "X-Amz" not in broken.last_reason
    assert broken.next_attempt_at is not None
    for order_id in orders[1:]:
        assert world.store.get_state(order_id).last_outcome == "fulfilled"
        assert_fully_delivered(world, order_id)

    world.batch([orders[0]])
    assert world.store.get_state(orders[0]).last_outcome == "fulfilled"
    assert_fully_delivered(world, orders[0])
    assert len(world.kinguin.orders_for_external_id(orders[0])) == 1


def test_a_kinguin_refusal_for_one_order_does_not_stall_the_others(world: World):
    refused = world.order([world.product(price=9.0, cost=5.0)])
    slow = world.order([world.product()])
    world.kinguin.inject("place_order_v2", Fault(latency=1.0, match=lambda body: body.get("orderExternalId") == slow))
    quick = [world.order([world.product()]) for _ in range(3)]

    result = world.batch([refused, slow, *quick])

    assert result.success
    assert world.store.get_state(refused).last_outcome == "needs_attention"
    for order_id in (slow, *quick):
        assert world.store.get_state(order_id).last_outcome == "fulfilled"


STEPS = ["verify_payment", "ensure_supplier_order", "poll_supplier", "store_keys", "mark_fulfilled",
         "send_completion_email"]


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_after_each_step_inside_a_batch_then_the_next_batch_converges(world: World, monkeypatch,
                                                                              step: str):
    orders = [world.order([world.product(), world.product(key_type="image/gif")]) for _ in range(2)]
    real = getattr(fulfilment, step)

    def crash_after(*args, **kwargs):
        real(*args, **kwargs)
        raise PermanentError("chaos", "injected crash")

    monkeypatch.setattr(fulfilment, step, crash_after)
    assert world.batch(orders).success  # an order's failure is its own, never the run's
    for order_id in orders:
        state = world.store.get_state(order_id)
        assert state.last_outcome == "retry_later" and state.lease_owner is None
        assert state.last_reason.startswith(f"{step} failed")
    monkeypatch.setattr(fulfilment, step, real)

    world.batch(orders)
    for order_id in orders:
        assert world.store.get_state(order_id).last_outcome == (
            "already_fulfilled" if step == "send_completion_email" else "fulfilled")
        assert len(world.kinguin.orders_for_external_id(order_id)) == 1
        assert_fully_delivered(world, order_id)
    assert len(world.resend.sent) == len(orders)


# -- concurrency and kills: each run in its own process, as the run launcher starts them ------------------------
def _specs(world: World, **policy) -> dict:
    overrides = {"policy": RecoveryPolicyResource(frontend_url=FRONTEND, **policy)} if policy else {}
    resources = world.resources(**overrides)
    return {name: (type(r), {f: getattr(r, f) for f in type(r).model_fields}) for name, r in resources.items()}


def _launch_in_child(resource_specs: dict, job_name: str, run_config: dict, done) -> None:
    resources = {name: cls(**fields) for name, (cls, fields) in resource_specs.items()}
    job = {"fulfill_backlog": fulfill_backlog, "fulfill_order": fulfill_order}[job_name]
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(run_config=run_config, resources=resources, instance=instance,
                                        raise_on_error=False, tags=SWEEP)
        done.put((job_name, result.success))


def _start(context, specs: dict, job_name: str, run_config: dict, done) -> multiprocessing.Process:
    process = context.Process(target=_launch_in_child, args=(specs, job_name, run_config, done))
    process.start()
    return process


def test_two_batches_and_a_per_order_run_on_the_same_orders_never_buy_twice(world: World):
    orders = [world.order([world.product()]) for _ in range(3)]
    world.kinguin.inject("place_order_v2", Fault(latency=1.5, times=10))
    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    specs = _specs(world)
    workers = [
        _start(context, specs, "fulfill_backlog", backlog_config(orders), done),
        _start(context, specs, "fulfill_backlog", backlog_config(list(reversed(orders))), done),
        _start(context, specs, "fulfill_order",
               {"order_id": orders[1], "reason": "race", "requested_by": "ops@bitloot.io"}, done),
    ]
    finished = sorted(done.get(timeout=180) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)

    assert finished == [("fulfill_backlog", True), ("fulfill_backlog", True), ("fulfill_order", True)]
    for order_id in orders:
        assert len(world.kinguin.orders_for_external_id(order_id)) == 1
        assert_fully_delivered(world, order_id)
        ends = [r["outcome"] for r in world.store.audit_trail(order_id) if r["action"] == "fulfill_order"]
        assert ends.count("fulfilled") == 1 and set(ends) <= {"fulfilled", "busy", "already_fulfilled"}
    assert world.kinguin_calls().count("place_order_v2") == 3
    assert sorted(m["to"][0] for m in world.resend.sent) == ["customer@example.com"] * 3


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_batch_killed_mid_way_leaves_every_order_to_the_next_one(world: World):
    orders = [world.order([world.product()]) for _ in range(4)]
    world.kinguin.inject("get_keys", Fault(latency=30.0, times=2))  # the first two orders hang on their keys
    short_lease = {"lease_seconds": 3, "max_retry_wait_seconds": 1, "supplier_poll_seconds": 0.2,
                   "supplier_poll_attempts": 1, "batch_workers": 2}
    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    worker = _start(context, _specs(world, **short_lease), "fulfill_backlog", backlog_config(orders), done)
    _wait_for(lambda: len(world.kinguin.requests_to("get_keys")) == 2, timeout=120)
    held = {o: world.store.get_state(o) for o in orders}
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=30)

    leased = [o for o, state in held.items() if state.lease_owner]
    assert len(leased) == 2  # the killed run held the two orders it was working, and no other
    assert all(world.store.load_order(o).status == "paid" for o in orders)
    time.sleep(3.5)  # the dead run's leases lapse
    world.kinguin.clear_faults()

    assert world.batch(orders).success
    for order_id in orders:
        assert world.store.get_state(order_id).last_outcome == "fulfilled"
        assert len(world.kinguin.orders_for_external_id(order_id)) == 1
        assert_fully_delivered(world, order_id)
    assert len(world.resend.sent) == 4
    assert world.store.get_state(leased[0]).attempts == 2  # the killed attempt counted, the order recovered


def test_a_malformed_order_id_in_a_hand_made_batch_fails_it_before_anything_is_claimed(world: World):
    order_id = world.order([world.product()])
    result = world.batch([order_id.upper(), "not-a-uuid"])
    assert not result.success
    assert world.store.get_state(order_id).attempts == 0 and world.kinguin.requests == []
    result = world.batch([f" {order_id.upper()} "])  # canonicalised, as the launchpad does for one order
    assert result.success and world.store.get_state(order_id).last_outcome == "fulfilled"
    assert {r["order_id"] for r in world.store.audit_trail(order_id)} == {order_id}


def test_a_retry_after_wait_in_a_batch_is_capped_as_in_a_run(world: World):
    order_id = world.order([world.product()], status="waiting", payment_status="waiting")
    world.nowpayments.inject("get_payment", Fault(status=429, retry_after=3600, times=10))
    policy = RecoveryPolicyResource(frontend_url=FRONTEND, max_retry_wait_seconds=0.2)

    started = time.monotonic()
    result = world.batch([order_id], policy=policy)

    assert result.success  # the order's failure is its own
    assert time.monotonic() - started < 30  # four tries, each waiting 0.2 s instead of an hour
    state = world.store.get_state(order_id)
    assert state.last_outcome == "retry_later"
    assert state.last_reason.startswith("verify_payment failed: TransientError: nowpayments:"), state.last_reason
