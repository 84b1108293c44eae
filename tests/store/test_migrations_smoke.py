import sqlalchemy as sa


def test_store_fixture_has_all_tables(store_engine):
    names = set(sa.inspect(store_engine).get_table_names())
    assert {"orders", "order_items", "keys", "payments", "products", "reconcile_state", "reconcile_audit"} <= names
    indexes = {ix["name"] for ix in sa.inspect(store_engine).get_indexes("orders")}
    assert "ix_reconcile_orders_status_updated" in indexes
