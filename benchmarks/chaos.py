"""Chaos run: N orders of every kind through the real `fulfill_order` job and the real sweep sensor, with faults at
every outside call, SIGKILLed run workers, concurrent admin runs and stalled store writes; then an invariant
checker over the store, the bucket, what the simulators saw and everything Dagster wrote.

Processes: this script hosts the simulators (Kinguin, NOWPayments, Resend), an outage proxy in front of SeaweedFS
and the sweep loop. Every run is its own worker process (`_chaos_worker.py`, forked from a preloaded fork server)
against one DagsterInstance on PostgreSQL; the code location gets its settings and secrets from the environment,
as in production. The loop evaluates `stuck_orders_sensor` once per sweep interval and starts a worker per run
request (run keys are never reused, like the daemon), at most `--parallel` at a time.

Chaos, all drawn from `--seed`:
- faults per order at Kinguin (placement 5xx / 429 + Retry-After / answer lost after the order was created /
  order created but answered 500; status and keys 5xx / 429 / lost), NOWPayments (5xx, 429), Resend (5xx, 429,
  answer lost after sending, sent but answered 500) and S3 puts (503, stored but answer lost, stored but
  answered 500), plus two S3 outage windows for everyone;
- SIGKILL of the run worker holding the order's lease: after the Kinguin POST was answered, after the S3 put of
  a key was answered (before its `keys` row), when the Resend call arrives (order fulfilled, email not sent),
  after Resend answered (email sent, flag not set), or at a random moment of the run. Dagster never hears of the
  killed run; like `dagster/max_runtime`, the loop fails it after `--max-runtime` seconds;
- the sensor's run and three admin runs on the same order at once (`--concurrent` share of the orders);
- stalled writes: the harness holds the order's item rows locked (as BitLoot's own transactions may) from the
  Kinguin keys call on, either past the lease (an admin run is started once it expired) or past the store's
  statement timeout.

Usage: uv run python benchmarks/chaos.py --orders 100 --seed 1   (prints the table; exit status 1 on violations)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from _harness import (
    Stack,
    console,
    dagster_home,
    print_machine,
    print_table,
    stand_ins,
    stderr_to_file,
    temp_database,
)

from bitloot_reconcile.adapters.kinguin import KinguinClient
from bitloot_reconcile.adapters.r2 import KeyVault
from bitloot_reconcile.domain.delivery import attachment_filename, key_object_path
from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.runs_in_flight import IN_FLIGHT
from bitloot_reconcile.store.repository import Store
from bitloot_reconcile.store.schema import keys as keys_table
from bitloot_reconcile.store.schema import order_items, orders, reconcile_state
from bitloot_reconcile.tags import TRIGGER_ADMIN, request_tags
from bitloot_standins.httpserver import Fault, RecordedRequest
from bitloot_standins.s3_proxy import FaultyS3Proxy, Outage
from bitloot_standins.seed import SeedProduct, insert_order, insert_product

BENCHMARKS = Path(__file__).resolve().parent
STATEMENT_TIMEOUT_SECONDS = 15.0  # StoreResource's default, which the code location uses
SIGNATURE = re.compile(r"X-Amz-Signature=[0-9a-fA-F]{16,}")

# Order kinds and their share of the orders.
KINDS = {
    "single": 16, "multi": 14, "image": 10, "waiting_paid": 12, "unpaid": 10, "canceled": 8, "slow": 10,
    "email_pending": 10, "bad_quantity": 4,
}
FULFILLABLE = {"single", "multi", "image", "waiting_paid", "slow", "email_pending"}
PLACES_ORDER = {"single", "multi", "image", "waiting_paid", "slow", "bad_quantity"}  # kinds that buy at Kinguin

KILLS = ("kinguin_post_answered", "s3_put_answered", "resend_received", "resend_answered", "random")
STALLS = ("stall_past_lease", "stall_past_statement_timeout")


# -- the plan ----------------------------------------------------------------------------------------------
@dataclass
class OrderPlan:
    order_id: str
    kind: str
    email: str
    payment_id: str | None = None
    faults: list[str] = field(default_factory=list)
    kill: str | None = None
    stall: str | None = None
    concurrent: bool = False


def applicable_faults(kind: str) -> list[str]:
    faults = []
    if kind in PLACES_ORDER:
        faults += ["kinguin_place_5xx", "kinguin_place_429", "kinguin_place_lost", "kinguin_place_commit_500",
                   "kinguin_keys_5xx", "kinguin_keys_429", "kinguin_keys_lost", "s3_put_503", "s3_put_lost",
                   "s3_put_commit_500"]
    if kind in PLACES_ORDER | {"canceled"}:
        faults += ["kinguin_status_5xx", "kinguin_status_429"]
    if kind in ("waiting_paid", "unpaid"):
        faults += ["nowpayments_5xx", "nowpayments_429"]
    if kind in FULFILLABLE | {"bad_quantity"}:
        faults += ["resend_5xx", "resend_429", "resend_lost", "resend_commit_500"]
    return faults


def applicable_kills(kind: str) -> list[str]:
    kills = ["random"]
    if kind in PLACES_ORDER:
        kills += ["kinguin_post_answered", "s3_put_answered"]
    if kind in FULFILLABLE | {"bad_quantity"}:
        kills += ["resend_received", "resend_answered"]
    return kills


def make_plan(n: int, rng: random.Random, *, concurrent_share: float) -> list[OrderPlan]:
    weighted = [k for k, weight in KINDS.items() for _ in range(weight)]
    kinds = list(KINDS)[:n] + [rng.choice(weighted) for _ in range(n - len(KINDS))]  # every kind at least once
    plans = [OrderPlan(str(uuid.UUID(int=rng.getrandbits(128))), kind, f"customer-{i}@example.com")
             for i, kind in enumerate(kinds)]
    for plan in plans:
        options = applicable_faults(plan.kind)
        plan.faults = rng.sample(options, k=min(len(options), rng.choice((0, 1, 1, 2, 2, 3))))
        if rng.random() < 0.3:
            plan.kill = rng.choice(applicable_kills(plan.kind))
    placers = [p for p in plans if p.kind in {"single", "multi", "image"} and p.kill is None]
    for stall, plan in zip(STALLS * max(1, n // 50), rng.sample(placers, k=min(len(placers), 2 * max(1, n // 50))),
                           strict=False):
        plan.stall, plan.faults = stall, []
    fulfillable = [p for p in plans if p.kind in FULFILLABLE and p.stall is None]
    for plan in rng.sample(fulfillable, k=min(len(fulfillable), max(1, round(n * concurrent_share)))):
        plan.concurrent = True
    return plans


# -- seeding -----------------------------------------------------------------------------------------------
class Catalogue:
    """A few products per key type and delivery speed, at the Kinguin simulator and in BitLoot's catalogue."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.text = [self._product("text/plain") for _ in range(3)]
        self.images = [self._product(t) for t in ("image/png", "image/jpeg", "image/gif")]
        self.slow = self._product("text/plain", delivery_mode="after_polls=2")

    def _product(self, key_type: str, delivery_mode: str | None = None) -> SeedProduct:
        kinguin_id = uuid.uuid4().hex[:24]
        self.stack.kinguin.add_product(kinguin_id, price=5.0, stock=1_000_000, key_type=key_type,
                                       delivery_mode=delivery_mode)
        return insert_product(self.stack.engine, SeedProduct(kinguin_id, f"Game {kinguin_id}", cost=Decimal("5")))


def seed(stack: Stack, vault: KeyVault, plans: list[OrderPlan], rng: random.Random) -> None:
    catalogue = Catalogue(stack)
    for plan in plans:
        seed_order(stack, vault, catalogue, plan, rng)


def seed_order(stack: Stack, vault: KeyVault, catalogue: Catalogue, plan: OrderPlan, rng: random.Random) -> None:
    common = {"order_id": plan.order_id, "email": plan.email, "age": dt.timedelta(minutes=30)}
    if plan.kind == "multi":
        insert_order(stack.engine, [rng.choice(catalogue.text) for _ in range(rng.randint(2, 4))], **common)
    elif plan.kind == "image":
        insert_order(stack.engine, rng.sample(catalogue.images, k=rng.randint(1, 2)), **common)
    elif plan.kind in ("waiting_paid", "unpaid"):
        plan.payment_id = str(rng.randrange(10**9, 10**10))
        insert_order(stack.engine, [rng.choice(catalogue.text)], status="waiting", payment_status="waiting",
                     payment_id=plan.payment_id, **common)
        stack.nowpayments.set_payment(plan.payment_id, "finished" if plan.kind == "waiting_paid" else "waiting",
                                      order_id=plan.order_id)
    elif plan.kind == "slow":
        insert_order(stack.engine, [catalogue.slow], **common)
    elif plan.kind == "canceled":
        product = rng.choice(catalogue.text)
        planted = stack.kinguin.plant_order(plan.order_id, [(product.kinguin_product_id, 1)], status="canceled")
        insert_order(stack.engine, [product], kinguin_reservation_id=planted.order_id, **common)
    elif plan.kind == "email_pending":
        seed_fulfilled_without_email(stack, vault, rng.choice(catalogue.text), plan, common)
    elif plan.kind == "bad_quantity":  # bad data: BitLoot writes one row per unit, never quantity 3
        insert_order(stack.engine, [rng.choice(catalogue.text)], **common)
        with stack.engine.begin() as conn:
            conn.execute(sa.update(order_items).where(order_items.c.orderId == plan.order_id).values(quantity=3))
    else:
        insert_order(stack.engine, [rng.choice(catalogue.text)], **common)


def seed_fulfilled_without_email(stack: Stack, vault: KeyVault, product: SeedProduct, plan: OrderPlan,
                                 common: dict) -> None:
    """Delivered by BitLoot (Kinguin order, key object, `keys` row, signed URL) but the email never went out."""
    planted = stack.kinguin.plant_order(plan.order_id, [(product.kinguin_product_id, 1)], status="completed")
    insert_order(stack.engine, [product], status="fulfilled", kinguin_reservation_id=planted.order_id, **common)
    with KinguinClient(stack.kinguin.base_url, stack.kinguin.api_key) as client:
        key = client.get_keys(planted.order_id)[0]
    store = Store(stack.engine)
    item = store.load_order(plan.order_id).items[0]
    path = key_object_path(plan.order_id, item.id, key.type)
    vault.put_key(path, key.content(), key.type)
    url = vault.presign_get(path, filename=attachment_filename(plan.order_id, item.id, key.type),
                            content_type=key.type)
    store.record_stored_key(plan.order_id, item.id, path, key.type, url)


# -- faults --------------------------------------------------------------------------------------------------
@dataclass
class InjectedFault:
    kind: str
    fault: Fault | Outage
    times: int

    @property
    def served(self) -> int:
        return self.times - max(self.fault.times, 0)


class FaultInjector:
    def __init__(self, stack: Stack, proxy: FaultyS3Proxy, rng: random.Random):
        self.stack, self.proxy, self.rng = stack, proxy, rng
        self.injected: list[InjectedFault] = []
        self.windows: list[Outage] = []

    def _kinguin_order_of(self, order_id: str) -> Callable[[RecordedRequest], bool]:
        """Requests about the Kinguin order(s) placed for this BitLoot order (ids appear in the path)."""
        sim = self.stack.kinguin

        def where(record: RecordedRequest) -> bool:
            return any(o.order_id in record.path for o in sim.orders_for_external_id(order_id))

        return where

    def _add(self, kind: str, server, route: str, fault: Fault) -> None:
        server.inject(route, fault)
        self.injected.append(InjectedFault(kind, fault, fault.times))

    def inject(self, plan: OrderPlan) -> None:
        kinguin, resend, nowpayments = self.stack.kinguin, self.stack.resend, self.stack.nowpayments
        placed = {"match": lambda body, oid=plan.order_id: isinstance(body, dict)
                  and body.get("orderExternalId") == oid}
        about = {"where": self._kinguin_order_of(plan.order_id)}
        mail = {"match": lambda body, to=plan.email: isinstance(body, dict) and body.get("to") == [to]}
        payment = {"where": lambda record, pid=plan.payment_id: record.path.endswith(f"/{pid}")}
        retry_after = self.rng.choice((1, 2))
        if plan.kill == "resend_received":  # the worker dies as the call arrives; the email must not go out
            self._add("resend_5xx", resend, "send_email", Fault(status=503, **mail))
        for kind in plan.faults:
            s3_path = f"orders/{plan.order_id}/"
            match kind:
                case "kinguin_place_5xx":
                    self._add(kind, kinguin, "place_order_v2", Fault(status=503, **placed))
                case "kinguin_place_429":
                    self._add(kind, kinguin, "place_order_v2", Fault(status=429, retry_after=retry_after, **placed))
                case "kinguin_place_lost":
                    self._add(kind, kinguin, "place_order_v2", Fault(lose_response=True, **placed))
                case "kinguin_place_commit_500":
                    self._add(kind, kinguin, "place_order_v2", Fault(status=500, commit=True, **placed))
                case "kinguin_status_5xx":
                    self._add(kind, kinguin, "get_order", Fault(status=502, times=2, **about))
                case "kinguin_status_429":
                    self._add(kind, kinguin, "get_order", Fault(status=429, retry_after=retry_after, **about))
                case "kinguin_keys_5xx":
                    self._add(kind, kinguin, "get_keys", Fault(status=500, **about))
                case "kinguin_keys_429":
                    self._add(kind, kinguin, "get_keys", Fault(status=429, retry_after=retry_after, **about))
                case "kinguin_keys_lost":
                    self._add(kind, kinguin, "get_keys", Fault(lose_response=True, **about))
                case "nowpayments_5xx":
                    self._add(kind, nowpayments, "get_payment", Fault(status=500, times=2, **payment))
                case "nowpayments_429":
                    self._add(kind, nowpayments, "get_payment", Fault(status=429, retry_after=retry_after, **payment))
                case "resend_5xx":
                    self._add(kind, resend, "send_email", Fault(status=502, **mail))
                case "resend_429":
                    self._add(kind, resend, "send_email", Fault(status=429, retry_after=retry_after, **mail))
                case "resend_lost":
                    self._add(kind, resend, "send_email", Fault(lose_response=True, **mail))
                case "resend_commit_500":
                    self._add(kind, resend, "send_email", Fault(status=500, commit=True, **mail))
                case "s3_put_503":
                    outage = self.proxy.fail(s3_path, 2, method="PUT")
                    self.injected.append(InjectedFault(kind, outage, 2))
                case "s3_put_lost":
                    self.injected.append(InjectedFault(kind, self.proxy.fail(s3_path, 1, mode="lost", method="PUT"), 1))
                case "s3_put_commit_500":
                    outage = self.proxy.fail(s3_path, 1, mode="commit_500", method="PUT")
                    self.injected.append(InjectedFault(kind, outage, 1))

    def served(self) -> Counter:
        counts: Counter = Counter()
        for injected in self.injected:
            counts[injected.kind] += injected.served
        counts["s3_outage_window"] = self.proxy.failed - sum(
            i.served for i in self.injected if isinstance(i.fault, Outage))
        return counts


# -- run workers ---------------------------------------------------------------------------------------------
@dataclass
class Worker:
    process: multiprocessing.process.BaseProcess
    order_id: str
    run_id: str
    trigger: str
    started: float
    kill_at: float | None = None
    killed_at: float | None = None
    failed_over: bool = False  # its run was failed for being over max runtime


@dataclass
class Kill:
    order_id: str
    trigger: str
    at: float
    repicked_after: float | None = None
    resolved: bool = False  # settled without needing the sweep again


class Runs:
    """Starts, kills and reaps run workers; fails the runs of killed workers after `max_runtime`, as the run
    monitor would for a run over its `dagster/max_runtime`."""

    def __init__(self, instance: dg.DagsterInstance, output_dir: Path, max_runtime: float):
        import _chaos_worker  # imports the code location: only after the environment points at the stand-ins

        self.worker_module = _chaos_worker
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["__main__", "_chaos_worker"])
        self.instance, self.output_dir, self.max_runtime = instance, output_dir, max_runtime
        self.live: dict[str, Worker] = {}
        self.dead: list[Worker] = []
        self.started_count: Counter = Counter()
        self.lock = threading.RLock()

    def start(self, order_id: str, run_config: dict, tags: dict, trigger: str, kill_after: float | None) -> Worker:
        run_id = str(uuid.uuid4())
        spec = self.worker_module.RunSpec(run_id, run_config, tags, str(self.output_dir / f"{run_id}.log"))
        process = self.context.Process(target=self.worker_module.run_one, args=(spec,), daemon=True)
        process.start()
        now = time.monotonic()
        worker = Worker(process, order_id, run_id, trigger, now, now + kill_after if kill_after else None)
        with self.lock:
            self.live[run_id] = worker
            self.started_count[trigger] += 1
        return worker

    def of_order(self, order_id: str) -> list[Worker]:
        with self.lock:
            return [w for w in self.live.values() if w.order_id == order_id]

    def kill(self, worker: Worker) -> None:
        with self.lock:
            if worker.killed_at is None and worker.process.pid:
                with contextlib.suppress(ProcessLookupError):  # it may have just ended by itself
                    os.kill(worker.process.pid, signal.SIGKILL)
                worker.killed_at = time.monotonic()

    def reap(self) -> list[Worker]:
        """Collect ended workers; kill those whose random moment came (returned); fail killed runs whose
        max runtime passed."""
        now, killed = time.monotonic(), []
        with self.lock:
            for worker in list(self.live.values()):
                if worker.kill_at is not None and worker.killed_at is None and now >= worker.kill_at:
                    self.kill(worker)
                    killed.append(worker)
                if worker.process.exitcode is not None:
                    worker.process.join()
                    del self.live[worker.run_id]
                    self.dead.append(worker)
            overdue = [w for w in self.dead if w.killed_at is not None and not w.failed_over
                       and now - w.started >= self.max_runtime]
        for worker in overdue:
            self._fail_if_running(worker)
        return killed

    def _fail_if_running(self, worker: Worker) -> None:
        worker.failed_over = True
        run = self.instance.get_run_by_id(worker.run_id)
        if run is not None and run.status in IN_FLIGHT:
            self.instance.report_run_failed(run, f"run worker killed; over max runtime {self.max_runtime:g} s")

    def busy_orders(self) -> set[str]:
        with self.lock:
            return {w.order_id for w in self.live.values()}

    def crashed(self) -> int:
        return sum(1 for w in self.dead if w.killed_at is None and w.process.exitcode != 0)


# -- the chaos loop ----------------------------------------------------------------------------------------
@dataclass
class Settings:
    orders: int = 100
    seed: int = 1
    lease_seconds: int = 8
    parallel: int = 6
    sweep_interval: float = 1.0
    max_runtime: float = 30.0
    concurrent: float = 0.1
    deadline: float = 1500.0

    @property
    def repick_bound(self) -> float:
        """How soon after a kill the sweep should ask for the order again: the lease, the longest backoff,
        one sweep interval and a few seconds for the loop itself."""
        return self.lease_seconds + BACKOFF_CAP_SECONDS + self.sweep_interval + 3.0


BACKOFF_CAP_SECONDS = 4.0


def policy_env(settings: Settings) -> dict[str, str]:
    """Short lease, backoff and supplier polls, no grace period, so a run of minutes shows hours of sweeping."""
    return {
        "RECONCILE_LEASE_SECONDS": str(settings.lease_seconds),
        "RECONCILE_GRACE_MINUTES": "0",
        "RECONCILE_BACKOFF_BASE_SECONDS": "1",
        "RECONCILE_BACKOFF_CAP_SECONDS": str(BACKOFF_CAP_SECONDS),
        "RECONCILE_SUPPLIER_POLL_SECONDS": "0.5",
        # Retry-After answers here are 1-2 s; waits must fit twice in the short lease.
        "RECONCILE_MAX_RETRY_WAIT_SECONDS": str(settings.lease_seconds / 4),
        "RECONCILE_MAX_RUNS_PER_TICK": "25",
        # The chaos loop launches per-order runs only; the batch path's invariants are tested in
        # tests/ops/test_fulfill_backlog.py.
        "RECONCILE_BATCH_THRESHOLD": "1000000",
    }


class Chaos:
    def __init__(self, settings: Settings, stack: Stack, proxy: FaultyS3Proxy, instance: dg.DagsterInstance,
                 runs: Runs, plans: list[OrderPlan], rng: random.Random):
        from bitloot_reconcile.definitions import build_resources
        from bitloot_reconcile.settings import load_settings

        self.settings, self.stack, self.proxy, self.instance, self.runs = settings, stack, proxy, instance, runs
        self.plans = {p.order_id: p for p in plans}
        self.rng = rng
        self.resources = build_resources(load_settings())  # from the environment chaos_run sets up
        self.run_keys: set[str] = set()
        self.queue: deque[tuple[str, dict, dict, str]] = deque()
        self.kills: list[Kill] = []
        self.awaiting_repick: dict[str, Kill] = {}
        self.kill_plans = {p.order_id: p.kill for p in plans if p.kill}
        self.stall_plans = {p.order_id: p.stall for p in plans if p.stall}
        self.stalls_done: Counter = Counter()
        self.concurrent_runs = 0
        self.lock = threading.Lock()
        self._watch()

    # -- kills on what the simulators see ---------------------------------------------------------------
    def _watch(self) -> None:
        kinguin, resend = self.stack.kinguin, self.stack.resend

        def on_kinguin(record: RecordedRequest, phase: str) -> None:
            if record.route == "place_order_v2" and phase == "answered" and isinstance(record.body, dict):
                self._trigger(record.body.get("orderExternalId"), "kinguin_post_answered")
            if record.route == "get_keys" and phase == "received":
                for order_id in list(self.stall_plans):
                    if any(o.order_id in record.path for o in kinguin.orders_for_external_id(order_id)):
                        self._stall(order_id)

        def on_resend(record: RecordedRequest, phase: str) -> None:
            to = record.body.get("to") if isinstance(record.body, dict) else None
            order_id = self.by_email.get(to[0]) if to else None
            self._trigger(order_id, f"resend_{phase}")

        def on_s3(method: str, path: str, status: int | None) -> None:
            found = re.search(r"/orders/([0-9a-f-]{36})/", path)
            if method == "PUT" and found:
                self._trigger(found.group(1), "s3_put_answered")

        self.by_email = {p.email: p.order_id for p in self.plans.values()}
        kinguin.observe(on_kinguin)
        resend.observe(on_resend)
        self.proxy.observe(on_s3)

    def _trigger(self, order_id: str | None, trigger: str) -> None:
        """Kill the worker that holds this order's lease (every worker of the order if none does)."""
        with self.lock:
            if not order_id or self.kill_plans.get(order_id) != trigger:
                return
            workers = self.runs.of_order(order_id)
            if not workers:
                return
            del self.kill_plans[order_id]
        if len(workers) > 1:  # the one doing the work holds the lease; looked up only when it matters (ms count)
            owner = Store(self.stack.engine).get_state(order_id).lease_owner
            workers = [w for w in workers if w.run_id == owner] or workers
        for worker in workers:
            self.runs.kill(worker)
        self._record_kill(order_id, trigger)

    def _record_kill(self, order_id: str, trigger: str) -> None:
        kill = Kill(order_id, trigger, time.monotonic())
        with self.lock:
            self.kills.append(kill)
            self.awaiting_repick[order_id] = kill

    # -- stalled store writes ---------------------------------------------------------------------------
    def _stall(self, order_id: str) -> None:
        """First keys call of the order: lock its item rows. Past the statement timeout; or past the lease: then
        an admin run starts as the lease expires, and the lock goes once both runs wait on it (both inserted
        their `keys` row), or just before the first run's statement timeout."""
        with self.lock:
            stall = self.stall_plans.pop(order_id, None)
        if stall is None:
            return
        conn = self.stack.engine.connect()
        conn.begin()
        # FOR NO KEY UPDATE: blocks the run's UPDATE of the item rows, not the key assignment's foreign key.
        conn.execute(sa.select(order_items.c.id).where(order_items.c.orderId == order_id)
                     .with_for_update(key_share=True))
        self.stalls_done[stall] += 1
        if stall == "stall_past_statement_timeout":
            threading.Timer(STATEMENT_TIMEOUT_SECONDS + 2, conn.close).start()
            return
        expires = Store(self.stack.engine).get_state(order_id).lease_expires_at
        wait = (expires - dt.datetime.now(dt.UTC)).total_seconds() if expires else self.settings.lease_seconds
        threading.Timer(max(wait, 0) + 0.3, self._admin_run, args=(order_id, "run looks stuck")).start()
        threading.Thread(target=self._release_when_raced, args=(conn,), daemon=True).start()

    def _release_when_raced(self, conn: sa.Connection) -> None:
        holder = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE :holder = ANY(pg_blocking_pids(pid))")
        give_up = time.monotonic() + STATEMENT_TIMEOUT_SECONDS - 1.5
        with self.stack.engine.connect() as probe:
            while time.monotonic() < give_up and probe.execute(waiting, {"holder": holder}).scalar_one() < 2:
                time.sleep(0.1)
        conn.close()

    def _admin_run(self, order_id: str, reason: str) -> None:
        tags = request_tags(order_id, trigger=TRIGGER_ADMIN, reason=reason, requested_by="admin@bitloot.io")
        config = {"order_id": order_id, "reason": reason, "requested_by": "admin@bitloot.io"}
        self._start(order_id, config, tags, "admin")

    def _start(self, order_id: str, config: dict, tags: dict, trigger: str) -> None:
        plan = self.plans[order_id]
        random_kill = plan.kill == "random" and self.kill_plans.get(order_id) == "random"
        kill_after = self.rng.uniform(0.3, 4.0) if random_kill else None
        if random_kill:
            del self.kill_plans[order_id]
        self.runs.start(order_id, config, tags, trigger, kill_after)

    # -- the sweep ----------------------------------------------------------------------------------------
    def sweep(self) -> None:
        from tests.fixtures.definitions import stuck_orders_sensor

        resources = {k: self.resources[k] for k in ("store", "policy")}
        with dg.build_sensor_context(instance=self.instance, resources=resources) as context:
            result = stuck_orders_sensor(context)
        queued = {order_id for order_id, *_ in self.queue}
        for request in getattr(result, "run_requests", None) or []:
            order_id = request.tags["bitloot/order_id"]
            if request.run_key in self.run_keys or order_id in queued:
                continue  # the daemon never launches a run key twice; a queued run counts as in flight
            self.run_keys.add(request.run_key)
            with self.lock:
                kill = self.awaiting_repick.pop(order_id, None)
            if kill is not None:
                kill.repicked_after = time.monotonic() - kill.at
            tags = {**request.tags, "dagster/sensor_name": "stuck_orders_sensor", "dagster/run_key": request.run_key}
            plan = self.plans[order_id]
            if plan.concurrent:
                plan.concurrent = False
                self._start(order_id, request.run_config, tags, "sensor")
                for n in range(3):
                    self._admin_run(order_id, f"customer wrote in ({n + 1})")
                self.concurrent_runs += 4
            else:
                self.queue.append((order_id, request.run_config, tags, "sensor"))

    def launch_queued(self) -> None:
        while self.queue and len(self.runs.live) < self.settings.parallel:
            self._start(*self.queue.popleft())

    def run(self) -> float:
        started = time.monotonic()
        next_sweep = started
        while time.monotonic() - started < self.settings.deadline:
            for worker in self.runs.reap():
                self._record_kill(worker.order_id, "random")
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + self.settings.sweep_interval
            self.launch_queued()
            if not self.queue and not self.runs.live and self.all_settled():
                break
            time.sleep(0.1)
        for worker in list(self.runs.live.values()):  # out of time: stop what is left
            self.runs.kill(worker)
        self.runs.reap()
        return time.monotonic() - started

    def all_settled(self) -> bool:
        """Every order in a state no sweep will change: fulfilled and emailed, or waiting for a person, or
        (unpaid) recorded as not paid. A killed order that settled without the sweep needs no re-pick."""
        states = read_states(self.stack.engine, list(self.plans))
        done = {oid for oid, state in states.items() if settled(self.plans[oid].kind, state)}
        with self.lock:
            for oid in done & set(self.awaiting_repick):
                self.awaiting_repick.pop(oid).resolved = True
        return len(done) == len(self.plans)

    def late_repicks(self) -> list[Kill]:
        """Kills after which the sweep asked for the order later than the bound (a figure: it depends on the
        machine's load), or never (a violation: the order was left blocked)."""
        bound = self.settings.repick_bound
        return [k for k in self.kills if self.never_repicked(k) or (k.repicked_after or 0) > bound]

    @staticmethod
    def never_repicked(kill: Kill) -> bool:
        return kill.repicked_after is None and not kill.resolved


@dataclass(frozen=True)
class OrderState:
    status: str
    email_sent: bool
    last_outcome: str | None
    lease_owner: str | None


def read_states(engine: sa.Engine, order_ids: list[str]) -> dict[str, OrderState]:
    query = (
        sa.select(orders.c.id, orders.c.status, orders.c.completionEmailSent, reconcile_state.c.last_outcome,
                  reconcile_state.c.lease_owner)
        .select_from(orders.outerjoin(reconcile_state, reconcile_state.c.order_id == orders.c.id))
        .where(orders.c.id.in_(order_ids))
    )
    with engine.connect() as conn:
        return {str(r.id): OrderState(r.status, bool(r.completionEmailSent), r.last_outcome, r.lease_owner)
                for r in conn.execute(query)}


def settled(kind: str, state: OrderState) -> bool:
    if state.status == "fulfilled" and state.email_sent:
        return True
    if state.last_outcome == Outcome.NEEDS_ATTENTION:
        return True
    return kind == "unpaid" and state.last_outcome == Outcome.PAYMENT_NOT_CONFIRMED and state.lease_owner is None


def converged(kind: str, state: OrderState) -> bool:
    """The end state each kind must reach."""
    if kind in FULFILLABLE:
        return state.status == "fulfilled" and state.email_sent
    if kind == "unpaid":
        return state.status == "waiting" and state.last_outcome in (Outcome.PAYMENT_NOT_CONFIRMED,
                                                                     Outcome.NEEDS_ATTENTION)
    return state.last_outcome == Outcome.NEEDS_ATTENTION and not state.email_sent  # canceled, bad_quantity


# -- what the checker looks at -------------------------------------------------------------------------------
@dataclass
class Observed:
    """Everything the invariants are checked on, collected after the run (or built by hand in tests)."""

    kinds: dict[str, str]                           # order id -> kind
    states: dict[str, OrderState]
    items: dict[str, list[str]]                     # order id -> its item ids
    signed_items: set[str]                          # items with a signed URL
    key_rows: list[str]                             # orderItemId of every `keys` row
    bucket: set[str]                                # object paths in the key bucket
    kinguin_orders: list[tuple[str | None, str, int]]  # (orderExternalId, status, keys charged)
    emails: list[str]                               # recipient of every email Resend sent
    email_of: dict[str, str]                        # order id -> customer address
    documents: dict[str, list[str]] = field(default_factory=dict)  # place -> texts Dagster and runs wrote
    secrets: dict[str, list[str]] = field(default_factory=dict)  # kind -> values that must appear nowhere
    never_repicked: int = 0


SECRET_PLACES = ("event log", "compute logs", "run storage", "op outputs", "run output")


def check(observed: Observed) -> dict[str, int]:
    """Violation counts; every one must be zero."""
    key_rows = Counter(observed.key_rows)
    items_of = observed.items
    stems = {path.rsplit(".", 1)[0] for path in observed.bucket}

    def stored(order_id: str, item_id: str) -> bool:
        return key_object_path(order_id, item_id, "text/plain").rsplit(".", 1)[0] in stems
    placed = Counter(ext for ext, _, _ in observed.kinguin_orders if ext)
    charged = Counter()
    for ext, status, keys in observed.kinguin_orders:
        if ext and status not in ("canceled", "refunded"):
            charged[ext] += keys
    emails = Counter(observed.emails)
    unpaid = [oid for oid, kind in observed.kinds.items() if kind == "unpaid"]
    violations = {
        "duplicate Kinguin orders": sum(n - 1 for n in placed.values() if n > 1),
        "duplicate emails": sum(max(0, emails[observed.email_of[oid]] - 1) for oid in observed.kinds),
        "keys for unpaid orders": sum(
            1 for oid in unpaid
            if placed[oid] or any(key_rows[i] for i in items_of[oid]) or observed.states[oid].status == "fulfilled"
        ),
        "fulfilled orders missing a key": sum(
            1 for oid, state in observed.states.items()
            if state.status == "fulfilled" and not all(
                key_rows[i] and i in observed.signed_items and stored(oid, i) for i in items_of[oid])
        ),
        "duplicate key rows": sum(n - 1 for n in key_rows.values() if n > 1),
        "keys bought but not delivered": sum(
            max(0, charged[oid] - sum(1 for i in items_of[oid] if key_rows[i])) for oid in observed.kinds
        ),
        "orders not converged": sum(
            1 for oid, kind in observed.kinds.items() if not converged(kind, observed.states[oid])
        ),
        "killed orders never picked up": observed.never_repicked,
    }
    for place, found in secrets_found(observed).items():
        violations[f"secrets in {place}"] = sum(found.values())
    return violations


def secrets_found(observed: Observed) -> dict[str, Counter]:
    """Per place: how many of its documents hold each kind of secret (API key, R2 secret, serial, signature)."""
    kinds = {secret: kind for kind, values in observed.secrets.items() for secret in values if secret}
    literal = "|".join(re.escape(s) for s in sorted(kinds, key=len, reverse=True))
    pattern = re.compile(f"{SIGNATURE.pattern}|{literal}" if literal else SIGNATURE.pattern)
    found = {}
    for place in SECRET_PLACES:
        counts: Counter = Counter()
        for text in observed.documents.get(place, []):
            for kind in {kinds.get(m.group(0), "URL signature") for m in pattern.finditer(text)}:
                counts[kind] += 1
        found[place] = counts
    return found


# -- collecting -------------------------------------------------------------------------------------------
def collect(stack: Stack, vault: KeyVault, plans: list[OrderPlan], dagster_url: str, home: Path,
            output_dir: Path, never_repicked: int) -> Observed:
    ids = [p.order_id for p in plans]
    with stack.engine.connect() as conn:
        item_rows = conn.execute(
            sa.select(order_items.c.id, order_items.c.orderId, order_items.c.signedUrl)
            .where(order_items.c.orderId.in_(ids))).all()
        key_rows = [str(r.orderItemId) for r in conn.execute(sa.select(keys_table.c.orderItemId))]
    items: dict[str, list[str]] = collections.defaultdict(list)
    for row in item_rows:
        items[str(row.orderId)].append(str(row.id))
    sim = stack.kinguin
    with sim._lock:
        kinguin_orders = [(o.order_external_id, o.status, len(o.keys)) for o in sim.orders.values()]
        serials = [k.serial for o in sim.orders.values() for k in o.keys]
    return Observed(
        kinds={p.order_id: p.kind for p in plans},
        states=read_states(stack.engine, ids),
        items=dict(items),
        signed_items={str(r.id) for r in item_rows if r.signedUrl},
        key_rows=key_rows,
        bucket=set(list_bucket(vault)),
        kinguin_orders=kinguin_orders,
        emails=[to for email in stack.resend.sent for to in email["to"]],
        email_of={p.order_id: p.email for p in plans},
        documents=dagster_documents(dagster_url, home, output_dir),
        secrets={"API key": [stack.kinguin.api_key, stack.nowpayments.api_key, stack.resend.api_key],
                 "R2 secret": [stack.s3.secret_access_key], "key serial": serials},
        never_repicked=never_repicked,
    )


def list_bucket(vault: KeyVault) -> Iterator[str]:
    paginator = vault._client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=vault.bucket):
        for obj in page.get("Contents", []):
            yield obj["Key"]


def dagster_documents(dagster_url: str, home: Path, output_dir: Path) -> dict[str, list[str]]:
    """Every text Dagster stored for the runs, by place, plus what the run processes printed."""
    engine = sa.create_engine(dagster_url)
    try:
        with engine.connect() as conn:
            events = list(conn.execute(sa.text("SELECT event FROM event_logs")).scalars())
            runs = list(conn.execute(sa.text("SELECT run_body FROM runs")).scalars())
            tags = [f"{k}={v}" for k, v in conn.execute(sa.text("SELECT key, value FROM run_tags"))]
            snapshots = [zlib.decompress(b).decode("utf-8", "replace")
                         for b in conn.execute(sa.text("SELECT snapshot_body FROM snapshots")).scalars()]
    finally:
        engine.dispose()
    storage = [p for p in (home / "storage").rglob("*") if p.is_file()]
    return {
        "event log": events,
        "run storage": runs + tags + snapshots,
        "compute logs": [read_text(p) for p in storage if "compute_logs" in p.parts],
        "op outputs": [read_text(p) for p in storage if "compute_logs" not in p.parts],
        "run output": [read_text(p) for p in output_dir.glob("*.log")],
    }


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


# -- the whole run --------------------------------------------------------------------------------------------
@dataclass
class Report:
    settings: Settings
    seconds: float
    kinds: Counter
    faults: Counter
    kills: Counter
    runs: Counter
    concurrent_runs: int
    stalls: Counter
    crashed_workers: int
    repick_seconds: list[float]
    violations: dict[str, int]
    secrets: dict[str, Counter]
    not_converged: list[str]
    late_repicks: list[str]

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def seeded_with_faults(stack_: ExitStack, stack, proxy: FaultyS3Proxy, plans, rng: random.Random):
    """The planned orders in the store and the bucket, each with its faults armed: the vault and the injector."""
    vault = KeyVault(stack.s3.endpoint_url, stack.s3.access_key_id, stack.s3.secret_access_key, stack.bucket)
    stack_.callback(vault.close)
    seed(stack, vault, plans, rng)
    injector = FaultInjector(stack, proxy, rng)
    for plan in plans:
        injector.inject(plan)
    return vault, injector


def not_converged(observed) -> list[str]:
    return [f"{oid} ({observed.kinds[oid]}: {observed.states[oid]})" for oid in observed.kinds
            if not converged(observed.kinds[oid], observed.states[oid])]


def violation_rows(violations: dict[str, int], secrets: dict[str, Counter]) -> list[list[object]]:
    """One report row per invariant: its count, and which secrets were found where."""
    rows: list[list[object]] = []
    for name, count in violations.items():
        found = secrets.get(name.removeprefix("secrets in "), Counter())
        detail = ", ".join(f"{kind} in {n}" for kind, n in sorted(found.items()))
        rows.append([name, count, f"VIOLATION {detail}".strip() if count else "ok"])
    return rows


def chaos_run(settings: Settings) -> Report:
    rng = random.Random(settings.seed)
    plans = make_plan(settings.orders, rng, concurrent_share=settings.concurrent)
    with ExitStack() as stack_:
        stack = stack_.enter_context(stand_ins())
        proxy = FaultyS3Proxy(stack.s3.endpoint_url).start()
        stack_.callback(proxy.stop)
        dagster_url = stack_.enter_context(temp_database("chaos_dagster"))
        dagster_url = dagster_url.replace("postgresql+psycopg:", "postgresql+psycopg2:")  # what Dagster's storage uses
        env = {**stack.env(), "R2_ENDPOINT": proxy.url, **policy_env(settings),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))}
        stack_.enter_context(environment(env))
        instance = stack_.enter_context(dagster_home(f"storage:\n  postgres:\n    postgres_url: {dagster_url}\n"))
        home = Path(os.environ["DAGSTER_HOME"])
        output_dir = Path(stack_.enter_context(tempfile.TemporaryDirectory(prefix="chaos_runs_")))
        vault, injector = seeded_with_faults(stack_, stack, proxy, plans, rng)
        runs = Runs(instance, output_dir, settings.max_runtime)
        chaos = Chaos(settings, stack, proxy, instance, runs, plans, rng)
        for _ in range(2):  # two S3 outage windows for everyone, early in the run
            threading.Timer(rng.uniform(2, 20), proxy.outage_window, args=(rng.uniform(2, 4),)).start()
        seconds = chaos.run()
        repicks = [k.repicked_after for k in chaos.kills if k.repicked_after is not None]
        late = chaos.late_repicks()
        observed = collect(stack, vault, plans, dagster_url, home, output_dir,
                           sum(1 for k in late if chaos.never_repicked(k)))
        violations = check(observed)
        return Report(
            settings=settings, seconds=seconds, kinds=Counter(p.kind for p in plans), faults=injector.served(),
            kills=Counter(k.trigger for k in chaos.kills), runs=runs.started_count,
            concurrent_runs=chaos.concurrent_runs, stalls=chaos.stalls_done, crashed_workers=runs.crashed(),
            repick_seconds=repicks, violations=violations, secrets=secrets_found(observed),
            not_converged=not_converged(observed),
            late_repicks=[f"{k.order_id} ({observed.kinds[k.order_id]}, killed at {k.trigger}): "
                          + (f"re-picked after {k.repicked_after:.0f} s" if k.repicked_after else "never re-picked")
                          for k in late],
        )


def print_report(report: Report) -> None:
    s = report.settings
    rows: list[list[object]] = [
        ["orders", sum(report.kinds.values()), ", ".join(f"{k} {n}" for k, n in sorted(report.kinds.items()))],
        ["wall time", f"{report.seconds:.0f} s", f"seed {s.seed}, lease {s.lease_seconds} s, {s.parallel} runs "
                                                  f"at a time, max runtime {s.max_runtime:g} s"],
        ["faults served", sum(report.faults.values()),
         ", ".join(f"{k} {n}" for k, n in sorted(report.faults.items()) if n)],
        ["kills (SIGKILL)", sum(report.kills.values()), ", ".join(f"{k} {n}" for k, n in sorted(report.kills.items()))],
        ["runs started", sum(report.runs.values()), ", ".join(f"{k} {n}" for k, n in sorted(report.runs.items()))],
        ["concurrent runs", report.concurrent_runs, "sensor run + 3 admin runs on one order at once"],
        ["stalled writes", sum(report.stalls.values()), ", ".join(f"{k} {n}" for k, n in report.stalls.items())],
        ["re-picked after kill", len(report.repick_seconds),
         f"max {max(report.repick_seconds):.1f} s (bound {s.repick_bound:g} s)" if report.repick_seconds else ""],
        ["worker crashes (not killed)", report.crashed_workers, "information"],
    ]
    rows += violation_rows(report.violations, report.secrets)
    print_table("Chaos run", ["", "count", "detail"], rows)
    for line in report.not_converged[:20]:
        console.print(f"not converged: {line}", highlight=False)
    for line in report.late_repicks[:20]:
        console.print(f"picked up late: {line}", highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lease-seconds", type=int, default=Settings.lease_seconds)
    parser.add_argument("--parallel", type=int, default=Settings.parallel, help="run workers at a time")
    parser.add_argument("--max-runtime", type=float, default=Settings.max_runtime,
                        help="seconds after which a killed run is failed (the run monitor's max runtime)")
    parser.add_argument("--deadline", type=float, default=Settings.deadline, help="give up after this many seconds")
    args = parser.parse_args()
    settings = Settings(orders=args.orders, seed=args.seed, lease_seconds=args.lease_seconds,
                        parallel=args.parallel, max_runtime=args.max_runtime, deadline=args.deadline)
    print_machine()
    with stderr_to_file("chaos"):
        report = chaos_run(settings)
    print_report(report)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
