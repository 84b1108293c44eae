"""Dagster's re-executions on the production shape (a real daemon, webserver and code server on a PostgreSQL
instance), launched through GraphQL `launchPipelineReexecution` as the UI's "Re-execute" menu does: from failure
after Kinguin was down at placement, from failure after an R2 outage at `store_keys`, and from a selected step
(`store_keys*`). Each re-execution fulfils the order once and is recorded as a re-execution of its parent."""

from __future__ import annotations

import datetime as dt
import time

import dagster as dg
import httpx
import pytest
from dagster_graphql import DagsterGraphQLClient

from bitloot_reconcile.assets.order_history import ORDER_ATTEMPTS_KEY
from bitloot_reconcile.commands import history
from bitloot_standins.httpserver import Fault
from bitloot_standins.postgres import temporary_database
from bitloot_standins.s3_proxy import FaultyS3Proxy
from tests.e2e.test_daemon import (
    BIN,
    REEXECUTE,
    REPO,
    Processes,
    free_port,
    location_loaded,
    production_env,
    start_code_server_and_daemon,
    wait_for,
)
from tests.fixtures.db import PG_SERVER_URL
from tests.fixtures.runs import assert_fully_delivered
from tests.fixtures.world import migrated_world

pytestmark = pytest.mark.e2e

BUDGET_SECONDS = 300
YOUNG = dt.timedelta(minutes=1)  # not stuck: only the admin's runs and their re-executions work these orders
# What the run page's "Re-execute > From selected" sends for the selection `store_keys*`: the parent's config and
# tags, the selected step and every step after it.
REEXECUTE_STEPS = """mutation($executionParams: ExecutionParams!) {
  launchPipelineReexecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""
FROM_STORE_KEYS = ["store_keys", "mark_fulfilled", "send_completion_email", "record_outcome"]


@pytest.mark.timeout(BUDGET_SECONDS + 60)
def test_reexecutions_through_graphql_fulfil_the_order_once_as_a_persons_act(
    tmp_path, kinguin_sim, nowpayments_sim, resend_sim, seaweed, monkeypatch
):
    deadline = time.monotonic() + BUDGET_SECONDS
    proxy = FaultyS3Proxy(seaweed.endpoint_url).start()
    with (
        temporary_database(PG_SERVER_URL, "brrx_store") as store_db,
        temporary_database(PG_SERVER_URL, "brrx_dagster") as dagster_db,
    ):
        store_url = f"{PG_SERVER_URL}/{store_db}"
        world = migrated_world(store_url, kinguin_sim, nowpayments_sim, resend_sim, seaweed)
        game = world.product()
        kinguin_down = world.order([game], age=YOUNG)
        kinguin_sim.inject("place_order_v2", Fault(status=503, times=4,
                                                   match=lambda body: body["orderExternalId"] == kinguin_down))
        r2_down = world.order([game, game], age=YOUNG)
        r2_down_selected = world.order([game, game], age=YOUNG)
        outages = [proxy.fail(f"orders/{order_id}/", times=1000) for order_id in (r2_down, r2_down_selected)]

        port, code_port = free_port(), free_port()
        home, env = production_env(tmp_path, dagster_db, world, code_port, monkeypatch, R2_ENDPOINT=proxy.url,
                                   RECONCILE_MAX_RETRY_WAIT_SECONDS="2")
        procs = Processes(tmp_path)
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:  # creates Dagster's tables first
                start_code_server_and_daemon(procs, env, code_port)
                procs.start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                          "-w", str(REPO / "workspace.yaml")], env)
                wait_for("the webserver to load the code location", lambda: location_loaded(port), deadline, procs)
                client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=30)

                def finished(run_id: str) -> bool:
                    return instance.get_run_by_id(run_id).is_finished

                parents = {
                    order_id: client.submit_job_execution(
                        "fulfill_order", repository_location_name="bitloot_reconcile",
                        run_config={"order_id": order_id, "reason": "ticket 31", "requested_by": "ops@bitloot.io"},
                        tags={"bitloot/order_id": order_id})
                    for order_id in (kinguin_down, r2_down, r2_down_selected)
                }
                wait_for("the admin runs to fail", lambda: all(finished(r) for r in parents.values()), deadline, procs)
                for order_id, step in [(kinguin_down, "ensure_supplier_order"), (r2_down, "store_keys"),
                                       (r2_down_selected, "store_keys")]:
                    parent = instance.get_run_by_id(parents[order_id])
                    assert parent.status == dg.DagsterRunStatus.FAILURE
                    assert failed_steps(instance, parent.run_id) == [step]
                    assert parent.tags["bitloot/outcome"] == "retry_later"
                    assert world.store.get_state(order_id).lease_owner is None
                for outage in outages:
                    outage.times = 0  # R2 is back

                def graphql(query: str, variables: dict) -> str:
                    answer = httpx.post(f"http://127.0.0.1:{port}/graphql", timeout=30,
                                        json={"query": query, "variables": variables}).json()
                    launched = answer["data"]["launchPipelineReexecution"]
                    assert launched["__typename"] == "LaunchRunSuccess", launched
                    return launched["run"]["runId"]

                selected_parent = instance.get_run_by_id(parents[r2_down_selected])
                from_failure = {"strategy": "FROM_FAILURE"}
                reexecutions = {
                    kinguin_down: graphql(REEXECUTE, {"parentRunId": parents[kinguin_down], **from_failure}),
                    r2_down: graphql(REEXECUTE, {"parentRunId": parents[r2_down], **from_failure}),
                    r2_down_selected: graphql(REEXECUTE_STEPS, {"executionParams": {
                        "selector": {"repositoryLocationName": "bitloot_reconcile",
                                     "repositoryName": "__repository__", "pipelineName": "fulfill_order"},
                        "runConfigData": selected_parent.run_config,
                        "stepKeys": FROM_STORE_KEYS,
                        "executionMetadata": {
                            "parentRunId": selected_parent.run_id, "rootRunId": selected_parent.run_id,
                            "tags": [{"key": k, "value": v} for k, v in selected_parent.tags.items()
                                     if not k.startswith("dagster/")]
                            + [{"key": "dagster/step_selection", "value": "store_keys*"}],
                        },
                    }}),
                }
                wait_for("the re-executions", lambda: all(finished(r) for r in reexecutions.values()), deadline,
                         procs)

                for order_id, run_id in reexecutions.items():
                    run, parent_id = instance.get_run_by_id(run_id), parents[order_id]
                    assert run.status == dg.DagsterRunStatus.SUCCESS, failed_steps(instance, run_id)
                    assert {k: run.tags.get(k) for k in ("bitloot/trigger", "bitloot/parent_run_id",
                                                         "bitloot/reason", "bitloot/requested_by",
                                                         "bitloot/outcome", "bitloot/order_id")} == {
                        "bitloot/trigger": "reexecution", "bitloot/parent_run_id": parent_id,
                        "bitloot/reason": "ticket 31", "bitloot/requested_by": "ops@bitloot.io",
                        "bitloot/outcome": "fulfilled", "bitloot/order_id": order_id}
                    assert run.tags.get("bitloot/alert") in (None, "none")
                    # One Kinguin order, one keys row and stored key per item, one email.
                    assert len(kinguin_sim.orders_for_external_id(order_id)) == 1
                    assert_fully_delivered(world, order_id)
                    assert [m["idempotency_key"] for m in resend_sim.sent
                            if m["idempotency_key"].endswith(order_id)] == [f"order-completed/{order_id}"]
                    # The audit, the history and the order's partition: the failed parent, then the re-execution.
                    rows = [r for r in world.store.audit_trail(order_id) if r["run_id"] == run_id]
                    assert [r["action"] for r in rows] == ["requested", "fulfill_order"]
                    assert all(r["trigger"] == "reexecution" and r["actor"] == "ops@bitloot.io" for r in rows)
                    attempts = history(world.store, order_id).attempts
                    assert [(a.run_id, a.trigger, a.outcome) for a in attempts] == [
                        (parent_id, "admin", "retry_later"), (run_id, "reexecution", "fulfilled")]
                    events = instance.fetch_materializations(
                        dg.AssetRecordsFilter(asset_key=ORDER_ATTEMPTS_KEY, asset_partitions=[order_id]), limit=10
                    ).records
                    recorded = sorted((e.asset_materialization.metadata["run"].value,
                                       e.asset_materialization.metadata["trigger"].value,
                                       e.asset_materialization.metadata["outcome"].value) for e in events)
                    assert recorded == sorted([(parent_id, "admin", "retry_later"),
                                               (run_id, "reexecution", "fulfilled")])
                # From failure ran only the failed step and those after it; From selected, the selection.
                assert executed_steps(instance, reexecutions[r2_down_selected]) == FROM_STORE_KEYS
                assert executed_steps(instance, reexecutions[kinguin_down])[0] == "ensure_supplier_order"
        finally:
            procs.stop()
            proxy.stop()
            world.engine.dispose()


def failed_steps(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)]


def executed_steps(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.step_key for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)]
