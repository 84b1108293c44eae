"""`order_attempts` with many partitions, on Dagster's PostgreSQL storage (as dagster.yaml configures it).

For each size (partitions already there, `--sizes`), on one Dagster database grown from one size to the next:
- the partitions are added in bulk (SQL into Dagster's `dynamic_partitions`, the rows `add_dynamic_partitions`
  writes) with one materialization each (copies of one event Dagster recorded itself into `event_logs`, its
  partition replaced): every order a run worked has its partition and at least one attempt;
- measured, warm, the median of `--reps`: adding one new partition (a per-order run) and 300 (a batch), as
  `order_history.add_order_partitions` does; recording one attempt's event on a partition; removing a partition
  (`order_history.remove_order_partitions`, what `prune_order_history` does, timed over 100); reading the partition
  list (`get_dynamic_partitions`, what a partitions definition resolves to) and the materialized partitions;
- in headless Chromium, against a `dagster-webserver` of this Dagster storage: the asset's page (its partitions
  tab, which lists every partition with its status) and one partition's history (the asset's events, filtered to
  that partition), each loaded until its content shows (or `--page-timeout` passes), cold then warm.

With `--prune-to N`, after the last size every partition but the newest N is removed (one DELETE of the rows
`remove_order_partitions` deletes one at a time; the events stay) and everything is measured again: what the
pruning policy leaves. Wall times on a shared machine: the load average is printed with them.

Usage: BENCH_PG_SERVER_URL=postgresql+psycopg://postgres@127.0.0.1:PORT \
       uv run python benchmarks/order_history_scale.py [--sizes 0,100000,1000000] [--reps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from _harness import REPO_ROOT, console, median, print_machine, print_table, temp_database, timed
from backlog_drain import free_port, wait_port

from bitloot_reconcile.assets.order_history import (
    ORDER_ATTEMPTS_KEY,
    ORDER_IDS,
    add_order_partitions,
    attempt_event,
    remove_order_partitions,
)

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TEMPLATE = "00000000-0000-4000-8000-000000000000"

ADD_PARTITIONS_SQL = """
INSERT INTO dynamic_partitions (partitions_def_name, partition, create_timestamp)
SELECT :name, gen_random_uuid()::text, now() - (g * interval '1 second') FROM generate_series(1, :count) AS g
"""
# One copy of the template event per partition that has none (the ones just added).
COPY_EVENTS_SQL = """
INSERT INTO event_logs (run_id, event, dagster_event_type, timestamp, step_key, asset_key, partition)
SELECT e.run_id, replace(e.event, :template, p.partition), e.dagster_event_type, e.timestamp, e.step_key,
       e.asset_key, p.partition
FROM event_logs e, dynamic_partitions p
WHERE e.partition = :template AND p.partitions_def_name = :name AND p.id > :after
"""


# What `remove_order_partitions` does one key at a time (Dagster deletes the `dynamic_partitions` row only), in one
# statement: every partition but the newest `keep` (and the one whose page is loaded).
PRUNE_SQL = """
DELETE FROM dynamic_partitions WHERE partitions_def_name = :name AND partition <> :template
  AND id < (SELECT min(id) FROM (SELECT id FROM dynamic_partitions WHERE partitions_def_name = :name
                                 ORDER BY id DESC LIMIT :keep) AS newest)
"""


def grow(engine: sa.Engine, instance: dg.DagsterInstance, count: int) -> float:
    """`count` more partitions, one event each; returns the seconds it took. One last event recorded through
    Dagster moves the asset's latest event past the copies, so its partition status cache reads them."""
    started = time.monotonic()
    with engine.begin() as conn:
        after = conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM dynamic_partitions")).scalar_one()
        conn.execute(sa.text(ADD_PARTITIONS_SQL), {"name": ORDER_IDS.name, "count": count})
        conn.execute(sa.text(COPY_EVENTS_SQL), {"name": ORDER_IDS.name, "template": TEMPLATE, "after": after})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("dynamic_partitions", "event_logs"):
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
    record(instance, TEMPLATE)
    return time.monotonic() - started


def record(instance: dg.DagsterInstance, order_id: str) -> None:
    """One attempt's event on the order's partition, as a run reports it (here without a run)."""
    instance.report_runless_asset_event(attempt_event(
        order_id, outcome="fulfilled", reason="keys stored and email sent", trigger="sensor",
        actor="sensor:stuck_orders", run_id=str(uuid.uuid4()), job="fulfill_backlog"))


def measure_storage(instance: dg.DagsterInstance, reps: int) -> dict[str, float]:
    adds, batches, records, removals = [], [], [], []
    for _ in range(reps):
        adds.append(timed(lambda: add_order_partitions(instance, [str(uuid.uuid4())]))[0])
        batch = [str(uuid.uuid4()) for _ in range(300)]
        batches.append(timed(lambda b=batch: add_order_partitions(instance, b))[0])
        records.append(timed(lambda b=batch: record(instance, b[0]))[0])
        removals.append(timed(lambda b=batch: remove_order_partitions(instance, b[1:101]))[0] / 100)
    keys_s, keys = timed(lambda: instance.get_dynamic_partitions(ORDER_IDS.name))
    done_s, done = timed(lambda: instance.get_materialized_partitions(ORDER_ATTEMPTS_KEY))
    return {"add one": median(adds), "add 300": median(batches), "record": median(records),
            "remove one (of 100)": median(removals),
            "list partitions": keys_s, "materialized partitions": done_s, "partitions": len(keys),
            "materialized": len(done)}


@contextlib.contextmanager
def webserver(home: Path, env: dict[str, str], logs: Path):
    port = free_port()
    log = (logs / f"webserver_{port}.log").open("wb")
    proc = subprocess.Popen([str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                             "-m", "bitloot_reconcile.definitions"], cwd=REPO_ROOT,
                            env={**env, "DAGSTER_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_port(port, proc, timeout=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def page_load(browser, url: str, ready: str, timeout_ms: int, shot: Path) -> float | None:
    """Seconds from navigation until `ready` (a text) shows; None when it never did within the timeout."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        started = time.monotonic()
        page.goto(url, timeout=timeout_ms)
        with contextlib.suppress(Exception):  # Dagster's newsletter prompt, shown once per browser profile
            page.get_by_role("button", name="Skip").click(timeout=3000)
        try:
            page.get_by_text(ready, exact=False).first.wait_for(timeout=timeout_ms)
            seconds = time.monotonic() - started
        except Exception:  # noqa: BLE001 -- a page that never shows its content is a figure, not a crash
            seconds = None
        with contextlib.suppress(Exception):  # the prompt may come up only once the page has loaded
            page.get_by_role("button", name="Skip").click(timeout=1000)
        page.screenshot(path=str(shot))
        return seconds
    finally:
        page.close()


def measure_pages(browser, base: str, partition: str, timeout_ms: int, shots: Path, n: int) -> dict[str, object]:
    asset = f"{base}/assets/{ORDER_ATTEMPTS_KEY.to_user_string()}"
    # Ready when the partitions are counted, and when the partition's latest attempt shows with its reason.
    pages = {"asset page (partitions)": (f"{asset}?view=partitions", "Partitions Selected"),
             "one partition's history": (f"{asset}?view=partitions&partition={partition}",
                                         "keys stored and email sent")}
    found = {}
    for name, (url, ready) in pages.items():
        for attempt in ("cold", "warm"):
            shot = shots / f"{n}_{name.split()[0]}_{attempt}.png"
            found[f"{name} {attempt}"] = page_load(browser, url, ready, timeout_ms, shot)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,100000,1000000")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--page-timeout", type=float, default=120.0, help="seconds")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--browser-max", type=int, default=10**9,
                        help="load the pages only at sizes up to this many partitions")
    parser.add_argument("--prune-to", type=int, default=0,
                        help="after the last size, remove all but this many partitions (the newest) and measure again")
    args = parser.parse_args()
    print_machine()
    logs = Path(tempfile.mkdtemp(prefix="order_history_scale_"))
    home = Path(tempfile.mkdtemp(prefix="order_history_home_"))
    results: dict[str, dict] = {}
    with temp_database("bench_history_dagster") as url, contextlib.ExitStack() as stack:
        pg_url = url.replace("postgresql+psycopg://", "postgresql+psycopg2://")
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
        env = {**os.environ, "DAGSTER_PG_URL": pg_url}
        os.environ["DAGSTER_PG_URL"] = pg_url
        instance = stack.enter_context(dg.DagsterInstance.from_config(str(home)))
        engine = sa.create_engine(url)
        stack.callback(engine.dispose)
        add_order_partitions(instance, [TEMPLATE])
        record(instance, TEMPLATE)
        browser = None
        if not args.no_browser:
            from playwright.sync_api import sync_playwright
            playwright = stack.enter_context(sync_playwright())
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            stack.callback(browser.close)
        have = 0
        steps = [(int(x), False) for x in args.sizes.split(",")] + ([(args.prune_to, True)] if args.prune_to else [])
        for n, pruning in steps:
            if pruning:
                started = time.monotonic()
                with engine.begin() as conn:
                    conn.execute(sa.text(PRUNE_SQL), {"name": ORDER_IDS.name, "template": TEMPLATE, "keep": n})
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.exec_driver_sql("VACUUM ANALYZE dynamic_partitions")
                seeded = time.monotonic() - started
            else:
                seeded = grow(engine, instance, n - have) if n > have else 0.0
            figures = {"seeding": seeded, **measure_storage(instance, args.reps)}
            have = figures["partitions"]
            with engine.connect() as conn:
                figures["MB"] = conn.exec_driver_sql(
                    "SELECT (pg_total_relation_size('dynamic_partitions') + pg_total_relation_size('event_logs'))"
                    " / 1048576.0").scalar()
            if browser is not None and n <= args.browser_max:
                with webserver(home, env, logs) as base:
                    figures.update(measure_pages(browser, base, TEMPLATE, int(args.page_timeout * 1000), logs, n))
            label = f"{n:,} after removing the rest" if pruning else f"{n:,}"
            results[label] = figures
            console.print(f"{label}: {figures} (load {os.getloadavg()[0]:.1f})", highlight=False)
    columns = ["seeding", "add one", "add 300", "record", "remove one (of 100)", "list partitions",
               "materialized partitions",
               *dict.fromkeys(k for r in results.values() for k in r if k.endswith(("cold", "warm")))]

    def cell(value) -> str:
        if value is None:
            return "did not show"
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.1f} s"

    print_table("order_attempts on Dagster's PostgreSQL storage (wall, median of the repetitions)",
                ["partitions", "materialized", "storage MB", *columns],
                [[label, f"{r['materialized']:,}", f"{r['MB']:.0f}", *(cell(r[c]) if c in r else "-" for c in columns)]
                 for label, r in results.items()])
    console.print(f"screenshots and webserver logs: {logs}", highlight=False)
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
