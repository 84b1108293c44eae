"""Every statement one order's attempt sends, planned by PostgreSQL on BitLoot's own schema in a shop large enough
that a sequential scan costs more than an index: none reads a BitLoot table (or one of the project's) whole
(a sequential scan, or an index walked end to end with a filter).

The statements are the ones the code sends (captured from the driver while a `fulfill_order` run and a
`fulfill_backlog` run each fulfil one order against the simulators), so the check follows the code as it changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import sqlalchemy as sa

from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import downgrade, upgrade
from bitloot_reconcile.store.repository import Store
from bitloot_standins.seed import add_history_lines, add_recovery_history
from tests.fixtures.world import World
from tests.store import bitloot_ddl as ddl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _plans import scans_of, statements_to  # noqa: E402  (benchmarks/ is not a package)

HISTORY_ORDERS = 40_000
# Read whole on purpose: every flag in one statement without a WHERE clause, a table of a few switches whose size
# does not follow the shop's.
WHOLE_TABLE_READS = {"feature_flags"}
# What one attempt reads and writes; each must show up among the captured statements, or the check misses a step.
TOUCHED = {"orders", "order_items", "payments", "products", "keys", "feature_flags", "email_bounces",
           "reconcile_state", "reconcile_audit", "reconcile_key_assignment"}


def _seed_shop(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(
            """INSERT INTO orders (id, email, "sourceType", status, "totalCrypto", "completionEmailSent",
                                   "createdAt", "updatedAt")
               SELECT gen_random_uuid(), 'buyer' || g || '@example.com', 'kinguin',
                      CASE WHEN g % 10 < 8 THEN 'fulfilled' ELSE 'expired' END, 7.99, g % 10 < 8, t, t
               FROM (SELECT g, now()::timestamp - interval '2 days' - g * interval '10 minutes' AS t
                     FROM generate_series(1, :n) AS g) AS s"""), {"n": HISTORY_ORDERS})
    add_history_lines(engine, catalogue=HISTORY_ORDERS // 4, bounces=HISTORY_ORDERS // 4)
    add_recovery_history(engine, percent=10)


def _whole_reads(engine: sa.Engine, statements, tables) -> dict[str, set[str]]:
    """Of `tables`, those read whole, by statement: a sequential scan, or an index walked without a search
    condition (in its order, every row filtered)."""
    return {sql: found for sql, plan in scans_of(engine, statements).items()
            if (found := {s.table for s in plan if s.whole_table} & set(tables))}


def test_every_statement_of_an_attempt_uses_an_index_on_bitloots_schema(
        kinguin_sim, nowpayments_sim, resend_sim, r2_bucket, dagster_instance):
    with ddl.fresh_pg_database("brtest_plans") as url:
        engine = create_store_engine(url)
        try:
            with engine.begin() as conn:
                ddl.create_bitloot_schema(conn)
            upgrade(engine)
            _seed_shop(engine)
            world = World(engine=engine, store=Store(engine), store_url=url, kinguin=kinguin_sim,
                          nowpayments=nowpayments_sim, resend=resend_sim, vault=r2_bucket.get_vault(), r2=r2_bucket,
                          instance=dagster_instance)
            game = world.product()
            alone, batched = world.order([game, game]), world.order([game])
            with statements_to(engine.url.database) as statements:
                single = world.run(alone)
                batch = world.batch([batched])
            assert single.success and batch.success
            assert all(world.store.load_order(o).completion_email_sent for o in (alone, batched))

            sent = " ".join(s.sql for s in statements)
            assert all(f"{table} " in sent or f'"{table}"' in sent for table in TOUCHED), sent
            plans = scans_of(engine, statements)
            assert len(plans) >= 20, list(plans)
            # The project's own tables too: they grow with every order it ever worked.
            whole = _whole_reads(engine, statements, {*ddl.BITLOOT_TABLES, *ddl.PROJECT_TABLES})
            assert {sql: tables - WHOLE_TABLE_READS for sql, tables in whole.items() if tables - WHOLE_TABLE_READS} \
                == {}
            # The items are read with their product through its primary key (the cast is on the item's side).
            (items_read,) = [p for sql, p in plans.items() if "JOIN products" in sql]
            assert {(s.table, s.index) for s in items_read} >= {
                ("order_items", "ix_reconcile_order_items_order"), ("products", "PK_products_id"),
                ("keys", "IDX_keys_orderItemId")}

            # The same statements without the project's lookup indexes: the check sees the scans.
            downgrade(engine, "0002")
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE")
            without = set().union(*_whole_reads(engine, statements, ddl.BITLOOT_TABLES).values())
            assert {"order_items", "payments", "email_bounces"} <= without
        finally:
            engine.dispose()
