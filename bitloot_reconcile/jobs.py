"""Job definitions."""

import dagster as dg

from bitloot_reconcile.ops.fulfill_backlog import work_backlog
from bitloot_reconcile.ops.fulfill_order import (
    STEP_OPS,
    FulfillOrderRequest,
    checked_request,
    load_and_claim,
    record_failed_run,
    record_outcome,
)
from bitloot_reconcile.ops.prune_order_history import remove_settled_partitions


@dg.config_mapping
def flat_request(request: FulfillOrderRequest) -> dg.RunConfig:
    """The launchpad asks for three fields: order_id, reason, requested_by. They are checked here, when the
    run is launched: a malformed id or an empty field is refused before a run exists."""
    return dg.RunConfig(ops={"load_and_claim": checked_request(request)})


@dg.job(
    config=flat_request,
    executor_def=dg.in_process_executor,
    hooks={record_failed_run},
    tags={"dagster/max_runtime": "1800"},
    description="Recover one stuck BitLoot order: verify payment, buy or adopt the Kinguin order, store the keys, "
    "mark it fulfilled and send the completion email once.",
)
def fulfill_order() -> None:
    """The claim, one op per row of the step table (`domain.steps`), and the one outcome."""
    progress, stopped = load_and_claim()
    ends = [stopped]
    for step in STEP_OPS:
        progress, stopped = step(progress)
        ends.append(stopped)
    record_outcome([*ends, progress])


@dg.job(
    executor_def=dg.in_process_executor,
    tags={"dagster/max_runtime": "3600"},
    description="Recover a backlog of stuck BitLoot orders in one run (launched by the sweep above its threshold): "
    "each order worked exactly as fulfill_order does, several at a time; one order's failure is its own.",
)
def fulfill_backlog() -> None:
    work_backlog()


@dg.job(
    executor_def=dg.in_process_executor,
    tags={"dagster/max_runtime": "3600"},
    description="Remove the order_attempts partitions of orders settled long ago (the store's audit rows keep "
    "every attempt), so the order history stays bounded by the orders of the last weeks.",
)
def prune_order_history() -> None:
    remove_settled_partitions()


# Daily, at a quiet hour.
prune_order_history_schedule = dg.ScheduleDefinition(
    job=prune_order_history, cron_schedule="40 3 * * *", execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
