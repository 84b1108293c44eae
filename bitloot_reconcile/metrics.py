"""`bitloot-reconcile metrics`: the project's state for Prometheus, read when scraped.

One small long-lived process serves `/metrics` (prometheus_client's server). A scrape reads, at most once per
`cache_seconds` whatever the number of scrapers:
- the stuck-orders board from the store (`domain.board.load_board`, the `order_backlog` asset's bounded read,
  without the 24 h trend), with the orders Dagster has a run queued or running for;
- Dagster's run records (runs of `fulfill_order` and `fulfill_backlog` in flight) and the last tick of the sweep
  sensor, from the instance of DAGSTER_HOME;
- the audit rows added since the last read (`store.audit_counts`, by primary key): the counters of outcomes,
  fulfilled orders and outside-call failures. They are the audit table's totals: grouped once at start, then
  kept up incrementally, so a scrape never reads the table whole.
A source that cannot be read is `bitloot_reconcile_up{source=...} 0` and its gauges are left out of that scrape;
the counters keep their values.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dagster as dg
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bitloot_reconcile.domain.board import Board, BoardState, load_board
from bitloot_reconcile.domain.failures import KINDS, SERVICES, failed_call
from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.jobs import fulfill_backlog, fulfill_order
from bitloot_reconcile.runs_in_flight import IN_FLIGHT, in_flight_run_records, runs_in_flight
from bitloot_reconcile.sensors.sweep import SWEEP_SENSOR_NAME
from bitloot_reconcile.settings import ReconcileVariables
from bitloot_reconcile.store import audit_counts
from bitloot_reconcile.store.repository import Store, utcnow
from bitloot_reconcile.tags import OUTCOME_REFUSED, TRIGGER_ADMIN, TRIGGER_REEXECUTION, TRIGGER_SENSOR

log = logging.getLogger(__name__)

PREFIX = "bitloot_reconcile"
DEFAULT_PORT = 9477
DEFAULT_CACHE_SECONDS = 5.0
# An audit id below the highest one read that is not there yet: its insert took the id earlier and commits
# later. Looked for again on every read for this long (a statement times out long before), then forgotten (a
# rolled-back insert leaves a hole for good).
PENDING_ID_SECONDS = 120.0
MAX_PENDING_IDS = 10_000
OUTCOMES = (*(o.value for o in Outcome), OUTCOME_REFUSED)
TRIGGERS = (TRIGGER_SENSOR, TRIGGER_ADMIN, TRIGGER_REEXECUTION)
JOBS = (fulfill_order.name, fulfill_backlog.name)
IN_FLIGHT_STATUSES = tuple(status.value for status in IN_FLIGHT)
# A tick that ended so swept (Dagster's TickStatus values; a failed or unfinished tick is no sweep).
TICKED = frozenset({"SUCCESS", "SKIPPED"})
TICK_PAGE, TICK_PAGES = 50, 20  # the last completed tick is looked for among at most 1000 recent ticks


@dataclass
class AuditCounts:
    """The audit table's counters, kept up by reading only the rows added since the last read."""

    outcomes: Counter = field(default_factory=Counter)  # (outcome, trigger) -> attempts ended so
    failures: Counter = field(default_factory=Counter)  # (service, kind) -> attempts an outside call ended
    fulfilled: int = 0
    highest: int = 0
    pending: dict[int, float] = field(default_factory=dict)  # id -> when first missed (monotonic)

    def prime(self, engine: sa.Engine) -> None:
        """The totals up to the highest id now: two grouped reads, once per process."""
        self.highest = audit_counts.highest_id(engine)
        ended, failed = audit_counts.totals(engine, self.highest)
        self.outcomes.update(ended)
        self.fulfilled = sum(n for (outcome, _), n in ended.items() if outcome == Outcome.FULFILLED)
        for (outcome, detail), n in failed.items():
            if (call := failed_call(outcome, detail)) is not None:
                self.failures[call] += n

    def catch_up(self, engine: sa.Engine, now: float, chunk: int = 5000) -> None:
        while True:
            rows = audit_counts.rows_after(engine, self.highest, self.pending, limit=chunk)
            fresh = 0
            for row in rows:
                if row.id > self.highest:
                    fresh += 1
                    if row.id - self.highest - 1 <= MAX_PENDING_IDS - len(self.pending):
                        self.pending.update(dict.fromkeys(range(self.highest + 1, row.id), now))
                    self.highest = row.id
                elif self.pending.pop(row.id, None) is None:
                    continue  # counted already
                self.add(row)
            if fresh < chunk:
                break
        self.pending = {i: t for i, t in self.pending.items() if now - t < PENDING_ID_SECONDS}

    def add(self, row: audit_counts.AuditRow) -> None:
        if row.action not in audit_counts.OUTCOME_ACTIONS:
            return
        outcome = row.outcome or row.action
        self.outcomes[(outcome, row.trigger)] += 1
        self.fulfilled += outcome == Outcome.FULFILLED
        if (call := failed_call(row.outcome, row.detail)) is not None:
            self.failures[call] += 1


@dataclass(frozen=True)
class DagsterView:
    runs: dict[tuple[str, str], int]  # (job, status) -> runs in flight
    in_flight: dict[str, str]  # order id -> its run (the board's in_flight)
    last_tick: float | None  # the sweep's last completed tick (epoch seconds); None: never


@dataclass(frozen=True)
class Snapshot:
    board: Board | None  # None: the store could not be read
    dagster: DagsterView | None  # None: the instance could not be read
    outcomes: dict[tuple[str, str], int]
    failures: dict[tuple[str, str], int]
    fulfilled: int
    read_seconds: dict[str, float]
    taken_at: float  # epoch seconds
    sla_seconds: float | None = None  # RECONCILE_BOARD_SLA_MINUTES, for the alert rule to compare with


def read_dagster(instance: dg.DagsterInstance) -> DagsterView:
    records = in_flight_run_records(instance)
    runs = Counter((r.dagster_run.job_name, r.dagster_run.status.value) for group in records for r in group)
    ticks = [last_completed_tick(instance, state) for state in instance.all_instigator_state()
             if state.instigator_name == SWEEP_SENSOR_NAME and state.instigator_type.value == "SENSOR"]
    last_tick = max((t for t in ticks if t is not None), default=None)
    return DagsterView(dict(runs), runs_in_flight(instance, records), last_tick)


def last_completed_tick(instance: dg.DagsterInstance, state) -> float | None:
    """When this sensor's newest successful or skipped tick started (epoch seconds); None: none in reach. Read a
    page at a time, newest first, so a run of failed ticks does not hide the last good one."""
    before = None
    for _ in range(TICK_PAGES):
        ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, before=before, limit=TICK_PAGE)
        for tick in ticks:
            if tick.status.value in TICKED:
                return tick.timestamp
        if len(ticks) < TICK_PAGE:
            return None
        before = ticks[-1].timestamp
    return None


class MetricsSource:
    """The snapshot the collector reports, read again once `cache_seconds` old; concurrent scrapes share a read."""

    def __init__(self, store: Store, instance: dg.DagsterInstance, tunables: ReconcileVariables, *,
                 cache_seconds: float = DEFAULT_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.store, self.instance, self.tunables = store, instance, tunables
        self.cache_seconds, self.clock = cache_seconds, clock
        self.audit = AuditCounts()
        self._primed = False
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._read_at = 0.0

    def prime(self) -> None:
        """The audit table's totals so far (the one read that grows with it); before serving."""
        self.audit.prime(self.store.engine)
        self._primed = True

    @property
    def last(self) -> Snapshot | None:
        """The snapshot the last scrape reported, without reading anew."""
        return self._snapshot

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snapshot is None or self.clock() - self._read_at >= self.cache_seconds:
                self._snapshot, self._read_at = self._read(), self.clock()
            return self._snapshot

    def _read(self) -> Snapshot:
        spent: dict[str, float] = {}
        started = time.perf_counter()
        try:
            dagster = read_dagster(self.instance)
        except Exception:  # a scrape reports what it could read; the log says why the rest is missing
            log.exception("reading the Dagster instance failed")
            dagster = None
        spent["dagster"] = time.perf_counter() - started
        started = time.perf_counter()
        try:
            if not self._primed:
                self.prime()
            self.audit.catch_up(self.store.engine, self.clock())
            board = load_board(self.store, in_flight=dagster.in_flight if dagster else {}, now=utcnow(),
                               grace=dt.timedelta(minutes=self.tunables.grace_minutes),
                               max_age=dt.timedelta(days=self.tunables.max_age_days), with_trend=False)
        except Exception:
            log.exception("reading the store failed")
            board = None
        spent["store"] = time.perf_counter() - started
        return Snapshot(board, dagster, dict(self.audit.outcomes), dict(self.audit.failures), self.audit.fulfilled,
                        spent, time.time(), self.tunables.board_sla_minutes * 60)


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of one snapshot, every one with its help text."""

    def gauge(name: str, help_text: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_{name}", help_text, labels=list(labels))

    up = gauge("up", "1 when the last read of this source succeeded, else 0 (its gauges are then left out).",
               ("source",))
    up.add_metric(["store"], snap.board is not None)
    up.add_metric(["dagster"], snap.dagster is not None)
    yield up
    read = gauge("read_duration_seconds", "Seconds the last read of each source took.", ("source",))
    for source, seconds in snap.read_seconds.items():
        read.add_metric([source], seconds)
    yield read

    if (board := snap.board) is not None:
        by_state = gauge("board_orders", "Orders not done, by their state on the stuck-orders board (order_backlog).",
                         ("state",))
        for state, n in board.counts().items():
            by_state.add_metric([state], n)
        yield by_state
        stuck = gauge("stuck_orders", "Stuck orders: money taken (or perhaps taken), no key or no email delivered, "
                      "and still the automation's (the board's 'stuck now', which its SLA check covers).")
        stuck.add_metric([], len(board.stuck))
        yield stuck
        oldest = gauge("oldest_stuck_order_age_seconds",
                       "Age (since the order was placed) of the oldest stuck order; 0 when none is stuck.")
        oldest.add_metric([], board.oldest_stuck.age.total_seconds() if board.oldest_stuck else 0.0)
        yield oldest
        if snap.sla_seconds is not None:
            sla = gauge("stuck_order_sla_seconds", "The age a stuck order must stay under "
                        "(RECONCILE_BOARD_SLA_MINUTES; the board's oldest_stuck_within_sla check).")
            sla.add_metric([], snap.sla_seconds)
            yield sla
        for name, state, text in (
            ("needs_attention_orders", BoardState.NEEDS_ATTENTION, "Orders a run left for a person (needs_attention)."),
            ("quarantined_orders", BoardState.QUARANTINED,
             "Orders the sweep gave up on (attempts exhausted or supplier deadline passed); they need a person."),
        ):
            family = gauge(name, text)
            family.add_metric([], board.count(state))
            yield family
        cut = gauge("board_truncated", "1 when the board's read hit its row limit: its counts are lower bounds.")
        cut.add_metric([], board.truncated)
        yield cut

    if (dagster := snap.dagster) is not None:
        runs = gauge("runs_in_flight", "Runs queued or running, by job (fulfill_order: one order; fulfill_backlog: "
                     "a batch) and Dagster run status.", ("job", "status"))
        for job in JOBS:
            for status in IN_FLIGHT_STATUSES:
                runs.add_metric([job, status], dagster.runs.get((job, status), 0))
        yield runs
        tick = gauge("sweep_last_tick_age_seconds", "Seconds since the sweep sensor (stuck_orders_sensor) last "
                     "completed a tick (launched runs or skipped); +Inf when it never did.")
        tick.add_metric([], snap.taken_at - dagster.last_tick if dagster.last_tick else float("inf"))
        yield tick

    outcomes = CounterMetricFamily(f"{PREFIX}_outcomes", "Attempts ended, by outcome and trigger (sensor, admin, "
                                   "reexecution), from the audit table; refused requests included.",
                                   labels=["outcome", "trigger"])
    for key in sorted({(o, t) for o in OUTCOMES for t in TRIGGERS} | set(snap.outcomes)):
        outcomes.add_metric(list(key), snap.outcomes.get(key, 0))
    yield outcomes
    fulfilled = CounterMetricFamily(f"{PREFIX}_orders_fulfilled",
                                    "Orders the project's runs fulfilled (attempts that ended 'fulfilled').")
    fulfilled.add_metric([], snap.fulfilled)
    yield fulfilled
    failures = CounterMetricFamily(f"{PREFIX}_outside_call_failures", "Attempts ended by an outside call's failure, "
                                   "by service (kinguin, nowpayments, r2, resend) and kind (transient: an outage that "
                                   "outlasted the retries; refused: the service said no for this order; permanent, "
                                   "not_found, conflict, duplicate).", labels=["service", "kind"])
    for key in sorted({(s, k) for s in SERVICES for k in KINDS} | set(snap.failures)):
        failures.add_metric(list(key), snap.failures.get(key, 0))
    yield failures


class ReconcileCollector(Collector):
    def __init__(self, source: MetricsSource):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from families(self.source.snapshot())


def serve(source: MetricsSource, *, host: str, port: int):
    """Serve /metrics on `host:port` in a background thread; returns the server (`shutdown()` stops it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReconcileCollector(source))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
