"""The Store as a whole: one attempt's cached view of its order and state row, and the store against a BitLoot-shaped
database (its DDL, its extra columns, its rows), touching only what it owns."""

from __future__ import annotations

import datetime as dt
import time
from decimal import Decimal

import pytest
import sqlalchemy as sa

from bitloot_reconcile.store.repository import LeaseLost, Store
from bitloot_standins.seed import SeedProduct, insert_product, set_feature_flag
from bitloot_standins.seed import insert_order as insert_seeded_order
from tests.store import bitloot_ddl as ddl
from tests.store.rows import count_statements, insert_order


def test_an_attempts_view_applies_its_own_writes_and_reads_again_when_a_guarded_write_changed_nothing(engine, store):
    order_id, (item_id,) = insert_order(engine)
    store.claim(order_id, "run-1", dt.timedelta(minutes=5))
    view = store.for_attempt()
    statements = count_statements(engine)

    first = view.load_order(order_id)
    assert view.load_order(order_id) is first
    assert len(statements) == 2  # the order with its payments, the items with their keys

    # Its own writes are applied to what it read, without reading the order again.
    view.save_reservation_id(order_id, "MINE0000001", owner="run-1")
    view.record_stored_key(order_id, item_id, "keys/a.txt", "text/plain", "https://signed", owner="run-1")
    assert view.mark_fulfilled(order_id, owner="run-1")
    writes = len(statements)
    kept = view.load_order(order_id)
    assert len(statements) == writes
    assert (kept.status, kept.kinguin_reservation_id) == ("fulfilled", "MINE0000001")
    assert (kept.items[0].key_refs, kept.items[0].signed_url, kept.items[0].delivered) == (
        ("keys/a.txt",), "https://signed", True)
    assert kept == Store(engine).load_order(order_id)  # what the database holds

    # Someone else's change is not seen until a guarded write of the view changes nothing, or a fresh read.
    Store(engine).mark_email_sent(order_id)
    assert view.load_order(order_id).completion_email_sent is False
    assert view.load_order(order_id, fresh=True).completion_email_sent is True
    Store(engine).replace_reservation_id(order_id, "MINE0000001", "THEIRS00001")
    assert view.load_order(order_id).kinguin_reservation_id == "MINE0000001"
    assert not view.replace_reservation_id(order_id, "MINE0000001", "MINE0000002", owner="run-1")
    assert view.load_order(order_id).kinguin_reservation_id == "THEIRS00001"


def test_an_attempts_view_keeps_the_state_its_claim_returned_and_renews_a_fresh_lease_without_a_statement(
        engine, store):
    order_id, _ = insert_order(engine)
    view = store.for_attempt()
    statements = count_statements(engine)
    ttl = dt.timedelta(minutes=5)
    assert view.claim(order_id, "run-1", ttl)
    assert len(statements) == 1  # one upsert, returning the row
    state = view.get_state(order_id)
    assert (state.lease_owner, state.attempts) == ("run-1", 1)
    assert view.renew_lease(order_id, "run-1", ttl)
    view.record_placement_intent(order_id, owner="run-1")
    assert len(statements) == 2
    assert view.get_state(order_id).placement_intent_at is not None

    # A longer lease than the one it holds is renewed in the database; so is one that has lapsed.
    assert view.renew_lease(order_id, "run-1", ttl * 10)
    assert len(statements) == 3
    assert view.get_state(order_id) == Store(engine).get_state(order_id)  # what the database holds
    assert view.finish_run(order_id, "run-1", last_outcome="fulfilled")
    assert view.get_state(order_id).lease_owner is None  # read again after the outcome


def test_an_attempts_view_renews_a_lapsed_lease_in_the_database_and_loses_it_to_a_run_that_took_it(engine, store):
    order_id, _ = insert_order(engine)
    view = store.for_attempt()
    assert view.claim(order_id, "run-1", dt.timedelta(seconds=-1))  # lapsed at once
    assert Store(engine).claim(order_id, "run-2", dt.timedelta(minutes=5))
    assert not view.renew_lease(order_id, "run-1", dt.timedelta(minutes=5))
    with pytest.raises(LeaseLost):
        view.record_placement_intent(order_id, owner="run-1")
    assert Store(engine).get_state(order_id).lease_owner == "run-2"


def test_the_views_of_a_sharing_store_read_the_flags_once_per_max_age(engine, store):
    set_feature_flag(engine, "kinguin_enabled", True)
    sharing = store.sharing_flags(max_age_seconds=0.5)
    statements = count_statements(engine)
    first, second = sharing.for_attempt(), sharing.for_attempt()
    assert first.feature_flags()["kinguin_enabled"] is True
    set_feature_flag(engine, "kinguin_enabled", False)
    statements.clear()
    assert second.feature_flags()["kinguin_enabled"] is True  # the shared read, not yet half a second old
    assert statements == []
    time.sleep(0.5)
    assert first.feature_flags()["kinguin_enabled"] is False
    assert len(statements) == 1
    assert store.feature_flags()["kinguin_enabled"] is False  # a plain store reads every time
    assert len(statements) == 2


def test_a_plain_store_reads_the_order_every_time(engine, store):
    order_id, _ = insert_order(engine)
    statements = count_statements(engine)
    store.load_order(order_id)
    store.load_order(order_id)
    assert len(statements) == 4
    Store(engine).save_reservation_id(order_id, "THEIRS00001")
    assert store.load_order(order_id).kinguin_reservation_id == "THEIRS00001"


def test_a_failed_write_of_the_view_still_drops_what_it_kept(engine, store):
    order_id, _ = insert_order(engine)
    store.claim(order_id, "run-1", dt.timedelta(minutes=5))
    view = store.for_attempt()
    view.load_order(order_id)
    Store(engine).mark_fulfilled(order_id)
    with pytest.raises(LeaseLost):
        view.mark_email_sent(order_id, owner="run-2")
    assert view.load_order(order_id).status == "fulfilled"



def test_store_on_a_bitloot_database_touches_only_what_it_owns(bitloot_store):
    store, ids, url = bitloot_store
    raw = sa.create_engine(url)
    try:
        with raw.connect() as conn:
            products_before = ddl.row_snapshot(conn, ["products", "users", "promocodes", "webhook_logs"])
            columns_before = ddl.column_snapshot(conn)

        order = store.load_order(ids["order_paid"])
        assert order.status == "paid" and order.total == Decimal("26.991")
        [item] = order.items
        assert item.kinguin_product_id == "5c9b5f6b2539a4e8f172916a"
        assert item.product_cost == Decimal("23.45")
        assert [(p.external_id, p.status) for p in order.payments] == [("5077125051", "finished")]
        fulfilled = store.load_order(ids["order_fulfilled"])
        assert fulfilled.items[0].key_refs == ("orders/x/key-abc.txt",)
        assert fulfilled.items[0].delivered

        assert store.claim(ids["order_paid"], "run-a", dt.timedelta(minutes=5))
        store.save_reservation_id(ids["order_paid"], "PHS84FJAG5V")
        store.save_reservation_id(ids["order_fulfilled"], "SHOULDNOTSET")
        store.record_stored_key(order.id, item.id, f"orders/{order.id}/key-{item.id[:8]}.txt", "text/plain", "https://x")
        assert store.mark_fulfilled(ids["order_paid"])
        store.mark_email_sent(ids["order_paid"])
        assert not store.mark_paid(ids["order_fulfilled"])
        assert store.mark_paid(ids["order_waiting"])

        with raw.connect() as conn:
            assert ddl.row_snapshot(conn, ["products", "users", "promocodes", "webhook_logs"]) == products_before
            assert ddl.column_snapshot(conn) == columns_before
            key = conn.execute(
                sa.text('SELECT "downloadCount", "contentType", "encryptionKey" FROM keys WHERE "orderItemId" = :i'),
                {"i": item.id},
            ).one()
            assert tuple(key) == (0, "text/plain", "raw:text/plain")
            orders = {
                str(r.id): r
                for r in conn.execute(
                    sa.text('SELECT id, status, "kinguinReservationId", "completionEmailSent", "userId" FROM orders')
                )
            }
        assert orders[ids["order_paid"]].status == "fulfilled"
        assert orders[ids["order_paid"]].kinguinReservationId == "PHS84FJAG5V"
        assert orders[ids["order_paid"]].completionEmailSent is True
        assert str(orders[ids["order_paid"]].userId) == ids["user"]
        assert orders[ids["order_fulfilled"]].kinguinReservationId == "PHS84FJAG5U"
        assert orders[ids["order_waiting"]].status == "paid"
    finally:
        raw.dispose()


def test_seeding_fills_bitloots_required_product_columns(bitloot_store):
    """BitLoot's `products.slug` is NOT NULL without a default: the sandbox seeding must set it."""
    store, _, url = bitloot_store
    game = insert_product(store.engine, SeedProduct("5c9b68662539a4e8f17ae2fe", "Hollow Knight: Silksong"))
    order_id = insert_seeded_order(store.engine, [game, game])

    [item, _] = store.load_order(order_id).items
    assert item.kinguin_product_id == "5c9b68662539a4e8f17ae2fe" and item.product_title == "Hollow Knight: Silksong"
    raw = sa.create_engine(url)
    try:
        with raw.connect() as conn:
            row = conn.execute(
                sa.text('SELECT slug, "businessCategory" FROM products WHERE id = :id'), {"id": game.id}
            ).one()
    finally:
        raw.dispose()
    assert row.slug == f"hollow-knight-silksong-{game.id[:8]}" and row.businessCategory == "games"
