"""What a `fulfill_order` run records about its order: the outcome tag, the steps it skipped once the order
stopped, and what each step did. Real runs against PostgreSQL, SeaweedFS and the simulators."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import pytest

from bitloot_reconcile.assets.order_history import ORDER_ATTEMPTS_KEY
from bitloot_reconcile.ops import fulfill_order
from bitloot_reconcile.resources.r2 import R2Resource
from tests.fixtures.runs import outcome_of
from tests.fixtures.world import World

STEPS = ["load_and_claim", "verify_payment", "ensure_supplier_order", "poll_supplier", "store_keys",
         "mark_fulfilled", "send_completion_email"]


def skipped_steps(result: dg.ExecuteInProcessResult) -> list[str]:
    return [e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_SKIPPED]


def step_said(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """Each step's `did` metadata, from the output it yielded."""
    return {
        e.step_key: e.step_output_data.metadata["did"].value
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_OUTPUT and "did" in e.step_output_data.metadata
    }


def outcome_tag(world: World, result: dg.ExecuteInProcessResult) -> str:
    return world.instance.get_run_by_id(result.run_id).tags["bitloot/outcome"]


def test_a_fulfilled_run_says_what_each_step_did(world: World):
    order_id = world.order([world.product()], status="waiting", payment_status="finished")

    result = world.run(order_id)

    assert outcome_of(result) == "fulfilled" and outcome_tag(world, result) == "fulfilled"
    assert skipped_steps(result) == []
    said = step_said(result)
    (kinguin_order,) = world.kinguin.orders_for_external_id(order_id)
    assert said["load_and_claim"] == "lease taken on the waiting order"
    assert said["verify_payment"] == "payment confirmed (payment row confirmed); order moved from waiting to paid"
    assert said["ensure_supplier_order"] == f"placed Kinguin order {kinguin_order.order_id} for 1 key(s)"
    assert said["poll_supplier"] == f"Kinguin order {kinguin_order.order_id} is completed, 1 key(s) delivered"
    assert said["store_keys"] == "stored 1 of 1 key(s)"
    assert said["mark_fulfilled"] == "order moved from paid to fulfilled"
    assert said["send_completion_email"] == "completion email sent"


def test_a_needs_attention_run_skips_the_steps_after_it_stopped_and_stores_no_keys(world: World):
    order_id = world.order([world.product(delivery_mode="manual")])
    assert outcome_of(world.run(order_id)) == "waiting_for_supplier"
    (supplier_order,) = world.kinguin.orders_for_external_id(order_id)
    world.kinguin.cancel(supplier_order.order_id)

    result = world.run(order_id)

    assert outcome_of(result) == "needs_attention" and outcome_tag(world, result) == "needs_attention"
    assert skipped_steps(result) == ["store_keys", "mark_fulfilled", "send_completion_email"]
    said = step_said(result)
    assert said["poll_supplier"] == f"supplier canceled Kinguin order {supplier_order.order_id}"
    assert said["ensure_supplier_order"] == (
        f"Kinguin order {supplier_order.order_id} already placed (saved kinguinReservationId)")
    messages = [e.message or "" for e in result.all_events]
    assert not any("stored" in m and "key" in m for m in messages)  # no step claims keys it never stored
    runs = world.instance.get_runs(filters=dg.RunsFilter(tags={"bitloot/outcome": "needs_attention"}))
    assert result.run_id in {r.run_id for r in runs}


def test_a_run_stopped_at_the_payment_check_skips_everything_after_it(world: World):
    order_id = world.order([world.product()], status="waiting", payment_status="waiting", payment_id="77")
    world.nowpayments.set_payment("77", "waiting", order_id=order_id)

    result = world.run(order_id)

    assert outcome_tag(world, result) == "payment_not_confirmed"
    assert skipped_steps(result) == STEPS[2:]
    assert step_said(result)["verify_payment"] == "payment not confirmed (NOWPayments says waiting)"


def test_a_busy_run_stops_at_the_claim(world: World):
    order_id = world.order([world.product()])
    assert world.store.claim(order_id, "other-run", dt.timedelta(minutes=5))

    result = world.run(order_id)

    assert outcome_tag(world, result) == "busy"
    assert skipped_steps(result) == STEPS[1:]


def test_a_refused_request_skips_every_step_and_fails_the_run_with_one_sentence(world: World):
    unknown = "5c91f65c-4b12-463c-9277-8cfc139ceda4"

    result = world.run(unknown)

    assert not result.success
    assert outcome_tag(world, result) == "refused"
    # No step fails for lack of its input ("Not executing"): the steps after the claim show as skipped, and the
    # run ends failed at its last step, with the refusal as the failure's description.
    assert skipped_steps(result) == STEPS[1:]
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_key == "record_outcome"
    assert failure.step_failure_data.user_failure_data.description == f"Order {unknown} not found"
    assert not [e for e in result.all_events if "Not executing" in (e.message or "")]
    assert step_said(result)["load_and_claim"] == f"Order {unknown} not found"


def test_a_failed_run_is_tagged_with_what_its_failed_step_recorded(world: World, seaweed):
    order_id = world.order([world.product()])
    wrong_secret = R2Resource(endpoint=seaweed.endpoint_url, access_key_id=seaweed.access_key_id,
                              secret_access_key="not-the-secret-key", bucket=world.r2.bucket)

    result = world.run(order_id, r2=wrong_secret)

    assert not result.success
    assert outcome_tag(world, result) == "retry_later" == world.store.get_state(order_id).last_outcome
    assert world.store.get_state(order_id).lease_owner is None


def test_the_failure_hook_records_what_a_failed_step_could_not(world: World, monkeypatch):
    """`record_outcome` fails while the run holds the lease: no step recorded the attempt, the hook does (its
    event has no run: a hook cannot log into its own run through Dagster's public API)."""
    order_id = world.order([world.product()])

    def outcome_store_down(*args, **kwargs):
        raise RuntimeError("store unreachable")

    monkeypatch.setattr(fulfill_order, "record_outcome_step", outcome_store_down)
    result = world.run(order_id)

    assert not result.success
    assert outcome_tag(world, result) == "retry_later" == world.store.get_state(order_id).last_outcome
    assert world.store.get_state(order_id).lease_owner is None
    (record,) = world.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=ORDER_ATTEMPTS_KEY, asset_partitions=[order_id]), limit=5).records
    assert record.run_id == ""
    assert record.asset_materialization.metadata["outcome"].value == "retry_later"
    assert "record_outcome failed" in record.asset_materialization.metadata["reason"].value


@pytest.mark.parametrize("typed", ["upper", "padded", "braces"])
def test_order_ids_are_tagged_and_recorded_canonical(world: World, typed: str):
    order_id = world.order([world.product()])
    raw = {"upper": order_id.upper(), "padded": f"  {order_id}\u00a0", "braces": f"{{{order_id.upper()}}}"}[typed]

    result = world.run(raw)

    assert outcome_of(result) == "fulfilled"
    assert world.instance.get_run_by_id(result.run_id).tags["bitloot/order_id"] == order_id
    assert {row["order_id"] for row in world.store.audit_trail(order_id)} == {order_id}
    assert result.run_id in {r.run_id for r in world.instance.get_runs(
        filters=dg.RunsFilter(tags={"bitloot/order_id": order_id}))}
