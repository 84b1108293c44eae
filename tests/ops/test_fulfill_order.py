"""`fulfill_order` executed for real against PostgreSQL, SeaweedFS and the HTTP simulators."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import re
import time
import uuid

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa

from bitloot_reconcile.domain import fulfilment
from bitloot_reconcile.jobs import fulfill_order
from bitloot_reconcile.ops.fulfill_order import RefusedLaunch
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.schema import order_items, orders, reconcile_audit, reconcile_state
from bitloot_standins.httpserver import Fault
from tests.fixtures.runs import assert_fully_delivered, key_bytes, key_rows, outcome_of, reason_of
from tests.fixtures.world import FRONTEND, World


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    return " | ".join(
        e.step_failure_data.error.message for e in result.all_events if e.is_step_failure and e.step_failure_data
    )


# -- happy paths -------------------------------------------------------------------------------------------
def test_single_item_paid_order_is_fulfilled_with_three_kinguin_calls(world: World):
    game = world.product(price=5.0)
    order_id = world.order([game])

    result = world.run(order_id)

    assert outcome_of(result) == "fulfilled"
    assert world.kinguin_calls() == ["place_order_v2", "get_order", "get_keys"]
    assert_fully_delivered(world, order_id)
    order = world.store.load_order(order_id)
    assert order.completion_email_sent
    (email,) = world.resend.sent
    assert email["to"] == ["customer@example.com"]
    assert email["idempotency_key"] == f"order-completed/{order_id}"
    assert f"{FRONTEND}/orders/{order_id}/success" in email["html"]
    (supplier_order,) = world.kinguin.orders_for_external_id(order_id)
    assert order.kinguin_reservation_id == supplier_order.order_id
    assert supplier_order.serials[0] not in email["html"]


def test_presigned_url_downloads_the_key_as_an_attachment(world: World):
    order_id = world.order([world.product()])
    assert outcome_of(world.run(order_id)) == "fulfilled"
    (row,) = key_rows(world, order_id)
    response = httpx.get(row["signedUrl"], timeout=5)
    assert response.status_code == 200
    assert response.content == key_bytes(world.kinguin.orders_for_external_id(order_id)[0].keys[0])
    assert "attachment" in response.headers["content-disposition"]


def test_multi_item_order_with_image_keys_and_more_than_thirty_units(world: World):
    text = world.product(price=1.0, stock=1000)
    other_text = world.product(price=2.0)
    png = world.product(price=7.5, key_type="image/png")
    jpeg = world.product(price=8.0, key_type="image/jpeg")
    units = [text] * 9 + [other_text] * 9 + [png] * 9 + [jpeg] * 5
    order_id = world.order(units)

    assert outcome_of(world.run(order_id)) == "fulfilled"

    assert_fully_delivered(world, order_id)
    rows = key_rows(world, order_id)
    assert len(rows) == 32
    assert {r["contentType"] for r in rows} == {"text/plain", "image/png", "image/jpeg"}
    png_rows = [r for r in rows if r["contentType"] == "image/png"]
    assert world.vault.read(png_rows[0]["storageRef"]).data.startswith(b"\x89PNG")  # decoded bytes, not base64
    assert world.kinguin_calls().count("get_keys") == 1  # one page of 100 holds all 32


# -- recovery of the supplier order ------------------------------------------------------------------------
def test_response_lost_after_kinguin_created_the_order_is_adopted(world: World):
    order_id = world.order([world.product()])
    world.kinguin.inject("place_order_v2", Fault(lose_response=True))

    assert outcome_of(world.run(order_id)) == "fulfilled"

    assert len(world.kinguin.orders_for_external_id(order_id)) == 1
    assert world.kinguin_calls().count("search_orders") == 1
    assert world.kinguin_calls().count("place_order_v2") == 1
    assert_fully_delivered(world, order_id)


@pytest.mark.parametrize("duplicate_status", [422, 400])
def test_duplicate_external_id_answer_adopts_the_existing_order(world: World, duplicate_status: int):
    game = world.product()
    order_id = world.order([game])
    world.kinguin.duplicate_status = duplicate_status
    world.kinguin.plant_order(order_id, [(game.kinguin_product_id, 1)], status="completed")

    assert outcome_of(world.run(order_id)) == "fulfilled"

    assert len(world.kinguin.orders_for_external_id(order_id)) == 1
    assert [r.status for r in world.kinguin.requests_to("place_order_v2")] == [duplicate_status]
    assert_fully_delivered(world, order_id)


def test_saved_reservation_id_short_circuits_placement(world: World):
    game = world.product()
    order_id = str(uuid.uuid4())
    planted = world.kinguin.plant_order(order_id, [(game.kinguin_product_id, 1)], status="completed")
    world.order([game], order_id=order_id, kinguin_reservation_id=planted.order_id)

    assert outcome_of(world.run(order_id)) == "fulfilled"
    assert world.kinguin_calls() == ["get_order", "get_keys"]


def test_processing_then_completed_across_two_runs(world: World):
    order_id = world.order([world.product(delivery_mode="manual")])

    assert outcome_of(world.run(order_id)) == "waiting_for_supplier"
    assert world.store.load_order(order_id).status == "paid"
    assert world.store.get_state(order_id).next_attempt_at is not None

    (supplier_order,) = world.kinguin.orders_for_external_id(order_id)
    world.kinguin.deliver(supplier_order.order_id)
    assert outcome_of(world.run(order_id, reason="second look")) == "fulfilled"
    assert world.kinguin_calls().count("place_order_v2") == 1
    assert_fully_delivered(world, order_id)


def test_partial_delivery_stores_what_arrived_then_completes(world: World):
    game = world.product(delivery_mode="manual")
    order_id = world.order([game, game, game])
    assert outcome_of(world.run(order_id)) == "waiting_for_supplier"
    (supplier_order,) = world.kinguin.orders_for_external_id(order_id)

    world.kinguin.deliver(supplier_order.order_id, 2)
    assert outcome_of(world.run(order_id)) == "waiting_for_supplier"
    assert "2 of 3 keys" in reason_of(world, order_id)
    assert len(key_rows(world, order_id)) == 2
    assert world.store.load_order(order_id).status == "paid"

    world.kinguin.deliver(supplier_order.order_id)
    assert outcome_of(world.run(order_id)) == "fulfilled"
    assert_fully_delivered(world, order_id)


@pytest.mark.parametrize("terminal", ["cancel", "refund"])
def test_canceled_or_refunded_supplier_order_needs_attention(world: World, terminal: str):
    order_id = world.order([world.product(delivery_mode="manual")])
    assert outcome_of(world.run(order_id)) == "waiting_for_supplier"
    (supplier_order,) = world.kinguin.orders_for_external_id(order_id)
    getattr(world.kinguin, terminal)(supplier_order.order_id)

    assert outcome_of(world.run(order_id)) == "needs_attention"

    word = {"cancel": "canceled", "refund": "refunded"}[terminal]
    assert f"supplier {word}" in reason_of(world, order_id)
    assert world.store.load_order(order_id).status == "paid"
    assert len(world.kinguin.orders_for_external_id(order_id)) == 1  # never re-placed
    # A quarantined order is not retried by itself: the next run asks Kinguin again and ends the same way.
    assert outcome_of(world.run(order_id)) == "needs_attention"
    assert world.kinguin_calls().count("place_order_v2") == 1


def test_insufficient_balance_needs_attention_and_buys_nothing(world: World):
    order_id = world.order([world.product()])
    world.kinguin.set_balance(0.0)
    assert outcome_of(world.run(order_id)) == "needs_attention"
    assert reason_of(world, order_id) == "insufficient Kinguin balance"
    assert world.kinguin.orders_for_external_id(order_id) == []
    assert world.resend.sent == []


def test_product_unavailable_when_kinguin_price_is_above_our_cost(world: World):
    order_id = world.order([world.product(price=9.0, cost=5.0)])
    assert outcome_of(world.run(order_id)) == "needs_attention"
    assert reason_of(world, order_id).startswith("product unavailable")
    assert world.kinguin.orders_for_external_id(order_id) == []


def test_custom_inventory_items_are_left_for_a_person(world: World):
    order_id = world.order([world.product(source_type="custom")])
    assert outcome_of(world.run(order_id)) == "needs_attention"
    assert reason_of(world, order_id) == "custom-inventory items are not handled here"
    assert world.kinguin.requests == []


def test_kinguin_5xx_and_429_bursts_are_retried_within_the_run(world: World):
    order_id = world.order([world.product()])
    world.kinguin.inject("place_order_v2", Fault(status=503, times=2))
    world.kinguin.inject("get_keys", Fault(status=429, retry_after=1))

    assert outcome_of(world.run(order_id)) == "fulfilled"
    assert len(world.kinguin.orders_for_external_id(order_id)) == 1
    assert_fully_delivered(world, order_id)


# -- outages of R2 and Resend --------------------------------------------------------------------------------
def test_r2_down_then_back(world: World):
    order_id = world.order([world.product()])
    dead_r2 = R2Resource(endpoint="http://127.0.0.1:9", access_key_id="x", secret_access_key="y",
                         bucket=world.r2.bucket)

    failed = world.run(order_id, r2=dead_r2)
    assert not failed.success
    state = world.store.get_state(order_id)
    assert state.last_outcome == "retry_later" and state.lease_owner is None
    assert world.store.load_order(order_id).status == "paid"

    assert outcome_of(world.run(order_id)) == "fulfilled"
    assert len(world.kinguin.orders_for_external_id(order_id)) == 1
    assert_fully_delivered(world, order_id)


@pytest.mark.parametrize("fault", [Fault(status=503, times=4), Fault(status=429, retry_after=0.5, times=4)],
                         ids=["503", "429"])
def test_resend_down_then_back_sends_exactly_one_email(world: World, fault: Fault):
    order_id = world.order([world.product()])
    world.resend.inject("send_email", fault)

    assert outcome_of(world.run(order_id)) == "fulfilled"
    order = world.store.load_order(order_id)
    assert order.status == "fulfilled" and not order.completion_email_sent
    assert "email not sent" in reason_of(world, order_id)

    calls_before = len(world.kinguin.requests)
    assert outcome_of(world.run(order_id, reason="email missing")) == "fulfilled"
    assert world.store.load_order(order_id).completion_email_sent
    assert len(world.resend.sent) == 1
    assert len(world.kinguin.requests) == calls_before  # nothing more bought or fetched


# -- crashes and concurrency ---------------------------------------------------------------------------------
STEPS = ["verify_payment", "ensure_supplier_order", "poll_supplier", "store_keys", "mark_fulfilled",
         "send_completion_email"]


@pytest.mark.parametrize("step", STEPS)
def test_crash_after_each_step_then_a_rerun_converges(world: World, monkeypatch, step: str):
    order_id = world.order([world.product(), world.product(key_type="image/gif")])
    real = getattr(fulfilment, step)

    def crash_after(*args, **kwargs):
        real(*args, **kwargs)
        raise dg.Failure("injected crash", allow_retries=False)

    monkeypatch.setattr(fulfilment, step, crash_after)
    assert not world.run(order_id).success
    monkeypatch.setattr(fulfilment, step, real)

    rerun = world.run(order_id, reason="after crash", tags={"bitloot/trigger": "sensor"})
    # A crash after the last step left nothing to do: the sweep's re-run sees a finished order.
    assert outcome_of(rerun) == ("already_fulfilled" if step == "send_completion_email" else "fulfilled")
    assert len(world.kinguin.orders_for_external_id(order_id)) == 1
    assert_fully_delivered(world, order_id)
    assert len(world.resend.sent) == 1


def test_a_second_run_while_the_lease_is_held_ends_busy(world: World):
    order_id = world.order([world.product()])
    assert world.store.claim(order_id, "other-run", dt.timedelta(minutes=5))
    assert outcome_of(world.run(order_id)) == "busy"
    assert world.kinguin.requests == []
    assert world.store.get_state(order_id).lease_owner == "other-run"


def _run_in_child(resource_specs: dict, order_id: str, outcomes) -> None:
    """A run in its own process, as the run launcher starts them (Dagster's execution is not thread-safe)."""
    resources = {name: cls(**fields) for name, (cls, fields) in resource_specs.items()}
    with dg.instance_for_test() as instance:
        result = fulfill_order.execute_in_process(
            run_config={"order_id": order_id, "reason": "race", "requested_by": "ops@bitloot.io"},
            resources=resources, instance=instance, raise_on_error=False,
        )
        outcomes.put(result.output_for_node("record_outcome") if result.success else "failed")


def test_two_runs_of_one_order_at_once(world: World):
    order_id = world.order([world.product()])
    world.kinguin.inject("place_order_v2", Fault(latency=2.0))
    specs = {name: (type(r), {f: getattr(r, f) for f in type(r).model_fields}) for name, r in world.resources().items()}
    context = multiprocessing.get_context("spawn")
    outcomes = context.Queue()
    workers = [context.Process(target=_run_in_child, args=(specs, order_id, outcomes)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = sorted(outcomes.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert results == ["busy", "fulfilled"]
    assert len(world.kinguin.orders_for_external_id(order_id)) == 1
    assert len(world.resend.sent) == 1


# -- payment gate ---------------------------------------------------------------------------------------------
def test_waiting_order_paid_at_nowpayments_moves_to_paid_then_is_fulfilled(world: World):
    order_id = world.order([world.product()], status="waiting", payment_status="waiting", payment_id="5077125051")
    world.nowpayments.set_payment("5077125051", "finished", order_id=order_id)

    assert outcome_of(world.run(order_id)) == "fulfilled"
    assert world.store.load_order(order_id).status == "fulfilled"
    assert len(world.nowpayments.requests_to("get_payment")) == 1


@pytest.mark.parametrize("status", ["waiting", "confirming", "failed"])
def test_unconfirmed_payment_buys_nothing(world: World, status: str):
    order_id = world.order([world.product()], status=status, payment_status="waiting", payment_id="42")
    world.nowpayments.set_payment("42", "confirming", order_id=order_id)

    assert outcome_of(world.run(order_id)) == "payment_not_confirmed"
    assert world.kinguin.requests == []
    assert world.store.load_order(order_id).status == status


def test_confirmed_payment_row_needs_no_nowpayments_call(world: World):
    order_id = world.order([world.product()], status="confirming", payment_status="finished")
    assert outcome_of(world.run(order_id)) == "fulfilled"
    assert world.nowpayments.requests == []


# -- bad input ------------------------------------------------------------------------------------------------
def _db_fingerprint(world: World) -> tuple:
    with world.engine.connect() as conn:
        return (
            conn.execute(sa.select(orders.c.id, orders.c.status, orders.c.updatedAt).order_by(orders.c.id)).all(),
            conn.execute(sa.select(sa.func.count()).select_from(reconcile_state)).scalar(),
            conn.execute(sa.select(sa.func.count()).select_from(reconcile_audit)).scalar(),
        )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("malformed", "is not a valid order uuid"),
        ("empty_reason", "reason must not be empty"),
        ("empty_actor", "requested_by must not be empty"),
        ("nul_reason", "reason must not contain control characters"),
        ("nul_actor", "requested_by must not contain control characters"),
    ],
)
def test_malformed_requests_are_refused_before_a_run_exists(world: World, case: str, expected: str):
    order_id = world.order([world.product()])
    kwargs: dict = {}
    if case == "malformed":
        order_id = "5c91f65c-not-a-uuid"
    elif case == "empty_reason":
        kwargs["reason"] = "   "
    elif case == "empty_actor":
        kwargs["requested_by"] = ""
    elif case == "nul_reason":
        kwargs["reason"] = "webhook\x00missed"
    elif case == "nul_actor":
        kwargs["requested_by"] = "ops@bitloot.io\n"
    before = _db_fingerprint(world)
    runs_before = world.instance.get_runs_count()

    with pytest.raises(RefusedLaunch, match=f"^fulfill_order refused: .*{expected}"):
        world.run(order_id, **kwargs)

    assert world.instance.get_runs_count() == runs_before
    assert world.kinguin.requests == [] and world.resend.requests == [] and world.nowpayments.requests == []
    assert _db_fingerprint(world) == before


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown", "not found"),
        ("no_items", "has no items"),
        ("fulfilled", "Order is already fulfilled"),
    ],
)
def test_requests_the_store_refuses_fail_at_once_tagged_refused_with_no_side_effect(
    world: World, case: str, expected: str
):
    if case == "unknown":
        order_id = str(uuid.uuid4())
    elif case == "no_items":
        order_id = world.order([])
    else:
        order_id = world.order([world.product()], status="fulfilled", completion_email_sent=True)
    orders_before, states_before, _ = _db_fingerprint(world)

    result = world.run(order_id.upper(), reason="customer ticket 7", requested_by="ops@bitloot.io")

    (failure,) = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert expected in description and "\n" not in description  # the one-line reason is the failure's description
    assert world.kinguin.requests == [] and world.resend.requests == [] and world.nowpayments.requests == []
    orders_after, states_after, _ = _db_fingerprint(world)
    assert (orders_after, states_after) == (orders_before, states_before)
    retries = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert retries == []
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.HOOK_ERRORED]
    tags = world.instance.get_run_by_id(result.run_id).tags
    assert tags["bitloot/outcome"] == "refused" and tags["bitloot/order_id"] == order_id
    (refused,) = world.store.audit_trail(order_id)
    assert (refused["action"], refused["outcome"], refused["actor"]) == ("refused", "refused", "ops@bitloot.io")
    assert expected in refused["detail"] and refused["run_id"] == result.run_id


def test_every_run_is_tagged_for_the_run_list(world: World):
    order_id = world.order([world.product()])
    result = world.run(order_id, reason="customer ticket 42", requested_by="ops@bitloot.io")
    tags = world.instance.get_run_by_id(result.run_id).tags
    assert tags["bitloot/order_id"] == order_id
    assert tags["bitloot/trigger"] == "admin"
    assert tags["bitloot/reason"] == "customer ticket 42"
    assert tags["bitloot/requested_by"] == "ops@bitloot.io"
    assert tags["bitloot/attempt"] == "1"
    trail = world.store.audit_trail(order_id)
    assert [(a["action"], a["outcome"]) for a in trail] == [("requested", None), ("fulfill_order", "fulfilled")]
    assert all(a["run_id"] == result.run_id and a["actor"] == "ops@bitloot.io" for a in trail)


def test_no_secret_reaches_logs_events_or_metadata(world: World, caplog):
    caplog.set_level("DEBUG")
    png = world.product(key_type="image/png")
    order_id = world.order([world.product(), png, png])
    world.kinguin.inject("place_order_v2", Fault(lose_response=True))
    result = world.run(order_id)
    assert outcome_of(result) == "fulfilled"

    (supplier_order,) = world.kinguin.orders_for_external_id(order_id)
    signed_urls = [r["signedUrl"] for r in key_rows(world, order_id)]
    signatures = [httpx.URL(u).params["X-Amz-Signature"] for u in signed_urls]
    secrets = [*supplier_order.serials, *signatures, *signed_urls, world.r2.secret_access_key,
               "test-kinguin-key-SECRET", "test-nowpayments-key-SECRET", "re_test_resend_key_SECRET"]
    event_text = "\n".join(repr(e) for e in world.instance.all_logs(result.run_id))
    tags_text = repr(world.instance.get_run_by_id(result.run_id).tags)
    for secret in secrets:
        assert secret not in caplog.text
        assert secret not in event_text
        assert secret not in tags_text


# -- bad data and refusals that a retry cannot fix ---------------------------------------------------------------
def set_quantities(world: World, order_id: str, quantities: list[int]) -> None:
    items = world.store.load_order(order_id).items
    with world.engine.begin() as conn:
        for item, quantity in zip(items, quantities, strict=True):
            conn.execute(sa.update(order_items).where(order_items.c.id == item.id).values(quantity=quantity))


@pytest.mark.parametrize("quantities", [[3], [1, 1, -1]], ids=["one-row-three-units", "plus-plus-minus"])
def test_item_rows_that_are_not_one_unit_each_buy_nothing(world: World, quantities: list[int]):
    game = world.product()
    order_id = world.order([game] * len(quantities))
    set_quantities(world, order_id, quantities)

    assert outcome_of(world.run(order_id)) == "needs_attention"
    assert "one unit each (quantity 1)" in reason_of(world, order_id)
    assert world.kinguin.requests == []
    assert key_rows(world, order_id) == []


def test_a_reservation_id_kinguin_does_not_know_needs_a_person_at_once(world: World):
    order_id = world.order([world.product()], kinguin_reservation_id="NOSUCHORDER1")

    result = world.run(order_id)
    assert outcome_of(result) == "needs_attention"
    assert "Kinguin does not know order NOSUCHORDER1" in reason_of(world, order_id)
    assert world.kinguin_calls() == ["get_order"]  # once: a 404 is not retried
    assert world.store.get_state(order_id).next_attempt_at is None  # left for a person, not swept again


def test_an_address_resend_refuses_is_recorded_once_and_not_retried(world: World):
    order_id = world.order([world.product()])
    world.resend.inject("send_email", Fault(status=422, body={"statusCode": 422, "name": "validation_error",
                                                            "message": "Invalid `to` field."}))
    result = world.run(order_id)

    assert outcome_of(result) == "needs_attention"
    assert "completion email undeliverable" in reason_of(world, order_id)
    order = world.store.load_order(order_id)
    assert (order.status, order.completion_email_sent) == ("fulfilled", False)
    assert len(world.resend.requests) == 1
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]


def test_a_retry_after_wait_is_capped_and_the_recorded_reason_keeps_the_cause(world: World):
    order_id = world.order([world.product()], status="waiting", payment_status="waiting")
    world.nowpayments.inject("get_payment", Fault(status=429, retry_after=3600, times=10))
    policy = RecoveryPolicyResource(frontend_url=FRONTEND, max_retry_wait_seconds=0.2)

    started = time.monotonic()
    result = world.run(order_id, policy=policy)
    assert not result.success
    assert time.monotonic() - started < 30  # four attempts, each waiting 0.2 s instead of an hour
    reason = reason_of(world, order_id)
    assert reason.startswith("verify_payment failed: TransientError: nowpayments:"), reason
    assert "429" in reason


def test_a_policy_whose_waits_do_not_fit_in_the_lease_is_refused():
    with pytest.raises(ValueError, match="lease_seconds .* at least twice the longest in-run wait"):
        RecoveryPolicyResource(lease_seconds=60, max_retry_wait_seconds=45)


def test_a_statement_timeout_on_the_signed_url_write_leaks_no_signature(world: World, caplog, tmp_path):
    """The UPDATE that stores the presigned URL times out (a trigger makes it slow): the error is retried and
    recorded, and no URL signature reaches the event log, the compute logs, the run's output or the logs."""
    caplog.set_level("DEBUG")
    order_id = world.order([world.product()])
    with world.engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE FUNCTION slow_signed_url() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$ "
            "LANGUAGE plpgsql"))
        conn.execute(sa.text(
            'CREATE TRIGGER slow_signed_url BEFORE UPDATE OF "signedUrl" ON order_items '
            "FOR EACH ROW EXECUTE FUNCTION slow_signed_url()"))
    try:
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            result = fulfill_order.execute_in_process(
                run_config={"order_id": order_id, "reason": "timeout", "requested_by": "ops@bitloot.io"},
                resources=world.resources(store=StoreResource(database_url=world.store_url,
                                                              statement_timeout_ms=300)),
                instance=instance,
                raise_on_error=False,
            )
            events = "\n".join(repr(e) for e in instance.all_logs(result.run_id))
    finally:
        with world.engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER slow_signed_url ON order_items"))
            conn.execute(sa.text("DROP FUNCTION slow_signed_url()"))

    assert not result.success
    assert "canceling statement due to statement timeout" in events  # the failure itself is on record
    stored = "\n".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
                       and p.suffix != ".db")
    reason = reason_of(world, order_id)
    signature = re.compile(r"X-Amz-Signature=[0-9a-f]{8}")
    for place, text in {"events": events, "storage files": stored, "logs": caplog.text, "reason": reason}.items():
        assert not signature.search(text), place
        assert "X-Amz-Credential=" not in text.replace("X-Amz-Credential=<redacted>", ""), place
