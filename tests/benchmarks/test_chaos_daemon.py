"""The chaos run through the daemon (`benchmarks/chaos_daemon.py`), small: batches and per-order runs made by the
real dagster-daemon, killed batches, racing runs, switches flipped, a SeaweedFS outage, and both PostgreSQL
databases restarted and cut off, on clusters of the test's own. Every violation count must be zero; the table is
printed either way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import chaos_daemon  # noqa: E402  (benchmarks/ is not a package; its scripts import each other by name)

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(600)
def test_small_chaos_run_through_the_daemon_has_no_violation(capsys):
    report = chaos_daemon.chaos_run(chaos_daemon.Settings(orders=12, seed=2, batch_threshold=2, deadline=420))
    with capsys.disabled():
        chaos_daemon.print_report(report)
    assert any(k.job == "fulfill_backlog" for k in report.kills)
    assert {"restart BitLoot's database", "restart Dagster's database", "cut BitLoot's connections",
            "cut Dagster's connections", "flip a switch", "SeaweedFS outage"} <= set(report.tally.events)
    assert report.tally.event_failures == []
    assert sum(report.faults.values()) > 0 and sum(report.tally.races.values()) > 0
    assert {k: v for k, v in report.violations.items() if v} == {}
