"""The production layout on separate hosts (`bitloot_standins.hosts`, one network namespace per role):
admin retries through the proxy with dagster-celery's CeleryRunLauncher on warm workers against Dagster's default
launcher (a new run-worker process per run on the code server's host), and a backlog drained on one vs two
worker hosts.

1. Admin retry, launch to outcome: a new order (not yet due for the sweep) is retried through nginx as the CLI's
   `retry` would (GraphQL `launchRun`, admin's credentials); the time until Dagster records the run finished
   (its row in Dagster's database, polled every 50 ms). One at a time, at idle, the simulators answering every
   call after 50 ms. Two warm-up retries first (the Celery workers' first run loads what the import did not).
2. CPU per `fulfill_order` run: the CPU time of every process on every host (daemon, code server, webservers,
   nginx, Celery workers and their processes, run workers, PostgreSQL with its backends, SeaweedFS, redis) over
   those retries, divided by their number; "net" subtracts what the same processes burn idle (sensor ticks, the
   daemon's loops) over as long, measured just before. The simulators (threads of this script) are not counted.
3. Backlog drain (`--drain N`, Celery only): N stuck orders drained by the sweep's `fulfill_backlog` batches and
   per-order runs on one, then two, worker hosts (a fresh layout each); wall time and CPU per order.

Usage: uv run python benchmarks/hosts.py [--retries 20] [--drain 200] [--celery-only] [--no-retries]
(as root: it needs `ip netns`)
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time

import sqlalchemy as sa
from _harness import console, print_machine, print_table

from bitloot_reconcile.store.schema import orders
from bitloot_standins.hosts import Layout, LayoutSettings, production_layout, why_namespaces_unavailable
from bitloot_standins.httpserver import Fault
from bitloot_standins.seed import insert_order

API_LATENCY = 0.05
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
IDLE_SECONDS = 20.0
# Drain: the sweep every 5 s (30 s in production), batches above 10 due orders of at most 25 each.
DRAIN_ENV = {"RECONCILE_SWEEP_INTERVAL_SECONDS": "5", "RECONCILE_BATCH_THRESHOLD": "10",
             "RECONCILE_BATCH_MAX_ORDERS": "25", "RECONCILE_MAX_RUNS_PER_TICK": "25"}


def slow_apis(layout: Layout) -> None:
    """Every call a fulfil run makes to the stand-in APIs answered after API_LATENCY."""
    for sim, routes in ((layout.kinguin, ("place_order_v2", "search_orders", "get_order", "get_keys", "get_product")),
                        (layout.resend, ("send_email",)), (layout.nowpayments, ("get_payment",))):
        for route in routes:
            sim.inject(route, Fault(times=1_000_000, latency=API_LATENCY))


def retry_once(layout: Layout, dagster_db: sa.Engine, product) -> float:
    order_id = insert_order(layout.engine, [product], age=dt.timedelta(minutes=1))  # not yet due for the sweep
    started = time.perf_counter()
    run_id = layout.retry(order_id, "benchmark", "ops@bitloot.io")
    # Polled in Dagster's database, not through the webserver: 50 ms GraphQL polls would cost the webserver
    # more CPU than the run.
    status_of = sa.text("SELECT status FROM runs WHERE run_id = :id")
    while True:
        with dagster_db.connect() as conn:
            status = conn.execute(status_of, {"id": run_id}).scalar_one()
        if status in FINISHED:
            break
        time.sleep(0.05)
    took = time.perf_counter() - started
    if status != "SUCCESS":
        raise RuntimeError(f"retry run {run_id} ended {status}")
    return took


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[q // 10 - 1] if len(values) > 1 else values[0]


def admin_retries(celery: bool, retries: int) -> list[object]:
    settings = LayoutSettings(worker_hosts=2 if celery else 0, celery=celery)
    with production_layout(settings) as layout:
        slow_apis(layout)
        product = layout.product()
        dagster_db = sa.create_engine(layout.dagster_url, pool_size=1)
        for _ in range(2):
            retry_once(layout, dagster_db, product)
        time.sleep(3)
        idle_from = layout.cpu_seconds()
        time.sleep(IDLE_SECONDS)
        idle_rate = used_since(layout, idle_from) / IDLE_SECONDS
        cpu_from, wall_from = layout.cpu_seconds(), time.perf_counter()
        latencies = [retry_once(layout, dagster_db, product) for _ in range(retries)]
        time.sleep(2)  # the last run's final writes
        cpu, wall = used_since(layout, cpu_from), time.perf_counter() - wall_from
        per_host = used_by_host(layout, cpu_from)
        dagster_db.dispose()
    name = "Celery, warm workers (2 hosts)" if celery else "default launcher (process per run)"
    hosts = ", ".join(f"{role} {seconds / retries:.2f}" for role, seconds in per_host.items() if seconds >= 0.01)
    return [name, retries, f"{statistics.median(latencies):.2f} s", f"{percentile(latencies, 90):.2f} s",
            f"{cpu / retries:.2f} s", f"{(cpu - idle_rate * wall) / retries:.2f} s", f"{idle_rate:.2f}", hosts]


def used_by_host(layout: Layout, since: dict[str, float]) -> dict[str, float]:
    return {role: seconds - since[role] for role, seconds in layout.cpu_seconds().items()}


def used_since(layout: Layout, since: dict[str, float]) -> float:
    return sum(used_by_host(layout, since).values())


def settled(layout: Layout, order_ids: list[str]) -> int:
    with layout.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(orders).where(
            orders.c.id.in_(order_ids), orders.c.status == "fulfilled", orders.c.completionEmailSent)).scalar_one()


def drain(worker_hosts: int, n: int) -> list[object]:
    settings = LayoutSettings(worker_hosts=worker_hosts, env=DRAIN_ENV)
    with production_layout(settings) as layout:
        slow_apis(layout)
        product = layout.product()
        time.sleep(3)
        cpu_from, started = layout.cpu_seconds(), time.perf_counter()
        backlog = [insert_order(layout.engine, [product], age=dt.timedelta(minutes=30)) for _ in range(n)]
        while (done := settled(layout, backlog)) < n:
            if time.perf_counter() - started > 60 + 5 * n:
                raise RuntimeError(f"{done} of {n} orders settled after {time.perf_counter() - started:.0f} s")
            time.sleep(1)
        wall, cpu = time.perf_counter() - started, used_since(layout, cpu_from)
    return [f"{worker_hosts} worker host(s)", n, f"{wall:.0f} s", f"{n / wall:.2f}", f"{cpu / n:.2f} s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retries", type=int, default=20)
    parser.add_argument("--drain", type=int, default=0, help="orders in the backlog drain (0: no drain)")
    parser.add_argument("--no-retries", action="store_true", help="the drain only")
    parser.add_argument("--celery-only", action="store_true", help="retries with the Celery launcher only")
    args = parser.parse_args()
    reason = why_namespaces_unavailable()
    if reason:
        raise SystemExit(f"this benchmark needs network namespaces: {reason}")
    print_machine()
    launchers = (True,) if args.celery_only else (True, False)
    rows = [] if args.no_retries else [admin_retries(celery, args.retries) for celery in launchers]
    if rows:
        print_table(f"Admin retry through the proxy, launch to outcome (APIs at {API_LATENCY * 1000:.0f} ms), and "
                    "CPU per fulfill_order run, every host's processes counted",
                    ["launcher", "retries", "p50", "p90", "CPU/run", "CPU/run net of idle", "idle CPU-s/s",
                     "CPU-s/run by host"], rows)
    if args.drain:
        print_table(f"Backlog drain ({args.drain} orders, Celery; {DRAIN_ENV})",
                    ["layout", "orders", "wall", "orders/s", "CPU/order"],
                    [drain(hosts, args.drain) for hosts in (1, 2)])
    console.print(f"(2 cores shared; Celery workers run 1 process per host; simulators at {API_LATENCY}s)")


if __name__ == "__main__":
    main()
