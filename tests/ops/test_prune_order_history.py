"""`prune_order_history` executed for real: Dagster's dynamic partitions and the store on PostgreSQL."""

from __future__ import annotations

import datetime as dt

from bitloot_reconcile.assets.order_history import (
    ORDER_ATTEMPTS_KEY,
    add_order_partitions,
    attempt_event,
    order_partitions,
)
from bitloot_reconcile.jobs import prune_order_history
from tests.fixtures.world import World


def test_partitions_of_orders_settled_long_ago_are_removed_and_their_events_kept(world: World):
    game = world.product()
    old = world.order([game], status="fulfilled", age=dt.timedelta(days=45), completion_email_sent=True)
    recent = world.order([game], status="fulfilled", age=dt.timedelta(days=2), completion_email_sent=True)
    open_order = world.order([game], status="paid", age=dt.timedelta(days=45))
    instance = world.instance
    add_order_partitions(instance, [old, recent, open_order])
    instance.report_runless_asset_event(attempt_event(old, outcome="fulfilled", reason="keys stored", trigger="sensor",
                                                      actor="sensor:stuck_orders", run_id="r1", job="fulfill_order"))

    result = prune_order_history.execute_in_process(
        run_config={"ops": {"remove_settled_partitions": {"config": {"keep_days": 30}}}},
        resources={"store": world.resources()["store"]}, instance=instance)

    assert result.output_for_node("remove_settled_partitions") == 1
    left = set(order_partitions(instance))
    assert old not in left and {recent, open_order} <= left
    # The attempt's event stays in Dagster's event log; a later attempt brings the partition back.
    assert old in instance.get_materialized_partitions(ORDER_ATTEMPTS_KEY)
    add_order_partitions(instance, [old])
    assert old in set(order_partitions(instance))
