"""The board's rules on hand-made rows: which state wins, where the SLA starts, what the figures leave out."""

from __future__ import annotations

import datetime as dt
import uuid

from bitloot_reconcile.domain import board as bd
from bitloot_reconcile.domain.board import BoardState
from bitloot_reconcile.store.repository import BacklogOrder, ReconcileState

NOW = dt.datetime(2026, 3, 10, 12, tzinfo=dt.UTC)
GRACE, WINDOW = dt.timedelta(minutes=10), dt.timedelta(days=30)


def order(minutes: float = 30, status: str = "paid", **state) -> BacklogOrder:
    oid = str(uuid.uuid4())
    moment = (NOW - dt.timedelta(minutes=minutes)).replace(tzinfo=None)
    return BacklogOrder(oid, status, False, moment, moment, None, ReconcileState(order_id=oid, **state))


def state_of(o: BacklogOrder, in_flight: dict[str, str] | None = None) -> BoardState:
    return bd.classify(o, in_flight=in_flight or {}, now=NOW, grace=GRACE, max_age=WINDOW).state


def test_a_run_holding_the_lease_wins_over_every_recorded_state():
    lease = {"lease_owner": "run-1", "lease_expires_at": NOW + dt.timedelta(minutes=5)}
    assert state_of(order(last_outcome="needs_attention", **lease)) is BoardState.IN_FLIGHT
    assert state_of(order(2, **lease)) is BoardState.IN_FLIGHT  # an admin run inside the grace period
    lapsed = {"lease_owner": "run-1", "lease_expires_at": NOW - dt.timedelta(seconds=1)}
    assert state_of(order(last_outcome="needs_attention", last_reason="bad data", **lapsed)) is \
        BoardState.NEEDS_ATTENTION
    queued = order(last_outcome="retry_later", next_attempt_at=NOW + dt.timedelta(minutes=5))
    row = bd.classify(queued, in_flight={queued.id: "run-q"}, now=NOW, grace=GRACE, max_age=WINDOW)
    assert row.state is BoardState.IN_FLIGHT and row.run_id == "run-q"


def test_a_person_is_needed_for_a_found_problem_and_the_sweep_gave_up_on_a_quarantined_one():
    assert state_of(order(last_outcome="needs_attention", last_reason="supplier canceled Kinguin order K")) is \
        BoardState.NEEDS_ATTENTION
    assert state_of(order(last_outcome="needs_attention", last_reason="attempts exhausted after 8 attempts")) is \
        BoardState.QUARANTINED
    assert state_of(order(last_outcome="needs_attention", last_reason="supplier did not deliver within 72 h (x)")) \
        is BoardState.QUARANTINED


def test_a_wait_that_is_over_makes_the_order_due_again():
    later, earlier = NOW + dt.timedelta(minutes=1), NOW - dt.timedelta(minutes=1)
    assert state_of(order(last_outcome="payment_not_confirmed", next_attempt_at=later)) is \
        BoardState.PAYMENT_NOT_CONFIRMED
    assert state_of(order(last_outcome="busy", next_attempt_at=later)) is BoardState.BACKING_OFF
    due = bd.classify(order(last_outcome="payment_not_confirmed", next_attempt_at=earlier), in_flight={}, now=NOW,
                      grace=GRACE, max_age=WINDOW)
    assert due.state is BoardState.STUCK and due.next_attempt_at is None
    assert state_of(order(5, status="fulfilled")) is BoardState.INSIDE_GRACE
    assert state_of(order(15, status="fulfilled")) is BoardState.EMAIL_PENDING


def test_the_sla_fails_from_the_sla_on_and_ignores_orders_a_person_or_the_customer_holds():
    sla = dt.timedelta(minutes=60)
    young = [order(59.9), order(600, last_outcome="needs_attention", last_reason="x"),
             order(600, status="waiting", last_outcome="payment_not_confirmed",
                   next_attempt_at=NOW + dt.timedelta(minutes=5))]
    board = bd.build_board(young, [], in_flight={}, now=NOW, grace=GRACE, max_age=WINDOW)
    verdicts = {v.name: v for v in bd.checks(board, sla=sla)}
    assert verdicts[bd.SLA_CHECK].passed and verdicts[bd.SLA_CHECK].description.endswith("(oldest: 59m)")
    assert not verdicts[bd.NEEDS_PERSON_CHECK].passed and verdicts[bd.QUARANTINE_CHECK].passed

    late = order(60)
    board = bd.build_board([*young, late], [], in_flight={}, now=NOW, grace=GRACE, max_age=WINDOW)
    sla_verdict = bd.checks(board, sla=sla)[0]
    assert not sla_verdict.passed and sla_verdict.severity == "ERROR" and sla_verdict.order_ids == (late.id,)


def test_without_fulfilments_in_24_hours_the_percentiles_are_left_out_not_zero():
    board = bd.build_board([], [], in_flight={}, now=NOW, grace=GRACE, max_age=WINDOW)
    assert board.figures() == {"stuck_now": 0, "oldest_stuck_minutes": 0.0, "needs_attention_now": 0,
                               "quarantined_now": 0, "recovered_24h": 0, "kinguin_orders_placed_24h": 0}
    assert bd.skipped_summary(board.rows, grace=GRACE) == ""
    assert bd.short_age(dt.timedelta(minutes=119)) == "119m" and bd.short_age(dt.timedelta(hours=47)) == "47h"


def test_an_order_an_admin_closed_by_hand_is_off_the_board():
    closed = order(last_outcome="resolved", last_reason="written_off: duplicate test order")
    open_one = order(last_outcome="needs_attention", last_reason="supplier canceled Kinguin order K")

    board = bd.build_board([closed, open_one], [], in_flight={}, now=NOW, grace=GRACE, max_age=WINDOW)

    assert [row.order_id for row in board.rows] == [open_one.id]
