"""The backlog path in the production shape: a real `dagster-daemon` and one `dagster api grpc` code server on a
PostgreSQL instance configured by the repo's dagster.yaml and workspace.yaml. A backlog above the threshold is
drained by one `fulfill_backlog` run; an order that falls due afterwards, alone, gets its own `fulfill_order`
run; every attempt shows on the order's `order_attempts` partition."""

from __future__ import annotations

import time

import dagster as dg
import pytest

from bitloot_reconcile.assets.order_history import ORDER_ATTEMPTS_KEY, ORDER_IDS
from bitloot_standins.postgres import temporary_database
from tests.e2e.test_daemon import (
    STUCK,
    Processes,
    done_in,
    free_port,
    production_env,
    start_code_server_and_daemon,
    wait_for,
)
from tests.fixtures.db import PG_SERVER_URL
from tests.fixtures.world import migrated_world

pytestmark = pytest.mark.e2e

BUDGET_SECONDS = 240


@pytest.mark.timeout(BUDGET_SECONDS + 60)
def test_daemon_drains_a_backlog_in_one_batch_then_a_lone_order_in_its_own_run(
    tmp_path, kinguin_sim, nowpayments_sim, resend_sim, seaweed, monkeypatch
):
    deadline = time.monotonic() + BUDGET_SECONDS
    with (
        temporary_database(PG_SERVER_URL, "brbl_store") as store_db,
        temporary_database(PG_SERVER_URL, "brbl_dagster") as dagster_db,
    ):
        store_url = f"{PG_SERVER_URL}/{store_db}"
        world = migrated_world(store_url, kinguin_sim, nowpayments_sim, resend_sim, seaweed)
        engine = world.engine
        game = world.product()
        backlog = [world.order([game], age=STUCK) for _ in range(4)]
        refused_by_kinguin = world.order([world.product(price=9.0, cost=5.0)], age=STUCK)

        code_port = free_port()
        home, env = production_env(tmp_path, dagster_db, world, code_port, monkeypatch,
                                   RECONCILE_SWEEP_INTERVAL_SECONDS="5",
                                   RECONCILE_BATCH_THRESHOLD="3")  # 5 due: one batch; then 1 due: its own run
        procs = Processes(tmp_path)
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:  # creates Dagster's tables first
                start_code_server_and_daemon(procs, env, code_port)

                wait_for("the backlog to be fulfilled", lambda: all(done_in(world.store, o) for o in backlog),
                         deadline, procs)
                wait_for("the refused order to be quarantined",
                         lambda: world.store.get_state(refused_by_kinguin).last_outcome == "needs_attention",
                         deadline, procs)
                (batch,) = instance.get_runs(filters=dg.RunsFilter(job_name="fulfill_backlog"))
                assert instance.get_runs(filters=dg.RunsFilter(job_name="fulfill_order")) == []
                for order_id in [*backlog, refused_by_kinguin]:
                    audited = {r["run_id"] for r in world.store.audit_trail(order_id)}
                    assert audited == {batch.run_id}
                    assert len(world.kinguin.orders_for_external_id(order_id)) == (
                        0 if order_id == refused_by_kinguin else 1)

                lone = world.order([game], age=STUCK)
                wait_for("the lone order to be fulfilled", lambda: done_in(world.store, lone), deadline, procs)
                (own,) = instance.get_runs(filters=dg.RunsFilter(job_name="fulfill_order"))
                assert own.tags["bitloot/order_id"] == lone and own.tags["bitloot/trigger"] == "sensor"
                assert len(instance.get_runs(filters=dg.RunsFilter(job_name="fulfill_backlog"))) == 1

                wait_for("the runs to end", lambda: all(r.is_finished for r in instance.get_runs()), deadline, procs)
                assert {r.status for r in instance.get_runs()} == {dg.DagsterRunStatus.SUCCESS}
                assert set(instance.get_dynamic_partitions(ORDER_IDS.name)) == {*backlog, refused_by_kinguin, lone}
                for order_id, run in [(backlog[0], batch), (lone, own)]:
                    (event,) = instance.fetch_materializations(
                        dg.AssetRecordsFilter(asset_key=ORDER_ATTEMPTS_KEY, asset_partitions=[order_id]), limit=5
                    ).records
                    assert event.asset_materialization.metadata["run"].value == run.run_id
                    assert event.asset_materialization.metadata["outcome"].value == "fulfilled"
                assert len(world.resend.sent) == len(backlog) + 1
        finally:
            procs.stop()
            engine.dispose()
