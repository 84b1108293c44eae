"""Who may be worked now: the SQL the store builds the sweep and the board from, and the Python verdict the board
and the dry run apply, give the same answer on a table of orders in every combination of status, age and
reconcile state (on PostgreSQL and on SQLite), boundaries included."""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from bitloot_reconcile.domain import board, eligibility
from bitloot_reconcile.domain.eligibility import Hold
from bitloot_reconcile.store import schema
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import upgrade
from bitloot_reconcile.store.repository import ReconcileState, Store, naive_utc

NOW = dt.datetime(2026, 3, 10, 12, 0, 0, 250_000, tzinfo=dt.UTC)
GRACE, WINDOW = dt.timedelta(minutes=10), dt.timedelta(days=30)
LATER, EARLIER = NOW + dt.timedelta(minutes=5), NOW - dt.timedelta(seconds=1)

STATUSES = {  # (status, completionEmailSent)
    "paid": ("paid", False), "waiting": ("waiting", False), "failed": ("failed", False),
    "email_pending": ("fulfilled", False), "fulfilled_and_emailed": ("fulfilled", True),
    "created": ("created", False), "refunded": ("refunded", False),
}
CHANGED = {  # how long before NOW the order last changed
    "inside_grace": dt.timedelta(minutes=1), "at_the_grace_edge": GRACE, "due": dt.timedelta(hours=2),
    "at_the_window_edge": WINDOW, "past_the_window": WINDOW + dt.timedelta(microseconds=1),
}
STATES = {  # the order's reconcile state row; None: the project never touched it
    "no_row": None,
    "touched": {"attempts": 2, "last_outcome": "fulfilled"},
    "leased": {"lease_owner": "run-a", "lease_expires_at": LATER},
    "lease_lapsed": {"lease_owner": "run-a", "lease_expires_at": EARLIER},
    "lease_ends_now": {"lease_owner": "run-a", "lease_expires_at": NOW},
    "lease_without_expiry": {"lease_owner": "run-a", "lease_expires_at": None},
    "expiry_without_owner": {"lease_owner": None, "lease_expires_at": LATER},
    "backing_off": {"next_attempt_at": LATER, "last_outcome": "retry_later"},
    "backoff_over": {"next_attempt_at": EARLIER, "last_outcome": "retry_later"},
    "backoff_ends_now": {"next_attempt_at": NOW, "last_outcome": "payment_not_confirmed"},
    "needs_attention": {"last_outcome": "needs_attention", "last_reason": "bad data"},
    "resolved": {"last_outcome": "resolved"},
    "waiting_for_supplier": {"last_outcome": "waiting_for_supplier", "next_attempt_at": LATER},
    "paused_and_leased_lapsed": {"last_outcome": "paused", "lease_owner": "run-b", "lease_expires_at": EARLIER,
                                 "next_attempt_at": EARLIER},
}


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "postgresql":
        yield request.getfixturevalue("store_engine")
        return
    path = tmp_path / "store.db"
    engine = create_store_engine(f"sqlite:///{path}")
    upgrade(engine)
    yield engine
    engine.dispose()
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def table(engine: sa.Engine) -> dict[str, tuple[str, str, str]]:
    """One order per combination: order id -> (status case, change case, state case)."""
    cases, order_rows, state_rows = {}, [], []
    for (status_case, (status, emailed)), (changed_case, ago), (state_case, values) in itertools.product(
            STATUSES.items(), CHANGED.items(), STATES.items()):
        order_id = str(uuid.uuid4())
        cases[order_id] = (status_case, changed_case, state_case)
        moment = naive_utc(NOW - ago)
        order_rows.append({"id": order_id, "email": "gamer@example.com", "status": status, "sourceType": "kinguin",
                           "totalCrypto": Decimal("9.99"), "completionEmailSent": emailed,
                           "createdAt": moment, "updatedAt": moment})
        if values is not None:
            state_rows.append({"order_id": order_id, **{"attempts": 0, "lease_owner": None, "lease_expires_at": None,
                                                         "next_attempt_at": None, "last_outcome": None,
                                                         "last_reason": None}, **values})
    with engine.begin() as conn:
        conn.execute(sa.insert(schema.orders), order_rows)
        conn.execute(sa.insert(schema.reconcile_state), state_rows)
    return cases


def python_verdicts(engine: sa.Engine, order_ids: set[str]) -> dict[str, Hold | None]:
    """`eligibility.hold` on each order as the store holds it (its columns and state row read back)."""
    states = Store(engine).states_of(order_ids)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.orders.c.id, schema.orders.c.status, schema.orders.c.completionEmailSent,
                                      schema.orders.c.updatedAt)).all()
    return {
        row.id: eligibility.hold(status=row.status, completion_email_sent=row.completionEmailSent,
                                 updated_at=row.updatedAt, state=states.get(row.id, ReconcileState(order_id=row.id)),
                                 now=NOW, grace=GRACE, max_age=WINDOW)
        for row in rows
    }


def test_the_sweeps_sql_and_the_python_verdict_agree_on_every_combination(engine, table):
    verdicts = python_verdicts(engine, set(table))
    swept = {o.id for o in Store(engine).find_stuck_orders(now=NOW, grace=GRACE, max_age=WINDOW, limit=10_000)}

    disagree = {table[order_id]: verdicts[order_id] for order_id in table
                if (order_id in swept) != (verdicts[order_id] is None)}
    assert not disagree
    # The table reaches every verdict, so a rule dropped on one side shows.
    assert set(verdicts.values()) == {None, *Hold}
    due = {table[order_id] for order_id in swept}
    assert ("paid", "at_the_grace_edge", "lease_lapsed") in due
    assert ("email_pending", "at_the_window_edge", "backoff_ends_now") in due
    assert ("paid", "due", "lease_without_expiry") not in due
    assert ("waiting", "due", "lease_ends_now") not in due


def test_the_state_rows_sql_and_python_agree(engine, table):
    """The state part alone (what the dry run asks): `held_back_sql` against `state_hold`."""
    state = schema.reconcile_state
    with engine.connect() as conn:
        held = set(conn.execute(sa.select(state.c.order_id).where(eligibility.held_back_sql(state, NOW))).scalars())
    states = Store(engine).states_of(set(table))
    assert {order_id for order_id, row in states.items() if eligibility.state_hold(row, NOW) is not None} == held
    expected = {"leased", "lease_ends_now", "lease_without_expiry", "backing_off", "needs_attention", "resolved",
                "waiting_for_supplier"}
    assert {table[order_id][2] for order_id in held} == expected


def test_the_board_calls_due_exactly_what_the_sweep_takes(engine, table):
    store = Store(engine)
    swept = {o.id for o in store.find_stuck_orders(now=NOW, grace=GRACE, max_age=WINDOW, limit=10_000)}
    rows = board.build_board(store.backlog_orders(now=NOW, max_age=WINDOW, limit=10_000), (), in_flight={},
                             now=NOW, grace=GRACE, max_age=WINDOW).rows

    assert {row.order_id for row in rows if row.state in board.DUE} == swept
    on_board = {table[row.order_id] for row in rows}
    assert not any(status in {"fulfilled_and_emailed", "created", "refunded"} for status, _, _ in on_board)
    # Past the window only what the project holds back stays on the board (a person's order never drops off).
    assert ("paid", "past_the_window", "needs_attention") in on_board
    assert ("paid", "past_the_window", "no_row") not in on_board


def test_precedence_follows_the_order_of_hold():
    """An order held for several reasons gets the first: what a person and the board are told."""
    state = ReconcileState(order_id="o", lease_owner="run-a", lease_expires_at=LATER, next_attempt_at=LATER,
                           last_outcome="needs_attention")
    inside_grace = naive_utc(NOW - dt.timedelta(minutes=1))

    def verdict(status: str = "paid", emailed: bool = False, **changes) -> Hold | None:
        return eligibility.hold(status=status, completion_email_sent=emailed, updated_at=inside_grace,
                                state=ReconcileState(**{**vars(state), **changes}), now=NOW, grace=GRACE,
                                max_age=WINDOW)

    assert verdict("fulfilled", emailed=True) is Hold.DONE
    assert verdict() is Hold.LEASED
    assert verdict(lease_owner=None) is Hold.LEFT_TO_A_PERSON
    assert verdict(lease_owner=None, last_outcome="retry_later") is Hold.BACKING_OFF
    assert verdict(lease_owner=None, last_outcome=None, next_attempt_at=None) is Hold.INSIDE_GRACE
