"""The `prune_order_history` job's one op: a thin shell over `domain.history`."""

import datetime as dt

import dagster as dg
from pydantic import Field

from bitloot_reconcile.assets.order_history import order_partitions, remove_order_partitions
from bitloot_reconcile.domain.history import partitions_to_remove
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.repository import utcnow


class PruneRequest(dg.Config):
    keep_days: int = Field(default=30, ge=1, description="Keep the partitions of orders settled fewer days ago")
    max_partitions: int = Field(default=100_000, ge=1, description="Remove at most this many partitions per run")


@dg.op
def remove_settled_partitions(context: dg.OpExecutionContext, config: PruneRequest,
                              store: StoreResource) -> dg.Output[int]:
    """Remove the `order_attempts` partitions of orders settled more than `keep_days` ago."""
    keys = order_partitions(context.instance)
    removed = partitions_to_remove(store.get_store(), keys, now=utcnow(), keep=dt.timedelta(days=config.keep_days),
                                   limit=config.max_partitions)
    remove_order_partitions(context.instance, removed)
    context.log.info(f"removed {len(removed)} of {len(keys)} order_attempts partition(s): orders settled more "
                     f"than {config.keep_days} days ago (the store's audit rows keep their attempts)")
    return dg.Output(len(removed), metadata={"partitions before": len(keys), "removed": len(removed)})
