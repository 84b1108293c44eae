"""Chaos run in the production shape: the real `dagster-daemon` (QueuedRunCoordinator, sweep sensor on), one
`dagster api grpc` code server and a `dagster-webserver`, draining N orders through `fulfill_backlog` batches and
`fulfill_order` runs while run workers are SIGKILLed, outside calls fail, admin runs and a second batch race the
batch's orders, BitLoot's switches flip, SeaweedFS goes away, and both PostgreSQL databases restart or lose their
connections; then the invariant checker of `chaos.py` plus the checks of the daemon path.

Processes: this script hosts the simulators (Kinguin, NOWPayments, Resend), an outage proxy in front of SeaweedFS
and the chaos itself. BitLoot's database and Dagster's database each live on a PostgreSQL cluster of the run's
own (initdb in a temporary directory, its own port), so each can be restarted alone; the machine's server is
never touched. Runs are made by the daemon from the sensor's requests and launched by the code server (one
process each), so the delay between a kill and the order's next claim is the product's.

Chaos, all drawn from `--seed`:
- faults per order at every outside call (as `chaos.py`: Kinguin placement, status and keys; NOWPayments;
  Resend; S3 puts), plus SeaweedFS outage windows for everyone;
- SIGKILL of the run process holding an order's lease (a batch, with its other orders mid-step, or an order's
  own run) after its claim, after the Kinguin POST was answered, after an S3 put of a key was answered, after its
  `keys` row, after Resend answered;
- racing: when a batch claims such an order, two admin runs for it (through the webserver, as the CLI's `retry`
  does) or a second `fulfill_backlog` run of it and two of its batch neighbours;
- BitLoot's switches flipped off for a few seconds (kinguin_enabled, email_notifications_enabled,
  fulfillment_enabled) while batches run;
- databases: BitLoot's and Dagster's clusters each stopped (`pg_ctl -m fast`) and started again a few seconds
  later, and every backend of either database terminated (`pg_terminate_backend`), at set points of the drain.

Checks (every count must be 0): those of `chaos.py`, plus killed runs Dagster still showed in flight (holding their
orders from new runs) later than lease + one sweep interval + a tick's slack, and runs still in flight (queued,
starting or started) after every order settled and the sweep had time to fail dead ones.

Usage: uv run python benchmarks/chaos_daemon.py --orders 100 --seed 1   (exit status 1 on violations)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from _harness import REPO_ROOT, Stack, console, print_machine, print_table, stand_ins
from chaos import (
    FULFILLABLE,
    OrderPlan,
    collect,
    environment,
    make_plan,
    not_converged,
    read_states,
    secrets_found,
    seeded_with_faults,
    violation_rows,
)
from chaos import check as check_store
from chaos import policy_env as chaos_policy_env

from bitloot_reconcile.runs_in_flight import IN_FLIGHT
from bitloot_reconcile.store.schema import feature_flags, order_items, reconcile_state
from bitloot_reconcile.store.schema import keys as keys_table
from bitloot_standins.httpserver import RecordedRequest
from bitloot_standins.postgres import PostgresCluster
from bitloot_standins.s3_proxy import FaultyS3Proxy

BIN = Path(sys.executable).parent
# How late after "lease + one sweep interval" a tick of the daemon may come on this loaded machine (its sensor
# loop, the tick's own reads and writes).
TICK_SLACK_SECONDS = 10.0

KILL_POINTS = ("claimed", "kinguin_post_answered", "s3_put_answered", "keys_row", "resend_answered")
BUYS = {"single", "multi", "image", "waiting_paid", "slow"}  # kinds that place a Kinguin order and store keys
SWITCHES = ("kinguin_enabled", "email_notifications_enabled", "fulfillment_enabled")
# Points of the drain (share of orders settled) and what happens there, in order.
EVENTS = (
    (0.05, "restart BitLoot's database"), (0.10, "flip a switch"), (0.15, "SeaweedFS outage"),
    (0.20, "restart Dagster's database"), (0.30, "cut BitLoot's connections"), (0.35, "flip a switch"),
    (0.40, "cut Dagster's connections"), (0.50, "restart BitLoot's database"), (0.55, "SeaweedFS outage"),
    (0.60, "restart Dagster's database"), (0.65, "flip a switch"), (0.70, "cut BitLoot's connections"),
    (0.75, "cut Dagster's connections"),
)


@dataclass
class Settings:
    orders: int = 100
    seed: int = 1
    # The sweep counts a started run that held no lease for a whole lease period as gone: the lease must cover a
    # worker's way from its start event to its first claim on a loaded machine (seconds, tens of them at load 30).
    lease_seconds: int = 30
    sweep_interval: int = 3
    batch_threshold: int = 6
    batch_max_orders: int = 40
    kill_share: float = 0.05
    race_share: float = 0.03
    deadline: float = 3000.0

    @property
    def dead_run_bound(self) -> float:
        return self.lease_seconds + self.sweep_interval + TICK_SLACK_SECONDS


def policy_env(settings: Settings) -> dict[str, str]:
    """`chaos.py`'s short lease, backoff and supplier polls, no grace period; short hold re-checks; small batches."""
    return {
        **chaos_policy_env(settings),
        "RECONCILE_HOLD_RECHECK_SECONDS": "3",
        "RECONCILE_SWEEP_INTERVAL_SECONDS": str(settings.sweep_interval),
        "RECONCILE_BATCH_THRESHOLD": str(settings.batch_threshold),
        "RECONCILE_BATCH_MAX_ORDERS": str(settings.batch_max_orders),
    }


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass
class DaemonPlan:
    kills: dict[str, str]       # order id -> kill point
    races: dict[str, str]       # order id -> "admin" | "batch"


def plan_chaos(plans: list[OrderPlan], rng: random.Random, settings: Settings) -> DaemonPlan:
    """Faults as `chaos.py` draws them; kills and races of our own, each kind of kill at least once."""
    for plan in plans:
        plan.kill, plan.stall, plan.concurrent = None, None, False
    kills: dict[str, str] = {}
    n_kills = max(len(KILL_POINTS), round(len(plans) * settings.kill_share))
    for i in range(n_kills):
        point = KILL_POINTS[i % len(KILL_POINTS)]
        kinds = BUYS if point in ("kinguin_post_answered", "s3_put_answered", "keys_row") else (
            FULFILLABLE if point == "resend_answered" else {p.kind for p in plans})
        free = [p for p in plans if p.kind in kinds and p.order_id not in kills]
        if free:
            kills[rng.choice(free).order_id] = point
    candidates = [p.order_id for p in plans if p.kind in FULFILLABLE and p.order_id not in kills]
    chosen = rng.sample(candidates, k=min(len(candidates), max(2, round(len(plans) * settings.race_share))))
    races = {order_id: ("admin", "batch")[i % 2] for i, order_id in enumerate(chosen)}
    return DaemonPlan(kills, races)


# -- processes -----------------------------------------------------------------------------------------------
class Processes:
    """Dagster's processes, each in its own process group (the code server's group holds its run workers)."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env = logs, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.args: dict[str, list[str]] = {}
        self.restarts: Counter = Counter()

    def start(self, name: str, args: list[str]) -> None:
        self.args[name] = args
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(args, cwd=REPO_ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def keep_alive(self) -> None:
        """A process that exited is started again (as a supervisor would), and counted."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.restarts[name] += 1
                self.start(name, self.args[name])

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.procs.values() if p.poll() is None]
            for proc in alive:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            deadline = time.monotonic() + grace
            for proc in alive:
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def run_process_id(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The process executing a launched run, from the pid its worker stamps on the run's start event (the code
    server starts it through multiprocessing: its command line does not name the run)."""
    starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)
    return starts[0].dagster_event.pid if starts and starts[0].dagster_event else None


def wait_for_webserver(url: str, seconds: float = 180) -> None:
    import httpx

    until = time.monotonic() + seconds
    while time.monotonic() < until:
        with suppress(httpx.HTTPError):
            if httpx.get(f"{url}/server_info", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"the webserver at {url} did not answer within {seconds:g} s")


# -- the chaos -------------------------------------------------------------------------------------------------
@dataclass
class Kill:
    order_id: str
    point: str
    run_id: str
    job: str
    at: float
    claimed_again_after: float | None = None  # another run claimed the order
    run_failed_after: float | None = None     # Dagster showed the dead run as ended
    resolved: bool = False                     # the order settled without being claimed again


@dataclass
class Tally:
    events: Counter = field(default_factory=Counter)
    races: Counter = field(default_factory=Counter)
    race_failures: int = 0
    event_failures: list[str] = field(default_factory=list)


class Chaos:
    def __init__(self, settings: Settings, stack: Stack, proxy: FaultyS3Proxy, instance: dg.DagsterInstance,
                 plans: list[OrderPlan], chaos_plan: DaemonPlan, clusters: dict[str, PostgresCluster],
                 databases: dict[str, str], webserver: str, rng: random.Random):
        self.settings, self.stack, self.proxy, self.instance = settings, stack, proxy, instance
        self.plans = {p.order_id: p for p in plans}
        self.kill_plans = dict(chaos_plan.kills)
        self.race_plans = dict(chaos_plan.races)
        self.clusters, self.databases, self.webserver, self.rng = clusters, databases, webserver, rng
        self.kills: list[Kill] = []
        self.tally = Tally()
        self.lock = threading.Lock()
        self.leases: dict[str, tuple[str | None, dt.datetime | None]] = {}
        self.jobs: dict[str, str] = {}  # run id -> job name
        self.pids: dict[str, int] = {}  # run id -> its worker's pid
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.busy = False  # an event is under way
        self.by_email = {p.email: p.order_id for p in plans}
        self.engine = sa.create_engine(stack.store_url, poolclass=sa.pool.NullPool,
                                       connect_args={"connect_timeout": 5})
        self._watch()

    # -- what the simulators see --------------------------------------------------------------------------
    def _watch(self) -> None:
        def on_kinguin(record: RecordedRequest, phase: str) -> None:
            if record.route == "place_order_v2" and phase == "answered" and isinstance(record.body, dict):
                self._trigger(record.body.get("orderExternalId"), "kinguin_post_answered")

        def on_resend(record: RecordedRequest, phase: str) -> None:
            to = record.body.get("to") if isinstance(record.body, dict) else None
            if to and phase == "answered":
                self._trigger(self.by_email.get(to[0]), "resend_answered")

        def on_s3(method: str, path: str, status: int | None) -> None:
            if method == "PUT" and "/orders/" in path:
                self._trigger(path.split("/orders/", 1)[1].split("/", 1)[0], "s3_put_answered")

        self.stack.kinguin.observe(on_kinguin)
        self.stack.resend.observe(on_resend)
        self.proxy.observe(on_s3)

    def _owner(self, order_id: str) -> str | None:
        with suppress(sa.exc.SQLAlchemyError), self.engine.connect() as conn:
            return conn.execute(sa.select(reconcile_state.c.lease_owner)
                                .where(reconcile_state.c.order_id == order_id)).scalar()
        return self.leases.get(order_id, (None, None))[0]  # the database is down: the last lease seen

    def _trigger(self, order_id: str | None, point: str) -> None:
        with self.lock:
            if not order_id or self.kill_plans.get(order_id) != point:
                return
        owner = self._owner(order_id)
        pid = None
        if owner:
            with suppress(Exception):  # Dagster's database is down just then: the next time the point is reached
                pid = self.pids.get(owner) or run_process_id(self.instance, owner)
        if pid is None:
            return
        self.pids[owner] = pid
        with self.lock:
            if self.kill_plans.pop(order_id, None) is None:
                return
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        kill = Kill(order_id, point, owner, self._job(owner), time.monotonic())
        with self.lock:
            self.kills.append(kill)

    def _job(self, run_id: str) -> str:
        if run_id not in self.jobs:
            with suppress(Exception):
                run = self.instance.get_run_by_id(run_id)
                self.jobs[run_id] = run.job_name if run else "?"
        return self.jobs.get(run_id, "?")

    # -- the watch over the store -------------------------------------------------------------------------
    def poll_store(self) -> None:
        """Leases and keys rows: kills at a claim or a keys row, races on a batch's claim, re-claims after kills."""
        ids = list(self.plans)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(reconcile_state.c.order_id, reconcile_state.c.lease_owner,
                                          reconcile_state.c.lease_expires_at)
                                .where(reconcile_state.c.order_id.in_(ids))).all()
            wanting_keys = [o for o, p in self.kill_plans.items() if p == "keys_row"]
            with_keys = set()
            if wanting_keys:
                with_keys = {str(r) for r in conn.execute(
                    sa.select(order_items.c.orderId).join(keys_table, keys_table.c.orderItemId == order_items.c.id)
                    .where(order_items.c.orderId.in_(wanting_keys))).scalars()}
        now = dt.datetime.now(dt.UTC)
        self.leases = {str(r.order_id): (r.lease_owner, r.lease_expires_at) for r in rows}
        for order_id, (owner, expires) in self.leases.items():
            live = owner is not None and expires is not None and expires > now
            if live and self.kill_plans.get(order_id) == "claimed":
                self._trigger(order_id, "claimed")
            if live and order_id in with_keys:
                self._trigger(order_id, "keys_row")
            if live and order_id in self.race_plans and self._job(owner) == "fulfill_backlog":
                threading.Thread(target=self._race, args=(order_id, owner, self.race_plans.pop(order_id)),
                                 daemon=True).start()
        for kill in self.kills:
            owner, expires = self.leases.get(kill.order_id, (None, None))
            if kill.claimed_again_after is None and owner not in (None, kill.run_id) and expires and expires > now:
                kill.claimed_again_after = time.monotonic() - kill.at

    def poll_dead_runs(self) -> None:
        for kill in self.kills:
            if kill.run_failed_after is None:
                run = self.instance.get_run_by_id(kill.run_id)
                if run is not None and run.status not in IN_FLIGHT:
                    kill.run_failed_after = time.monotonic() - kill.at

    # -- racing runs ------------------------------------------------------------------------------------------
    def _race(self, order_id: str, batch_run_id: str, how: str) -> None:
        from dagster_graphql import DagsterGraphQLClient

        from bitloot_reconcile.commands import submit_retry
        from bitloot_reconcile.runs_in_flight import batch_order_ids

        def second_batch() -> None:
            run = self.instance.get_run_by_id(batch_run_id)
            neighbours = [o for o in batch_order_ids(run) if o != order_id][:2] if run else []
            orders = [{"order_id": o, "reason": "second batch"} for o in [order_id, *neighbours]]
            host, port = self.webserver.removeprefix("http://").split(":")
            DagsterGraphQLClient(host, port_number=int(port), timeout=30).submit_job_execution(
                "fulfill_backlog", run_config={"ops": {"work_backlog": {"config": {"orders": orders}}}})

        submissions = [("second batches", second_batch)] if how == "batch" else [
            ("admin runs", lambda n=n: submit_retry(self.webserver, order_id, f"customer wrote in ({n + 1})",
                                                    "admin@bitloot.io")) for n in range(2)]
        for name, submit in submissions:
            for attempt in range(3):  # Dagster's database may be restarting just then
                try:
                    submit()
                    self.tally.races[name] += 1
                    break
                except Exception as exc:
                    if attempt == 2:
                        self.tally.race_failures += 1
                        console.print(f"race on {order_id} not submitted: {type(exc).__name__}", highlight=False)
                    time.sleep(2)

    # -- outages and switches ------------------------------------------------------------------------------
    def run_events(self) -> None:
        while True:
            event = self.events.get()
            if event is None:
                return
            self.busy = True
            try:
                self._event(event)
                self.tally.events[event] += 1
            except Exception as exc:
                self.tally.event_failures.append(f"{event}: {type(exc).__name__}: {exc}")
            finally:
                self.busy = False

    def _event(self, event: str) -> None:
        if event == "restart BitLoot's database":
            self._restart("store")
        elif event == "restart Dagster's database":
            self._restart("dagster")
        elif event == "cut BitLoot's connections":
            self.tally.events["backends cut"] += self.clusters["store"].terminate_backends(self.databases["store"])
        elif event == "cut Dagster's connections":
            self.tally.events["backends cut"] += self.clusters["dagster"].terminate_backends(self.databases["dagster"])
        elif event == "SeaweedFS outage":
            self.proxy.outage_window(self.rng.uniform(3, 6))
        elif event == "flip a switch":
            name = SWITCHES[self.tally.events[event] % len(SWITCHES)]
            self._set_flag(name, False)
            time.sleep(self.rng.uniform(2, 4))
            self._set_flag(name, True)

    def _restart(self, which: str) -> None:
        cluster = self.clusters[which]
        cluster.stop(mode="fast")
        time.sleep(self.rng.uniform(2, 5))
        cluster.start()

    def _set_flag(self, name: str, enabled: bool) -> None:
        for _ in range(30):  # the database may be restarting just then
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.update(feature_flags).where(feature_flags.c.name == name)
                                 .values(enabled=enabled))
                return
            except sa.exc.OperationalError:
                time.sleep(1)
        raise RuntimeError(f"could not set {name}")

    # -- the loop ---------------------------------------------------------------------------------------------
    def settled_share(self) -> tuple[int, set[str]]:
        from chaos import settled

        states = read_states(self.engine, list(self.plans))
        done = {oid for oid, state in states.items() if settled(self.plans[oid].kind, state)}
        for kill in self.kills:
            if kill.order_id in done and kill.claimed_again_after is None:
                kill.resolved = True
        return len(done), done

    def run(self, processes: Processes) -> float:
        started = time.monotonic()
        events = list(EVENTS)
        threading.Thread(target=self.run_events, daemon=True).start()
        next_check = 0.0
        try:
            while time.monotonic() - started < self.settings.deadline:
                processes.keep_alive()
                for poll in (self.poll_store, self.poll_dead_runs):
                    with suppress(Exception):  # a database is restarting: the next round sees it
                        poll()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    try:
                        done, _ = self.settled_share()
                    except sa.exc.SQLAlchemyError:
                        continue
                    while events and done >= events[0][0] * len(self.plans):
                        self.events.put(events.pop(0)[1])
                    if done == len(self.plans) and self.events.empty() and not self.busy:
                        break
                time.sleep(0.25)
        finally:
            self.events.put(None)
        return time.monotonic() - started

    def wait_for_runs(self, processes: Processes, seconds: float) -> list[dg.DagsterRun]:
        """After the drain: the runs still in flight once the sweep had `seconds` to fail dead ones."""
        until = time.monotonic() + seconds
        while True:
            processes.keep_alive()
            with suppress(Exception):
                self.poll_dead_runs()
            left = self.instance.get_runs(filters=dg.RunsFilter(statuses=list(IN_FLIGHT)))
            if not left or time.monotonic() > until:
                return left
            time.sleep(1)


# -- the whole run ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    settings: Settings
    seconds: float
    kinds: Counter
    faults: Counter
    kills: list[Kill]
    runs: Counter
    tally: Tally
    daemon_restarts: Counter
    violations: dict[str, int]
    secrets: dict[str, Counter]
    not_converged: list[str]
    stuck_runs: list[str]

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


def dagster_env(stack: Stack, proxy: FaultyS3Proxy, home: Path, dagster_url: str, code_port: int,
                settings: Settings) -> dict[str, str]:
    return {
        **os.environ, **stack.env(), "R2_ENDPOINT": proxy.url, **policy_env(settings), "DAGSTER_HOME": str(home),
        "DAGSTER_PG_URL": dagster_url, "DAGSTER_CODE_SERVER_HOST": "127.0.0.1",
        "DAGSTER_CODE_SERVER_PORT": str(code_port),
    }


@contextmanager
def dagster_processes(env: dict[str, str], logs: Path, web_port: int) -> Iterator[Processes]:
    processes = Processes(logs, env)
    try:
        processes.start("code server", [str(BIN / "dagster"), "api", "grpc", "-m", "bitloot_reconcile.definitions",
                                        "-h", "127.0.0.1", "-p", env["DAGSTER_CODE_SERVER_PORT"]])
        processes.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(REPO_ROOT / "workspace.yaml")])
        processes.start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(web_port),
                                      "-w", str(REPO_ROOT / "workspace.yaml")])
        yield processes
    finally:
        processes.stop()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def p50_max(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.1f} s, max {max(values):.1f} s" if values else "none"


def chaos_run(settings: Settings) -> Report:
    rng = random.Random(settings.seed)
    plans = make_plan(settings.orders, rng, concurrent_share=0.0)
    chaos_plan = plan_chaos(plans, rng, settings)
    with ExitStack() as stack_:
        clusters = {"store": stack_.enter_context(PostgresCluster()),
                    "dagster": stack_.enter_context(PostgresCluster())}
        stack = stack_.enter_context(stand_ins(clusters["store"].url))
        proxy = FaultyS3Proxy(stack.s3.endpoint_url).start()
        stack_.callback(proxy.stop)
        databases = {"store": stack.store_url.rsplit("/", 1)[1], "dagster": "dagster"}
        dagster_url = clusters["dagster"].create_database("dagster").replace("postgresql+psycopg:",
                                                                             "postgresql+psycopg2:")
        home = Path(tempfile.mkdtemp(prefix="chaos_daemon_home_"))
        stack_.callback(shutil.rmtree, home, True)
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
        logs = Path(tempfile.mkdtemp(prefix="chaos_daemon_logs_"))
        env = dagster_env(stack, proxy, home, dagster_url, free_port(), settings)
        stack_.enter_context(environment({"DAGSTER_HOME": str(home), "DAGSTER_PG_URL": dagster_url}))
        instance = stack_.enter_context(dg.DagsterInstance.from_config(str(home)))  # creates Dagster's tables
        vault, injector = seeded_with_faults(stack_, stack, proxy, plans, rng)
        web_port = free_port()
        processes = stack_.enter_context(dagster_processes(env, logs, web_port))
        wait_for_webserver(f"http://127.0.0.1:{web_port}")
        chaos = Chaos(settings, stack, proxy, instance, plans, chaos_plan, clusters, databases,
                      f"http://127.0.0.1:{web_port}", rng)
        seconds = chaos.run(processes)
        stack.engine.dispose()  # its pooled connections did not live through the restarts
        stuck = chaos.wait_for_runs(processes, settings.dead_run_bound + 2 * settings.sweep_interval + 30)
        observed = collect(stack, vault, plans, dagster_url, home, logs,
                           sum(1 for k in chaos.kills if k.claimed_again_after is None and not k.resolved))
        violations = check_store(observed)
        violations["killed runs in flight past lease + sweep"] = sum(
            1 for k in chaos.kills if k.run_failed_after is None or k.run_failed_after > settings.dead_run_bound)
        violations["runs stuck in flight after the drain"] = len(stuck)
        runs = Counter(f"{r.job_name} ({r.tags.get('bitloot/trigger', 'submitted')}): {r.status.value.lower()}"
                       for r in instance.get_runs())
        console.print(f"(process logs: {logs})", highlight=False)
        return Report(
            settings=settings, seconds=seconds, kinds=Counter(p.kind for p in plans), faults=injector.served(),
            kills=chaos.kills, runs=runs, tally=chaos.tally, daemon_restarts=processes.restarts,
            violations=violations, secrets=secrets_found(observed),
            not_converged=not_converged(observed),
            stuck_runs=[f"{r.run_id} {r.job_name} {r.status.value}" for r in stuck],
        )


def print_report(report: Report) -> None:
    s, kills = report.settings, report.kills
    rows: list[list[object]] = [
        ["orders", sum(report.kinds.values()), ", ".join(f"{k} {n}" for k, n in sorted(report.kinds.items()))],
        ["wall time", f"{report.seconds:.0f} s",
         f"seed {s.seed}, lease {s.lease_seconds} s, sweep every {s.sweep_interval:g} s, batches above "
         f"{s.batch_threshold} due orders, at most {s.batch_max_orders} each"],
        ["runs", sum(report.runs.values()), ", ".join(f"{k} {n}" for k, n in sorted(report.runs.items()))],
        ["faults served", sum(report.faults.values()),
         ", ".join(f"{k} {n}" for k, n in sorted(report.faults.items()) if n)],
        ["kills (SIGKILL)", len(kills), ", ".join(f"{k} {n}" for k, n in sorted(
            Counter(f"{k.point} in {k.job}" for k in kills).items()))],
        ["re-claimed after kill", sum(1 for k in kills if k.claimed_again_after is not None),
         p50_max([k.claimed_again_after for k in kills if k.claimed_again_after is not None])
         + f"; {sum(1 for k in kills if k.resolved)} settled by a run already going"],
        ["killed run failed in Dagster after", sum(1 for k in kills if k.run_failed_after is not None),
         p50_max([k.run_failed_after for k in kills if k.run_failed_after is not None])
         + f" (bound {s.dead_run_bound:g} s)"],
        ["racing runs", sum(report.tally.races.values()),
         ", ".join(f"{k} {n}" for k, n in sorted(report.tally.races.items()))
         + (f"; {report.tally.race_failures} not submitted" if report.tally.race_failures else "")],
        ["outages and switches", sum(n for k, n in report.tally.events.items() if k != "backends cut"),
         ", ".join(f"{k} {n}" for k, n in sorted(report.tally.events.items()))],
        ["Dagster processes restarted", sum(report.daemon_restarts.values()),
         ", ".join(f"{k} {n}" for k, n in sorted(report.daemon_restarts.items())) or "none"],
    ]
    rows += violation_rows(report.violations, report.secrets)
    print_table("Chaos run through the daemon", ["", "count", "detail"], rows)
    for line in report.tally.event_failures:
        console.print(f"event failed: {line}", highlight=False)
    for line in report.not_converged[:20]:
        console.print(f"not converged: {line}", highlight=False)
    for line in report.stuck_runs[:20]:
        console.print(f"run in flight: {line}", highlight=False)
    for kill in kills:
        if kill.run_failed_after is None or kill.run_failed_after > s.dead_run_bound or (
                kill.claimed_again_after is None and not kill.resolved):
            console.print(f"kill: {kill}", highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lease-seconds", type=int, default=Settings.lease_seconds)
    parser.add_argument("--batch-max-orders", type=int, default=Settings.batch_max_orders)
    parser.add_argument("--kill-share", type=float, default=Settings.kill_share,
                        help="orders whose run is killed at one of the points (each point at least once)")
    parser.add_argument("--race-share", type=float, default=Settings.race_share,
                        help="orders raced by admin runs or a second batch")
    parser.add_argument("--deadline", type=float, default=Settings.deadline, help="give up after this many seconds")
    args = parser.parse_args()
    settings = Settings(orders=args.orders, seed=args.seed, lease_seconds=args.lease_seconds,
                        batch_max_orders=args.batch_max_orders, kill_share=args.kill_share,
                        race_share=args.race_share, deadline=args.deadline)
    print_machine()
    report = chaos_run(settings)
    print_report(report)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
