"""The README's demo command, run as a user runs it: every seeded order must settle as expected."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from bitloot_reconcile.store.schema import orders
from tests.e2e.test_daemon import free_port, location_loaded


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
    rows = metadata["board"].md_str.strip().splitlines()[2:]  # the Markdown table below its header
    states = [row.split(" | ")[1] for row in rows]
    assert len(states) == metadata["dagster/row_count"].value == 5 and states.count("needing a person") == 3
    assert metadata["needs_attention_now"].value == 3 and metadata["recovered_24h"].value >= 9
    assert isinstance(metadata["payment_to_fulfilment_p95_minutes"], dg.FloatMetadataValue)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_command_line_works_against_a_running_demo_through_its_env_file(tmp_path):
    from click.testing import CliRunner
    from dotenv import dotenv_values

    from bitloot_reconcile.cli import main

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_HOME")}
    env_file, output = tmp_path / ".demo" / "env", tmp_path / "demo.out"
    with output.open("w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "bitloot_reconcile.cli", "demo", "--timeout", "240"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Variables for the command line written to .demo/env" not in output.read_text():
            assert demo.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.5)
        variables = dotenv_values(env_file)
        with sa.create_engine(variables["DATABASE_URL"]).connect() as conn:
            order_id = conn.execute(sa.select(orders.c.id).where(orders.c.status == "paid")).scalars().first()
        cli_env = {name: None for name in variables} | {"COLUMNS": "200"}  # only the file's values count

        plan = CliRunner().invoke(main, ["--env-file", str(env_file), "plan", order_id], env=cli_env)
        history = CliRunner().invoke(main, ["--env-file", str(env_file), "history", order_id], env=cli_env)

        assert plan.exit_code == 0, plan.output
        assert order_id in plan.output and "next run per order" in plan.output
        assert history.exit_code == 0, history.output
        assert f"order {order_id}" in history.output
        assert "audit table only" not in history.output  # DAGSTER_HOME came from the file
        assert env_file.stat().st_mode & 0o077 == 0
        assert env_file.read_text().startswith("# Written by `bitloot-reconcile demo`")
        assert set(variables) >= {"DATABASE_URL", "DAGSTER_HOME", "KINGUIN_BASE_URL", "KINGUIN_API_KEY",
                                  "NOWPAYMENTS_BASE", "R2_ENDPOINT", "RESEND_BASE_URL", "RECONCILE_GRACE_MINUTES"}
    finally:
        demo.send_signal(signal.SIGINT)  # the demo stops its dagster-daemon and stand-ins on Ctrl-C
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


def _children() -> dict[int, int]:
    """pid -> parent pid of every process on the machine, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # The command may hold spaces and parentheses: the fields after its closing one are fixed.
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return parents


def _descendants(pid: int) -> set[int]:
    parents, found, frontier = _children(), set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stopping_the_demo_stops_every_process_it_started_within_10_s(tmp_path, sig):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_HOME")}
    port, output = free_port(), tmp_path / "demo.out"
    with output.open("w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "bitloot_reconcile.cli", "demo", "--ui", "--port", str(port),
                                 "--timeout", "240"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        # Everything is up: SeaweedFS, dagster dev, its webserver, daemon and code server.
        while not location_loaded(port, "bitloot_reconcile.definitions"):
            assert demo.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(1)
        started = _descendants(demo.pid)
        assert len(started) >= 4, started  # weed, dagster dev, its webserver and daemon, at least

        demo.send_signal(sig)  # to the demo alone, as `kill` does (Ctrl-C in a terminal reaches its group)
        signalled = time.monotonic()
        demo.wait(timeout=10)
        while [pid for pid in started if _alive(pid)] and time.monotonic() < signalled + 10:
            time.sleep(0.2)
        assert [pid for pid in started if _alive(pid)] == [], "outlived the demo"
        print(f"demo and its {len(started)} processes gone {time.monotonic() - signalled:.1f} s after {sig.name}")
    finally:  # whatever a failed check left behind
        for pid in [demo.pid, *started]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
