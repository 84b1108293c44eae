"""The sweep's pure rules for the backlog path: when to batch, and when a batch run has lost its worker."""

from __future__ import annotations

import datetime as dt

from bitloot_reconcile.domain.sweep import SweepRequest, batch_worker_gone, split_backlog
from bitloot_reconcile.store.repository import ReconcileState

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(minutes=15)


def requests(n: int) -> list[SweepRequest]:
    return [SweepRequest(f"order-{i}", f"order-{i}:1:0", "stuck", {}) for i in range(n)]


def test_at_the_threshold_per_order_runs_above_it_one_bounded_batch():
    runs, batch = split_backlog(requests(5), threshold=5, max_orders=3, max_runs=4)
    assert [r.order_id for r in runs] == ["order-0", "order-1", "order-2", "order-3"] and batch is None
    runs, batch = split_backlog(requests(6), threshold=5, max_orders=3, max_runs=4)
    assert runs == [] and [o["order_id"] for o in batch.orders] == ["order-0", "order-1", "order-2"]
    assert batch.tags["bitloot/batch_size"] == "3" and "bitloot/order_id" not in batch.tags


def test_a_batchs_run_key_follows_its_orders_run_keys():
    first = split_backlog(requests(6), threshold=0, max_orders=6, max_runs=1)[1]
    same = split_backlog(requests(6), threshold=0, max_orders=6, max_runs=1)[1]
    moved = requests(6)
    moved[2] = SweepRequest("order-2", "order-2:2:0", "stuck", {})  # its attempt moved on
    assert first.run_key == same.run_key != split_backlog(moved, threshold=0, max_orders=6, max_runs=1)[1].run_key


def lease(owner: str, expires: dt.datetime) -> ReconcileState:
    return ReconcileState(order_id="x", lease_owner=owner, lease_expires_at=expires)


def test_a_batch_is_gone_only_when_old_holding_no_live_lease_and_with_orders_left():
    old = NOW - 2 * LEASE
    orders = ["a", "b"]
    live = {"a": lease("run", NOW + dt.timedelta(seconds=30))}
    lapsed = {"a": lease("run", NOW - dt.timedelta(seconds=1))}
    assert not batch_worker_gone("run", NOW - dt.timedelta(minutes=1), orders, {}, set(), lease_ttl=LEASE, now=NOW)
    assert not batch_worker_gone("run", old, orders, live, set(), lease_ttl=LEASE, now=NOW)
    assert batch_worker_gone("run", old, orders, lapsed, set(), lease_ttl=LEASE, now=NOW)
    assert batch_worker_gone("run", old, orders, {}, {"a"}, lease_ttl=LEASE, now=NOW)
    assert not batch_worker_gone("run", old, orders, lapsed, {"a", "b"}, lease_ttl=LEASE, now=NOW)  # finishing
    other = {"a": lease("other-run", NOW + dt.timedelta(seconds=30))}
    assert batch_worker_gone("run", old, orders, other, set(), lease_ttl=LEASE, now=NOW)
