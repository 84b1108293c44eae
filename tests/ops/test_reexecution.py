"""Dagster's re-executions of a `fulfill_order` run (from failure, from a selected step, all steps), executed
for real: each is a person's act that claims the order under its own run id before any step acts."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest

from bitloot_reconcile.jobs import fulfill_order
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_standins.httpserver import Fault
from tests.fixtures.runs import assert_fully_delivered
from tests.fixtures.world import World

# `execute_job` (which re-executes) builds the job from a module-level function, in this process, with the test's
# resources.
_RESOURCES: dict = {}


def fulfill_order_with_test_resources() -> dg.JobDefinition:
    return dg.Definitions(jobs=[fulfill_order], resources=_RESOURCES).get_job_def("fulfill_order")


@pytest.fixture
def execute(world: World) -> Iterator:
    def execute(order_id: str, *, reexecution: dg.ReexecutionOptions | None = None, config: dict | None = None,
                **resource_overrides) -> dg.DagsterRun:
        _RESOURCES.clear()
        _RESOURCES.update(world.resources(**resource_overrides))
        job = dg.reconstructable(fulfill_order_with_test_resources)
        type(job).get_definition.cache_clear()  # Dagster keeps the last job built; this one has other resources
        type(job).get_repository_definition.cache_clear()
        with dg.execute_job(
            job, instance=world.instance,
            run_config=config or {"order_id": order_id, "reason": "ticket 12", "requested_by": "ops@bitloot.io"},
            reexecution_options=reexecution, raise_on_error=False,
        ) as result:
            return world.instance.get_run_by_id(result.run_id)

    yield execute
    _RESOURCES.clear()


def failed_at(world: World, run: dg.DagsterRun) -> str:
    assert run.status == dg.DagsterRunStatus.FAILURE
    (failure,) = [e for e in world.instance.all_logs(run.run_id) if e.dagster_event and e.dagster_event.is_step_failure]
    return failure.step_key


def dead_r2(world: World) -> R2Resource:
    return R2Resource(endpoint="http://127.0.0.1:9", access_key_id="x", secret_access_key="y", bucket=world.r2.bucket)


def assert_recorded_as_reexecution(world: World, order_id: str, run: dg.DagsterRun, parent: dg.DagsterRun) -> None:
    assert run.status == dg.DagsterRunStatus.SUCCESS
    tags = run.tags
    assert tags["bitloot/trigger"] == "reexecution" and tags["bitloot/parent_run_id"] == parent.run_id
    assert tags["bitloot/outcome"] == "fulfilled"
    # The chain began with an admin's run: its reason and requester carry over.
    assert tags["bitloot/reason"] == "ticket 12" and tags["bitloot/requested_by"] == "ops@bitloot.io"
    assert tags["bitloot/alert"] == "none"
    rows = [r for r in world.store.audit_trail(order_id) if r["run_id"] == run.run_id]
    assert [r["action"] for r in rows] == ["requested", "fulfill_order"]
    assert all(r["trigger"] == "reexecution" and r["actor"] == "ops@bitloot.io" for r in rows)
    assert f"re-execution of run {parent.run_id}" in rows[0]["detail"]
    state = world.store.get_state(order_id)
    assert state.last_run_id == run.run_id and state.lease_owner is None and state.attempts == 2
    assert len(world.kinguin.orders_for_external_id(order_id)) == 1
    assert_fully_delivered(world, order_id)
    assert [e["idempotency_key"] for e in world.resend.sent] == [f"order-completed/{order_id}"]


def test_from_failure_after_kinguin_was_down_at_placement(world: World, execute):
    order_id = world.order([world.product()])
    world.kinguin.inject("place_order_v2", Fault(status=503, times=4))
    parent = execute(order_id)
    assert failed_at(world, parent) == "ensure_supplier_order"
    assert world.store.get_state(order_id).last_outcome == "retry_later"

    run = execute(order_id, reexecution=dg.ReexecutionOptions.from_failure(parent.run_id, world.instance))

    assert_recorded_as_reexecution(world, order_id, run, parent)


@pytest.mark.parametrize("strategy", ["from_failure", "from_selected", "all_steps"])
def test_after_an_r2_outage_at_store_keys(world: World, execute, strategy: str):
    order_id = world.order([world.product(), world.product()])
    parent = execute(order_id, r2=dead_r2(world))
    assert failed_at(world, parent) == "store_keys"

    options = {
        "from_failure": dg.ReexecutionOptions.from_failure(parent.run_id, world.instance),
        "from_selected": dg.ReexecutionOptions(parent_run_id=parent.run_id, step_selection=["store_keys*"]),
        "all_steps": dg.ReexecutionOptions(parent_run_id=parent.run_id),
    }[strategy]
    run = execute(order_id, reexecution=options)

    assert_recorded_as_reexecution(world, order_id, run, parent)


def test_a_reexecution_never_acts_under_a_lease_another_run_holds(world: World, execute):
    order_id = world.order([world.product()])
    parent = execute(order_id, r2=dead_r2(world))
    world.store.claim(order_id, "another-run", world.resources()["policy"].lease_ttl)

    run = execute(order_id, reexecution=dg.ReexecutionOptions.from_failure(parent.run_id, world.instance))

    assert run.tags["bitloot/outcome"] == "busy" and run.tags["bitloot/trigger"] == "reexecution"
    assert world.store.get_state(order_id).lease_owner == "another-run"
    assert world.store.load_order(order_id).status == "paid"
    assert world.resend.sent == []


def test_a_reexecuted_sweep_run_of_a_quarantined_order_is_refused(world: World, execute):
    order_id = world.order([world.product()])
    sweep = {"order_id": order_id, "reason": "stuck in paid for 20 min", "requested_by": "stuck_orders_sensor"}
    parent = execute(order_id, config=sweep, r2=dead_r2(world))
    world.instance.add_run_tags(parent.run_id, {"bitloot/trigger": "sensor"})  # as the sweep's run is tagged
    world.store.update_state(order_id, last_outcome="needs_attention", last_reason="attempts used up")

    run = execute(order_id, reexecution=dg.ReexecutionOptions.from_failure(parent.run_id, world.instance),
                  config=sweep)

    assert run.status == dg.DagsterRunStatus.FAILURE
    assert run.tags["bitloot/outcome"] == "refused" and run.tags["bitloot/trigger"] == "reexecution"
    assert run.tags["bitloot/requested_by"] != "stuck_orders_sensor"
    assert world.store.load_order(order_id).status == "paid"
