"""`board_check_alert_sensor` against a real webhook receiver: the board's checks come from materialising
`order_backlog` on a PostgreSQL store, on an instance of the test's own."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from bitloot_reconcile.resources.alerts import AlertsResource
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.schema import reconcile_state
from bitloot_standins.httpserver import Fault
from tests.fixtures.board import seed_every_state
from tests.fixtures.definitions import board_check_alert_sensor, order_backlog
from tests.fixtures.webhook import Receiver

DAGSTER_URL = "http://dagster.test"


@pytest.fixture
def board(store_url, r2_bucket, receiver):
    with dg.instance_for_test() as instance:
        alerts = AlertsResource(webhook_url=receiver.hook_url, dagster_base_url=DAGSTER_URL, timeout_seconds=2)

        class Board:
            cursor: str | None = None

            @staticmethod
            def refresh() -> str:
                result = dg.materialize([order_backlog], instance=instance, resources={
                    "store": StoreResource(database_url=store_url), "policy": RecoveryPolicyResource(), "r2": r2_bucket,
                    "alerts": alerts})
                assert result.success
                return result.run_id

            @staticmethod
            def tick() -> str:
                context = dg.build_sensor_context(instance=instance, cursor=Board.cursor, resources={"alerts": alerts})
                skipped = board_check_alert_sensor(context)
                Board.cursor = context.cursor
                return skipped.skip_message

        yield Board


def test_a_failed_check_is_alerted_once_per_state_change(board, receiver: Receiver, store_engine):
    assert board.tick() == "0 of 0 board alerts sent; failed and told: none"  # never refreshed yet
    ids = seed_every_state(store_engine)
    run_id = board.refresh()

    board.tick()

    texts = receiver.texts
    assert len(texts) == 3
    (sla,) = [t for t in texts if "oldest_stuck_within_sla failed" in t]
    assert ids["past_age_window"] in sla and "older than the SLA of 60 min" in sla
    assert f"{DAGSTER_URL}/runs/{run_id}" in sla
    (person,) = [t for t in texts if "no_order_needs_a_person failed" in t]
    assert ids["needs_attention"] in person and "supplier canceled Kinguin order K-1" in person
    (quarantined,) = [t for t in texts if "no_order_quarantined failed" in t]
    assert ids["quarantined"] in quarantined and "attempts exhausted" in quarantined

    board.refresh()  # still failing at the next refresh: nothing new to tell
    assert board.tick().startswith("0 of 0 board alerts sent")
    assert len(receiver.texts) == 3

    with store_engine.begin() as conn:  # a person dealt with the quarantined order
        conn.execute(sa.delete(reconcile_state).where(reconcile_state.c.order_id == ids["quarantined"]))
        conn.execute(sa.text("UPDATE orders SET status = 'refunded' WHERE id = :id"), {"id": ids["quarantined"]})
    board.refresh()
    board.tick()
    assert len(receiver.texts) == 3  # a check that passes again is not alerted

    again = seed_every_state(store_engine)  # ...and a new order gets quarantined: alerted again
    board.refresh()
    board.tick()
    assert len(receiver.texts) == 4
    assert again["quarantined"] in receiver.texts[3] and "no_order_quarantined failed" in receiver.texts[3]


def test_an_alert_the_webhook_did_not_take_is_sent_on_the_next_tick(board, receiver: Receiver, store_engine):
    seed_every_state(store_engine)
    board.refresh()
    receiver.inject("hook", Fault(status=503, times=1))

    first = board.tick()
    assert first.startswith("0 of 3 board alerts sent")
    second = board.tick()
    assert second.startswith("3 of 3 board alerts sent")
    assert len(receiver.texts) == 3
    assert board.tick().startswith("0 of 0")
