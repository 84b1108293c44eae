"""The stuck-orders board's reads on PostgreSQL with 10k and with 1M orders (target: 1M within 1.2x of 10k).

The data and the two phases are `sensor_tick.py`'s (its seeding is reused as is): two years of order history, the
same recent set in both sizes (200 stuck orders, 50 of them leased, backing off or needing a person; 50 fulfilled
without the email; 100 inside the grace period), then `reconcile_state` history in the second phase.

Measured warm, sizes interleaved call by call:
- `Store.backlog_orders`: the board's rows, the one query the sweep's skip message, `plan`, `board` and the
  `order_backlog` asset share (wall, execution inside PostgreSQL, buffers, plan and sequential scans);
- `Store.fulfilled_since` (24 h): the trend figures of the asset and `board`. It reads the orders fulfilled in the
  last 24 h, and the seeding spreads two years of history evenly, so the larger database also has about 100x the
  fulfilments per day; its cost is printed with that row count, not held to the size target;
- `load_board`: both reads and the classification in Python, as the asset runs it.

Usage: uv run python benchmarks/board_query.py [--sizes 10000,1000000] [--reps 40]
"""

from __future__ import annotations

import argparse
import datetime as dt
from contextlib import ExitStack
from dataclasses import dataclass, field

import sqlalchemy as sa
from _harness import console, median, migrated_store, ms, print_machine, print_table, spread, timed
from sensor_tick import PHASES, POLICY, STATE_HISTORY_SQL, explain, load, run_sql, server_ms

from bitloot_reconcile.domain.board import TREND_WINDOW, load_board
from bitloot_reconcile.store.repository import Store, utcnow

GRACE, MAX_AGE = dt.timedelta(minutes=POLICY.grace_minutes), dt.timedelta(days=POLICY.max_age_days)
READS = {
    "backlog_orders": lambda store: store.backlog_orders(now=utcnow(), max_age=MAX_AGE, limit=10_000),
    "fulfilled_since": lambda store: store.fulfilled_since(utcnow() - TREND_WINDOW),
}


def whole_board(store: Store):
    return load_board(store, in_flight={}, now=utcnow(), grace=GRACE, max_age=MAX_AGE)


def capture(engine: sa.Engine, read) -> tuple[str, dict]:
    """The statement and parameters a read sends, exactly as the driver gets them."""
    seen: list[tuple[str, dict]] = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", grab)
    try:
        read()
    finally:
        sa.event.remove(engine, "before_cursor_execute", grab)
    return seen[-1]


@dataclass
class Size:
    n: int
    engine: sa.Engine
    store: Store
    results: dict[str, dict] = field(default_factory=dict)


def measure(phase: str, sizes: list[Size], reps: int) -> None:
    keys = [*READS, *(f"{name} in PG" for name in READS), "load_board"]
    runs = {size.n: {key: [] for key in keys} for size in sizes}
    captured = {(size.n, name): capture(size.engine, lambda s=size, r=read: r(s.store))
                for size in sizes for name, read in READS.items()}
    for rep in range(-5, reps):  # 5 warm-up rounds
        for size in sizes:
            times = runs[size.n]
            for name, read in READS.items():
                seconds, rows = timed(lambda s=size, r=read: r(s.store))
                if rep >= 0:
                    times[name].append(seconds)
                    times[f"{name} in PG"].append(server_ms(size.engine, *captured[size.n, name]))
                size.results[phase][f"{name} rows"] = len(rows)
            seconds, board = timed(lambda s=size: whole_board(s.store))
            if rep >= 0:
                times["load_board"].append(seconds)
            size.results[phase]["counts"] = {k: v for k, v in board.counts().items() if v}
    for size in sizes:
        size.results[phase].update(runs[size.n])
        for name in READS:
            size.results[phase][f"{name} plan"] = explain(size.engine, *captured[size.n, name])


def report(phase: str, sizes: list[Size], reps: int) -> None:
    console.rule(f"[bold]{phase}")
    for size in sizes:
        for name in READS:
            plan = size.results[phase][f"{name} plan"]
            console.print(f"EXPLAIN (ANALYZE, BUFFERS) {name}, {size.n:,} orders: execution {plan['execution_ms']:.2f} "
                          f"ms, {plan['buffers']} buffers; indexes: {', '.join(plan['indexes'])}; seq scans: "
                          f"{', '.join(plan['seq_scans']) or 'none'}", highlight=False, soft_wrap=True)
            for line in plan["lines"]:
                console.print("    " + line, highlight=False, soft_wrap=True)
        console.print(f"board at {size.n:,} orders: {size.results[phase]['counts']}", highlight=False)
    rows = []
    for size in sizes:
        r = size.results[phase]
        rows.append([f"{size.n:,}", f"{r['state_rows']:,}", r["backlog_orders rows"], spread(r["backlog_orders"]),
                     ms(median(r["backlog_orders in PG"]), 2), r["backlog_orders plan"]["buffers"],
                     r["fulfilled_since rows"], spread(r["fulfilled_since"]), ms(median(r["fulfilled_since in PG"]), 2),
                     spread(r["load_board"])])
    print_table(f"{phase}: warm, {reps} interleaved repetitions; wall: median (min); PG: median execution inside",
                ["orders", "state rows", "board rows", "backlog_orders", "PG", "buffers", "24 h rows",
                 "fulfilled_since", "PG", "load_board"], rows)
    small = sizes[0].results[phase]
    for size in sizes[1:]:
        large = size.results[phase]
        for key in ("backlog_orders", "backlog_orders in PG", "fulfilled_since", "load_board"):
            ratio = median(large[key]) / median(small[key])
            target = f", {'meets' if ratio <= 1.2 else 'MISSES'} target <= 1.2x" if key.startswith("backlog") else ""
            console.print(f"{key}: {size.n:,} / {sizes[0].n:,} = {ratio:.2f}x on medians "
                          f"({min(large[key]) / min(small[key]):.2f}x on minima){target}", highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    print_machine()
    with ExitStack() as stack:
        sizes = []
        for n in (int(x) for x in args.sizes.split(",")):
            _, engine = stack.enter_context(migrated_store("bench_board"))
            seconds, megabytes = load(engine, n)
            console.print(f"{n:,} orders: bulk insert {seconds:.1f} s, orders table with indexes {megabytes:.0f} MB",
                          highlight=False)
            sizes.append(Size(n, engine, Store(engine)))
        for phase in PHASES:
            for size in sizes:
                if phase == PHASES[1]:
                    run_sql(size.engine, STATE_HISTORY_SQL)
                with size.engine.connect() as conn:
                    size.results[phase] = {"state_rows": conn.exec_driver_sql(
                        "SELECT count(*) FROM reconcile_state").scalar()}
            measure(phase, sizes, args.reps)
            report(phase, sizes, args.reps)


if __name__ == "__main__":
    main()
