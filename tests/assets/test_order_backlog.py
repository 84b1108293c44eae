"""`order_backlog` materialised for real: a PostgreSQL store seeded with every state, SeaweedFS for the CSV, a
Dagster instance holding a queued run."""

from __future__ import annotations

import csv
import datetime as dt
import io

import dagster as dg
import pytest

from bitloot_reconcile.assets.order_backlog import TABLE_ROWS
from bitloot_reconcile.jobs import fulfill_order
from bitloot_reconcile.resources.alerts import AlertsResource
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_standins.seed import SeedProduct, insert_order, insert_product
from tests.fixtures.board import EXHAUSTED, SUPPLIER_CANCELED, on_board, seed_every_state
from tests.fixtures.definitions import order_backlog

DAGSTER_URL = "http://dagster.test"


@pytest.fixture
def materialize(store_url, r2_bucket, dagster_instance):
    def run() -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [order_backlog], instance=dagster_instance,
            resources={"store": StoreResource(database_url=store_url), "policy": RecoveryPolicyResource(),
                       "r2": r2_bucket, "alerts": AlertsResource(dagster_base_url=DAGSTER_URL)},
        )
    return run


def metadata(result: dg.ExecuteInProcessResult) -> dict:
    (materialization,) = result.asset_materializations_for_node("order_backlog")
    return materialization.metadata


def board_rows(meta: dict) -> list[list[str]]:
    """The cells of the board's Markdown table, below its header."""
    lines = meta["board"].md_str.strip().splitlines()
    assert lines[0] == "| order | state | age | runs | last run | reason |"
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def verdicts(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


@pytest.fixture
def queued_run(store_engine, dagster_instance):
    """An order with a run Dagster has created but not started: in flight although it holds no lease."""
    product = insert_product(store_engine, SeedProduct("aa9b68662539a4e8f17ae2fe", "Queued game"))
    order_id = insert_order(store_engine, [product], age=dt.timedelta(minutes=25))
    run = dagster_instance.create_run_for_job(
        fulfill_order, run_config={"order_id": order_id, "reason": "x", "requested_by": "y"},
        tags={"bitloot/order_id": order_id})
    yield order_id, run.run_id
    dagster_instance.delete_run(run.run_id)


def test_every_state_is_a_row_with_its_counts_figures_csv_and_failed_checks(store_engine, materialize, r2_bucket,
                                                                             queued_run):
    ids = seed_every_state(store_engine)
    queued_order, queued_run_id = queued_run

    result = materialize()

    assert result.success
    meta = metadata(result)
    bucket, path = meta["csv_path"].path.split("/", 1)
    assert bucket == r2_bucket.bucket and path.startswith("reports/board/") and path.endswith(".csv")
    written = list(csv.DictReader(io.StringIO(r2_bucket.get_vault().read(path).data.decode())))
    rows = {row["order_id"]: row for row in written}
    expected = {order_id: state for state, order_id in on_board(ids).items()} | {queued_order: "in_flight"}
    assert {oid: row["state"] for oid, row in rows.items()} == expected
    assert list(written[0]) == ["order_id", "state", "status", "age_minutes", "attempts", "last_outcome", "reason",
                                "next_attempt_at", "run_id", "run_url"]
    ages = [int(row["age_minutes"]) for row in written]
    assert ages == sorted(ages, reverse=True)  # oldest first
    assert rows[ids["stuck"]]["age_minutes"] in ("89", "90") and rows[ids["stuck"]]["status"] == "paid"
    assert rows[ids["quarantined"]]["reason"] == EXHAUSTED and rows[ids["quarantined"]]["attempts"] == "8"
    assert rows[ids["needs_attention"]]["reason"] == SUPPLIER_CANCELED
    run_id = rows[ids["needs_attention"]]["run_id"]
    assert rows[ids["needs_attention"]]["run_url"] == f"{DAGSTER_URL}/runs/{run_id}"
    assert rows[ids["in_flight"]]["run_id"] == "run-in-flight"
    assert "holds the lease until" in rows[ids["in_flight"]]["reason"]
    assert rows[queued_order]["run_id"] == queued_run_id
    assert rows[ids["backing_off"]]["next_attempt_at"].endswith("UTC")
    assert rows[ids["stuck"]]["next_attempt_at"] == ""

    # The UI's table: one line per order, oldest first, its short id linked to the order's runs, the last run's
    # short id linked to the run.
    board = board_rows(meta)
    assert [cells[0] for cells in board] == [
        f"[{oid[:8]}]({DAGSTER_URL}/runs?q%5B0%5D=tag%3Abitloot%2Forder_id%3D{oid})" for oid in rows]
    attention = board[list(rows).index(ids["needs_attention"])]
    assert attention[1] == "needing a person" and attention[5] == SUPPLIER_CANCELED
    assert attention[4] == f"[{run_id[:8]}]({DAGSTER_URL}/runs/{run_id}) needs attention"
    assert board[list(rows).index(ids["quarantined"])][3] == "8"
    assert "(next look " in board[list(rows).index(ids["backing_off"])][5]

    counts = {name.removeprefix("orders_"): value.value for name, value in meta.items() if name.startswith("orders_")}
    assert all(isinstance(meta[f"orders_{state}"], dg.IntMetadataValue) for state in counts)  # plotted figures
    assert {state: n for state, n in counts.items() if n} == {
        "in_flight": 2, "needs_attention": 1, "quarantined": 1, "waiting_for_supplier": 1,
        "payment_not_confirmed": 1, "held": 1, "backing_off": 1, "inside_grace": 1, "past_age_window": 1,
        "stuck": 1, "email_pending": 1}
    assert meta["dagster/row_count"].value == len(expected) == 12
    # Stuck: due, email pending, in flight (2), backing off, waiting for the supplier, held, past the window.
    assert meta["stuck_now"].value == 8
    assert 40 * 1440 - 1 <= meta["oldest_stuck_minutes"].value <= 40 * 1440 + 1
    assert meta["needs_attention_now"].value == 1 and meta["quarantined_now"].value == 1
    assert meta["recovered_24h"].value == 1 and meta["kinguin_orders_placed_24h"].value == 1
    # Order to fulfilment in the last 24 h: 0 (email pending), 10 and 30 minutes.
    assert meta["payment_to_fulfilment_p50_minutes"].value == pytest.approx(10, abs=0.2)
    assert meta["payment_to_fulfilment_p95_minutes"].value == pytest.approx(28, abs=0.2)
    for name in ("stuck_now", "oldest_stuck_minutes", "needs_attention_now", "quarantined_now", "recovered_24h",
                 "payment_to_fulfilment_p50_minutes", "payment_to_fulfilment_p95_minutes",
                 "kinguin_orders_placed_24h"):
        assert isinstance(meta[name], dg.IntMetadataValue | dg.FloatMetadataValue), name  # plotted by the UI

    checks = verdicts(result)
    assert {name: (c.passed, c.severity) for name, c in checks.items()} == {
        "oldest_stuck_within_sla": (False, dg.AssetCheckSeverity.ERROR),
        "no_order_needs_a_person": (False, dg.AssetCheckSeverity.WARN),
        "no_order_quarantined": (False, dg.AssetCheckSeverity.WARN),
    }
    sla = checks["oldest_stuck_within_sla"]
    assert ids["past_age_window"] in sla.description and "SLA of 60 min" in sla.description
    assert sla.metadata["orders"].data[0] == ids["past_age_window"]
    assert sla.metadata["count"].value == 3  # past the window, waiting for the supplier (120 min), stuck (90)
    person = checks["no_order_needs_a_person"]
    assert f"{ids['needs_attention']} ({SUPPLIER_CANCELED})" in person.description
    assert person.metadata["orders"].data == [ids["needs_attention"]]
    assert checks["no_order_quarantined"].metadata["orders"].data == [ids["quarantined"]]


def test_checks_pass_on_a_store_with_nothing_stuck_past_the_sla(store_engine, materialize):
    product = insert_product(store_engine, SeedProduct("5c9b68662539a4e8f17ae2fe", "Game"))
    young = insert_order(store_engine, [product], age=dt.timedelta(minutes=20))
    insert_order(store_engine, [product], status="fulfilled", completion_email_sent=True)

    result = materialize()

    checks = verdicts(result)
    assert all(check.passed for check in checks.values()), {n: c.description for n, c in checks.items()}
    sla = checks["oldest_stuck_within_sla"].description
    assert sla == "no stuck order older than the SLA of 60 min (oldest: 20m)"
    meta = metadata(result)
    assert [cells[0].split("]")[0] for cells in board_rows(meta)] == [f"[{young[:8]}"]
    assert meta["stuck_now"].value == 1 and meta["needs_attention_now"].value == 0


def test_the_table_shows_the_oldest_rows_and_the_count_covers_all(store_engine, materialize):
    product = insert_product(store_engine, SeedProduct("5c9b68662539a4e8f17ae2fe", "Game"))
    made = [insert_order(store_engine, [product], age=dt.timedelta(minutes=20 + n)) for n in range(TABLE_ROWS + 5)]

    meta = metadata(materialize())

    assert meta["dagster/row_count"].value == TABLE_ROWS + 5
    assert [cells[0].split("]")[0] for cells in board_rows(meta)] == [
        f"[{oid[:8]}" for oid in list(reversed(made))[:TABLE_ROWS]]
    assert meta["shown"].value == f"the oldest {TABLE_ROWS} of {TABLE_ROWS + 5}"
