"""`bitloot_reconcile.metrics`: the exposition (names, help, types), the audit counters kept up incrementally on a
real PostgreSQL store, Dagster's runs and sweep ticks, and the dashboard and alert rules against what is exported.
The end-to-end check with a real Prometheus is tests/e2e/test_prometheus.py."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster._core.remote_origin import InProcessCodeLocationOrigin, RemoteInstigatorOrigin, RemoteRepositoryOrigin
from dagster._core.scheduler.instigation import (
    InstigatorState,
    InstigatorStatus,
    InstigatorType,
    SensorInstigatorData,
    TickData,
    TickStatus,
)
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.utils import make_new_run_id
from dagster_shared.error import SerializableErrorInfo
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bitloot_reconcile import metrics
from bitloot_reconcile.domain.board import BoardState, build_board
from bitloot_reconcile.metrics import AuditCounts, DagsterView, MetricsSource, ReconcileCollector, Snapshot
from bitloot_reconcile.settings import ReconcileVariables
from bitloot_reconcile.store.repository import Store
from bitloot_reconcile.store.schema import reconcile_audit
from bitloot_standins.seed import SeedProduct, insert_order, insert_product
from tests.e2e.test_daemon import free_port
from tests.fixtures.board import seed_every_state
from tests.fixtures.world import backlog_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "deploy" / "grafana-provisioning" / "dashboards" / "bitloot-reconcile.json"
RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
METRIC_NAME = re.compile(r"\b(bitloot_reconcile_[a-z_]+)\b")


def queried_metrics() -> set[str]:
    """Every metric name the dashboard's panels and the alert rules query."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load((RULES_DIR / "bitloot-reconcile.rules.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def exposition(snapshot: Snapshot) -> str:
    class Fixed(ReconcileCollector):
        def collect(self):
            yield from metrics.families(snapshot)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed(None))
    return generate_latest(registry).decode()


def full_snapshot(store_engine) -> Snapshot:
    ids = seed_every_state(store_engine)
    now = dt.datetime.now(dt.UTC)
    board = build_board(Store(store_engine).backlog_orders(now=now, max_age=dt.timedelta(days=7), limit=1000), [],
                        in_flight={}, now=now, grace=dt.timedelta(minutes=10), max_age=dt.timedelta(days=7))
    assert len(board.rows) == len([name for name in ids if not name.startswith("done")])
    return Snapshot(board, DagsterView({("fulfill_order", "STARTED"): 2}, {}, time.time() - 12),
                    {("fulfilled", "sensor"): 3}, {("kinguin", "transient"): 2}, 3,
                    {"store": 0.01, "dagster": 0.02}, time.time(), sla_seconds=3600.0)


def test_every_metric_has_the_prefix_help_text_and_prometheus_naming(store_engine):
    families = list(text_string_to_metric_families(exposition(full_snapshot(store_engine))))
    assert families
    for family in families:
        assert family.name.startswith("bitloot_reconcile_"), family.name
        assert len(family.documentation) > 20, family.name
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
        assert not family.name.endswith("_total") or family.type == "counter", family.name
    exported = {family.name for family in families}
    assert {"bitloot_reconcile_stuck_orders", "bitloot_reconcile_board_orders",
            "bitloot_reconcile_oldest_stuck_order_age_seconds", "bitloot_reconcile_needs_attention_orders",
            "bitloot_reconcile_quarantined_orders", "bitloot_reconcile_runs_in_flight",
            "bitloot_reconcile_sweep_last_tick_age_seconds", "bitloot_reconcile_outcomes",
            "bitloot_reconcile_orders_fulfilled", "bitloot_reconcile_outside_call_failures"} <= exported


def test_the_gauges_say_what_the_board_says(store_engine):
    snapshot = full_snapshot(store_engine)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(exposition(snapshot)) for s in f.samples}
    board = snapshot.board
    assert samples[("bitloot_reconcile_stuck_orders", ())] == len(board.stuck) > 0
    assert samples[("bitloot_reconcile_needs_attention_orders", ())] == board.count(BoardState.NEEDS_ATTENTION) == 1
    assert samples[("bitloot_reconcile_quarantined_orders", ())] == 1
    for state, n in board.counts().items():
        assert samples[("bitloot_reconcile_board_orders", (("state", state),))] == n
    assert samples[("bitloot_reconcile_oldest_stuck_order_age_seconds", ())] == pytest.approx(
        board.oldest_stuck.age.total_seconds())
    assert samples[("bitloot_reconcile_stuck_order_sla_seconds", ())] == 3600
    assert samples[("bitloot_reconcile_runs_in_flight", (("job", "fulfill_order"), ("status", "STARTED")))] == 2
    assert samples[("bitloot_reconcile_runs_in_flight", (("job", "fulfill_backlog"), ("status", "QUEUED")))] == 0
    assert 11 < samples[("bitloot_reconcile_sweep_last_tick_age_seconds", ())] < 60
    assert samples[("bitloot_reconcile_outside_call_failures_total", (("kind", "transient"),
                                                                      ("service", "kinguin")))] == 2
    assert samples[("bitloot_reconcile_outside_call_failures_total", (("kind", "transient"), ("service", "r2")))] == 0
    assert samples[("bitloot_reconcile_up", (("source", "store"),))] == 1


def test_a_source_that_cannot_be_read_is_down_and_its_gauges_are_left_out():
    snapshot = Snapshot(None, None, {("fulfilled", "admin"): 1}, {}, 1, {"store": 0.5, "dagster": 0.1}, time.time())
    text = exposition(snapshot)
    assert 'bitloot_reconcile_up{source="store"} 0.0' in text
    assert 'bitloot_reconcile_up{source="dagster"} 0.0' in text
    assert "bitloot_reconcile_stuck_orders" not in text and "sweep_last_tick" not in text
    assert "bitloot_reconcile_orders_fulfilled_total 1.0" in text  # counters keep their values


def test_the_dashboard_follows_bitloots_conventions_and_queries_only_exported_metrics(store_engine):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 38 and dashboard["uid"] == "bitloot-reconcile"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["type"] == "prometheus" and panel["type"] == "timeseries"
        assert panel["targets"] and all(t["expr"] and "legendFormat" in t for t in panel["targets"])
    exported = {s.name for f in text_string_to_metric_families(exposition(full_snapshot(store_engine)))
                for s in f.samples}
    assert queried_metrics() and queried_metrics() <= exported, queried_metrics() - exported


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian's prometheus package) is not installed")
def test_the_alert_rules_pass_promtool_check_and_their_unit_tests():
    config = subprocess.run(["promtool", "check", "config", "prometheus.bitloot-reconcile.yml"], cwd=RULES_DIR,
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr  # the scrape job and its rule file load
    check = subprocess.run(["promtool", "check", "rules", "bitloot-reconcile.rules.yml"], cwd=RULES_DIR,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 5 rules found" in check.stdout
    tested = subprocess.run(["promtool", "test", "rules", "bitloot-reconcile.rules.test.yml"], cwd=RULES_DIR,
                            capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    names = {rule["alert"] for group in yaml.safe_load((RULES_DIR / "bitloot-reconcile.rules.yml").read_text())[
        "groups"] for rule in group["rules"]}
    tests = yaml.safe_load((RULES_DIR / "bitloot-reconcile.rules.test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == names  # every rule has a case where it fires


# ------------------------------------------------------------------------------------------------ audit counters
def audit(engine: sa.Engine, outcome: str | None, *, action: str = "fulfill_order", trigger: str = "sensor",
          detail: str | None = None, conn: sa.Connection | None = None) -> None:
    row = dict(order_id="5c91f65c-4b12-463c-9277-8cfc139ceda4", action=action, trigger=trigger, outcome=outcome,
               detail=detail, created_at=dt.datetime.now(dt.UTC))
    if conn is not None:
        conn.execute(sa.insert(reconcile_audit).values(**row))
        return
    with engine.begin() as own:
        own.execute(sa.insert(reconcile_audit).values(**row))


def test_audit_counters_start_from_the_tables_totals_then_add_only_new_rows(store_engine):
    audit(store_engine, "fulfilled", trigger="admin")
    audit(store_engine, "retry_later",
          detail="store_keys failed: TransientError: r2: put_object orders/x/key-1.txt: 503 ServiceUnavailable")
    audit(store_engine, None, action="requested")  # who asked: not an outcome
    audit(store_engine, "refused", action="refused", trigger="admin", detail="order not found")
    counts = AuditCounts()
    counts.prime(store_engine)
    assert counts.outcomes == {("fulfilled", "admin"): 1, ("retry_later", "sensor"): 1, ("refused", "admin"): 1}
    assert counts.failures == {("r2", "transient"): 1} and counts.fulfilled == 1

    audit(store_engine, "fulfilled")
    audit(store_engine, "needs_attention", detail="insufficient Kinguin balance")
    counts.catch_up(store_engine, time.monotonic())
    counts.catch_up(store_engine, time.monotonic())  # nothing new: nothing counted twice
    assert counts.fulfilled == 2
    assert counts.outcomes[("fulfilled", "sensor")] == 1 and counts.outcomes[("needs_attention", "sensor")] == 1
    assert counts.failures == {("r2", "transient"): 1, ("kinguin", "refused"): 1}


def primed_next_to_the_sequence(engine: sa.Engine) -> AuditCounts:
    """Counters primed right after a row: the table's id sequence runs on across tests (TRUNCATE keeps it)."""
    audit(engine, "busy")
    counts = AuditCounts()
    counts.prime(engine)
    return counts


def test_a_row_that_commits_after_a_later_id_is_still_counted_once(store_engine):
    counts = primed_next_to_the_sequence(store_engine)
    with store_engine.connect() as slow:
        slow_tx = slow.begin()
        audit(store_engine, "fulfilled", conn=slow)  # takes its id first, commits last
        audit(store_engine, "fulfilled")
        counts.catch_up(store_engine, time.monotonic())
        assert counts.fulfilled == 1 and len(counts.pending) == 1
        slow_tx.commit()
    counts.catch_up(store_engine, time.monotonic())
    counts.catch_up(store_engine, time.monotonic())
    assert counts.fulfilled == 2 and not counts.pending


def test_a_hole_left_by_a_rolled_back_insert_is_forgotten_after_a_while(store_engine):
    counts = primed_next_to_the_sequence(store_engine)
    with store_engine.connect() as conn:
        tx = conn.begin()
        audit(store_engine, "fulfilled", conn=conn)
        tx.rollback()
    audit(store_engine, "fulfilled")
    counts.catch_up(store_engine, 1000.0)
    assert len(counts.pending) == 1
    counts.catch_up(store_engine, 1000.0 + metrics.PENDING_ID_SECONDS + 1)
    assert counts.fulfilled == 1 and not counts.pending


def test_a_backlog_larger_than_a_chunk_is_read_in_chunks(store_engine):
    counts = AuditCounts()
    counts.prime(store_engine)
    for _ in range(7):
        audit(store_engine, "fulfilled")
    counts.catch_up(store_engine, time.monotonic(), chunk=3)
    assert counts.fulfilled == 7


# ----------------------------------------------------------------------------------------- Dagster and the source
def record_sweep_tick(instance: dg.DagsterInstance, seconds_ago: float, status=TickStatus.SKIPPED) -> None:
    """A tick of stuck_orders_sensor in the instance's sensor storage, as the daemon records it."""
    location = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="bitloot_reconcile.definitions"),
                                           location_name="bitloot_reconcile")
    origin = RemoteInstigatorOrigin(RemoteRepositoryOrigin(location, "__repository__"), "stuck_orders_sensor")
    state = InstigatorState(origin, InstigatorType.SENSOR, InstigatorStatus.RUNNING, SensorInstigatorData())
    if instance.get_instigator_state(origin.get_id(), state.selector_id) is None:
        instance.add_instigator_state(state)
    failed = SerializableErrorInfo("store down", [], "OperationalError") if status == TickStatus.FAILURE else None
    instance.create_tick(TickData(origin.get_id(), "stuck_orders_sensor", InstigatorType.SENSOR, status,
                                  time.time() - seconds_ago, selector_id=state.selector_id, error=failed))


def test_runs_in_flight_and_the_last_completed_sweep_tick_come_from_the_instance(store_engine):
    product = insert_product(store_engine, SeedProduct("5c9b68662539a4e8f17ae2fe", "Game"))
    orders = [insert_order(store_engine, [product]) for _ in range(3)]
    with dg.instance_for_test() as instance:
        assert metrics.read_dagster(instance).last_tick is None
        record_sweep_tick(instance, 90)
        record_sweep_tick(instance, 30, status=TickStatus.FAILURE)  # a failed tick is no sweep
        single = dg.DagsterRun(job_name="fulfill_order", run_id=make_new_run_id(),
                               status=dg.DagsterRunStatus.STARTED, tags={"bitloot/order_id": orders[0]})
        batch = dg.DagsterRun(job_name="fulfill_backlog", run_id=make_new_run_id(),
                              status=dg.DagsterRunStatus.NOT_STARTED, run_config=backlog_config(orders[1:]))
        done = dg.DagsterRun(job_name="fulfill_order", run_id=make_new_run_id(),
                             status=dg.DagsterRunStatus.SUCCESS, tags={"bitloot/order_id": orders[2]})
        for run in (single, batch, done):
            instance.add_run(run)
        view = metrics.read_dagster(instance)
        assert time.time() - view.last_tick == pytest.approx(90, abs=5)
        assert view.in_flight == {orders[0]: single.run_id, orders[1]: batch.run_id, orders[2]: batch.run_id}
        assert view.runs == {("fulfill_order", "STARTED"): 1, ("fulfill_backlog", "NOT_STARTED"): 1}


def test_the_source_reads_once_per_cache_period(store_engine):
    now = [0.0]
    reads = []
    with dg.instance_for_test() as instance:
        source = MetricsSource(Store(store_engine), instance, ReconcileVariables(), cache_seconds=5,
                               clock=lambda: now[0])
        original = source._read
        source._read = lambda: reads.append(1) or original()
        first = source.snapshot()
        now[0] = 4.9
        assert source.snapshot() is first and len(reads) == 1
        now[0] = 5.0
        assert source.snapshot() is not first and len(reads) == 2
        assert first.board is not None and first.dagster is not None


def test_the_metrics_command_needs_a_dagster_home(store_url):
    from tests.test_cli_db import run_cli

    result = run_cli("metrics", "--port", "0", env={"DATABASE_URL": store_url, "DAGSTER_HOME": ""})
    assert result.returncode == 2
    assert "set DAGSTER_HOME" in result.stderr


def test_the_metrics_command_on_a_database_without_the_project_tables_says_what_to_do(empty_pg_url, tmp_path):
    from tests.test_cli_db import run_cli

    result = run_cli("metrics", "--port", "0", env={"DATABASE_URL": empty_pg_url, "DAGSTER_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert "run `bitloot-reconcile db upgrade` first" in result.stderr and "Traceback" not in result.stderr


def test_a_store_that_is_down_is_reported_down_and_read_again_at_the_next_scrape(store_engine):
    from bitloot_reconcile.store.engine import create_store_engine

    down = create_store_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nowhere")
    with dg.instance_for_test() as instance:
        source = MetricsSource(Store(down), instance, ReconcileVariables(), cache_seconds=0)
        with pytest.raises(sa.exc.OperationalError):
            source.prime()
        snapshot = source.snapshot()
        assert snapshot.board is None and snapshot.dagster is not None
        assert 'bitloot_reconcile_up{source="store"} 0.0' in exposition(snapshot)
        source.store = Store(store_engine)  # back: the next scrape primes and reads
        assert source.snapshot().board is not None
    down.dispose()
