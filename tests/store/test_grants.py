"""The project's least rights (`store.grants`, `bitloot-reconcile db grants`): derived from the code's statements,
enough for every write the code makes, refused everywhere else."""

from __future__ import annotations

import importlib.util
import re
import textwrap
from decimal import Decimal

import psycopg
import pytest
import sqlalchemy as sa

from bitloot_reconcile.store import grants, schema
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import upgrade
from bitloot_standins.seed import insert_order
from tests.fixtures.db import restricted_role
from tests.fixtures.world import World
from tests.store import bitloot_ddl as ddl
from tests.test_cli_db import run_cli

_UPDATE = re.compile(r'^UPDATE "?(\w+)"? SET (.*?) WHERE ', re.DOTALL)
_INSERT = re.compile(r'^INSERT INTO "?(\w+)"? \((.*?)\) VALUES', re.DOTALL)
_SET_COLUMN = re.compile(r'(?:^|,\s*)"?([A-Za-z_]\w*)"?=')


def written(statement: str) -> tuple[str, str, set[str]] | None:
    """(kind, table, columns) of an UPDATE or INSERT as the driver receives it."""
    if found := _UPDATE.match(statement):
        return "UPDATE", found.group(1), set(_SET_COLUMN.findall(found.group(2)))
    if found := _INSERT.match(statement):
        return "INSERT", found.group(1), {c.strip().strip('"') for c in found.group(2).split(",")}
    return None


@pytest.fixture
def captured_writes(app_store_url):
    """Every UPDATE and INSERT the runs' engines (those connected as the project's role) send during the test;
    the tests' own seeding connects as the owner."""
    seen: list[tuple[str, str, set[str]]] = []
    role = sa.engine.make_url(app_store_url).username

    def grab(conn, cursor, statement, parameters, context, executemany):
        if conn.engine.url.username == role and (write := written(statement)) is not None:
            seen.append(write)

    sa.event.listen(sa.Engine, "before_cursor_execute", grab)
    yield seen
    sa.event.remove(sa.Engine, "before_cursor_execute", grab)


def test_the_grants_name_every_column_the_runs_write(world: World, captured_writes):
    """A fulfilment from `waiting` (payment check, Kinguin order, keys, email), a price remedy and a resolution:
    every column the code writes to a BitLoot table is in the grants. Fails when the code writes a column the
    derivation misses."""
    product = world.product(price=5.0)
    waiting = world.order([product], status="waiting", payment_status="finished")
    assert world.run(waiting).success
    refund = world.order([product], status="paid")
    assert world.run(refund, remedy={"resolution": "refunded_to_customer"}).success
    seeded = {(kind, table) for kind, table, _ in captured_writes if table in {"orders", "order_items", "keys"}}
    assert {("UPDATE", "orders"), ("UPDATE", "order_items"), ("INSERT", "keys")} <= seeded

    uses = grants.table_uses()
    project = {t.name for t in schema.PROJECT_TABLES}
    for kind, table, columns in captured_writes:
        assert kind in uses[table].writes, (kind, table)
        if table not in project:
            assert columns <= uses[table].writes[kind], (kind, table, columns - uses[table].writes[kind])


def test_the_derivation_reads_the_columns_from_the_statements():
    uses = grants.table_uses()
    assert uses["orders"].writes["UPDATE"] >= {"status", "kinguinReservationId", "completionEmailSent", "updatedAt"}
    assert "totalCrypto" not in uses["orders"].writes["UPDATE"]
    assert set(uses["keys"].writes) == {"INSERT"}
    assert set(uses["reconcile_audit"].writes) == {"INSERT"}  # append-only
    assert not any("DELETE" in use.writes for use in uses.values())
    assert {"payments", "products", "feature_flags", "email_bounces"} <= set(uses)
    assert all(not uses[t].writes for t in ("payments", "products", "feature_flags", "email_bounces"))


def test_a_write_whose_columns_the_code_does_not_name_stops_the_derivation(tmp_path):
    module_file = tmp_path / "dynamic_writes.py"
    module_file.write_text(textwrap.dedent("""
        import sqlalchemy as sa
        from bitloot_reconcile.store.schema import orders

        def touch(order_id, **values):
            return sa.update(orders).where(orders.c.id == order_id).values(**values)
    """))
    spec = importlib.util.spec_from_file_location("dynamic_writes", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    with pytest.raises(grants.CannotDerive, match="a write to orders whose columns the code does not name"):
        grants.table_uses([module])


def test_db_grants_prints_the_statements_and_refuses_a_bad_role_name():
    printed = run_cli("db", "grants", "bitloot_reconcile")
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert 'GRANT UPDATE ("completionEmailSent", "kinguinReservationId", status, "updatedAt") ON orders ' \
           "TO bitloot_reconcile;" in lines
    assert "GRANT SELECT, INSERT ON reconcile_audit TO bitloot_reconcile;" in lines
    assert not any(word in printed.stdout for word in ("users", "promocodes", "totalCrypto", "ALL", "DELETE"))

    bad = run_cli("db", "grants", "app; DROP TABLE orders")
    assert bad.returncode == 2 and "role name" in bad.stderr and not bad.stdout


def test_the_role_is_refused_outside_its_grants_on_a_bitloot_database(empty_pg_url):
    """On a database shaped like BitLoot's (users, promocodes, webhook_logs...): `db grants ROLE --apply` as the
    owner, then the role may move an order's status and nothing it was not granted."""
    ids = ddl.populate_bitloot_database(empty_pg_url)
    owner = create_store_engine(empty_pg_url)
    upgrade(owner)
    owner.dispose()
    with restricted_role(empty_pg_url, granted=False) as role_url:
        role = sa.engine.make_url(role_url).username
        applied = run_cli("db", "grants", role, "--apply", "--database-url", empty_pg_url)
        assert applied.returncode == 0, applied.stderr
        assert f"granted to {role}" in applied.stdout

        engine = create_store_engine(role_url)
        try:
            def run(statement: str, **params) -> int:
                with engine.begin() as conn:
                    return conn.execute(sa.text(statement), params).rowcount

            assert run("""UPDATE orders SET status = 'fulfilled', "updatedAt" = now() WHERE id = :id""",
                       id=ids["order_paid"]) == 1
            assert run("""INSERT INTO reconcile_audit (order_id, action, trigger) VALUES (:id, 'x', 'admin')""",
                       id=ids["order_paid"]) == 1
            for refused in (
                """UPDATE users SET role = 'admin' WHERE id = :id""",
                """UPDATE payments SET status = 'finished' WHERE "orderId" = :id""",
                """UPDATE orders SET "totalCrypto" = 0 WHERE id = :id""",
                """INSERT INTO orders (email) VALUES ('x@example.com')""",
                """DELETE FROM orders WHERE id = :id""",
                """UPDATE reconcile_audit SET reason = 'rewritten' WHERE order_id = :id""",
                """DELETE FROM reconcile_audit WHERE order_id = :id""",
                """SELECT * FROM users""",
                """SELECT * FROM webhook_logs""",
                """CREATE TABLE reconcile_extra (id int)""",
            ):
                params = {"id": ids["user"] if "users" in refused else ids["order_paid"]} if ":id" in refused else {}
                with pytest.raises(sa.exc.ProgrammingError) as refusal:
                    run(refused, **params)
                assert isinstance(refusal.value.orig, psycopg.errors.InsufficientPrivilege), refused
        finally:
            engine.dispose()


def test_a_run_as_the_role_fulfils_and_the_role_cannot_touch_the_order_total(world: World):
    """The world's runs connect as the restricted role (see the `world` fixture); the order's total stays."""
    assert sa.engine.make_url(world.store_url).username.startswith("brtest_app_")
    product = world.product(price=5.0)
    order_id = insert_order(world.engine, [product], status="paid")
    assert world.run(order_id).success
    assert world.store.load_order(order_id).status == "fulfilled"
    role_engine = create_store_engine(world.store_url)
    try:
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"), role_engine.begin() as conn:
            conn.execute(sa.update(schema.orders).where(schema.orders.c.id == order_id)
                         .values(totalCrypto=Decimal("0")))
    finally:
        role_engine.dispose()


def test_applying_to_a_role_that_does_not_exist_fails_in_one_line(store_url):
    result = run_cli("db", "grants", "brtest_nobody_here", "--apply", "--database-url", store_url)
    assert result.returncode == 1
    assert 'granting failed: role "brtest_nobody_here" does not exist' in result.stderr
    assert "Traceback" not in result.stderr
