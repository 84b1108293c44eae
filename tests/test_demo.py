"""The README's demo command, run as a user runs it: every seeded order must settle as expected."""

import os
import subprocess
import sys

import dagster as dg
import pytest


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_demo_settles_every_order(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_HOME")}
    # As `make demo` runs it: the default, relative `--dir .demo`, from the working directory.
    result = subprocess.run(
        [sys.executable, "-m", "bitloot_reconcile.cli", "demo", "--timeout", "420"],
        cwd=tmp_path,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "every order settled as expected" in result.stdout
    for scenario in ("webhook missed", "response lost", "R2 outage", "email outage", "supplier canceled",
                     "partial keys", "unpaid", "already fulfilled", "Kinguin switched off", "bounced address"):
        assert scenario in result.stdout
    # The board was materialised at the end: its page shows the table and the plotted figures.
    assert "The stuck-orders board: asset order_backlog" in result.stdout
    home = tmp_path / ".demo" / "dagster_home"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("order_backlog"))
    metadata = event.asset_materialization.metadata
    # Left: the three that need a person, the partial delivery and the unpaid order (their states move on
    # with their next attempts: waiting, due or in flight).
    states = [record.data["state"] for record in metadata["board"].records]
    assert len(states) == metadata["dagster/row_count"].value == 5 and states.count("needs_attention") == 3
    assert metadata["needs_attention_now"].value == 3 and metadata["recovered_24h"].value >= 9
    assert isinstance(metadata["payment_to_fulfilment_p95_minutes"], dg.FloatMetadataValue)
