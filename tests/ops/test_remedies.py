"""An admin's remedies on `fulfill_order`, run for real against PostgreSQL, SeaweedFS and the HTTP simulators:
a price ceiling above cost, a replacement of a canceled Kinguin order, a resolution by hand."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import dagster as dg
import pytest

from bitloot_reconcile.adapters.kinguin import KinguinClient
from bitloot_reconcile.adapters.nowpayments import NowPaymentsClient
from bitloot_reconcile.domain import alerting, reconciliation
from bitloot_reconcile.ops.fulfill_order import RefusedLaunch
from bitloot_reconcile.resources.alerts import AlertsResource
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.repository import utcnow
from tests.fixtures.definitions import needs_attention_alert_sensor, stuck_orders_sensor
from tests.fixtures.kinguin import KINGUIN_TEST_KEY
from tests.fixtures.payments_mail import NOWPAYMENTS_TEST_KEY
from tests.fixtures.runs import assert_fully_delivered, outcome_of, reason_of
from tests.fixtures.webhook import Receiver
from tests.fixtures.world import World


def tags_of(world: World, result: dg.ExecuteInProcessResult) -> dict[str, str]:
    return dict(world.instance.get_run_by_id(result.run_id).tags)


def refusal_of(result: dg.ExecuteInProcessResult) -> str:
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    return failure.step_failure_data.user_failure_data.description


def step_said(result: dg.ExecuteInProcessResult, step: str) -> str:
    (output,) = [e for e in result.all_events if e.is_successful_output and e.step_key == step]
    return output.event_specific_data.metadata["did"].value


# -- a price ceiling above cost ----------------------------------------------------------------------------------
def test_a_ceiling_within_the_bound_fulfils_an_order_refused_at_cost(world: World):
    game = world.product(price=5.8, cost=5.0)  # Kinguin's price moved up past BitLoot's cost
    order_id = world.order([game])
    assert outcome_of(world.run(order_id)) == "needs_attention"
    assert reason_of(world, order_id).startswith("product unavailable")

    # Bound for a 5.00 cost: +20% (6.00) or +5 EUR (10.00), the lower one.
    result = world.run(order_id, reason="ticket 88: price moved", remedy={"max_unit_price_eur": 6.0})

    assert outcome_of(result) == "fulfilled"
    assert_fully_delivered(world, order_id)
    (placed,) = world.kinguin.orders_for_external_id(order_id)
    assert [(line.request_price, line.price) for line in placed.lines] == [(6.0, 5.8)]
    assert world.kinguin_calls()[-4:] == ["get_product", "place_order_v2", "get_order", "get_keys"]
    said = step_said(result, "ensure_supplier_order")
    assert f"{game.kinguin_product_id}: from 5.80 EUR" in said and "paying at most 6.00" in said
    paid = f"paid 5.80 per unit for {game.kinguin_product_id} against cost 5.00 (+0.80)"
    assert paid in reason_of(world, order_id)
    assert tags_of(world, result)["bitloot/remedy"] == "max_unit_price_eur=6.00"
    rows = [r for r in world.store.audit_trail(order_id) if r["run_id"] == result.run_id]
    assert [(r["action"], r["outcome"]) for r in rows] == [
        ("requested", None), ("remedy", None), ("fulfill_order", "fulfilled")]
    assert rows[1]["detail"] == "max_unit_price_eur=6.00"
    assert {(r["actor"], r["reason"]) for r in rows} == {("admin@bitloot.io", "ticket 88: price moved")}
    assert paid in rows[-1]["detail"]


def test_a_ceiling_above_the_bound_is_a_refused_run_that_changes_nothing(world: World):
    order_id = world.order([world.product(price=5.8, cost=5.0)])
    result = world.run(order_id, remedy={"max_unit_price_eur": 6.01})

    refused = refusal_of(result)
    assert refused.startswith("max_unit_price_eur 6.01 is above the bound") and "at most 6.00" in refused
    assert "+20% or +5.00 EUR over cost" in refused and "\n" not in refused
    tags = tags_of(world, result)
    assert tags["bitloot/outcome"] == "refused" and tags["bitloot/remedy"] == "max_unit_price_eur=6.01"
    assert alerting.is_input_error(tags)  # nobody is paged
    assert world.kinguin.requests == []
    (row,) = world.store.audit_trail(order_id)
    assert (row["action"], row["outcome"]) == ("refused", "refused") and "above the bound" in row["detail"]
    assert world.store.get_state(order_id).attempts == 0


def test_the_bound_follows_the_shops_tunables(world: World):
    order_id = world.order([world.product(price=5.8, cost=5.0)])
    policy = RecoveryPolicyResource(supplier_poll_attempts=1, supplier_poll_seconds=0.2, max_price_over_cost_percent=50,
                             max_price_over_cost_eur=1)
    result = world.run(order_id, remedy={"max_unit_price_eur": 6.5}, policy=policy)
    assert "at most 6.00 (+50% or +1.00 EUR over cost" in refusal_of(result)


def test_no_offer_within_the_ceiling_buys_nothing_and_says_what_kinguin_asks(world: World):
    game = world.product(price=5.95, cost=5.0)
    order_id = world.order([game])
    result = world.run(order_id, remedy={"max_unit_price_eur": 5.9})

    assert outcome_of(result) == "needs_attention"
    reason = reason_of(world, order_id)
    assert "no offer within max_unit_price_eur 5.90" in reason and "from 5.95 EUR" in reason
    assert world.kinguin_calls() == ["get_product"]


# -- a replacement of a canceled Kinguin order ---------------------------------------------------------------------
@pytest.fixture
def canceled(world: World) -> tuple[str, str]:
    """An order whose Kinguin order Kinguin canceled: it needs a person. (order id, canceled Kinguin id)"""
    game = world.product(delivery_mode="manual")
    order_id = world.order([game])
    assert outcome_of(world.run(order_id)) == "waiting_for_supplier"
    (first,) = world.kinguin.orders_for_external_id(order_id)
    world.kinguin.cancel(first.order_id)
    assert outcome_of(world.run(order_id)) == "needs_attention"
    world.kinguin.set_delivery_mode("instant", game.kinguin_product_id)
    return order_id, first.order_id


REPLACE = {"replace_canceled_supplier_order": True}


def test_a_replacement_places_one_new_order_under_a_new_external_id(world: World, canceled):
    order_id, first = canceled
    result = world.run(order_id, reason="Kinguin canceled: buy again", remedy=REPLACE)

    assert outcome_of(result) == "fulfilled"
    (replacement,) = world.kinguin.orders_for_external_id(f"{order_id}:r1")
    assert [o.status for o in world.kinguin.orders_for_external_id(order_id)] == ["canceled"]
    assert world.store.load_order(order_id).kinguin_reservation_id == replacement.order_id
    assert f"canceled Kinguin order {first} replaced by {replacement.order_id}" in reason_of(world, order_id)
    state = world.store.get_state(order_id)
    assert (state.replacements, state.replaced_kinguin_order_id) == (1, first)
    assert tags_of(world, result)["bitloot/remedy"] == "replace_canceled_supplier_order"
    order = world.store.load_order(order_id)
    assert order.status == "fulfilled" and all(item.delivered for item in order.items)
    # The daily report finds both Kinguin orders (the replacement by its own orderExternalId): one live
    # beside a canceled one is no duplicate.
    now = utcnow()
    with KinguinClient(world.kinguin.base_url, KINGUIN_TEST_KEY) as kinguin, \
            NowPaymentsClient(world.nowpayments.url, NOWPAYMENTS_TEST_KEY) as nowpayments:
        report = reconciliation.build_report(world.store, kinguin, nowpayments, world.vault,
                                             now - dt.timedelta(days=1), now + dt.timedelta(minutes=1))
    row = report.set_index("order_id").loc[order_id]
    assert row["class"] == "ok"
    assert row["kinguin_orders"] == f"{first}:canceled, {replacement.order_id}:completed"
    assert len(report) == 1

    # Asked again once the replacement is live: nothing more is bought.
    again = world.run(order_id, reason="twice by mistake", remedy=REPLACE)
    assert not again.success and "Order is already fulfilled" in refusal_of(again)
    assert world.kinguin_calls().count("place_order_v2") == 2


@pytest.mark.parametrize("retried_by", ["admin", "sweep"])
def test_a_replacement_killed_after_the_placement_is_adopted_by_the_retry(world: World, canceled, monkeypatch,
                                                                        retried_by: str):
    order_id, first = canceled
    place = KinguinClient.place_order

    def placed_then_killed(self, *args, **kwargs):
        place(self, *args, **kwargs)  # Kinguin took the order; the run dies before it saves the id
        raise dg.Failure("run killed", allow_retries=False)

    monkeypatch.setattr(KinguinClient, "place_order", placed_then_killed)
    assert not world.run(order_id, reason="Kinguin canceled: buy again", remedy=REPLACE).success
    monkeypatch.setattr(KinguinClient, "place_order", place)
    assert world.store.load_order(order_id).kinguin_reservation_id == first  # not saved

    if retried_by == "admin":
        retry = world.run(order_id, reason="again after the crash", remedy=REPLACE)
    else:  # the failed run left retry_later: the sweep's next run carries no remedy
        retry = world.run(order_id, reason="stuck", requested_by="stuck_orders_sensor",
                          tags={"bitloot/trigger": "sensor"})

    assert outcome_of(retry) == "fulfilled"
    (replacement,) = world.kinguin.orders_for_external_id(f"{order_id}:r1")  # exactly one new Kinguin order
    assert len(world.kinguin.orders) == 2 and world.kinguin_calls().count("place_order_v2") == 2
    assert world.store.load_order(order_id).kinguin_reservation_id == replacement.order_id
    assert f"replaced by {replacement.order_id}" in reason_of(world, order_id)
    assert_delivered_from(world, order_id, replacement.order_id)


def assert_delivered_from(world: World, order_id: str, kinguin_order_id: str) -> None:
    order = world.store.load_order(order_id)
    assert order.status == "fulfilled" and order.completion_email_sent
    assert len(world.store.key_assignments(order_id)) == len(order.items)
    sold = {key.id for key in world.kinguin.orders[kinguin_order_id].keys}
    assert set(world.store.key_assignments(order_id).values()) <= sold


def test_a_live_kinguin_order_is_not_replaced(world: World):
    game = world.product(delivery_mode="manual")
    order_id = world.order([game])
    assert outcome_of(world.run(order_id)) == "waiting_for_supplier"
    (live,) = world.kinguin.orders_for_external_id(order_id)
    world.kinguin.deliver(live.order_id)

    result = world.run(order_id, remedy=REPLACE)

    assert outcome_of(result) == "fulfilled"
    assert f"{live.order_id} already placed (saved kinguinReservationId, completed: nothing to replace)" in \
        step_said(result, "ensure_supplier_order")
    assert len(world.kinguin.orders) == 1
    assert world.store.get_state(order_id).replacements == 0


def test_a_replacement_without_a_kinguin_order_is_refused(world: World):
    order_id = world.order([world.product()])
    result = world.run(order_id, remedy=REPLACE)
    assert "has no Kinguin order to replace" in refusal_of(result)
    assert world.kinguin.requests == []


# -- a resolution by hand ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("resolution", "status"), [
    ("refunded_to_customer", "refunded"), ("delivered_elsewhere", "paid"), ("written_off", "paid")])
def test_a_resolution_closes_the_order_without_an_outside_call(world: World, resolution: str, status: str):
    order_id = world.order([world.product(price=9.0, cost=5.0)])
    assert outcome_of(world.run(order_id)) == "needs_attention"
    calls = len(world.kinguin.requests)

    result = world.run(order_id, reason="ticket 9: customer refunded", requested_by="lead@bitloot.io",
                       remedy={"resolution": resolution})

    assert outcome_of(result) == "resolved"
    assert len(world.kinguin.requests) == calls and world.resend.requests == [] and world.nowpayments.requests == []
    assert world.store.load_order(order_id).status == status
    state = world.store.get_state(order_id)
    assert (state.last_outcome, state.next_attempt_at, state.lease_owner) == ("resolved", None, None)
    assert state.last_reason.startswith(f"resolved by hand: {resolution} (orders.status ")
    rows = [r for r in world.store.audit_trail(order_id) if r["run_id"] == result.run_id]
    assert [(r["action"], r["outcome"]) for r in rows] == [  # the claim step ends the run: it says so too
        ("requested", "resolved"), ("remedy", None), ("fulfill_order", "resolved")]
    assert rows[1]["detail"] == f"resolution={resolution}"
    assert all((r["actor"], r["reason"]) == ("lead@bitloot.io", "ticket 9: customer refunded") for r in rows)
    tags = tags_of(world, result)
    assert (tags["bitloot/outcome"], tags["bitloot/remedy"]) == ("resolved", f"resolution={resolution}")
    skipped = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_SKIPPED}
    assert "ensure_supplier_order" in skipped


def sweep_tick(world: World) -> list[str]:
    context = dg.build_sensor_context(
        instance=world.instance,
        resources={"store": StoreResource(database_url=world.store_url), "policy": RecoveryPolicyResource()},
    )
    result = stuck_orders_sensor(context)
    return [] if isinstance(result, dg.SkipReason) else [r.tags["bitloot/order_id"] for r in result.run_requests]


def test_a_resolved_order_is_never_swept_again(world: World):
    order_id = world.order([world.product()], status="waiting", payment_status="waiting", payment_id="77")
    world.nowpayments.set_payment("77", "waiting", order_id=order_id)
    assert outcome_of(world.run(order_id)) == "payment_not_confirmed"
    world.store.update_state(order_id, next_attempt_at=utcnow() - dt.timedelta(seconds=1))  # its backoff is over
    assert order_id in sweep_tick(world)

    assert outcome_of(world.run(order_id, remedy={"resolution": "written_off"})) == "resolved"

    assert order_id not in sweep_tick(world)
    now = utcnow()
    stuck = world.store.find_stuck_orders(now=now, grace=dt.timedelta(0), max_age=dt.timedelta(days=30), limit=100)
    assert order_id not in [s.id for s in stuck]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def test_a_resolved_order_is_never_alerted_again(world: World, receiver: Receiver):
    order_id = world.order([world.product(source_type="custom")])
    assert outcome_of(world.run(order_id)) == "needs_attention"
    context = dg.build_sensor_context(
        instance=world.instance,
        resources={"store": StoreResource(database_url=world.store_url),
                   "alerts": AlertsResource(webhook_url=receiver.hook_url, dagster_base_url="http://dagster.test")},
    )
    needs_attention_alert_sensor(context)
    assert len([t for t in receiver.texts if order_id in t]) == 1

    assert outcome_of(world.run(order_id, remedy={"resolution": "delivered_elsewhere"})) == "resolved"
    for _ in range(2):
        needs_attention_alert_sensor(context)
    assert len([t for t in receiver.texts if order_id in t]) == 1
    assert world.store.get_state(order_id).alerted_outcome is None  # the mark was cleared: it left the alerts


# -- who may ask for a remedy ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("remedy", "who", "expected"), [
    ({"resolution": "written_off"}, {"reason": " "}, "a remedy (resolution=written_off) needs a reason"),
    ({"max_unit_price_eur": 6.0}, {"requested_by": ""}, "a remedy (max_unit_price_eur=6.00) needs a reason"),
    (REPLACE, {"reason": ""}, "a remedy (replace_canceled_supplier_order) needs a reason and requested_by"),
    ({"max_unit_price_eur": 0.0}, {}, "max_unit_price_eur must be a price above 0 EUR"),
    ({"resolution": "written_off", "max_unit_price_eur": 6.0}, {}, "cannot be combined"),
])
def test_no_remedy_without_a_reason_and_an_actor_and_no_malformed_one(world: World, remedy, who, expected):
    order_id = world.order([world.product()])
    runs_before = world.instance.get_runs_count()
    with pytest.raises(RefusedLaunch, match=f"^fulfill_order refused: .*{re.escape(expected)}"):
        world.run(order_id, remedy=remedy, **who)
    assert world.instance.get_runs_count() == runs_before
    assert world.store.audit_trail(order_id) == [] and world.kinguin.requests == []


def test_a_sweep_run_cannot_carry_a_remedy(world: World):
    order_id = world.order([world.product(price=5.8, cost=5.0)])
    result = world.run(order_id, reason="stuck", requested_by="stuck_orders_sensor",
                       tags={"bitloot/trigger": "sensor"}, remedy={"max_unit_price_eur": 6.0})

    assert "a sweep run or a re-execution of one cannot carry it" in refusal_of(result)
    assert tags_of(world, result)["bitloot/outcome"] == "refused"
    assert world.kinguin.requests == [] and world.store.get_state(order_id).attempts == 0
