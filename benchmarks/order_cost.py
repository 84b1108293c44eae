"""The cost of one order worked in a shop of 10k orders and in one of 1M (target: 1M within 1.2x of 10k per order).

Each size gets its own database on BitLoot's schema as BitLoot's migrations leave it (tests/store/bitloot_ddl.py:
no index on `order_items."orderId"` nor `payments."orderId"`), the project's migrations up to 0002, `sensor_tick.py`'s
two years of order history and recent set, then the lines a real shop's orders have (`sandbox.seed.add_history_lines`:
one item each from a catalogue of Kinguin products, a finished payment each, a `keys` row per fulfilled item, a
suppression list) and VACUUM ANALYZE. Then:

0. optionally (`--before N`), N stuck orders drained before the lookup indexes exist (the store at 0002);
1. `db upgrade`'s migration 0003, timed: the lookup indexes built with CREATE INDEX CONCURRENTLY;
2. the backlog: `--orders` one-item orders stuck in `paid` drained by one `fulfill_backlog` run (the batch path,
   executed in this process against the simulators), then `--single` more worked by one `fulfill_order` run each
   (the per-order job).

Per order worked, from PostgreSQL's own counters (pg_stat_user_tables, read before and after with every
connection closed, so nothing is left unflushed): rows read (sequential scans' rows plus rows fetched through
indexes) on BitLoot's tables and on the project's, sequential scans of BitLoot's tables; the statements the code
sent (captured from the driver); CPU-s of the PostgreSQL backends serving the store database (`BackendCpu`; the
server must run on this machine, preferably a cluster of the benchmark's own for the 1M seeding: point
BENCH_PG_SERVER_URL at it) and of this process (the runs, Dagster's in-process executor and event writes to its
SQLite storage, and the HTTP simulators, which run in this process too). The drains run `--rounds` times, the
sizes interleaved (10k, 1M, 10k, 1M, ...), each round on fresh orders, so other people's load on the shared
cores hits both sizes alike; the ratios are on the totals over the rounds.
Then the plan of every distinct statement at each size: the table each reads and the index it goes through.

Usage: BENCH_PG_SERVER_URL=postgresql+psycopg://postgres@127.0.0.1:PORT \
       uv run python benchmarks/order_cost.py [--sizes 10000,1000000] [--orders 300] [--single 20] [--rounds 2]
       [--before 0]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field

import dagster as dg
import sqlalchemy as sa
from _harness import (
    KINGUIN_KEY,
    NOWPAYMENTS_KEY,
    PG_SERVER_URL,
    REPO_ROOT,
    RESEND_KEY,
    Stack,
    console,
    print_machine,
    print_table,
    stderr_to_file,
    temp_database,
)
from _plans import Statement, scans_of, statements_to
from backlog_drain import _stat
from sensor_tick import load

from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import upgrade
from bitloot_standins.kinguin import KinguinSimulator
from bitloot_standins.nowpayments import NowPaymentsSimulator
from bitloot_standins.resend import ResendSimulator
from bitloot_standins.s3 import SeaweedS3
from bitloot_standins.seed import SeedProduct, add_history_lines, add_recovery_history

sys.path.insert(0, str(REPO_ROOT))
from tests.store.bitloot_ddl import MODELED_TABLES, create_bitloot_schema  # noqa: E402

PROJECT_TABLES = ("reconcile_state", "reconcile_audit", "reconcile_key_assignment")


@dataclass
class Drain:
    orders: int
    rows: Counter  # rows read, by table
    seq_scans: Counter  # sequential scans, by table
    statements: list[Statement]
    pg_cpu: float
    own_cpu: float
    wall: float
    outcomes: Counter

    def per_order(self, tables) -> float:
        return sum(self.rows[t] for t in tables) / self.orders

    def __add__(self, other: Drain) -> Drain:
        return Drain(self.orders + other.orders, self.rows + other.rows, self.seq_scans + other.seq_scans,
                     self.statements + other.statements, self.pg_cpu + other.pg_cpu, self.own_cpu + other.own_cpu,
                     self.wall + other.wall, self.outcomes + other.outcomes)


@dataclass
class Size:
    n: int
    stack: Stack
    product: SeedProduct | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    drains: dict[str, list[Drain]] = field(default_factory=dict)

    def total(self, label: str) -> Drain:
        return sum(self.drains[label][1:], self.drains[label][0])


class BackendCpu:
    """CPU-seconds of the PostgreSQL backends serving one database (a server on this machine): their pids from
    pg_stat_activity and their CPU from /proc, sampled every 0.2 s while the drain runs and once at its end, so
    other databases' work on the same server never counts. A backend that exits between two samples (a pool's
    overflow connection) loses at most 0.2 s of its CPU."""

    def __init__(self, url: str):
        self.database = sa.engine.make_url(url).database
        self.engine = sa.create_engine(f"{PG_SERVER_URL}/postgres", poolclass=sa.pool.NullPool)
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self, conn: sa.Connection) -> None:
        pids = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :db"),
                            {"db": self.database}).scalars().all()
        for pid in pids:
            if stat := _stat(pid):
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), stat[1])

    def _loop(self) -> None:
        with self.engine.connect() as conn:
            while not self._stop.wait(0.2):
                conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
                self.sample(conn)

    def __enter__(self) -> BackendCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        with self.engine.connect() as conn:
            self.sample(conn)
        self.engine.dispose()

    @property
    def seconds(self) -> float:
        return sum(self.cpu.values())


def table_counters(url: str) -> tuple[Counter, Counter]:
    """Rows read and sequential scans by table so far: every store connection is closed first (a backend's
    counters reach the statistics when it exits, or on its own schedule)."""
    StoreResource(database_url=url).get_store().engine.dispose()  # the runs' cached pool
    time.sleep(0.5)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            rows = conn.execute(sa.text(
                "SELECT relname, coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0), coalesce(seq_scan, 0) "
                "FROM pg_stat_user_tables")).all()
    finally:
        engine.dispose()
    return Counter({r[0]: r[1] for r in rows}), Counter({r[0]: r[2] for r in rows})


def drained(size: Size, order_ids: list[str], run) -> Drain:
    """Work `order_ids` with `run(order_ids)` and read what it cost."""
    url = size.stack.store_url
    with size.stack.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("CHECKPOINT")  # the seeding's dirty pages written before, not during, the drain
    size.stack.engine.dispose()
    rows, scans = table_counters(url)  # every connection to the store closed: its backends all start below
    own, started = time.process_time(), time.monotonic()
    with statements_to(sa.engine.make_url(url).database) as statements, BackendCpu(url) as backends:
        outcomes = run(order_ids)
    wall, own = time.monotonic() - started, time.process_time() - own
    rows_after, scans_after = table_counters(url)
    return Drain(len(order_ids), rows_after - rows, scans_after - scans, list(statements), backends.seconds, own,
                 wall, outcomes)


def batch(stack: Stack, instance: dg.DagsterInstance):
    def run(order_ids: list[str]) -> Counter:
        config = {"orders": [{"order_id": o, "reason": "stuck in paid for 30 min"} for o in order_ids]}
        result = fulfill_backlog.execute_in_process(
            run_config={"ops": {"work_backlog": {"config": config}}}, resources=stack.resources(),
            instance=instance, raise_on_error=False)
        assert result.success, "the fulfill_backlog run failed (see the run logs)"
        return Counter(result.output_for_node("work_backlog"))
    return run


def one_by_one(stack: Stack, instance: dg.DagsterInstance):
    def run(order_ids: list[str]) -> Counter:
        outcomes = Counter()
        for order_id in order_ids:
            result = fulfill_order.execute_in_process(
                run_config={"order_id": order_id, "reason": "webhook missed", "requested_by": "admin@bitloot.io"},
                resources=stack.resources(), instance=instance, raise_on_error=False)
            outcomes[result.output_for_node("record_outcome") if result.success else "run failed"] += 1
        return outcomes
    return run


def seed(stack: Stack, n: int, catalogue: int) -> dict[str, float]:
    engine = stack.engine
    with engine.begin() as conn:
        create_bitloot_schema(conn)
    upgrade(engine, "0002")
    started = time.monotonic()
    load(engine, n)
    add_history_lines(engine, catalogue=catalogue, bounces=max(1000, n // 50))
    add_recovery_history(engine, percent=3)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # No autovacuum inside the measured drains (its CPU would count as the orders'); vacuumed by hand instead.
        for table in (*MODELED_TABLES, *PROJECT_TABLES):
            conn.exec_driver_sql(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')
            conn.exec_driver_sql(f'VACUUM ANALYZE "{table}"')
    return {"seeding": time.monotonic() - started}


def describe(statement: str) -> str:
    """A statement in a few words: its verb and its first table."""
    words = statement.replace('"', "").split()
    verb = words[0].upper()
    anchor = {"SELECT": "FROM", "INSERT": "INTO", "UPDATE": "UPDATE", "DELETE": "FROM"}.get(verb, verb)
    table = words[words.index(anchor) + 1] if anchor in words else "?"
    return f"{verb} {table}" + (" (+products, keys)" if "JOIN products" in statement else "") + (
        " FOR UPDATE" if "FOR UPDATE" in statement else "") + (" ON CONFLICT" if "ON CONFLICT" in statement else "")


BEFORE, BATCH, SINGLE = ("before: no lookup indexes, fulfill_backlog", "fulfill_backlog (batch)",
                         "fulfill_order (per-order job)")


def report(sizes: list[Size], args) -> None:
    for size in sizes:
        console.print(f"{size.n:,} orders: seeding {size.seconds['seeding']:.0f} s; migration 0003 (CREATE INDEX "
                      f"CONCURRENTLY x3) {size.seconds['indexes']:.1f} s", highlight=False)
    bitloot = list(MODELED_TABLES)
    rows = []
    for label in (BEFORE, BATCH, SINGLE):
        for size in sizes:
            for number, d in enumerate(size.drains.get(label, []), start=1):
                verbs = Counter(s.verb for s in d.statements)
                rows.append([label, f"{size.n:,}", number, d.orders, f"{d.per_order(bitloot):,.1f}",
                             f"{d.per_order(PROJECT_TABLES):,.1f}",
                             f"{sum(d.seq_scans[t] for t in bitloot if t != 'feature_flags') / d.orders:.2f}",
                             f"{len(d.statements) / d.orders:.1f}",
                             ", ".join(f"{k} {v / d.orders:.1f}" for k, v in verbs.most_common()),
                             f"{d.pg_cpu / d.orders * 1000:.1f}", f"{d.own_cpu / d.orders * 1000:.0f}",
                             f"{d.wall:.1f} s", dict(d.outcomes)])
    print_table("Per order worked (rows read: pg_stat_user_tables seq_tup_read + idx_tup_fetch)",
                ["path", "shop", "round", "orders", "rows read, BitLoot tables", "rows read, project tables",
                 "seq scans of BitLoot tables (not feature_flags)", "statements", "by verb",
                 "PostgreSQL CPU-ms (store's backends)", "process CPU-ms", "wall", "outcomes"], rows)
    small, large = sizes[0], sizes[-1]
    for label in (BATCH, SINGLE):
        a, b = small.total(label), large.total(label)
        for what, x, y in (("rows read (BitLoot tables)", a.per_order(bitloot), b.per_order(bitloot)),
                           ("rows read (all tables)", a.per_order(a.rows), b.per_order(b.rows)),
                           ("statements", len(a.statements) / a.orders, len(b.statements) / b.orders),
                           ("PostgreSQL CPU-s", a.pg_cpu / a.orders, b.pg_cpu / b.orders),
                           ("process CPU-s", a.own_cpu / a.orders, b.own_cpu / b.orders)):
            ratio = y / x if x else float("nan")
            console.print(f"{label}, {what} per order, all rounds: {large.n:,} / {small.n:,} = {ratio:.2f}x "
                          f"({'meets' if ratio <= 1.2 else 'MISSES'} <= 1.2x)", highlight=False)
    for label in ((BEFORE,) if args.before else ()) + (BATCH, SINGLE):
        for size in sizes:
            d = size.total(label)
            by_table = ", ".join(f"{t} {d.rows[t] / d.orders:,.1f}" for t in (*bitloot, *PROJECT_TABLES) if d.rows[t])
            console.print(f"{label} at {size.n:,}: rows read per order by table: {by_table}", highlight=False)
    plans = {}
    for size in sizes:
        statements = [s for label in (BATCH, SINGLE) for s in size.total(label).statements]
        for sql, found in scans_of(size.stack.engine, statements).items():
            plans.setdefault(describe(sql), {})[size.n] = "; ".join(
                sorted({f"{s.table} " + (f"via {s.index}" if s.keyed else f"WHOLE ({s.node})") for s in found}))
    print_table("The plan of every distinct statement (EXPLAIN, at head): each table read and how",
                ["statement", *(f"{size.n:,} orders" for size in sizes)],
                [[name, *(by_size.get(size.n, "-") or "(no table read)" for size in sizes)]
                 for name, by_size in sorted(plans.items())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--orders", type=int, default=300, help="the backlog drained by one fulfill_backlog run")
    parser.add_argument("--single", type=int, default=20, help="orders worked by one fulfill_order run each")
    parser.add_argument("--rounds", type=int, default=2, help="drains per size, the sizes interleaved")
    parser.add_argument("--before", type=int, default=0, help="orders drained before the lookup indexes exist")
    parser.add_argument("--catalogue", type=int, default=50_000, help="products in the shop's catalogue")
    args = parser.parse_args()
    print_machine()
    console.print(f"PostgreSQL server: {sa.engine.make_url(PG_SERVER_URL).render_as_string()}", highlight=False)
    sizes: list[Size] = []
    with ExitStack() as stack, stderr_to_file("order_cost"):
        kinguin = stack.enter_context(KinguinSimulator(api_key=KINGUIN_KEY, balance=10_000_000.0))
        nowpayments = stack.enter_context(NowPaymentsSimulator(api_key=NOWPAYMENTS_KEY))
        resend = stack.enter_context(ResendSimulator(api_key=RESEND_KEY))
        s3 = stack.enter_context(SeaweedS3())
        instance = stack.enter_context(dg.instance_for_test())
        for n in (int(x) for x in args.sizes.split(",")):
            url = stack.enter_context(temp_database("bench_order_cost"))
            engine = create_store_engine(url, statement_timeout_ms=0)
            stack.callback(engine.dispose)
            world = Stack(url, engine, kinguin, nowpayments, resend, s3, f"bench-{uuid.uuid4().hex[:12]}")
            world.resources()["r2"].get_vault().ensure_bucket()
            size = Size(n, world, seconds=seed(world, n, args.catalogue))
            console.print(f"{n:,} orders seeded in {size.seconds['seeding']:.0f} s", highlight=False)
            size.product = world.product()
            if args.before:
                size.drains[BEFORE] = [drained(size, world.paid_orders(args.before, size.product),
                                               batch(world, instance))]
            started = time.monotonic()
            upgrade(engine)
            size.seconds["indexes"] = time.monotonic() - started
            sizes.append(size)
        for _ in range(args.rounds):
            for size in sizes:
                world = size.stack
                backlog = world.paid_orders(args.orders, size.product)
                singles = world.paid_orders(args.single, size.product)
                with world.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.exec_driver_sql("ANALYZE")
                size.drains.setdefault(BATCH, []).append(drained(size, backlog, batch(world, instance)))
                size.drains.setdefault(SINGLE, []).append(drained(size, singles, one_by_one(world, instance)))
        report(sizes, args)


if __name__ == "__main__":
    main()
