"""`bitloot-reconcile board`, and `plan` without ids listing what the sweep skips, on a PostgreSQL store seeded
with every state of the board."""

from __future__ import annotations

import csv
import re

import dagster as dg

from bitloot_reconcile.domain.board import LABELS, BoardState
from bitloot_reconcile.jobs import fulfill_order
from bitloot_standins.seed import SeedProduct, insert_order, insert_product
from tests.fixtures.board import SUPPLIER_CANCELED, on_board, seed_every_state
from tests.fixtures.world import World
from tests.test_cli_operator import invoke

BLOCKED = ("in_flight", "needs_attention", "quarantined", "waiting_for_supplier", "payment_not_confirmed", "held",
           "backing_off", "inside_grace", "past_age_window")


def test_board_prints_every_order_not_done_readable_at_80_columns(world: World, tmp_path):
    ids = seed_every_state(world.engine)

    result = invoke(world, "board", "--csv", str(tmp_path / "board.csv"), COLUMNS="80")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    board = [line for line in lines if not line.startswith("all 11 rows written to ")]  # the path is the path
    assert max(map(len, board)) <= 80, "\n".join(line for line in board if len(line) > 80)
    for state, order_id in on_board(ids).items():
        (line,) = [n for n, text in enumerate(lines) if order_id in text and text.startswith("│")]  # whole id
        assert LABELS[BoardState(state)] in lines[line + 1], state  # and its state under it
    for done in ("done_fulfilled", "done_refunded", "done_expired", "done_recovered"):
        assert ids[done] not in result.output
    assert lines[0].startswith("11 order(s) not done: 1 in flight, 1 needing a person, 1 quarantined")
    assert "stuck now 7" in result.output and "needs attention now 1" in result.output
    assert "recovered 24h 1" in result.output and "kinguin orders placed 24h 1" in result.output
    assert re.search(r"FAIL oldest_stuck_within_sla: 3 stuck order\(s\) older than the SLA of 60 min", result.output)
    assert "WARN no_order_needs_a_person: 1 order(s) needing a person" in result.output
    assert "WARN no_order_quarantined" in result.output
    with open(tmp_path / "board.csv") as written:
        rows = {row["order_id"]: row for row in csv.DictReader(written)}
    assert {oid: row["state"] for oid, row in rows.items()} == {oid: s for s, oid in on_board(ids).items()}
    assert rows[ids["needs_attention"]]["reason"] == SUPPLIER_CANCELED


def test_board_sees_runs_queued_in_the_dagster_instance_and_the_sla_setting(world: World, tmp_path, monkeypatch):
    product = insert_product(world.engine, SeedProduct("5c9b68662539a4e8f17ae2fe", "Game"))
    queued = insert_order(world.engine, [product])
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        instance.create_run_for_job(fulfill_order, run_config={"order_id": queued, "reason": "x", "requested_by": "y"},
                                    tags={"bitloot/order_id": queued})

    result = invoke(world, "board", DAGSTER_HOME=str(tmp_path), RECONCILE_BOARD_SLA_MINUTES="20")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "1 order(s) not done: 1 in flight"
    assert "a run is queued or starting" in result.output
    assert "FAIL oldest_stuck_within_sla: 1 stuck order(s) older than the SLA of 20 min" in result.output


def test_board_on_a_store_with_nothing_not_done(world: World):
    result = invoke(world, "board")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "0 order(s) not done"
    assert "ok oldest_stuck_within_sla: no stuck order older than the SLA of 60 min" in result.output


def test_plan_without_ids_lists_the_orders_the_sweep_skips_and_why(world: World):
    ids = seed_every_state(world.engine)

    result = invoke(world, "plan")

    assert result.exit_code == 0, result.output
    planned, _, skipped = result.output.partition("not run now: 9 order(s) the sweep skips")
    assert skipped, result.output
    assert ids["stuck"] in planned and ids["email_pending"] in planned
    for state in BLOCKED:
        assert ids[state] in skipped and ids[state] not in planned, state
    for words in ("in flight", "needing a person", "quarantined", "waiting for the supplier", "payment not "
                  "confirmed", "held by a BitLoot switch", "backing off", "inside the grace period",
                  "past the age window", SUPPLIER_CANCELED, "next attempt"):
        assert words in skipped, words
