"""`order_attempts`: every attempt on an order, from a per-order run or a batch, as an event on the order's
own partition, so an order's history reads the same whatever shape of run made each attempt.

The asset is never materialised by a job of its own: the runs that work orders report one materialisation per
attempt (outcome, reason, trigger, actor, run id; never a secret). Partitions are the canonical order ids,
added only for orders a run touched.
"""

from __future__ import annotations

import dagster as dg

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


def hold_event_connections(instance: dg.DagsterInstance) -> None:
    """A batch writes one event per order. Dagster's PostgreSQL storages open a new connection for every write
    unless the instance is told to keep one open, as the webserver does; a run worker is one process per run,
    so the connection lives as long as the batch."""
    instance.optimize_for_webserver(statement_timeout=60_000, pool_recycle=3600, max_overflow=2)


def order_partitions(instance: dg.DagsterInstance) -> list[str]:
    """Every order id that has a partition, in the order they were added."""
    return list(instance.get_dynamic_partitions(ORDER_IDS.name))


def remove_order_partitions(instance: dg.DagsterInstance, order_ids: list[str]) -> None:
    """Remove these orders' partitions. Their attempt events stay in Dagster's event log (each run's page still
    shows them) and the store's audit rows keep every attempt; a later attempt adds the partition back."""
    for order_id in order_ids:
        instance.delete_dynamic_partition(ORDER_IDS.name, order_id)
