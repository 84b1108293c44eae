"""Which orders' partitions of `order_attempts` to remove: those of orders settled long ago.

Dagster keeps one dynamic partition per order a run ever worked; the partition list, the asset's partitions page
and every partition added cost more as it grows (benchmarks/README.md). An order that is settled (fulfilled and
emailed, refunded, cancelled or resolved by an admin) and unchanged for `keep` needs no partition: the store's
audit rows keep every attempt on it, and a later attempt adds its partition back.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.fulfilment import parse_order_id
from bitloot_reconcile.store.repository import Store

# Order ids per store query (one primary-key probe each).
CHUNK = 1000


def _canonical(keys: list[str]) -> Iterator[str]:
    """The partition keys that are canonical order ids; anything else was not added by the project: left alone."""
    for key in keys:
        try:
            if parse_order_id(key) == key:
                yield key
        except InvalidRequest:
            continue


def partitions_to_remove(store: Store, partition_keys: list[str], *, now: dt.datetime, keep: dt.timedelta,
                         limit: int) -> list[str]:
    """At most `limit` partition keys whose orders settled before `now - keep`, oldest partitions first."""
    candidates, chosen = list(_canonical(partition_keys)), []
    for start in range(0, len(candidates), CHUNK):
        chunk = candidates[start:start + CHUNK]
        settled = store.settled_before(chunk, now - keep)
        chosen.extend(key for key in chunk if key in settled)
        if len(chosen) >= limit:
            return chosen[:limit]
    return chosen
