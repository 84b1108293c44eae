"""`order_attempts`: every attempt on an order, from a per-order run or a batch, as an event on the order's
own partition, so an order's history reads the same whatever shape of run made each attempt.

The asset is never materialised by a job of its own: the runs that work orders report one materialisation per
attempt (outcome, reason, trigger, actor, run id; never a secret). Partitions are the canonical order ids,
added only for orders a run touched. It lives outside `assets/` because the ops that report it are imported
by the sensors that the assets package imports.
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
