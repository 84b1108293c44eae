"""The project's migrations: an empty database gets everything; a BitLoot database only gets the project's objects."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from bitloot_reconcile.store import schema
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import downgrade, upgrade
from tests.store import bitloot_ddl as ddl


def _migrate(url: str, action: str = "upgrade", revision: str = "head") -> None:
    engine = create_store_engine(url)
    try:
        if action == "upgrade":
            upgrade(engine, revision)
        else:
            downgrade(engine, revision)
    finally:
        engine.dispose()


def _versions(url: str) -> list[str]:
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text(f"SELECT version_num FROM {ddl.VERSION_TABLE}"))]
    finally:
        engine.dispose()


@pytest.fixture
def bitloot_pg_url(empty_pg_url: str) -> Iterator[str]:
    """A PostgreSQL database shaped and filled like a real BitLoot database, before the project ever ran."""
    ddl.populate_bitloot_database(empty_pg_url)
    yield empty_pg_url


# --- (a) an empty PostgreSQL database ----------------------------------------------------------------------
def test_upgrade_on_empty_postgres_creates_every_table_and_index(empty_pg_url):
    _migrate(empty_pg_url)
    snap = ddl.full_snapshot(empty_pg_url)

    expected_tables = {t.name for t in (*schema.BITLOOT_TABLES, *schema.PROJECT_TABLES)} | {ddl.VERSION_TABLE}
    assert snap["tables"] == expected_tables
    order_indexes = {name for (table, name) in snap["all_indexes"] if table == "orders"}
    assert set(ddl.PROJECT_ORDER_INDEXES) <= order_indexes
    assert snap["enums"] == {
        "email_bounces_type_enum": ["hard", "soft", "complaint"],
        "payments_status_enum": ["created", "waiting", "confirmed", "finished", "underpaid", "failed"],
        "product_source_type_enum": ["custom", "kinguin"],
    }
    # payments.externalId is unique, as in BitLoot
    assert any(
        table == "payments" and definition == 'UNIQUE ("externalId")' for table, _, definition in snap["constraints"]
    )
    assert _versions(empty_pg_url) == ["0003"]

    _migrate(empty_pg_url)  # a second run is a no-op
    again = ddl.full_snapshot(empty_pg_url)
    assert again == snap
    assert _versions(empty_pg_url) == ["0003"]


def test_upgrade_on_empty_postgres_seeds_bitloots_feature_flags(empty_pg_url):
    _migrate(empty_pg_url)
    engine = create_store_engine(empty_pg_url)
    try:
        with engine.connect() as conn:
            flags = conn.execute(sa.select(schema.feature_flags.c.name, schema.feature_flags.c.enabled,
                                           schema.feature_flags.c.category).order_by("name")).all()
    finally:
        engine.dispose()
    assert [tuple(f) for f in flags] == list(schema.SEEDED_FEATURE_FLAGS)


def test_project_index_definitions(empty_pg_url):
    _migrate(empty_pg_url)
    indexes = ddl.full_snapshot(empty_pg_url)["all_indexes"]
    assert indexes[("orders", "ix_reconcile_orders_status_updated")].endswith('(status, "updatedAt")')
    assert indexes[("orders", "ix_reconcile_orders_kinguin_reservation")].endswith('("kinguinReservationId")')
    pending = indexes[("orders", "ix_reconcile_orders_email_pending")]
    assert '("updatedAt")' in pending
    assert "WHERE" in pending and "'fulfilled'" in pending and '"completionEmailSent" IS FALSE' in pending


def test_tables_created_on_empty_database_have_bitloots_column_types():
    """On an empty database the project creates BitLoot's tables; every column it models has BitLoot's type."""

    def shape(url: str) -> dict[tuple[str, str], tuple]:
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                rows = ddl.column_snapshot(conn, ddl.MODELED_TABLES)
        finally:
            engine.dispose()
        # table, column -> data_type, udt_name, length, precision, scale, datetime precision, nullable
        return {(r[0], r[1]): (r[3], r[4], r[5], r[6], r[7], r[8], r[9]) for r in rows}

    with ddl.fresh_pg_database() as ours_url, ddl.fresh_pg_database() as bitloot_url:
        _migrate(ours_url)
        ddl.populate_bitloot_database(bitloot_url)
        ours, theirs = shape(ours_url), shape(bitloot_url)

    assert ours, "no columns found"
    for (table, column), column_shape in ours.items():
        assert (table, column) in theirs, f"{table}.{column} does not exist in BitLoot"
        assert column_shape == theirs[(table, column)], f"{table}.{column}"
    unmodeled = {k for k in theirs if k not in ours}
    assert {("products", c) for c in ddl.UNMODELED_COLUMNS["products"]} <= unmodeled


# --- (b) a database BitLoot's own migrations created ---------------------------------------------------------
def test_upgrade_on_bitloot_database_adds_only_the_projects_objects(bitloot_pg_url):
    before = ddl.full_snapshot(bitloot_pg_url)
    assert before["rows"]["orders"] and before["rows"]["products"]

    _migrate(bitloot_pg_url)
    after = ddl.full_snapshot(bitloot_pg_url)

    assert after["columns"] == before["columns"]
    assert after["constraints"] == before["constraints"]
    assert after["enums"] == before["enums"]
    assert after["rows"] == before["rows"]
    assert after["tables"] - before["tables"] == {*ddl.PROJECT_TABLES, ddl.VERSION_TABLE}
    assert before["tables"] <= after["tables"]
    added = {k: v for k, v in after["indexes"].items() if k not in before["indexes"]}
    assert set(added) == {("orders", name) for name in ddl.PROJECT_ORDER_INDEXES} | set(
        ddl.PROJECT_LOOKUP_INDEXES.items())
    assert added[("order_items", "ix_reconcile_order_items_order")].endswith('("orderId")')
    assert added[("payments", "ix_reconcile_payments_order")].endswith('("orderId")')
    assert added[("email_bounces", "ix_reconcile_email_bounces_address")].endswith("(lower((email)::text))")
    assert {k: v for k, v in after["indexes"].items() if k in before["indexes"]} == before["indexes"]
    assert _versions(bitloot_pg_url) == ["0003"]

    _migrate(bitloot_pg_url)  # twice: nothing more
    assert ddl.full_snapshot(bitloot_pg_url) == after


def test_upgrade_on_an_older_bitloot_never_creates_its_switch_tables(empty_pg_url):
    """BitLoot before its feature-flags migration: those tables are BitLoot's to create, never the project's."""
    ddl.populate_bitloot_database(empty_pg_url, with_switches=False)
    before = ddl.full_snapshot(empty_pg_url)
    assert not before["tables"] & set(ddl.SWITCH_TABLES)

    _migrate(empty_pg_url)

    after = ddl.full_snapshot(empty_pg_url)
    assert after["tables"] - before["tables"] == {*ddl.PROJECT_TABLES, ddl.VERSION_TABLE}
    assert after["columns"] == before["columns"] and after["rows"] == before["rows"]


def test_downgrade_to_base_removes_only_the_projects_objects(bitloot_pg_url):
    before = ddl.full_snapshot(bitloot_pg_url)
    _migrate(bitloot_pg_url)
    _migrate(bitloot_pg_url, "downgrade", "base")
    after = ddl.full_snapshot(bitloot_pg_url)

    for part in ("columns", "constraints", "enums", "rows", "indexes"):
        assert after[part] == before[part], part
    # Alembic keeps its (now empty) version table after a downgrade to base; nothing else of ours remains.
    assert after["tables"] - before["tables"] <= {ddl.VERSION_TABLE}
    assert before["tables"] <= after["tables"]
    assert not {name for (_, name) in after["all_indexes"]} & set(ddl.PROJECT_ORDER_INDEXES)
    assert _versions(bitloot_pg_url) == []

    _migrate(bitloot_pg_url)  # and it can be upgraded again
    reupgraded = ddl.full_snapshot(bitloot_pg_url)
    assert reupgraded["tables"] - before["tables"] == {*ddl.PROJECT_TABLES, ddl.VERSION_TABLE}
    assert reupgraded["rows"] == before["rows"]
    assert reupgraded["columns"] == before["columns"]


def test_a_store_at_0001_gets_the_replacement_columns_and_the_widened_blocking_index(empty_pg_url):
    """A store migrated before the admin remedies: 0002 adds the state's replacement columns and lets the
    sweep's partial index cover the orders resolved by hand."""
    _migrate(empty_pg_url, revision="0001")
    engine = create_store_engine(empty_pg_url)
    try:
        with engine.begin() as conn:  # 0001 builds tables from today's schema: make it the old shape
            conn.execute(sa.text("ALTER TABLE reconcile_state DROP COLUMN replacements, "
                                 "DROP COLUMN replaced_kinguin_order_id"))
            conn.execute(sa.text("DROP INDEX ix_reconcile_state_blocking"))
            conn.execute(sa.text("CREATE INDEX ix_reconcile_state_blocking ON reconcile_state (order_id) WHERE "
                                 "lease_owner IS NOT NULL OR next_attempt_at IS NOT NULL "
                                 "OR last_outcome = 'needs_attention'"))
            conn.execute(sa.text("INSERT INTO reconcile_state (order_id, attempts) "
                                 "VALUES ('5c91f65c-4b12-463c-9277-8cfc139ceda4', 2)"))
        _migrate(empty_pg_url)
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT attempts, replacements, replaced_kinguin_order_id "
                                       "FROM reconcile_state")).one()
            index = conn.execute(sa.text("SELECT indexdef FROM pg_indexes "
                                         "WHERE indexname = 'ix_reconcile_state_blocking'")).scalar_one()
    finally:
        engine.dispose()
    assert tuple(row) == (2, 0, None)
    assert "'resolved'" in index and "'needs_attention'" in index
    assert _versions(empty_pg_url) == ["0003"]
    _migrate(empty_pg_url, "downgrade", "0001")
    assert _versions(empty_pg_url) == ["0001"]


# --- (c) SQLite -------------------------------------------------------------------------------------------
def test_upgrade_on_sqlite_file_twice(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _migrate(url)
    _migrate(url)

    engine = create_store_engine(url)
    try:
        inspector = sa.inspect(engine)
        expected = {t.name for t in (*schema.BITLOOT_TABLES, *schema.PROJECT_TABLES)} | {ddl.VERSION_TABLE}
        assert set(inspector.get_table_names()) == expected
        assert set(ddl.PROJECT_ORDER_INDEXES) <= {ix["name"] for ix in inspector.get_indexes("orders")}
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT version_num FROM {ddl.VERSION_TABLE}")).scalars().all() == ["0003"]
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()

    _migrate(url, "downgrade", "base")
    engine = create_store_engine(url)
    try:
        inspector = sa.inspect(engine)
        names = set(inspector.get_table_names())
        assert {t.name for t in schema.BITLOOT_TABLES} <= names
        assert not names & {t.name for t in schema.PROJECT_TABLES}
        assert not {ix["name"] for ix in inspector.get_indexes("orders")} & set(ddl.PROJECT_ORDER_INDEXES)
    finally:
        engine.dispose()
    _migrate(url)
    assert _versions(url) == ["0003"]


# --- (d) the lookup indexes of one order (0003) ---------------------------------------------------------------
def _upgrade_statements(url: str) -> list[str]:
    """Every statement `upgrade` sends to the database, in order."""
    engine = create_store_engine(url)
    sent: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda conn, cursor, statement, *args: sent.append(statement))
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return sent


def test_lookup_indexes_are_built_concurrently_outside_any_transaction(bitloot_pg_url):
    """PostgreSQL refuses CREATE INDEX CONCURRENTLY inside a transaction block: that the build succeeds is the
    proof that the shop's writes were not blocked."""
    _migrate(bitloot_pg_url, revision="0002")
    sent = _upgrade_statements(bitloot_pg_url)
    builds = [s for s in sent if s.startswith("CREATE INDEX")]
    assert builds == [f'CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON "{table}" ({column})'
                      for table, name, column in (
                          ("order_items", "ix_reconcile_order_items_order", '"orderId"'),
                          ("payments", "ix_reconcile_payments_order", '"orderId"'),
                          ("email_bounces", "ix_reconcile_email_bounces_address", "lower(email)"))]
    # Without the store's statement timeout during the builds, and with it again afterwards.
    assert sent.index("SET statement_timeout = 0") < sent.index(builds[0])
    assert "RESET statement_timeout" in sent[sent.index(builds[-1]):]
    assert _versions(bitloot_pg_url) == ["0003"]


def test_an_index_left_invalid_by_an_interrupted_build_is_built_again(bitloot_pg_url):
    _migrate(bitloot_pg_url, revision="0002")
    engine = create_store_engine(bitloot_pg_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            order_id = conn.execute(sa.text('SELECT "orderId" FROM payments LIMIT 1')).scalar_one()
            conn.execute(sa.text('INSERT INTO payments (id, "orderId", "externalId") VALUES '
                                 "(gen_random_uuid(), :order, 'second-payment')"), {"order": order_id})
            # A unique build over duplicates fails half-way, as a cancelled build does: an invalid index stays.
            with pytest.raises(sa.exc.IntegrityError):
                conn.exec_driver_sql(
                    'CREATE UNIQUE INDEX CONCURRENTLY ix_reconcile_payments_order ON payments ("orderId")')
        upgrade(engine)
        with engine.connect() as conn:
            valid, definition = conn.execute(sa.text(
                "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'ix_reconcile_payments_order'")).one()
    finally:
        engine.dispose()
    assert valid and "UNIQUE" not in definition


def test_a_database_the_project_created_gets_the_keys_index_and_a_downgrade_removes_them_all(empty_pg_url):
    _migrate(empty_pg_url)
    indexes = ddl.full_snapshot(empty_pg_url)["all_indexes"]
    assert {*ddl.PROJECT_LOOKUP_INDEXES.items(), ddl.PROJECT_KEYS_INDEX} <= set(indexes)
    _migrate(empty_pg_url, "downgrade", "0002")
    indexes = ddl.full_snapshot(empty_pg_url)["all_indexes"]
    assert not {*ddl.PROJECT_LOOKUP_INDEXES.items(), ddl.PROJECT_KEYS_INDEX} & set(indexes)


def test_every_index_on_a_bitloot_table_is_built_concurrently(bitloot_pg_url):
    on_bitloot = [s for s in _upgrade_statements(bitloot_pg_url) if s.startswith("CREATE") and " INDEX " in s
                  and any(f" ON {t} " in s.replace('"', "") for t in ddl.MODELED_TABLES)]
    assert len(on_bitloot) == len(ddl.PROJECT_ORDER_INDEXES) + len(ddl.PROJECT_LOOKUP_INDEXES)
    assert all(s.startswith("CREATE INDEX CONCURRENTLY IF NOT EXISTS ") for s in on_bitloot), on_bitloot
