"""`reconciliation_report` materialised for real: PostgreSQL, SeaweedFS and the HTTP simulators.

One seeded day holds an order of every class; the broken states are set directly in the rows or planted in the
Kinguin simulator, fulfilled orders come from real `fulfill_order` runs.
"""

from __future__ import annotations

import datetime as dt
import io
import uuid

import dagster as dg
import pandas as pd
import sqlalchemy as sa

from bitloot_reconcile.assets.reconciliation_report import bar_chart, reconciliation_report, worst_rows_markdown
from bitloot_reconcile.domain import reconciliation
from bitloot_reconcile.store.schema import keys, orders, products
from bitloot_standins.seed import set_feature_flag
from tests.fixtures.report import NOON, order, plant
from tests.fixtures.world import World

DAY = "2026-03-10"
ERROR = {"orphan_supplier_order", "duplicate_supplier_orders", "fulfilled_missing_keys"}


def fulfilled(world: World, products) -> str:
    order_id = world.order(products)
    assert world.run(order_id).success
    assert world.store.load_order(order_id).status == "fulfilled"
    return order_id


def seed_every_class(world: World) -> dict[str, str]:
    """Orders created on DAY, one per class (two ok); returns order id -> expected class."""
    game = world.product(price=5.0)
    expected = {fulfilled(world, [game]): "ok"}

    waiting = world.order([game], status="waiting", payment_status="waiting", payment_id="5001")
    world.nowpayments.set_payment("5001", "waiting", order_id=waiting)
    expected[waiting] = "ok"  # not paid yet, and NOWPayments agrees

    broken = fulfilled(world, [game, game])  # one item loses its keys row, the other its stored object
    first, second = world.store.load_order(broken).items
    with world.engine.begin() as conn:
        conn.execute(sa.delete(keys).where(keys.c.orderItemId == first.id))
        conn.execute(sa.update(keys).where(keys.c.orderItemId == second.id).values(storageRef=f"orders/{broken}/gone"))
    expected[broken] = "fulfilled_missing_keys"

    no_email = fulfilled(world, [game])
    with world.engine.begin() as conn:
        conn.execute(sa.update(orders).where(orders.c.id == no_email).values(completionEmailSent=False))
    expected[no_email] = "fulfilled_missing_email"

    repriced = world.product(price=5.0)
    overcharged = fulfilled(world, [repriced])  # Kinguin charged 5.00; the cost BitLoot sends is now 4.00
    with world.engine.begin() as conn:
        conn.execute(sa.update(products).where(products.c.id == repriced.id).values(cost=4))
    expected[overcharged] = "price_mismatch"

    expected[world.order([game])] = "paid_not_placed"

    held = world.order([game])  # a run found Kinguin switched off in BitLoot
    set_feature_flag(world.engine, "kinguin_enabled", False)
    assert world.run(held).output_for_node("record_outcome") == "paused"
    set_feature_flag(world.engine, "kinguin_enabled", True)
    expected[held] = "held_by_switch"

    processing = world.order([game])  # an intent, and a Kinguin order created the next day: found by external id
    world.store.record_placement_intent(processing)
    plant(world, processing, game, "processing", created_at=NOON + dt.timedelta(days=1), reserve=False)
    expected[processing] = "placed_not_delivered"

    completed = world.order([game])
    plant(world, completed, game)
    expected[completed] = "supplier_completed_store_not_fulfilled"

    canceled = world.order([game])
    plant(world, canceled, game, "canceled")
    expected[canceled] = "supplier_canceled_or_refunded"

    duplicated = world.order([game])
    plant(world, duplicated, game)
    plant(world, duplicated, game, reserve=False)
    expected[duplicated] = "duplicate_supplier_orders"

    unpaid = world.order([game], status="confirming", payment_status="waiting", payment_id="5002")
    world.nowpayments.set_payment("5002", "finished", order_id=unpaid)
    expected[unpaid] = "store_unpaid_but_payment_finished"

    orphan = str(uuid.uuid4())
    plant(world, orphan, game, created_at=NOON + dt.timedelta(hours=3), reserve=False)
    expected[orphan] = "orphan_supplier_order"

    with world.engine.begin() as conn:
        conn.execute(sa.update(orders).values(createdAt=NOON.replace(tzinfo=None)))
    return expected


def materialize(world: World, day: str) -> dg.ExecuteInProcessResult:
    return dg.materialize([reconciliation_report], partition_key=day, resources=world.resources(),
                          instance=world.instance)


def request_methods(world: World, since: dict[str, int]) -> dict[str, set[str]]:
    sims = {"kinguin": world.kinguin, "nowpayments": world.nowpayments, "resend": world.resend}
    return {name: {r.method for r in sim.requests[since[name]:]} for name, sim in sims.items()}


def test_every_class_is_found_stored_in_r2_and_fails_its_check(world: World):
    expected = seed_every_class(world)
    seen = {"kinguin": len(world.kinguin.requests), "nowpayments": len(world.nowpayments.requests),
            "resend": len(world.resend.requests)}

    result = materialize(world, DAY)

    assert result.success
    report = result.output_for_node("reconciliation_report")
    assert dict(zip(report["order_id"], report["class"], strict=True)) == expected
    assert request_methods(world, seen) == {"kinguin": {"GET"}, "nowpayments": {"GET"}, "resend": set()}

    (materialization,) = result.asset_materializations_for_node("reconciliation_report")
    meta = materialization.metadata
    counts = meta["counts"].value
    assert counts == {cls.value: 2 if cls.value == "ok" else 1 for cls in reconciliation.Mismatch}
    assert meta["dagster/row_count"].value == 13
    assert meta["report_path"].value == f"{world.r2.bucket}/reports/reconciliation/{DAY}.csv"
    assert "| orphan_supplier_order |" in meta["worst_rows"].value
    broken = report.set_index("order_id").loc[next(k for k, v in expected.items() if v == "fulfilled_missing_keys")]
    assert (broken["items"], broken["items_with_key"]) == (2, 1)
    assert broken["detail"] == "fulfilled; 1 item(s) without keys row, 1 without object"
    assert meta["chart"].value.startswith("```\norphan_supplier_order")
    assert "https://" not in str(meta) and "X-Amz" not in str(meta)

    stored = world.vault.read(f"reports/reconciliation/{DAY}.csv")
    assert stored.content_type == "text/csv"
    csv = pd.read_csv(io.BytesIO(stored.data))
    assert dict(zip(csv["order_id"], csv["class"], strict=True)) == expected

    checks = {check.check_name: check for check in result.get_asset_check_evaluations()}
    assert set(checks) == {cls.value for cls in reconciliation.Mismatch} - {"ok"}
    for name, check in checks.items():
        assert not check.passed, name
        assert check.severity == (dg.AssetCheckSeverity.ERROR if name in ERROR else dg.AssetCheckSeverity.WARN)
    assert checks["orphan_supplier_order"].metadata["orders"].value == [
        order_id for order_id, cls in expected.items() if cls == "orphan_supplier_order"]

    # The next day holds no store order; its one Kinguin order belongs to DAY's order, so it is no orphan.
    quiet = materialize(world, "2026-03-11")
    assert quiet.output_for_node("reconciliation_report").empty
    assert all(check.passed for check in quiet.get_asset_check_evaluations())
    assert world.vault.read("reports/reconciliation/2026-03-11.csv").data.decode().startswith("order_id,source,")


def test_window_search_follows_kinguin_pages_past_one_hundred(world: World):
    game = world.product(price=1.0)
    ours = world.order([game])
    with world.engine.begin() as conn:
        conn.execute(sa.update(orders).values(createdAt=NOON.replace(tzinfo=None)))
    plant(world, ours, game)
    orphans = {str(uuid.uuid4()) for _ in range(130)}
    for n, external_id in enumerate(sorted(orphans)):
        plant(world, external_id, game, created_at=NOON + dt.timedelta(seconds=n), reserve=False)
    plant(world, str(uuid.uuid4()), game, created_at=NOON + dt.timedelta(days=1), reserve=False)  # next day

    with world.resources()["kinguin"].get_client() as kinguin, world.resources()["nowpayments"].get_client() as np:
        report = reconciliation.build_report(world.store, kinguin, np, world.vault, NOON.replace(hour=0),
                                             NOON.replace(hour=0) + dt.timedelta(days=1))

    classes = dict(zip(report["order_id"], report["class"], strict=True))
    assert classes.pop(ours) == "supplier_completed_store_not_fulfilled"
    assert classes == dict.fromkeys(orphans, "orphan_supplier_order")
    pages = [(r.query.get("page"), r.query.get("limit")) for r in world.kinguin.requests_to("search_orders")
             if "createdAtFrom" in r.query]
    assert pages == [("1", "100"), ("2", "100")]



def test_schedule_reports_the_day_just_ended_and_today_is_available_on_demand():
    import datetime as dt

    import dagster as dg

    from bitloot_reconcile.assets.reconciliation_report import DAILY, reconciliation_report_schedule

    moment = dt.datetime(2026, 11, 27, 1, 0, tzinfo=dt.UTC)
    request = reconciliation_report_schedule(dg.build_schedule_context(scheduled_execution_time=moment))
    assert request.partition_key == "2026-11-26"
    with dg.instance_for_test(), dg.partition_loading_context(effective_dt=moment):
        assert DAILY.get_last_partition_key() == "2026-11-27"


def test_worst_rows_and_counts_render_as_markdown():
    empty = reconciliation.classify(reconciliation.Evidence(orders=[]))
    assert worst_rows_markdown(empty) == "No mismatches: every order is ok."

    stuck = order("paid")
    report = reconciliation.classify(reconciliation.Evidence(orders=[stuck, order("fulfilled", emailed=True)]))
    table = worst_rows_markdown(report)
    assert table.splitlines()[0] == "| class | order | store status | Kinguin orders | detail |"
    assert f"| paid_not_placed | {stuck.id} | paid |  | paid; no Kinguin order |" in table
    assert len(table.splitlines()) == 3  # header, rule, the one non-ok row

    chart = bar_chart({"ok": 4, "paid_not_placed": 1, "price_mismatch": 0}, width=8)
    assert chart.splitlines() == ["```", "ok              ████████ 4", "paid_not_placed ██ 1",
                                  "price_mismatch   0", "```"]
