"""Which `order_attempts` partitions are removed: orders settled long ago, on a real PostgreSQL store."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from bitloot_reconcile.domain.history import partitions_to_remove
from bitloot_reconcile.store.repository import Store, utcnow
from bitloot_reconcile.store.schema import reconcile_state
from bitloot_standins.seed import SeedProduct, insert_order, insert_product

LONG_AGO, LATELY = dt.timedelta(days=60), dt.timedelta(days=3)
KEEP = dt.timedelta(days=30)


def test_only_orders_settled_and_untouched_for_the_kept_period_lose_their_partition(store_engine):
    store = Store(store_engine)
    game = insert_product(store_engine, SeedProduct("5c9b68662539a4e8f17ae2fe", "Hades (PC)"))

    def order(status: str, age: dt.timedelta, emailed: bool = True) -> str:
        return insert_order(store_engine, [game], status=status, age=age, completion_email_sent=emailed)

    settled = {
        "fulfilled and emailed long ago": order("fulfilled", LONG_AGO),
        "refunded long ago": order("refunded", LONG_AGO),
        "cancelled long ago": order("cancelled", LONG_AGO),
        "resolved by an admin long ago": order("paid", LONG_AGO),
    }
    kept = {
        "fulfilled lately": order("fulfilled", LATELY),
        "fulfilled long ago, email never sent": order("fulfilled", LONG_AGO, emailed=False),
        "paid long ago, never fulfilled": order("paid", LONG_AGO),
        "fulfilled long ago, leased now": order("fulfilled", LONG_AGO),
        "fulfilled long ago, its state changed lately": order("fulfilled", LONG_AGO),
    }
    store.update_state(settled["resolved by an admin long ago"], last_outcome="resolved")
    store.update_state(kept["fulfilled long ago, its state changed lately"], last_outcome="fulfilled")
    assert store.claim(kept["fulfilled long ago, leased now"], "run-1", dt.timedelta(minutes=10))
    with store_engine.begin() as conn:  # the state rows written just now date from long ago, but these two
        conn.execute(sa.update(reconcile_state).where(reconcile_state.c.order_id.in_([
            settled["resolved by an admin long ago"], kept["fulfilled long ago, leased now"]]))
            .values(updated_at=utcnow() - LONG_AGO))
    gone_from_the_store = "0b0f8e4e-54b8-4f1c-9b52-7d4a2e0f3c11"
    keys = [*kept.values(), *settled.values(), gone_from_the_store, "not-an-order",
            settled["refunded long ago"].upper()]

    removed = partitions_to_remove(store, keys, now=utcnow(), keep=KEEP, limit=100)

    assert sorted(removed) == sorted(settled.values())
    assert partitions_to_remove(store, keys, now=utcnow(), keep=KEEP, limit=2) == removed[:2]
    assert partitions_to_remove(store, [], now=utcnow(), keep=KEEP, limit=2) == []
