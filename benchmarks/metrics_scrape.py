"""The cost of a Prometheus scrape of `bitloot-reconcile metrics` with 10k and with 1M orders.

The data is `sensor_tick.py`'s (its seeding is reused as is): two years of order history, the same recent set in
both sizes (350 orders on the board), `reconcile_state` history (3% of the fulfilled history), and audit history
for it: every recovered order's `requested` and `fulfill_order` rows, and a `retry_later` row with a Kinguin
outage for one in five.

Measured warm, sizes interleaved scrape by scrape, with the cache off (`cache_seconds=0`, so every scrape reads):
- a whole scrape over HTTP (prometheus_client's server, the metrics process's code), and inside it the store's
  part (the board's read and the audit rows added since the last scrape) and Dagster's part (runs in flight,
  the sweep's last tick, on a DagsterInstance with SQLite storage);
- a scrape after 200 new audit rows (the counters' incremental read);
- the start-up read of the audit table's totals (`AuditCounts.prime`, once per process), which does grow with
  the table;
- EXPLAIN (ANALYZE, BUFFERS) of the incremental audit read: a primary-key range scan.

Usage: BENCH_PG_SERVER_URL=postgresql+psycopg://postgres@127.0.0.1:PORT \
       uv run python benchmarks/metrics_scrape.py [--sizes 10000,1000000] [--reps 30]
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from dataclasses import dataclass, field

import dagster as dg
import httpx
import sqlalchemy as sa
from _harness import console, dagster_home, median, migrated_store, ms, print_machine, print_table, spread, timed
from backlog_drain import free_port
from dagster._core.utils import make_new_run_id
from sensor_tick import STATE_HISTORY_SQL, load, run_sql

from bitloot_reconcile.metrics import AuditCounts, MetricsSource, serve
from bitloot_reconcile.settings import ReconcileVariables
from bitloot_reconcile.store import audit_counts
from bitloot_reconcile.store.repository import Store
from bitloot_reconcile.store.schema import reconcile_audit

AUDIT_HISTORY_SQL = """
INSERT INTO reconcile_audit (order_id, action, trigger, reason, run_id, outcome, detail, created_at)
SELECT s.order_id, a.action, 'sensor', 'stuck in paid for 20 min', s.last_run_id, a.outcome, a.detail, s.updated_at
FROM reconcile_state AS s
CROSS JOIN (VALUES ('requested', NULL, NULL), ('fulfill_order', 'fulfilled', NULL)) AS a(action, outcome, detail)
;
INSERT INTO reconcile_audit (order_id, action, trigger, reason, run_id, outcome, detail, created_at)
SELECT order_id, 'fulfill_order', 'sensor', 'stuck in paid for 20 min', last_run_id, 'retry_later',
       'poll_supplier failed: TransientError: kinguin: GET /v2/order/K' || left(order_id::text, 8)
       || ': 503 Service Unavailable', updated_at - interval '10 minutes'
FROM reconcile_state WHERE abs(hashtext(order_id::text)) % 5 = 0
"""
NEW_ROWS_SQL = """
INSERT INTO reconcile_audit (order_id, action, trigger, outcome, detail, created_at)
SELECT gen_random_uuid(), 'fulfill_order', 'sensor', 'fulfilled', NULL, now() FROM generate_series(1, :n)
"""


@dataclass
class Size:
    n: int
    engine: sa.Engine
    url: str = ""
    audit_rows: int = 0
    source: MetricsSource | None = None
    scrape: list[float] = field(default_factory=list)
    store: list[float] = field(default_factory=list)
    dagster: list[float] = field(default_factory=list)
    after_rows: list[float] = field(default_factory=list)
    prime: list[float] = field(default_factory=list)
    sample_lines: int = 0


def explain_audit_read(engine: sa.Engine, after: int) -> list[str]:
    query = (sa.select(reconcile_audit.c.id, reconcile_audit.c.detail)
             .where(reconcile_audit.c.id > after).order_by(reconcile_audit.c.id).limit(5000))
    sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}").scalars().all()
    return [line for line in plan if "Scan" in line or "Execution Time" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    print_machine()
    with ExitStack() as stack:
        instance = stack.enter_context(dagster_home())
        for status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.SUCCESS):
            instance.add_run(dg.DagsterRun(job_name="fulfill_order", run_id=make_new_run_id(), status=status,
                                           tags={"bitloot/order_id": "5c91f65c-4b12-463c-9277-8cfc139ceda4"}))
        sizes: list[Size] = []
        for n in (int(x) for x in args.sizes.split(",")):
            url, engine = stack.enter_context(migrated_store("bench_metrics"))
            seconds, megabytes = load(engine, n)
            run_sql(engine, STATE_HISTORY_SQL)
            run_sql(engine, AUDIT_HISTORY_SQL)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE reconcile_audit")  # as autovacuum leaves it
            with engine.connect() as conn:
                audit_rows = conn.exec_driver_sql("SELECT count(*) FROM reconcile_audit").scalar()
            console.print(f"{n:,} orders: bulk insert {seconds:.1f} s, orders table with indexes {megabytes:.0f} MB, "
                          f"{audit_rows:,} audit rows", highlight=False)
            sizes.append(Size(n, engine, url, audit_rows))

        servers = []
        for size in sizes:
            source = MetricsSource(Store(size.engine), instance, ReconcileVariables(), cache_seconds=0)
            size.prime.append(timed(source.prime)[0])
            port = free_port()
            servers.append(serve(source, host="127.0.0.1", port=port))
            size.url = f"http://127.0.0.1:{port}/metrics"
            size.source = source
        try:
            with httpx.Client(timeout=30) as client:
                for size in sizes:  # warm up
                    client.get(size.url).raise_for_status()
                for _ in range(args.reps):
                    for size in sizes:
                        seconds, answer = timed(lambda size=size: client.get(size.url).raise_for_status())
                        size.scrape.append(seconds)
                        snapshot = size.source.last
                        size.store.append(snapshot.read_seconds["store"])
                        size.dagster.append(snapshot.read_seconds["dagster"])
                        size.sample_lines = sum(1 for line in answer.text.splitlines() if not line.startswith("#"))
                for _ in range(5):
                    for size in sizes:
                        run_sql_plain(size.engine, NEW_ROWS_SQL, n=200)
                        size.after_rows.append(timed(lambda size=size: client.get(size.url).raise_for_status())[0])
                for _ in range(2):
                    for size in sizes:
                        size.prime.append(timed(lambda size=size: AuditCounts().prime(size.engine))[0])
        finally:
            for server in servers:
                server.shutdown()

        print_table(
            f"a scrape of /metrics, cache off ({args.reps} scrapes per size, median (min))",
            ["orders", "audit rows", "whole scrape (HTTP)", "store part", "Dagster part",
             "after 200 new audit rows", "start-up totals (once)", "samples"],
            [[f"{s.n:,}", f"{s.audit_rows:,}", spread(s.scrape), spread(s.store), spread(s.dagster),
              spread(s.after_rows), ms(median(s.prime)), s.sample_lines] for s in sizes],
        )
        small, large = sizes[0], sizes[-1]
        console.print(f"1M / 10k, whole scrape: {median(large.scrape) / median(small.scrape):.2f}x; store part: "
                      f"{median(large.store) / median(small.store):.2f}x", highlight=False)
        for size in sizes:
            highest = audit_counts.highest_id(size.engine)
            console.print(f"{size.n:,} orders, the incremental audit read (id > highest - 200):", highlight=False)
            for line in explain_audit_read(size.engine, highest - 200):
                console.print(f"    {line.strip()}", highlight=False)


def run_sql_plain(engine: sa.Engine, statement: str, **params) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)


if __name__ == "__main__":
    main()
