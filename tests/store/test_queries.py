"""The board's two reads on a real PostgreSQL store seeded with an order in every state."""

from __future__ import annotations

import datetime as dt

from bitloot_reconcile.store.repository import Store, utcnow
from tests.fixtures.board import EXHAUSTED, on_board, seed_every_state

WINDOW = dt.timedelta(days=30)


def test_backlog_orders_are_every_not_done_order_oldest_first_with_its_state(store_engine):
    ids = seed_every_state(store_engine)
    store = Store(store_engine)

    found = store.backlog_orders(now=utcnow(), max_age=WINDOW, limit=100)

    assert sorted(o.id for o in found) == sorted(on_board(ids).values())
    assert [o.created_at for o in found] == sorted(o.created_at for o in found)
    assert found[0].id == ids["past_age_window"]  # 40 days old, kept because the project holds it back
    by_id = {o.id: o for o in found}
    assert by_id[ids["quarantined"]].state.last_reason == EXHAUSTED
    assert by_id[ids["in_flight"]].state.lease_owner == "run-in-flight"
    assert by_id[ids["stuck"]].state.attempts == 0 and by_id[ids["stuck"]].state.last_outcome is None
    assert by_id[ids["waiting_for_supplier"]].kinguin_reservation_id == "K-WAIT"
    assert by_id[ids["email_pending"]].status == "fulfilled" and not by_id[ids["email_pending"]].completion_email_sent


def test_backlog_orders_stop_at_the_limit_keeping_the_oldest(store_engine):
    ids = seed_every_state(store_engine)
    found = Store(store_engine).backlog_orders(now=utcnow(), max_age=WINDOW, limit=3)
    assert [o.id for o in found] == [ids["past_age_window"], ids["quarantined"], ids["needs_attention"]]


def test_fulfilled_since_lists_orders_fulfilled_in_the_window_with_the_projects_part(store_engine):
    ids = seed_every_state(store_engine)
    found = {o.id: o for o in Store(store_engine).fulfilled_since(utcnow() - dt.timedelta(hours=24))}

    # Fulfilled without the email still counts: the keys were delivered.
    assert set(found) == {ids["done_recovered"], ids["done_fulfilled"], ids["email_pending"]}
    recovered = found[ids["done_recovered"]]
    assert recovered.last_outcome == "fulfilled" and recovered.kinguin_reservation_id == "K-RECOVERED"
    assert recovered.placement_intent_at is not None
    assert round((recovered.updated_at - recovered.created_at).total_seconds() / 60) == 30
    assert found[ids["done_fulfilled"]].last_outcome is None
