"""What the stuck-orders sweep asks for: one run request per stuck order, keyed by attempt and time bucket."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from bitloot_reconcile.store.repository import StuckOrder
from bitloot_reconcile.tags import TAG_ATTEMPT, TRIGGER_SENSOR, request_tags

SENSOR_ACTOR = "stuck_orders_sensor"
# Dagster never reuses a run key, even after a failed run. The attempt number changes after every run that
# claimed the order, the last run id after every run that recorded an outcome (a run held by a BitLoot switch
# gives its attempt back); the time bucket also frees the key when a run died before it could claim.
RUN_KEY_BUCKET = dt.timedelta(minutes=15)


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
    if order.status == "fulfilled":
        return "fulfilled but the completion email was never sent"
    minutes = int((now.replace(tzinfo=None) - order.updated_at).total_seconds() // 60)
    return f"stuck in {order.status} for {minutes} min"


def plan_sweep(stuck: list[StuckOrder], *, in_flight: set[str], now: dt.datetime) -> list[SweepRequest]:
    bucket = int(now.timestamp() // RUN_KEY_BUCKET.total_seconds())
    requests = []
    for order in stuck:
        if order.id in in_flight:
            continue
        attempt = order.attempts + 1
        reason = describe(order, now)
        tags = request_tags(order.id, trigger=TRIGGER_SENSOR, reason=reason, requested_by=SENSOR_ACTOR)
        tags[TAG_ATTEMPT] = str(attempt)
        run_key = f"{order.id}:{attempt}:{bucket}" + (f":{order.last_run_id}" if order.last_run_id else "")
        requests.append(SweepRequest(order.id, run_key, reason, tags))
    return requests
