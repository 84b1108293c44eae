"""The production layout on separate hosts (`bitloot_standins.hosts`): database, storage (SeaweedFS as
R2), broker (redis-server), stand-in APIs, daemon with the code server, webserver behind nginx, two run-worker
hosts with a Celery worker each, every one in its own network namespace with a private /tmp. Runs go to the
worker hosts through dagster-celery's CeleryRunLauncher.

1. A backlog is drained in `fulfill_backlog` batches and an admin retry is launched through the proxy; every
   process of one worker host is killed while it executes a run. Every order ends exactly once (one Kinguin
   order, one keys row per item, one email), the killed host's run is failed by the sweep and its orders are
   worked again by the other host, and the admin run's output, written on a worker host, is read from the
   webserver host through the proxy (GraphQL as admin and as support, and support's stderr tab in Chromium).
2. While a backlog drains, a worker host executing a run is cut off the network for 30 s, and meanwhile the
   broker is killed and started again. Every order still ends exactly once, and no run is left in flight.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections import Counter

import pytest
import sqlalchemy as sa
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from bitloot_reconcile.store.schema import keys, order_items, orders
from bitloot_standins.hosts import LayoutSettings, production_layout, why_namespaces_unavailable
from bitloot_standins.httpserver import Fault
from bitloot_standins.seed import insert_order
from tests.e2e.test_browser import PAGE_TIMEOUT_MS, browser

pytestmark = [pytest.mark.e2e]

__all__ = ["browser"]  # the module-scoped Chromium of the browser tests

LEASE_SECONDS, SWEEP_SECONDS = 20, 3
BACKLOG = 18
RUN_ID = re.compile(r'run_id": "([0-9a-f-]{36})"')  # packed as pipeline_run_id
RUN_LOGS = """query($runId: ID!) { logsForRun(runId: $runId) { ... on EventConnection { events { __typename
  ... on LogsCapturedEvent { fileKey } } } } }"""
CAPTURED = "query($logKey: [String!]!) { capturedLogs(logKey: $logKey) { stdout stderr } }"


def wait_for(what: str, check, layout, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"out of time waiting for {what}"
        time.sleep(0.5)


def layout_settings() -> LayoutSettings:
    reason = why_namespaces_unavailable()
    if reason:
        pytest.skip(f"the hosts test needs network namespaces: {reason}")
    return LayoutSettings(
        env={"RECONCILE_SWEEP_INTERVAL_SECONDS": str(SWEEP_SECONDS), "RECONCILE_LEASE_SECONDS": str(LEASE_SECONDS),
             "RECONCILE_MAX_RETRY_WAIT_SECONDS": "5", "RECONCILE_BATCH_THRESHOLD": "4",
             "RECONCILE_BATCH_MAX_ORDERS": "6"},
        # Run monitoring's default poll is every 120 s: a run sent to a lost host but not started there would
        # wait that long plus the start timeout.
        instance_overrides={"run_monitoring": {"poll_interval_seconds": 5, "start_timeout_seconds": 60}},
    )


def seed_backlog(layout, n: int = BACKLOG) -> list[str]:
    """`n` orders of 1 or 2 items, stuck in `paid` for 30 minutes; Kinguin placements slow enough that a batch
    is mid-way when something happens to its host."""
    game = layout.product()
    layout.kinguin.inject("place_order_v2", Fault(times=10_000, latency=1.5))
    return [insert_order(layout.engine, [game] * (1 + i % 2), age=dt.timedelta(minutes=30)) for i in range(n)]


def assert_settled_exactly_once(layout, order_ids: list[str]) -> None:
    """One Kinguin order, one keys row per item and one completion email for each order."""
    for order_id in order_ids:
        assert len(layout.kinguin.orders_for_external_id(order_id)) == 1, order_id
    with layout.engine.connect() as conn:
        items = Counter(r[0] for r in conn.execute(sa.select(order_items.c.orderId)))
        key_rows = Counter(r[0] for r in conn.execute(
            sa.select(order_items.c.orderId).join(keys, keys.c.orderItemId == order_items.c.id)))
    assert {o: key_rows[o] for o in order_ids} == {o: items[o] for o in order_ids}
    emails = Counter(e["idempotency_key"] for e in layout.resend.sent)
    assert {o: emails[f"order-completed/{o}"] for o in order_ids} == dict.fromkeys(order_ids, 1)


@pytest.mark.timeout(600)
@pytest.mark.browser
def test_a_backlog_and_an_admin_retry_drain_on_two_worker_hosts_and_survive_the_loss_of_one(browser, tmp_path):
    settings = layout_settings()
    with production_layout(settings) as layout:
        backlog = seed_backlog(layout)
        admin_order = insert_order(layout.engine, [layout.product()], age=dt.timedelta(minutes=1))  # not swept yet
        everything = [*backlog, admin_order]

        # -- kill worker-1 while it executes a run of the backlog ----------------------------------------------
        victim = layout.workers[0]
        doomed: set[str] = set()

        def mid_drain_on_victim() -> bool:
            doomed.clear()
            doomed.update(runs_on(layout, victim))
            return bool(doomed) and settled_count(layout, backlog) < len(backlog)

        wait_for("a run on worker-1 mid-drain", mid_drain_on_victim, layout, 240)
        killed = victim.kill()
        assert killed >= 2  # the Celery worker and its process executing the run

        # -- the admin retry, through the proxy (an order inside its grace period: the sweep leaves it alone) ---
        admin_run = layout.retry(admin_order, "ticket 25", "ops@bitloot.io")

        wait_for("every order settled", lambda: settled_count(layout, everything) == len(everything), layout, 300)

        assert_settled_exactly_once(layout, everything)

        # -- the lost run: failed in Dagster, its orders worked again by the other host -------------------------
        wait_for("the killed host's run to be failed", lambda: not doomed & set(runs_in(layout, "STARTED")),
                 layout, LEASE_SECONDS + 3 * SWEEP_SECONDS + 60)
        # Failed (by the sweep: the task's state in Celery stays STARTED), unless it ended in the moment between
        # the question and the kill.
        assert doomed & set(runs_in(layout, "FAILURE")) or doomed <= set(runs_in(layout, "SUCCESS"))
        for run_id in doomed & set(runs_in(layout, "FAILURE")):
            # Whichever noticed first: the sweep (its order's lease lapsed) or run monitoring (the launcher asked
            # the worker, which is gone).
            failure = failure_of(layout, run_id)
            assert "run worker gone" in failure or "is not executing this run's task" in failure, failure
        print(f"hosts: runs on the killed host: {doomed}, failed: {doomed & set(runs_in(layout, 'FAILURE'))}")
        survivor = layout.workers[1]
        assert "succeeded" in (layout.network.root / "logs" / f"{survivor.role}.celery.log").read_text()
        assert victim.pids() == []

        # -- the admin run's output, from the webserver host, through the proxy ----------------------------------
        status = layout.run_status(admin_run)
        assert status in ("SUCCESS", "FAILURE"), status  # finished; the order itself settled once either way
        for base, user in ((layout.door, layout.settings.admin), (f"{layout.door}/support", layout.settings.support)):
            events = layout.graphql(base, user, RUN_LOGS, {"runId": admin_run})["logsForRun"]["events"]
            (file_key,) = {e["fileKey"] for e in events if e["__typename"] == "LogsCapturedEvent"}
            captured = layout.graphql(base, user, CAPTURED, {"logKey": [admin_run, "compute_logs", file_key]})
            assert "load_and_claim - STEP_SUCCESS" in (captured["capturedLogs"]["stderr"] or "")

        # -- and on the run's stderr tab, as support sees it in Chromium -----------------------------------------
        support = layout.settings.support
        context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                      http_credentials={"username": support[0], "password": support[1]})
        try:
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            page = context.new_page()
            page.goto(f"{layout.door}/support/runs/{admin_run}?logType=stderr&logFileKey={file_key}")
            try:
                page.get_by_text(re.compile(r"record_outcome - STEP_SUCCESS")).first.wait_for()
            finally:
                page.screenshot(path=str(tmp_path / "support_run_stderr.png"))  # for a person to look at
        finally:
            context.close()


@pytest.mark.timeout(600)
def test_a_broker_restart_and_a_30_s_network_cut_of_a_worker_host_settle_every_order_once():
    with production_layout(layout_settings()) as layout:
        backlog = seed_backlog(layout, 2 * BACKLOG)
        # -- worker-2 is cut off from every other host for 30 s while it executes a run ---------------------------
        cut_off = layout.workers[1]
        wait_for("a run on worker-2 mid-drain", lambda: bool(runs_on(layout, cut_off))
                 and settled_count(layout, backlog) < len(backlog), layout, 240)
        cut_off.cut_network()
        cut_at = time.monotonic()
        # -- meanwhile the broker goes away and comes back (its append-only file keeps the queued tasks) ----------
        broker = layout.network["broker"]
        broker.kill()
        time.sleep(5)
        layout.start_broker()
        time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
        cut_off.restore_network()

        wait_for("every order settled", lambda: settled_count(layout, backlog) == len(backlog), layout, 300)
        assert_settled_exactly_once(layout, backlog)
        assert all(layout.network[role].alive()[name] for role, name in (
            ("worker-1", "celery"), ("worker-2", "celery"), ("daemon", "daemon")))
        wait_for("no run left in flight", lambda: not runs_in(layout, "STARTED") and not runs_in(layout, "STARTING")
                 and not runs_in(layout, "QUEUED"), layout, LEASE_SECONDS + 3 * SWEEP_SECONDS + 90)


def runs_on(layout, host) -> set[str]:
    """The runs the host's Celery worker is executing now (asked over the broker; each task carries its run's
    id in its arguments); none while the broker does not answer."""
    app = layout.celery_app()
    try:
        active = app.control.inspect(timeout=1.0).active() or {}
    except (OSError, OperationalError, RedisError):  # the broker just restarted: ask again
        return set()
    finally:
        app.close()
    return {run_id for name, tasks in active.items() if name.startswith(f"{host.role}@") for task in tasks
            for run_id in RUN_ID.findall(json.dumps(task.get("kwargs")))}


def dagster_rows(layout, query: str, **params: str) -> list[tuple]:
    """Rows of `query` on Dagster's database, on the database host."""
    engine = sa.create_engine(layout.dagster_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(query), params)]
    finally:
        engine.dispose()


def runs_in(layout, status: str) -> dict[str, str]:
    """Run id -> job name of the runs in `status`."""
    return dict(dagster_rows(layout, "SELECT run_id, pipeline_name FROM runs WHERE status = :s", s=status))


def failure_of(layout, run_id: str) -> str:
    """The run's failure event as Dagster stored it."""
    return "\n".join(row[0] for row in dagster_rows(
        layout, "SELECT event FROM event_logs WHERE run_id = :id AND dagster_event_type = 'PIPELINE_FAILURE'",
        id=run_id))


def settled_count(layout, order_ids: list[str]) -> int:
    with layout.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(orders).where(
            orders.c.id.in_(order_ids), orders.c.status == "fulfilled", orders.c.completionEmailSent)).scalar_one()
