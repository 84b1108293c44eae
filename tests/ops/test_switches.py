"""BitLoot's own switches obeyed by real `fulfill_order` runs: feature flags and the email suppression list.

Every test runs against PostgreSQL, SeaweedFS and the HTTP simulators; the flags are rows of BitLoot's
`feature_flags` table, flipped as BitLoot's admin panel flips them.
"""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from bitloot_reconcile.domain import fulfilment
from bitloot_reconcile.store.schema import orders, reconcile_state
from bitloot_standins.httpserver import Fault
from bitloot_standins.seed import insert_email_bounce, set_feature_flag
from tests.fixtures.definitions import stuck_orders_sensor
from tests.fixtures.runs import assert_fully_delivered, outcome_of, reason_of
from tests.fixtures.world import World

TRIGGERS = ["admin", "sensor"]


def run_as(world: World, order_id: str, trigger: str, **kwargs) -> dg.ExecuteInProcessResult:
    """An admin run from the launchpad, or a run as the sweep launches it (its trigger tag set)."""
    tags = {"bitloot/trigger": "sensor"} if trigger == "sensor" else None
    return world.run(order_id, tags=tags, **kwargs)


def outside_calls(world: World) -> int:
    return len(world.kinguin.requests) + len(world.nowpayments.requests) + len(world.resend.requests)


def store_rows(world: World) -> tuple:
    with world.engine.connect() as conn:
        return (
            conn.execute(sa.select(orders).order_by(orders.c.id)).all(),
            conn.execute(sa.select(reconcile_state).order_by(reconcile_state.c.order_id)).all(),
        )


def switch_off_after(monkeypatch, world: World, step: str, flag: str, value: bool = False) -> None:
    """Flip `flag` right after `step` of the running order has done its work."""
    real = getattr(fulfilment, step)

    def then_switch(*args, **kwargs):
        result = real(*args, **kwargs)
        set_feature_flag(world.engine, flag, value)
        return result

    monkeypatch.setattr(fulfilment, step, then_switch)


def tick(world: World) -> list[dg.RunRequest] | dg.SkipReason:
    resources = world.resources()
    context = dg.build_sensor_context(
        instance=world.instance, resources={"store": resources["store"], "policy": resources["policy"]}
    )
    result = stuck_orders_sensor(context)
    return result if isinstance(result, dg.SkipReason) else result.run_requests


def launched(world: World) -> list[dg.RunRequest]:
    result = tick(world)
    return [] if isinstance(result, dg.SkipReason) else result


# -- fulfillment_enabled off, maintenance_mode on: nothing at all -------------------------------------------
@pytest.mark.parametrize(("flag", "value", "why"), [
    ("fulfillment_enabled", False, "fulfillment is switched off in BitLoot"),
    ("maintenance_mode", True, "BitLoot is in maintenance mode"),
])
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_fulfilment_switched_off_ends_the_run_at_once_changing_nothing(world: World, trigger, flag, value, why):
    order_id = world.order([world.product()], status="waiting", payment_status="waiting", payment_id="61")
    world.nowpayments.set_payment("61", "finished", order_id=order_id)
    set_feature_flag(world.engine, flag, value)
    before = store_rows(world)

    result = run_as(world, order_id, trigger)

    assert outcome_of(result) == "paused"
    assert outside_calls(world) == 0
    assert store_rows(world) == before  # no lease, no attempt, no state row, the order untouched
    trail = world.store.audit_trail(order_id)
    assert [(a["action"], a["outcome"], a["detail"]) for a in trail] == [
        ("requested", "paused", None), ("fulfill_order", "paused", why)]

    set_feature_flag(world.engine, flag, not value)
    assert outcome_of(run_as(world, order_id, trigger)) == "fulfilled"
    assert world.store.get_state(order_id).attempts == 1
    assert_fully_delivered(world, order_id)


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_fulfilment_switched_off_between_two_steps_stops_the_next_kinguin_step(world: World, monkeypatch, trigger):
    order_id = world.order([world.product()])
    switch_off_after(monkeypatch, world, "verify_payment", "fulfillment_enabled")

    assert outcome_of(run_as(world, order_id, trigger)) == "paused"

    assert world.kinguin.requests == []
    state = world.store.get_state(order_id)
    assert (state.attempts, state.lease_owner, state.last_outcome) == (0, None, "paused")
    assert state.next_attempt_at is not None


@pytest.mark.parametrize(("flag", "value"), [("fulfillment_enabled", False), ("maintenance_mode", True),
                                             ("auto_fulfill_enabled", False)])
def test_sweep_launches_nothing_and_says_why(world: World, flag, value):
    world.order([world.product()])
    assert len(launched(world)) == 1
    set_feature_flag(world.engine, flag, value)

    skipped = tick(world)

    assert isinstance(skipped, dg.SkipReason)
    assert skipped.skip_message.startswith("launching nothing: ")
    expected = {"fulfillment_enabled": "fulfillment is switched off", "maintenance_mode": "maintenance mode",
                "auto_fulfill_enabled": "automatic fulfillment is switched off"}[flag]
    assert expected in skipped.skip_message


# -- auto_fulfill_enabled off: the sweep waits for an admin --------------------------------------------------
def test_automatic_fulfilment_switched_off_holds_sweep_runs_but_not_admin_runs(world: World):
    held, retried = world.order([world.product()]), world.order([world.product()])
    set_feature_flag(world.engine, "auto_fulfill_enabled", False)
    before = store_rows(world)

    assert outcome_of(run_as(world, held, "sensor")) == "paused"
    assert store_rows(world) == before and outside_calls(world) == 0
    assert "automatic fulfillment is switched off" in world.store.audit_trail(held)[-1]["detail"]

    assert outcome_of(run_as(world, retried, "admin")) == "fulfilled"
    assert_fully_delivered(world, retried)


# -- kinguin_enabled off: no Kinguin call; payment checks and email-only recoveries go on ----------------------
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_kinguin_switched_off_holds_the_order_without_using_an_attempt(world: World, trigger):
    order_id = world.order([world.product()], status="confirming", payment_status="waiting", payment_id="62")
    world.nowpayments.set_payment("62", "finished", order_id=order_id)
    set_feature_flag(world.engine, "kinguin_enabled", False)

    assert outcome_of(run_as(world, order_id, trigger)) == "paused"

    assert world.kinguin.requests == []
    assert len(world.nowpayments.requests_to("get_payment")) == 1  # the payment check still ran
    assert world.store.load_order(order_id).status == "paid"
    state = world.store.get_state(order_id)
    assert (state.attempts, state.lease_owner, state.last_outcome) == (0, None, "paused")
    assert reason_of(world, order_id) == "Kinguin is switched off in BitLoot"
    assert state.next_attempt_at is not None

    for _ in range(10):  # held as long as it takes: never quarantined for attempts
        assert outcome_of(run_as(world, order_id, trigger)) == "paused"
    assert world.store.get_state(order_id).attempts == 0

    set_feature_flag(world.engine, "kinguin_enabled", True)
    assert outcome_of(run_as(world, order_id, trigger)) == "fulfilled"
    assert world.store.get_state(order_id).attempts == 1
    assert_fully_delivered(world, order_id)


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_kinguin_switched_off_between_two_steps_stops_the_next_kinguin_step(world: World, monkeypatch, trigger):
    order_id = world.order([world.product()])
    switch_off_after(monkeypatch, world, "ensure_supplier_order", "kinguin_enabled")

    assert outcome_of(run_as(world, order_id, trigger)) == "paused"

    assert world.kinguin_calls() == ["place_order_v2"]  # placed, then never polled
    assert world.store.get_state(order_id).attempts == 0
    monkeypatch.undo()
    set_feature_flag(world.engine, "kinguin_enabled", True)
    assert outcome_of(run_as(world, order_id, trigger)) == "fulfilled"
    assert world.kinguin_calls().count("place_order_v2") == 1
    assert_fully_delivered(world, order_id)


def test_kinguin_switched_off_still_sends_a_missing_completion_email(world: World):
    order_id = world.order([world.product()])
    world.resend.inject("send_email", Fault(status=503, times=4))
    assert outcome_of(world.run(order_id)) == "fulfilled"
    assert not world.store.load_order(order_id).completion_email_sent
    set_feature_flag(world.engine, "kinguin_enabled", False)
    calls = len(world.kinguin.requests)

    assert outcome_of(run_as(world, order_id, "sensor")) == "fulfilled"

    assert world.store.load_order(order_id).completion_email_sent
    assert len(world.resend.sent) == 1 and len(world.kinguin.requests) == calls


def test_sweep_keeps_launching_while_kinguin_or_email_is_switched_off(world: World):
    paid = world.order([world.product()])
    set_feature_flag(world.engine, "kinguin_enabled", False)
    set_feature_flag(world.engine, "email_notifications_enabled", False)
    (request,) = launched(world)
    assert request.tags["bitloot/order_id"] == paid

    result = world.run(paid, tags=request.tags)
    assert outcome_of(result) == "paused"
    assert launched(world) == []  # held: looked at again after a short while, not at every tick

    with world.engine.begin() as conn:  # the hold's short wait is over
        conn.execute(sa.update(reconcile_state).values(next_attempt_at=sa.func.now()))
    (again,) = launched(world)
    assert again.tags["bitloot/attempt"] == request.tags["bitloot/attempt"] == "1"  # the attempt was given back
    assert again.run_key != request.run_key  # yet Dagster gets a fresh run key


# -- email_notifications_enabled off: the email waits ---------------------------------------------------------
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_email_switched_off_delivers_the_keys_and_holds_the_email(world: World, trigger):
    order_id = world.order([world.product()])
    set_feature_flag(world.engine, "email_notifications_enabled", False)

    assert outcome_of(run_as(world, order_id, trigger)) == "paused"

    assert_fully_delivered(world, order_id)
    assert not world.store.load_order(order_id).completion_email_sent  # still "email pending", unlike BitLoot
    assert world.resend.requests == []
    assert "email notifications are switched off" in reason_of(world, order_id)
    assert world.store.get_state(order_id).attempts == 0

    set_feature_flag(world.engine, "email_notifications_enabled", True)
    calls = len(world.kinguin.requests)
    assert outcome_of(run_as(world, order_id, trigger)) == "fulfilled"
    assert world.store.load_order(order_id).completion_email_sent
    assert len(world.resend.sent) == 1 and len(world.kinguin.requests) == calls


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_email_switched_off_between_two_steps_stops_the_resend_step(world: World, monkeypatch, trigger):
    order_id = world.order([world.product()])
    switch_off_after(monkeypatch, world, "mark_fulfilled", "email_notifications_enabled")

    assert outcome_of(run_as(world, order_id, trigger)) == "paused"

    assert world.store.load_order(order_id).status == "fulfilled"
    assert world.resend.requests == []
    assert world.store.get_state(order_id).attempts == 0


# -- the suppression list -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bounce_type", "trigger"), [("hard", "admin"), ("complaint", "sensor")])
def test_bounced_address_gets_its_keys_and_no_email(world: World, bounce_type, trigger):
    order_id = world.order([world.product()], email="Gone@Example.com")
    insert_email_bounce(world.engine, "gone@example.com", bounce_type=bounce_type, reason="550 5.1.1 no mailbox")

    assert outcome_of(run_as(world, order_id, trigger)) == "fulfilled"

    assert_fully_delivered(world, order_id)
    assert world.resend.requests == []
    assert world.store.load_order(order_id).completion_email_sent  # handled: never swept again
    reason = reason_of(world, order_id)
    assert reason.startswith(f"keys delivered; completion email suppressed: the address has a {bounce_type} bounce")
    assert reason.endswith("550 5.1.1 no mailbox")
    suppressed = [a for a in world.store.audit_trail(order_id) if "suppressed" in (a["detail"] or "")]
    assert len(suppressed) == 1
    assert launched(world) == []


def test_soft_bounce_does_not_suppress(world: World):
    order_id = world.order([world.product()])
    insert_email_bounce(world.engine, "customer@example.com", bounce_type="soft")
    assert outcome_of(world.run(order_id)) == "fulfilled"
    assert len(world.resend.sent) == 1
