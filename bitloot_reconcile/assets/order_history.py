"""`order_attempts`: every attempt on an order, from a per-order run or a batch, as an event on the order's
own partition, so an order's history reads the same whatever shape of run made each attempt.

The asset is never materialised by a job of its own: the runs that work orders report one materialisation per
attempt (outcome, reason, trigger, actor, run id; never a secret). Partitions are the canonical order ids,
added only for orders a run touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

# Dagster 1.13 writes a batch of asset events in one statement, but offers it through no public API: the
# events must carry batch metadata (as its own partitioned outputs do) while DAGSTER_EVENT_BATCH_SIZE is set.
from dagster._core.events import (
    DagsterEvent,
    DagsterEventBatchMetadata,
    DagsterEventType,
    StepMaterializationData,
    generate_event_batch_id,
)

ORDER_IDS = dg.DynamicPartitionsDefinition(name="order_ids")
ORDER_ATTEMPTS_KEY = dg.AssetKey("order_attempts")

order_attempts = dg.AssetSpec(
    ORDER_ATTEMPTS_KEY,
    partitions_def=ORDER_IDS,
    group_name="orders",
    description="Every attempt on one order (partition = its order id): outcome, reason, trigger, actor and the "
    "run that made it, per-order run or batch.",
)


def attempt_event(order_id: str, *, outcome: str, reason: str | None, trigger: str, actor: str | None,
                  run_id: str, job: str) -> dg.AssetMaterialization:
    return dg.AssetMaterialization(
        asset_key=ORDER_ATTEMPTS_KEY,
        partition=order_id,
        description=f"{outcome}: {reason or 'no reason'}"[:500],
        metadata={
            "outcome": outcome,
            "reason": reason or "",
            "trigger": trigger,
            "actor": actor or "",
            "run": dg.MetadataValue.dagster_run(run_id),
            "job": job,
        },
    )


def add_order_partitions(instance: dg.DagsterInstance, order_ids: list[str]) -> None:
    """Before the first event on an order's partition; Dagster adds only the ids it does not have yet."""
    if order_ids:
        instance.add_dynamic_partitions(ORDER_IDS.name, list(dict.fromkeys(order_ids)))


def report_in_run(instance: dg.DagsterInstance, event: dg.AssetMaterialization, *, run_id: str, job_name: str,
                  step_key: str) -> None:
    """Record an attempt's event in its run's log from outside a step (the job's failure hook). The UI lists a
    partition's historical events by run: a runless event (`report_runless_asset_event`) is counted there but
    not shown, so the failed attempt would be missing from the order's history."""
    instance.report_dagster_event(
        DagsterEvent(event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value, job_name=job_name,
                     step_key=step_key, event_specific_data=StepMaterializationData(event)),
        run_id=run_id,
    )


EVENT_BATCH_SIZE_VAR = "DAGSTER_EVENT_BATCH_SIZE"


@contextmanager
def _event_batches_of(size: int) -> Iterator[None]:
    """Dagster reads the variable at every event; a deployment's own setting wins if it is large enough."""
    previous = os.environ.get(EVENT_BATCH_SIZE_VAR)
    if previous is not None and previous.isdigit() and int(previous) >= size:
        yield
        return
    os.environ[EVENT_BATCH_SIZE_VAR] = str(size)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(EVENT_BATCH_SIZE_VAR, None)
        else:
            os.environ[EVENT_BATCH_SIZE_VAR] = previous


def log_attempt_events(context: dg.OpExecutionContext, events: list[dg.AssetMaterialization]) -> None:
    """Log these events as `context.log_event` would, written to Dagster's storage as one batch: one INSERT
    and one index update for all of them, instead of two new database connections per event."""
    if not events:
        return
    step, batch = context.get_step_execution_context(), generate_event_batch_id()
    with _event_batches_of(len(events)):
        for number, event in enumerate(events, start=1):
            DagsterEvent.asset_materialization(step, event, DagsterEventBatchMetadata(batch, number == len(events)))


def order_partitions(instance: dg.DagsterInstance) -> list[str]:
    """Every order id that has a partition, in the order they were added."""
    return list(instance.get_dynamic_partitions(ORDER_IDS.name))


def remove_order_partitions(instance: dg.DagsterInstance, order_ids: list[str]) -> None:
    """Remove these orders' partitions. Their attempt events stay in Dagster's event log (each run's page still
    shows them) and the store's audit rows keep every attempt; a later attempt adds the partition back."""
    for order_id in order_ids:
        instance.delete_dynamic_partition(ORDER_IDS.name, order_id)
