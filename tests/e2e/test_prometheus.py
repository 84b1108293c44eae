"""A real Prometheus (Debian's package) scrapes `bitloot-reconcile metrics`, run as its own process with the
project's restricted role, while a test world's stuck orders are worked; Prometheus's HTTP API must show what
the board shows and the counters must rise by what the runs did. The scrape job and the alert rules are the
repository's own (deploy/prometheus/), loaded by that Prometheus."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bitloot_reconcile.domain.board import BoardState, load_board
from bitloot_reconcile.store.repository import Store, utcnow
from tests.e2e.test_daemon import Processes, free_port
from tests.fixtures.world import World

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def wait_until(what: str, check, procs: Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    tails = "\n".join(f"--- {name}\n{procs.tail(name)}" for name in procs.procs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


class PrometheusApi:
    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url, timeout=5)

    def values(self, query: str) -> dict[tuple, float]:
        """The instant vector of `query`, by its labels (job and instance left out)."""
        answer = self.client.get("/api/v1/query", params={"query": query}).raise_for_status().json()
        assert answer["status"] == "success", answer
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("job", "instance"))):
                float(r["value"][1]) for r in answer["data"]["result"]}

    def value(self, query: str) -> float | None:
        found = self.values(query)
        assert len(found) <= 1, found
        return next(iter(found.values()), None)


def prometheus_config(target: str, rules: Path) -> dict:
    """The repository's scrape job for BitLoot's prometheus.yml, aimed at `target`, scraping every second."""
    snippet = yaml.safe_load((PROMETHEUS_DIR / "prometheus.bitloot-reconcile.yml").read_text())
    (job,) = snippet["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [target]}])
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)], "scrape_configs": [job]}


@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="Debian's prometheus package is not installed "
                    "(.ci/run installs it)")
def test_prometheus_sees_the_board_and_the_counters_rise_by_what_the_runs_did(world: World, dagster_instance,
                                                                              tmp_path):
    products = [world.product(price=5.0) for _ in range(2)]
    good = [world.order([products[n % 2]], age=dt.timedelta(minutes=20 + n)) for n in range(4)]
    refused = world.order([world.product(price=9.0, cost=5.0)], age=dt.timedelta(minutes=40))  # Kinguin too dear
    world.run(world.order([products[0]], age=dt.timedelta(minutes=50)))  # fulfilled before the metrics start

    metrics_port, prometheus_port = free_port(), free_port()
    env = {**os.environ, "DATABASE_URL": world.store_url, "DAGSTER_HOME": dagster_instance.root_directory}
    env.pop("DAGSTER_WEBSERVER_URL", None)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{metrics_port}",
                                                       PROMETHEUS_DIR / "bitloot-reconcile.rules.yml")))
    procs = Processes(tmp_path)
    procs.start("metrics", [sys.executable, "-c", "from bitloot_reconcile.cli import main; main()", "metrics",
                            "--host", "127.0.0.1", "--port", str(metrics_port), "--cache-seconds", "1"], env)
    procs.start("prometheus", [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{prometheus_port}"], dict(os.environ))
    api = PrometheusApi(f"http://127.0.0.1:{prometheus_port}")
    board_store = Store(world.engine)

    def board_now():
        return load_board(board_store, in_flight={}, now=utcnow(), grace=dt.timedelta(minutes=10),
                          max_age=dt.timedelta(days=7), with_trend=False)

    try:
        wait_until("Prometheus to scrape the metrics endpoint", lambda: api.value(
            'up{job="bitloot-reconcile"}') == 1 and api.value("bitloot_reconcile_stuck_orders") is not None,
            procs, timeout=90)
        before = board_now()
        assert len(before.stuck) == 5
        assert api.value("bitloot_reconcile_stuck_orders") == len(before.stuck)
        by_state = api.values("bitloot_reconcile_board_orders")
        assert {dict(k)["state"]: v for k, v in by_state.items()} == before.counts()
        assert api.value("bitloot_reconcile_needs_attention_orders") == 0
        assert api.value('bitloot_reconcile_up{source="store"}') == 1
        assert api.value('bitloot_reconcile_up{source="dagster"}') == 1
        oldest = api.value("bitloot_reconcile_oldest_stuck_order_age_seconds")
        assert abs(oldest - before.oldest_stuck.age.total_seconds()) < 30
        fulfilled_before = api.value("bitloot_reconcile_orders_fulfilled_total")
        assert fulfilled_before == 1  # the audit's total so far, read once at start
        refusals_before = api.value('bitloot_reconcile_outside_call_failures_total{service="kinguin",kind="refused"}')

        # Work the orders as the sweep would above its threshold: one batch run, while Prometheus scrapes.
        result = world.batch([*good, refused])
        assert result.success

        after = board_now()
        assert len(after.stuck) == 0 and [r.order_id for r in after.rows] == [refused]
        wait_until("the fulfilled counter to rise", lambda: api.value(
            "bitloot_reconcile_orders_fulfilled_total") == fulfilled_before + len(good), procs)
        assert api.value("increase(bitloot_reconcile_orders_fulfilled_total[10m])") > 0
        wait_until("the stuck-orders gauge to follow the board",
                   lambda: api.value("bitloot_reconcile_stuck_orders") == len(after.stuck), procs)
        assert api.value("bitloot_reconcile_needs_attention_orders") == after.count(BoardState.NEEDS_ATTENTION) == 1
        assert api.value('bitloot_reconcile_outside_call_failures_total{service="kinguin",kind="refused"}') \
            == refusals_before + 1
        outcomes = {dict(k)["outcome"]: v for k, v in
                    api.values('bitloot_reconcile_outcomes_total{trigger="sensor"}').items()}
        assert outcomes["fulfilled"] == len(good) and outcomes["needs_attention"] == 1
        # The sweep never ticked on this instance: its age is +Inf, so the rule that watches it fires.
        assert api.value("bitloot_reconcile_sweep_last_tick_age_seconds") == float("inf")
        wait_until("the sweep alert to fire", lambda: any(
            a["labels"]["alertname"] == "BitLootSweepStopped" and a["state"] == "firing" for a in
            api.client.get("/api/v1/alerts").json()["data"]["alerts"]), procs)

        # Every metric the dashboard's panels and the alert rules query is one Prometheus scraped.
        names = set(api.client.get("/api/v1/label/__name__/values").json()["data"])
        from tests.test_metrics import queried_metrics

        assert queried_metrics() <= names
        metrics = procs.procs["metrics"]
        metrics.send_signal(signal.SIGTERM)
        assert metrics.wait(timeout=20) == 0, procs.tail("metrics")  # SIGTERM ends it cleanly
    finally:
        procs.stop()
