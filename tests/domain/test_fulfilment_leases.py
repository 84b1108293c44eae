"""Two runs of one order when the first one outlives its lease: the step functions on the real store, Kinguin
simulator and SeaweedFS, the runs in threads so the test controls the interleaving."""

from __future__ import annotations

import datetime as dt
import threading
import time

import sqlalchemy as sa

from bitloot_reconcile.domain import fulfilment
from bitloot_reconcile.domain.outcomes import LEASE_LOST_REASON, Outcome, Progress
from bitloot_reconcile.store.schema import order_items
from bitloot_standins.httpserver import Fault
from tests.fixtures.runs import key_rows
from tests.fixtures.world import World

SHORT_LEASE = dt.timedelta(seconds=1)


def claim(world: World, order_id: str, owner: str, ttl: dt.timedelta) -> Progress:
    return fulfilment.load_and_claim(world.store, order_id, owner=owner, lease_ttl=ttl, admin=False)


def up_to_the_keys(world: World, progress: Progress) -> Progress:
    resources = world.resources()
    with resources["nowpayments"].get_client() as nowpayments, resources["kinguin"].get_client() as kinguin:
        progress = fulfilment.verify_payment(world.store, nowpayments, progress)
        progress = fulfilment.ensure_supplier_order(world.store, kinguin, progress)
        return fulfilment.poll_supplier(world.store, kinguin, progress)


def from_the_keys(world: World, progress: Progress) -> Progress:
    with world.resources()["kinguin"].get_client() as kinguin:
        progress = fulfilment.store_keys(world.store, kinguin, world.vault, progress, presign_seconds=600)
    return fulfilment.mark_fulfilled(world.store, progress)


def in_thread(target, *args) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(target(*args)), daemon=True)
    thread.start()
    return thread, result


def test_a_run_stalled_past_its_lease_stops_as_busy_before_its_next_write(world: World):
    order_id = world.order([world.product()])
    first = up_to_the_keys(world, claim(world, order_id, "run-a", SHORT_LEASE))
    world.kinguin.inject("get_keys", Fault(latency=2.5))  # A stalls inside store_keys, past its lease
    stalled, first_result = in_thread(from_the_keys, world, first)

    time.sleep(1.5)
    second = claim(world, order_id, "run-b", dt.timedelta(minutes=5))
    assert not second.finished, "A's lease lapsed: B takes the order"
    second = from_the_keys(world, up_to_the_keys(world, second))
    stalled.join(10)

    assert second.outcome is None and world.store.load_order(order_id).status == "fulfilled"
    assert (first_result[0].outcome, first_result[0].reason) == (Outcome.BUSY, LEASE_LOST_REASON)
    assert len(key_rows(world, order_id)) == 1
    assert len(world.store.key_assignments(order_id)) == 1
    assert len(world.kinguin.orders_for_external_id(order_id)) == 1


def test_two_runs_and_a_shop_lock_on_the_item_row_leave_one_key_row(world: World):
    """BitLoot holds the item row; run A waits on it with its write half done while its lease lapses and run B
    arrives. Before fencing, both runs inserted a keys row once the lock went away (4 of 4 attempts)."""
    order_id = world.order([world.product()])
    (item,) = world.store.load_order(order_id).items
    first = up_to_the_keys(world, claim(world, order_id, "run-a", SHORT_LEASE))

    with world.engine.connect() as shop:
        shop.execute(sa.select(order_items.c.id).where(order_items.c.id == item.id).with_for_update())
        waiting, first_result = in_thread(from_the_keys, world, first)
        time.sleep(1.5)  # A's lease has lapsed while A waits on the shop's lock
        racing, second_result = in_thread(
            lambda: from_the_keys(world, up_to_the_keys(world, claim(world, order_id, "run-b", SHORT_LEASE * 60)))
        )
        time.sleep(1.0)
        shop.rollback()  # the shop lets go of the row
    waiting.join(15)
    racing.join(15)

    assert len(key_rows(world, order_id)) == 1
    assert world.store.load_order(order_id).status == "fulfilled"
    outcomes = sorted(str(r[0].outcome) for r in (first_result, second_result))
    assert outcomes == ["None", "busy"]  # one run finished the order, the other stopped at its next step
    assert len(world.kinguin.orders_for_external_id(order_id)) == 1
