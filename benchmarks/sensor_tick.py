"""Sensor tick cost on PostgreSQL with 10k and with 1M orders (docs/design.md section 10: 1M within 1.2x of 10k).

Each size gets its own database: the project's migrations on an empty database (BitLoot's tables and the
project's indexes), a bulk `INSERT ... SELECT generate_series` of two years of order history, the same fixed set
of recent orders in both sizes, then VACUUM ANALYZE (what autovacuum leaves behind). Two phases:

1. orders history only: reconcile_state holds just the recent orders' rows (a project freshly installed);
2. + reconcile_state history: one row per order the project ever recovered (3% of the fulfilled history), since
   the project never deletes those rows, so this table grows with the history too.

In each phase, measured warm and with the sizes interleaved call by call (the 2 cores are shared):
- `Store.find_stuck_orders` wall time, the sensor's one store query;
- a whole `stuck_orders_sensor` evaluation (`build_sensor_context` + the sensor, on `instance_for_test`);
- EXPLAIN (ANALYZE, BUFFERS) of the exact statement `find_stuck_orders` sends, captured from the engine: which
  indexes serve it (the project's two `orders` indexes, `ix_reconcile_state_blocking`, the state primary key)
  and whether any table is read by a sequential scan.

Usage: uv run python benchmarks/sensor_tick.py [--sizes 10000,1000000] [--reps 60]
"""

from __future__ import annotations

import argparse
import datetime as dt
from contextlib import ExitStack
from dataclasses import dataclass, field

import dagster as dg
import sqlalchemy as sa
from _harness import console, median, migrated_store, ms, print_machine, print_table, spread, timed

from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.repository import Store, utcnow
from tests.fixtures.definitions import stuck_orders_sensor

POLICY = RecoveryPolicyResource()  # grace 10 min, max age 30 days, 25 runs per tick
STUCK, EMAIL_PENDING, IN_GRACE = 200, 50, 100
PHASES = ("orders history only", "+ reconcile_state history")

# Two years of history. Statuses the sweep looks at (failed, paid, fulfilled without email) occur in the history
# only outside the 30-day window, so both sizes hold the same due orders; they still sit in the project's
# indexes, so a scan that ignored the window bounds would show up as size-dependent cost.
HISTORY_SQL = """
INSERT INTO orders (id, email, "sourceType", status, "totalCrypto", "completionEmailSent", "createdAt", "updatedAt")
SELECT gen_random_uuid(), 'buyer' || g || '@example.com', 'kinguin',
       CASE WHEN r < 78 THEN 'fulfilled' WHEN r < 94 THEN 'expired' WHEN r < 96 THEN 'underpaid'
            WHEN r < 97 THEN 'refunded' WHEN r < 98 THEN 'cancelled'
            WHEN r < 99 THEN CASE WHEN t < :window_start THEN 'failed' ELSE 'expired' END
            ELSE CASE WHEN t < :window_start THEN 'paid' ELSE 'fulfilled' END END,
       9.99, NOT (g % 1000 = 0 AND t < :window_start), t - interval '5 minutes', t
FROM (SELECT g, g % 100 AS r, CAST(:now AS timestamp) - interval '1 hour' - (g::float8 / :n) * interval '730 days' AS t
      FROM generate_series(1, :n) AS g) AS s
"""
# The same in both sizes: 200 stuck (paid/waiting/confirming/failed, 15 min to 14 days old), 50 fulfilled without
# the email, 100 still inside the grace period; some stuck ones are backing off, leased or need a person.
RECENT_SQL = f"""
INSERT INTO orders (id, email, "sourceType", status, "totalCrypto", "completionEmailSent", "createdAt", "updatedAt")
SELECT gen_random_uuid(), 'stuck' || i || '@example.com', 'kinguin',
       (ARRAY['paid','waiting','confirming','failed'])[1 + i % 4], 9.99, false,
       t - interval '5 minutes', t
FROM (SELECT i, CAST(:now AS timestamp) - interval '15 minutes' - i * interval '100 minutes' AS t
      FROM generate_series(1, {STUCK}) AS i) AS s;
INSERT INTO orders (id, email, "sourceType", status, "totalCrypto", "completionEmailSent", "createdAt", "updatedAt")
SELECT gen_random_uuid(), 'noemail' || i || '@example.com', 'kinguin', 'fulfilled', 9.99, false, t, t
FROM (SELECT i, CAST(:now AS timestamp) - interval '20 minutes' - i * interval '5 hours' AS t
      FROM generate_series(1, {EMAIL_PENDING}) AS i) AS s;
INSERT INTO orders (id, email, "sourceType", status, "totalCrypto", "completionEmailSent", "createdAt", "updatedAt")
SELECT gen_random_uuid(), 'fresh' || i || '@example.com', 'kinguin',
       (ARRAY['paid','waiting','confirming'])[1 + i % 3], 9.99, false, t, t
FROM (SELECT i, CAST(:now AS timestamp) - i * interval '3 seconds' AS t
      FROM generate_series(1, {IN_GRACE}) AS i) AS s;
INSERT INTO reconcile_state (order_id, attempts, next_attempt_at, lease_owner, lease_expires_at, last_outcome)
SELECT o.id, 1 + n % 5,
       CASE WHEN n % 10 = 1 THEN now() + interval '30 minutes' END,
       CASE WHEN n % 20 = 3 THEN 'run-bench' END,
       CASE WHEN n % 20 = 3 THEN now() + interval '10 minutes' END,
       CASE WHEN n % 10 = 2 THEN 'needs_attention' ELSE 'waiting_for_supplier' END
FROM orders o, LATERAL (SELECT substring(o.email from 'stuck([0-9]+)@')::int AS n) AS m
WHERE o.email LIKE 'stuck%' AND m.n % 10 IN (1, 2, 3, 4)
"""
STATE_HISTORY_SQL = """
INSERT INTO reconcile_state (order_id, attempts, last_outcome, last_run_id, created_at, updated_at)
SELECT id, 1, 'fulfilled', 'run-' || left(email, 20), "updatedAt" AT TIME ZONE 'UTC', "updatedAt" AT TIME ZONE 'UTC'
FROM orders WHERE email LIKE 'buyer%' AND status = 'fulfilled' AND abs(hashtext(email)) % 100 < 3
"""


def run_sql(engine: sa.Engine, script: str, **params) -> float:
    with engine.begin() as conn:
        seconds = sum(timed(lambda st=st: conn.execute(sa.text(st), params))[0]
                      for st in script.split(";") if st.strip())
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("orders", "reconcile_state"):
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
    return seconds


def load(engine: sa.Engine, n: int) -> tuple[float, float]:
    """Returns the bulk insert's seconds and the orders table's size with its indexes (MB)."""
    now = utcnow().replace(tzinfo=None)
    window_start = now - dt.timedelta(days=POLICY.max_age_days + 1)
    seconds = run_sql(engine, HISTORY_SQL, now=now, n=n - STUCK - EMAIL_PENDING - IN_GRACE, window_start=window_start)
    run_sql(engine, RECENT_SQL, now=now)
    with engine.connect() as conn:
        size = conn.exec_driver_sql("SELECT pg_total_relation_size('orders')").scalar()
    return seconds, size / 2**20


def find(store: Store) -> list:
    return store.find_stuck_orders(now=utcnow(), grace=dt.timedelta(minutes=POLICY.grace_minutes),
                                   max_age=dt.timedelta(days=POLICY.max_age_days), limit=POLICY.max_runs_per_tick)


def capture_query(engine: sa.Engine, store: Store) -> tuple[str, dict]:
    """The statement and parameters `find_stuck_orders` sends, exactly as the driver gets them."""
    seen: list[tuple[str, dict]] = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", grab)
    try:
        find(store)
    finally:
        sa.event.remove(engine, "before_cursor_execute", grab)
    return seen[-1]


def plan_lines(node: dict, depth: int = 0) -> list[str]:
    where = node.get("Index Name") or node.get("Relation Name") or ""
    cond = node.get("Index Cond") or node.get("Recheck Cond") or node.get("Hash Cond") or ""
    join = f" ({node['Join Type']})" if node.get("Join Type", "Inner") != "Inner" else ""
    line = (f"{'  ' * depth}{node['Node Type']}{join}{' on ' + where if where else ''}: rows={node.get('Actual Rows')}"
            f" x{node.get('Actual Loops')}, buffers hit={node.get('Shared Hit Blocks', 0)}"
            f" read={node.get('Shared Read Blocks', 0)}"
            + (f", removed by filter={node['Rows Removed by Filter']}" if node.get("Rows Removed by Filter") else "")
            + (f"  [{cond[:90]}]" if cond else ""))
    return [line] + [x for child in node.get("Plans", []) for x in plan_lines(child, depth + 1)]


def explain(engine: sa.Engine, statement: str, parameters: dict) -> dict:
    """EXPLAIN (ANALYZE, BUFFERS): the fastest of 5 executions (one sample is noisy on this machine)."""
    statement = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement
    with engine.connect() as conn:
        plans = [conn.exec_driver_sql(statement, parameters).scalar()[0] for _ in range(5)]
    plan = min(plans, key=lambda p: p["Execution Time"])
    nodes, stack = [], [plan["Plan"]]
    while stack:
        nodes.append(stack.pop())
        stack.extend(nodes[-1].get("Plans", []))
    leaves = [n for n in nodes if not n.get("Plans")]
    return {
        "lines": plan_lines(plan["Plan"]),
        "seq_scans": sorted({n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"}),
        "indexes": sorted({n["Index Name"] for n in nodes if n.get("Index Name")}),
        "buffers": plan["Plan"].get("Shared Hit Blocks", 0) + plan["Plan"].get("Shared Read Blocks", 0),
        "heaviest": max(leaves, key=lambda n: n.get("Shared Hit Blocks", 0) + n.get("Shared Read Blocks", 0)),
        "execution_ms": plan["Execution Time"], "planning_ms": plan["Planning Time"],
    }


@dataclass
class Size:
    n: int
    url: str
    engine: sa.Engine
    store: Store
    results: dict[str, dict] = field(default_factory=dict)


def tick(size: Size, instance: dg.DagsterInstance) -> dg.SensorResult | dg.SkipReason:
    resources = {"store": StoreResource(database_url=size.url), "policy": POLICY}
    return stuck_orders_sensor(dg.build_sensor_context(instance=instance, resources=resources))


def server_ms(engine: sa.Engine, statement: str, parameters: dict) -> float:
    """Execution time inside PostgreSQL (EXPLAIN ANALYZE with TIMING OFF: no per-node clock reads)."""
    statement = "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + statement
    with engine.connect() as conn:
        return conn.exec_driver_sql(statement, parameters).scalar()[0]["Execution Time"] / 1000


def measure(phase: str, sizes: list[Size], reps: int, instance: dg.DagsterInstance) -> None:
    """Sizes interleaved call by call, so the other engineers' load on the 2 cores hits all sizes alike."""
    keys = ("query", "query_server", "tick")
    runs = {size.n: {key: [] for key in keys} for size in sizes}
    captured = {size.n: capture_query(size.engine, size.store) for size in sizes}
    for rep in range(-10, reps):  # 10 warm-up rounds
        for size in sizes:
            if rep < 0:
                found, result = find(size.store), tick(size, instance)
                requested = 0 if isinstance(result, dg.SkipReason) else len(result.run_requests)
                size.results[phase].update(found=len(found), requested=requested)
                continue
            times = runs[size.n]
            times["query"].append(timed(lambda s=size: find(s.store))[0])
            times["query_server"].append(server_ms(size.engine, *captured[size.n]))
            times["tick"].append(timed(lambda s=size: tick(s, instance))[0])
    for size in sizes:
        size.results[phase].update(runs[size.n])
        size.results[phase]["plan"] = explain(size.engine, *capture_query(size.engine, size.store))


def report(phase: str, sizes: list[Size], reps: int) -> None:
    console.rule(f"[bold]{phase}")
    for size in sizes:
        plan = size.results[phase]["plan"]
        heaviest = plan["heaviest"]
        console.print(f"EXPLAIN (ANALYZE, BUFFERS) find_stuck_orders, {size.n:,} orders: execution "
                      f"{plan['execution_ms']:.2f} ms (planning {plan['planning_ms']:.2f}), {plan['buffers']} "
                      f"buffers; indexes: {', '.join(plan['indexes'])}; seq scans: "
                      f"{', '.join(plan['seq_scans']) or 'none'}; heaviest leaf: {heaviest['Node Type']} on "
                      f"{heaviest.get('Index Name') or heaviest.get('Relation Name')} "
                      f"({heaviest['Actual Rows'] * heaviest['Actual Loops']} rows)",
                      highlight=False, soft_wrap=True)
        for line in plan["lines"]:
            console.print("    " + line, highlight=False, soft_wrap=True)
    rows = []
    for size in sizes:
        r = size.results[phase]
        rows.append([f"{size.n:,}", f"{r['state_rows']:,}", f"{r['found']} / {r['requested']}", spread(r["query"]),
                     ms(median(r["query_server"]), 2), r["plan"]["buffers"], spread(r["tick"])])
    print_table(
        f"{phase}: warm, {reps} interleaved repetitions; wall: median (min), server: median execution in PostgreSQL",
        ["orders", "state rows", "due / runs", "find_stuck_orders", "server", "buffers", "sensor evaluation"], rows)
    small = sizes[0].results[phase]
    for size in sizes[1:]:
        large = size.results[phase]
        for label, key in (("find_stuck_orders wall", "query"), ("find_stuck_orders in PostgreSQL", "query_server"),
                           ("sensor evaluation wall", "tick")):
            ratio = median(large[key]) / median(small[key])
            console.print(f"{label}: {size.n:,} / {sizes[0].n:,} = {ratio:.2f}x on medians "
                          f"({min(large[key]) / min(small[key]):.2f}x on minima), "
                          f"{'meets' if ratio <= 1.2 else 'MISSES'} target <= 1.2x", highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--reps", type=int, default=60)
    args = parser.parse_args()
    print_machine()
    with ExitStack() as stack, dg.instance_for_test() as instance:
        sizes = []
        for n in (int(x) for x in args.sizes.split(",")):
            url, engine = stack.enter_context(migrated_store("bench_sweep"))
            seconds, megabytes = load(engine, n)
            console.print(f"{n:,} orders: bulk insert {seconds:.1f} s, orders table with indexes {megabytes:.0f} MB",
                          highlight=False)
            sizes.append(Size(n, url, engine, Store(engine)))
        for phase in PHASES:
            for size in sizes:
                if phase == PHASES[1]:
                    run_sql(size.engine, STATE_HISTORY_SQL)
                with size.engine.connect() as conn:
                    size.results[phase] = {"state_rows": conn.exec_driver_sql(
                        "SELECT count(*) FROM reconcile_state").scalar()}
            measure(phase, sizes, args.reps, instance)
            report(phase, sizes, args.reps)


if __name__ == "__main__":
    main()
