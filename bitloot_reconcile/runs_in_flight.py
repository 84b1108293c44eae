"""Which orders Dagster has a run queued or running for: reads of the instance's run records only.

The sweep, the stuck-orders board (asset, command line, metrics) all read them here.
"""

import dagster as dg

from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order
from bitloot_reconcile.tags import TAG_ORDER_ID

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def order_run_records(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    """The queued or running `fulfill_order` runs that name their order (one order each)."""
    records = instance.get_run_records(filters=dg.RunsFilter(job_name=fulfill_order.name, statuses=IN_FLIGHT))
    return [r for r in records if TAG_ORDER_ID in r.dagster_run.tags]


def batch_run_records(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    """The queued or running `fulfill_backlog` runs."""
    return list(instance.get_run_records(filters=dg.RunsFilter(job_name=fulfill_backlog.name, statuses=IN_FLIGHT)))


def batch_order_ids(run: dg.DagsterRun) -> list[str]:
    """The orders a `fulfill_backlog` run was given (its run config: ids and reasons, nothing secret)."""
    config = ((run.run_config or {}).get("ops", {}).get("work_backlog", {}).get("config", {}))
    return [due["order_id"] for due in config.get("orders", [])]


def in_flight_run_records(instance: dg.DagsterInstance) -> tuple[list[dg.RunRecord], list[dg.RunRecord]]:
    """The queued or running `fulfill_order` runs (one order each) and `fulfill_backlog` runs."""
    return order_run_records(instance), batch_run_records(instance)


def runs_in_flight(instance: dg.DagsterInstance,
                   records: tuple[list[dg.RunRecord], list[dg.RunRecord]] | None = None) -> dict[str, str]:
    """Order id -> its queued or running `fulfill_order` run, or the batch it is in, as Dagster shows them
    (reads only: the board). `records`: `in_flight_run_records` already read."""
    singles, batches = records or in_flight_run_records(instance)
    in_flight = {order_id: r.dagster_run.run_id for r in batches for order_id in batch_order_ids(r.dagster_run)}
    in_flight.update({r.dagster_run.tags[TAG_ORDER_ID]: r.dagster_run.run_id for r in singles})
    return in_flight
