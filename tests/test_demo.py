"""The README's demo command, run as a user runs it: every seeded order must settle as expected."""

import os
import subprocess
import sys

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
