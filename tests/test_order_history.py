"""`order_attempts`: an order's history holds every attempt once, whatever ended it and whatever ran it. Real
runs against PostgreSQL, SeaweedFS and the simulators."""

from __future__ import annotations

import dagster as dg

from bitloot_reconcile.assets.order_history import ORDER_ATTEMPTS_KEY
from bitloot_reconcile.resources.r2 import R2Resource
from tests.fixtures.world import World


def test_every_attempt_is_on_the_orders_partition_once_each_in_its_run(world: World):
    order_id = world.order([world.product()])
    dead_r2 = R2Resource(endpoint="http://127.0.0.1:9", access_key_id="x", secret_access_key="y",
                         bucket=world.r2.bucket)
    failed = world.run(order_id, r2=dead_r2)  # R2 down at store_keys: recorded by the failure hook
    fulfilled = world.run(order_id)
    refused = world.run(order_id, reason="customer asked again")  # an admin's run on a fulfilled order
    batch = world.batch([order_id])  # the sweep's batch finds it done
    assert not failed.success and fulfilled.success and not refused.success and batch.success

    records = world.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=ORDER_ATTEMPTS_KEY, asset_partitions=[order_id]), limit=10, ascending=True
    ).records
    seen = [(r.run_id, r.asset_materialization.metadata["outcome"].value,
             r.asset_materialization.metadata["trigger"].value, r.asset_materialization.metadata["actor"].value)
            for r in records]
    assert seen == [
        (failed.run_id, "retry_later", "admin", "admin@bitloot.io"),
        (fulfilled.run_id, "fulfilled", "admin", "admin@bitloot.io"),
        (refused.run_id, "refused", "admin", "admin@bitloot.io"),
        (batch.run_id, "already_fulfilled", "sensor", "stuck_orders_sensor"),
    ]
    # Each is in its run's own log (the UI lists a partition's events by run; a runless one it does not show).
    for record in records:
        logged = [e.dagster_event.event_specific_data.materialization for e in world.instance.all_logs(
            record.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)]
        assert [(m.asset_key, m.partition) for m in logged] == [(ORDER_ATTEMPTS_KEY, order_id)]
    assert "store_keys failed" in records[0].asset_materialization.metadata["reason"].value
    assert records[2].asset_materialization.metadata["reason"].value == "Order is already fulfilled"
