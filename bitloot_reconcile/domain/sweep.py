"""What the stuck-orders sweep asks for: one run request per stuck order, keyed by attempt and time bucket."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Collection
from dataclasses import dataclass

from bitloot_reconcile.store.repository import ReconcileState, StuckOrder
from bitloot_reconcile.store.statuses import OrderStatus
from bitloot_reconcile.tags import TRIGGER_SENSOR, request_tags

SENSOR_ACTOR = "stuck_orders_sensor"


@dataclass(frozen=True)
class SweepRequest:
    order_id: str
    run_key: str
    reason: str
    tags: dict[str, str]

    @property
    def run_config(self) -> dict[str, str]:
        return {"order_id": self.order_id, "reason": self.reason, "requested_by": SENSOR_ACTOR}


def describe(order: StuckOrder, now: dt.datetime) -> str:
    if order.status == OrderStatus.FULFILLED:
        return "fulfilled but the completion email was never sent"
    minutes = int((now.replace(tzinfo=None) - order.updated_at).total_seconds() // 60)
    return f"stuck in {order.status} for {minutes} min"


def plan_sweep(
    stuck: list[StuckOrder], *, in_flight: set[str], now: dt.datetime, lease_ttl: dt.timedelta
) -> list[SweepRequest]:
    """Dagster never reuses a run key, even after a failed run. The attempt number changes after every run
    that claimed the order, the last run id after every run that recorded an outcome (a run held by a BitLoot
    switch gives its attempt back); a run that died before it could claim is found gone a lease period after
    it started (`run_worker_gone`), so a time bucket one lease long has moved on by then and frees the key."""
    bucket = int(now.timestamp() // lease_ttl.total_seconds())
    requests = []
    for order in stuck:
        if order.id in in_flight:
            continue
        attempt = order.attempts + 1
        reason = describe(order, now)
        tags = request_tags(order.id, trigger=TRIGGER_SENSOR, reason=reason, requested_by=SENSOR_ACTOR,
                            attempt=attempt)
        run_key = f"{order.id}:{attempt}:{bucket}" + (f":{order.last_run_id}" if order.last_run_id else "")
        requests.append(SweepRequest(order.id, run_key, reason, tags))
    return requests


def run_worker_gone(
    run_id: str, started_at: dt.datetime, state: ReconcileState, *, lease_ttl: dt.timedelta, now: dt.datetime
) -> bool:
    """Whether a run Dagster still shows as started has stopped working on its order. A live run renews its
    lease at every step, so its lease lapsing means its worker died (a SIGKILL, a lost host); a run that never
    held the lease for a whole lease period never got as far as claiming. The default run launcher cannot
    see a dead worker, and until the run ends the per-order run limit holds every new run for the order."""
    if state.lease_owner == run_id:
        return state.lease_expires_at is not None and state.lease_expires_at < now
    return started_at + lease_ttl < now


@dataclass(frozen=True)
class BacklogBatch:
    """One batch run of many due orders (the backlog path), instead of one run each."""

    requests: list[SweepRequest]

    @property
    def run_key(self) -> str:
        """Changes whenever any of its orders' own run keys would (attempt, time bucket, last run)."""
        digest = hashlib.sha256("|".join(r.run_key for r in self.requests).encode()).hexdigest()[:24]
        return f"backlog:{len(self.requests)}:{digest}"

    @property
    def orders(self) -> list[dict[str, str]]:
        return [{"order_id": r.order_id, "reason": r.reason} for r in self.requests]

    @property
    def tags(self) -> dict[str, str]:
        return request_tags(None, trigger=TRIGGER_SENSOR, reason=f"backlog of {len(self.requests)} stuck orders",
                            requested_by=SENSOR_ACTOR, batch_size=len(self.requests))


# A run worker costs about as much CPU to start as 50 orders take to work: a backlog is split into parts of
# at least this many orders.
MIN_ORDERS_PER_BATCH = 100


def split_backlog(
    requests: list[SweepRequest], *, threshold: int, max_orders: int, max_runs: int, batch_slots: int
) -> tuple[list[SweepRequest], list[BacklogBatch]]:
    """At most `max_runs` per-order runs up to `threshold` due orders. Above it, the oldest orders as up to
    `batch_slots` batches of at most `max_orders` each, split evenly (one run worker is one process: several
    use more than one core), parts of at least `MIN_ORDERS_PER_BATCH`; none while no slot is free."""
    if len(requests) <= threshold:
        return requests[:max_runs], []
    if batch_slots <= 0:
        return [], []
    taken = requests[: max_orders * batch_slots]
    count = min(batch_slots, max(-(-len(taken) // max_orders), len(taken) // MIN_ORDERS_PER_BATCH, 1))
    size, extra = divmod(len(taken), count)
    batches, start = [], 0
    for number in range(count):
        end = start + size + (1 if number < extra else 0)
        batches.append(BacklogBatch(taken[start:end]))
        start = end
    return [], batches


def batch_worker_gone(
    run_id: str, started_at: dt.datetime, order_ids: Collection[str], states: dict[str, ReconcileState],
    attempted: set[str], *, lease_ttl: dt.timedelta, now: dt.datetime,
) -> bool:
    """Whether a batch run Dagster still shows as started has stopped working. A live batch holds (and renews)
    the lease of every order it is working and hands it back with the order's outcome; it is gone when, a lease
    period after it started, it holds no live lease while some of its orders were never attempted (no audit row
    of its own) or it still owns a lapsed lease (it died mid-order, even on its last orders): its worker died, and
    the orders it held are free again once their leases lapsed."""
    if started_at + lease_ttl >= now:
        return False
    owned = [state for order_id in order_ids
             if (state := states.get(order_id)) is not None and state.lease_owner == run_id]
    if any(state.lease_expires_at is not None and state.lease_expires_at >= now for state in owned):
        return False
    return bool(owned) or any(order_id not in attempted for order_id in order_ids)
