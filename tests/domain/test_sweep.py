"""The sweep's pure rules for the backlog path: when to batch, and when a batch run has lost its worker."""

from __future__ import annotations

import datetime as dt

from bitloot_reconcile.domain.sweep import SweepRequest, batch_worker_gone, split_backlog
from bitloot_reconcile.store.repository import ReconcileState

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(minutes=15)


def requests(n: int) -> list[SweepRequest]:
    return [SweepRequest(f"order-{i}", f"order-{i}:1:0", "stuck", {}) for i in range(n)]


def order_ids(batches) -> list[list[str]]:
    return [[o["order_id"] for o in batch.orders] for batch in batches]


def test_at_the_threshold_per_order_runs_above_it_one_bounded_batch():
    runs, batches = split_backlog(requests(5), threshold=5, max_orders=3, max_runs=4, batch_slots=1)
    assert [r.order_id for r in runs] == ["order-0", "order-1", "order-2", "order-3"] and batches == []
    runs, (batch,) = split_backlog(requests(6), threshold=5, max_orders=3, max_runs=4, batch_slots=1)
    assert runs == [] and order_ids([batch]) == [["order-0", "order-1", "order-2"]]
    assert batch.tags["bitloot/batch_size"] == "3" and "bitloot/order_id" not in batch.tags


def test_a_backlog_is_split_evenly_over_the_free_slots_in_parts_of_at_least_the_minimum():
    # Small: one batch even with slots free (another run worker would cost more than it saves).
    assert order_ids(split_backlog(requests(150), threshold=25, max_orders=500, max_runs=25, batch_slots=2)[1]) == [
        [f"order-{i}" for i in range(150)]]
    # Large enough for two: split evenly, oldest first.
    halves = order_ids(split_backlog(requests(301), threshold=25, max_orders=500, max_runs=25, batch_slots=2)[1])
    assert [len(h) for h in halves] == [151, 150] and halves[0][0] == "order-0" and halves[1][0] == "order-151"
    # Bounded by the slots and the batch size: the rest waits for a later tick.
    parts = order_ids(split_backlog(requests(1200), threshold=25, max_orders=500, max_runs=25, batch_slots=2)[1])
    assert [len(p) for p in parts] == [500, 500]
    # More batches than the minimum would give, when one batch cannot hold them all.
    assert [len(p) for p in order_ids(split_backlog(requests(60), threshold=25, max_orders=20, max_runs=25,
                                                    batch_slots=4)[1])] == [20, 20, 20]
    # No free slot: nothing launched, per-order runs neither.
    assert split_backlog(requests(60), threshold=25, max_orders=500, max_runs=25, batch_slots=0) == ([], [])


def test_a_batchs_run_key_follows_its_orders_run_keys():
    def batch_of(reqs):
        return split_backlog(reqs, threshold=0, max_orders=6, max_runs=1, batch_slots=1)[1][0]

    moved = requests(6)
    moved[2] = SweepRequest("order-2", "order-2:2:0", "stuck", {})  # its attempt moved on
    assert batch_of(requests(6)).run_key == batch_of(requests(6)).run_key != batch_of(moved).run_key


def lease(owner: str, expires: dt.datetime) -> ReconcileState:
    return ReconcileState(order_id="x", lease_owner=owner, lease_expires_at=expires)


def test_a_batch_is_gone_only_when_old_holding_no_live_lease_and_with_orders_left_or_a_lapsed_lease():
    old = NOW - 2 * LEASE
    orders = ["a", "b"]
    live = {"a": lease("run", NOW + dt.timedelta(seconds=30))}
    lapsed = {"a": lease("run", NOW - dt.timedelta(seconds=1))}
    assert not batch_worker_gone("run", NOW - dt.timedelta(minutes=1), orders, {}, set(), lease_ttl=LEASE, now=NOW)
    assert not batch_worker_gone("run", old, orders, live, set(), lease_ttl=LEASE, now=NOW)
    assert batch_worker_gone("run", old, orders, lapsed, set(), lease_ttl=LEASE, now=NOW)
    assert batch_worker_gone("run", old, orders, {}, {"a"}, lease_ttl=LEASE, now=NOW)
    assert not batch_worker_gone("run", old, orders, {}, {"a", "b"}, lease_ttl=LEASE, now=NOW)  # finishing
    # Died on its last orders: all attempted, a lapsed lease still its own.
    assert batch_worker_gone("run", old, orders, lapsed, {"a", "b"}, lease_ttl=LEASE, now=NOW)
    other = {"a": lease("other-run", NOW + dt.timedelta(seconds=30))}
    assert batch_worker_gone("run", old, orders, other, set(), lease_ttl=LEASE, now=NOW)
