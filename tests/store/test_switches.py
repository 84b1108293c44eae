"""BitLoot's switches as the store reads them: its feature flags and its email suppression list."""

from __future__ import annotations

from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import upgrade
from bitloot_reconcile.store.repository import Store
from bitloot_standins.seed import insert_email_bounce, set_feature_flag
from tests.store import bitloot_ddl as ddl


def test_feature_flags_as_bitloot_seeds_them(bitloot_store):
    store, _, _ = bitloot_store
    assert store.feature_flags() == {
        "auto_fulfill_enabled": True, "captcha_enabled": True, "custom_products_enabled": True,
        "email_notifications_enabled": True, "fulfillment_enabled": True, "kinguin_enabled": True,
        "maintenance_mode": False, "payment_processing_enabled": True,
    }
    set_feature_flag(store.engine, "kinguin_enabled", False)
    assert store.feature_flags()["kinguin_enabled"] is False


def test_email_suppression_on_a_bitloot_database(bitloot_store):
    store, _, _ = bitloot_store
    bounce = store.email_suppression("Gone@Example.com")
    assert (bounce.type, bounce.reason) == ("hard", "550 5.1.1 mailbox does not exist")
    insert_email_bounce(store.engine, "soft@example.com", bounce_type="soft")
    insert_email_bounce(store.engine, "angry@example.com", bounce_type="complaint", reason="marked as spam")
    assert store.email_suppression("soft@example.com") is None  # soft bounces never suppress
    assert store.email_suppression("angry@example.com").type == "complaint"
    assert store.email_suppression("gamer@example.com") is None


def test_an_older_bitloot_without_the_switch_tables(empty_pg_url):
    ddl.populate_bitloot_database(empty_pg_url, with_switches=False)
    engine = create_store_engine(empty_pg_url)
    try:
        upgrade(engine)
        store = Store(engine)
        assert store.feature_flags() is None
        assert store.email_suppression("gone@example.com") is None
    finally:
        engine.dispose()
