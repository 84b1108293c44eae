"""A backlog of N stuck orders drained by the real daemon (batch path) vs a plain thread pool of 8, side by side.

Stand-ins: the Kinguin, NOWPayments and Resend simulators with `--latency` added to every request (50 ms by
default; SeaweedFS answers at its own speed), a fresh PostgreSQL store per side holding N one-item orders
stuck in `paid` for 30 minutes.

1. daemon: a `dagster api grpc` code server and a `dagster-daemon` as separate processes, on a fresh PostgreSQL
   Dagster database configured by the repository's `dagster.yaml` and reached through its `workspace.yaml`; the
   sweep ticks every `--sweep-seconds` (4; production 30) and, N being above the threshold, launches
   `fulfill_backlog` runs with the default batch settings. The orders pile up while BitLoot's `auto_fulfill_enabled` is
   off and the daemon is already running (its start is printed apart); timed from switching it back on until
   every order is fulfilled and emailed.
2. peer: `domain.backlog.drain` with 8 threads calling `domain.attempt.work_order` (the same step functions)
   in this process, on a second store holding a fresh copy of the same orders.

CPU-seconds: the daemon side sums user+system time of every process in the code server's and the daemon's
process groups (the run workers included), sampled from /proc while they run, minus what they had used when the
drain started; the peer side sums the worker threads' own CPU time. PostgreSQL is the whole local server's
CPU over each drain, backends that exited included (a shared server: other load shows up there). The floor is
N x 4 calls x latency / 8.

Usage: uv run python benchmarks/backlog_drain.py [--orders 100] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from _harness import (
    REPO_ROOT,
    Stack,
    console,
    migrated_store,
    print_machine,
    print_table,
    stand_ins,
    temp_database,
)

from bitloot_reconcile.domain.attempt import SWITCHES_MAX_AGE_SECONDS, work_order
from bitloot_reconcile.domain.backlog import drain
from bitloot_reconcile.domain.steps import Services, Who
from bitloot_reconcile.store.schema import orders
from bitloot_standins.httpserver import Fault
from bitloot_standins.seed import insert_order, set_feature_flag

BIN = Path(sys.executable).parent
AUTO_FULFIL = "auto_fulfill_enabled"
TICKS = os.sysconf("SC_CLK_TCK")
ROUTES = {"kinguin": ("place_order_v2", "get_order", "get_keys", "search_orders", "get_product"),
          "nowpayments": ("get_payment",), "resend": ("send_email",)}


def add_latency(stack: Stack, seconds: float) -> None:
    for service, routes in ROUTES.items():
        for route in routes:
            getattr(stack, service).inject(route, Fault(latency=seconds, times=10**9))


def done_count(engine: sa.Engine, order_ids: list[str] | None = None) -> int:
    """Orders fulfilled and emailed (of `order_ids`, when given)."""
    query = sa.select(sa.func.count()).select_from(orders).where(
        orders.c.status == "fulfilled", orders.c.completionEmailSent.is_(True))
    if order_ids is not None:
        query = query.where(orders.c.id.in_(order_ids))
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


# -- CPU and memory from /proc -----------------------------------------------------------------------------------
def _fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command: [state, ppid, pgrp, ...], utime at 11, cutime at 13."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def _parent(pid: int) -> int:
    fields = _fields(pid)
    return int(fields[1]) if fields else 0


def _stat(pid: int) -> tuple[int, float, str] | None:
    """(process group, CPU seconds, command) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1: raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[2]), (int(fields[11]) + int(fields[12])) / TICKS, comm


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def processes() -> dict[int, tuple[int, float, str]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))):
            found[int(entry)] = stat
    return found


def postgres_cpu() -> float:
    """The whole local server: the postmaster, its live backends, and (its children's total) every backend
    that has exited since it started: a connection that closes takes its CPU time into the postmaster's."""
    live = processes()
    backends = {pid for pid, (_, _, comm) in live.items() if comm.startswith("postgres")}
    postmasters = {pid for pid in backends if _parent(pid) not in backends}
    total = 0.0
    for pid in postmasters:
        fields = _fields(pid)
        if fields:
            total += sum(int(v) for v in fields[11:15]) / TICKS  # utime, stime, cutime, cstime
    return total + sum(live[pid][1] for pid in backends - postmasters)


class GroupSampler:
    """CPU seconds and peak RSS of every process in the given process groups, sampled while they live."""

    def __init__(self, groups: set[int]):
        self.groups, self.cpu, self.rss, self.names = groups, {}, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        for pid, (group, cpu, comm) in processes().items():
            if group in self.groups:
                self.cpu[pid] = cpu
                self.rss[pid] = max(self.rss.get(pid, 0.0), _rss_mb(pid))
                self.names[pid] = comm

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    def start(self) -> GroupSampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- the daemon side ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def production_shape(stack: Stack, dagster_db_url: str, sweep_seconds: int, logs: Path):
    """Code server + daemon, as in production, each in its own process group; stopped with all their children."""
    home = Path(tempfile.mkdtemp(prefix="bench_backlog_home_"))
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    code_port = free_port()
    env = {**os.environ, **stack.env(), "DAGSTER_HOME": str(home),
           "DAGSTER_PG_URL": dagster_db_url.replace("postgresql+psycopg://", "postgresql+psycopg2://"),
           "DAGSTER_CODE_SERVER_HOST": "127.0.0.1", "DAGSTER_CODE_SERVER_PORT": str(code_port),
           "RECONCILE_SWEEP_INTERVAL_SECONDS": str(sweep_seconds)}
    previous = {name: os.environ.get(name) for name in ("DAGSTER_HOME", "DAGSTER_PG_URL")}
    os.environ.update({name: env[name] for name in previous})
    procs: list[subprocess.Popen] = []
    try:
        # Dagster's tables are created from this process first: two processes initialising one database race.
        with dg.DagsterInstance.from_config(str(home)) as instance:
            def start(name: str, args: list[str]) -> subprocess.Popen:
                log = (logs / f"{name}.log").open("wb")
                proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                procs.append(proc)
                return proc

            server = start("code_server", [str(BIN / "dagster"), "api", "grpc", "-m", "bitloot_reconcile.definitions",
                                           "-h", "127.0.0.1", "-p", str(code_port)])
            wait_port(code_port, server)
            yield instance, start, {server.pid}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(home, ignore_errors=True)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the code server exited (see its log)"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError("the code server did not open its port")


def commits(url: str) -> tuple[int, int]:
    """Transactions committed and connections opened in one database so far (PostgreSQL's statistics, flushed
    within a second)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            return tuple(conn.execute(sa.text(
                "SELECT xact_commit, sessions FROM pg_stat_database WHERE datname = current_database()")).one())
    finally:
        engine.dispose()


def sweep_ticks(url: str) -> int:
    """The sweep's finished ticks (skipped or launching) in Dagster's schedule storage."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT count(*) FROM job_ticks WHERE tick_body LIKE '%stuck_orders_sensor%' "
                "AND status IN ('SKIPPED', 'SUCCESS')")).scalar_one()
    finally:
        engine.dispose()


def daemon_side(stack: Stack, n: int, sweep_seconds: int, logs: Path, timeout: float, admin_retry: bool) -> dict:
    """The daemon runs as in production while BitLoot's `auto_fulfill_enabled` is off (the shop paused
    automatic fulfilment during the outage) and N stuck orders pile up; switching it back on makes the whole
    backlog due at once. Timed from that switch."""
    set_feature_flag(stack.engine, AUTO_FULFIL, False)
    backlog = stack.paid_orders(n)
    # Paid a minute ago, inside the sweep's grace period: only an admin's retry works it.
    admin_order = insert_order(stack.engine, [stack.product()], age=dt.timedelta(minutes=1))
    admin_run_id, launched_at = str(uuid.uuid4()), None
    with temp_database("bench_backlog_dagster") as dagster_db, \
            production_shape(stack, f"{dagster_db}", sweep_seconds, logs) as (instance, start, groups):
        sampler = GroupSampler(groups).start()
        cold = time.monotonic()
        daemon = start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(REPO_ROOT / "workspace.yaml")])
        groups.add(daemon.pid)
        while sweep_ticks(dagster_db) == 0:  # the daemon is up and its sweep held: nothing launched
            assert daemon.poll() is None, "the daemon exited (see its log)"
            if time.monotonic() - cold > timeout:
                raise TimeoutError("the sweep never ticked")
            time.sleep(0.2)
        warm_up = time.monotonic() - cold
        time.sleep(1.5)  # let the statistics of Dagster's database settle before reading them
        sampler.sample()
        baseline, xacts = dict(sampler.cpu), commits(dagster_db)
        calls, pg = len(stack.kinguin.requests), postgres_cpu()
        started, switched = time.monotonic(), time.time()
        set_feature_flag(stack.engine, AUTO_FULFIL, True)
        while done_count(stack.engine, backlog) < n:
            assert daemon.poll() is None, "the daemon exited (see its log)"
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{done_count(stack.engine, backlog)} of {n} orders done after {timeout} s")
            if admin_retry and launched_at is None and any(r.dagster_run.status == dg.DagsterRunStatus.STARTED
                                           for r in instance.get_run_records()):
                launched_at = time.time()  # an admin retries one order from the launchpad while the batches run
                start("admin_retry", [str(BIN / "dagster"), "job", "launch", "-w", str(REPO_ROOT / "workspace.yaml"),
                                      "-j", "fulfill_order", "--run-id", admin_run_id, "--config-json", json.dumps(
                                          {"order_id": admin_order, "reason": "customer asked", "requested_by":
                                           "admin@bitloot.io"})])
            time.sleep(0.2)
        wall = time.monotonic() - started
        ended = time.monotonic() + 60  # every order is done; the runs still write their last events
        while time.monotonic() < ended and any(not r.dagster_run.is_finished for r in instance.get_run_records()):
            time.sleep(0.2)
        sampler.stop()
        pg = postgres_cpu() - pg
        time.sleep(1.5)
        xacts = tuple(after - before for after, before in zip(commits(dagster_db), xacts, strict=True))
        admin = instance.get_run_record_by_id(admin_run_id)
        # Not the backlog's work: the admin's run, and any other job the daemon ran meanwhile (the board's
        # schedule). Their workers' CPU is left out; their share of PostgreSQL's CPU cannot be.
        others = [r.dagster_run.run_id for r in instance.get_run_records()
                  if r.dagster_run.job_name != "fulfill_backlog"]
        other_pids = {int(pid) for run_id in others for entry in instance.all_logs(run_id)
                      for pid in re.findall(r"\(pid: (\d+)\)", entry.user_message or "")}
        runs = [r for r in instance.get_run_records() if r.dagster_run.run_id != admin_run_id]
        jobs = Counter(r.dagster_run.job_name for r in runs)
        body = [r.end_time - r.start_time for r in runs if r.start_time and r.end_time]
        first = min(runs, key=lambda r: r.create_timestamp)
        timeline = (first.create_timestamp.timestamp() - switched, (first.start_time or switched) - switched)
    used = {pid: cpu - baseline.get(pid, 0.0) for pid, cpu in sampler.cpu.items() if pid not in other_pids}
    workers = [pid for pid in used if pid not in baseline]
    server = min(groups - {daemon.pid})
    split = {"code server": used.get(server, 0.0), "daemon": used.get(daemon.pid, 0.0),
             "run workers": sum(used[pid] for pid in workers)}
    split["other"] = sum(used.values()) - sum(split.values())
    cpu = sum(used.values())
    admin_supplier = {o.order_id for o in stack.kinguin.orders_for_external_id(admin_order)}
    backlog_calls = [r for r in stack.kinguin.requests[calls:]
                     if not (isinstance(r.body, dict) and r.body.get("orderExternalId") == admin_order)
                     and not any(order_id in r.path for order_id in admin_supplier)]
    return {"wall": wall, "cpu": cpu, "pg": pg, "calls": len(backlog_calls),
            "rss": max((sampler.rss[p] for p in workers), default=0.0), "runs": dict(jobs),
            "run_body": max(body, default=0.0), "warm_up": warm_up, "dagster_xacts": xacts,
            "split": split, "timeline": timeline, "admin": {
                "created": admin.create_timestamp.timestamp() - launched_at if admin else None,
                "started": admin.start_time - launched_at if admin and admin.start_time else None,
                "ended": admin.end_time - launched_at if admin and admin.end_time else None,
                "status": admin.dagster_run.status.value if admin else "never created",
                "outcome": admin.dagster_run.tags.get("bitloot/outcome") if admin else None}}


# -- the peer --------------------------------------------------------------------------------------------------------
def peer_side(stack: Stack, n: int) -> dict:
    with migrated_store("bench_backlog_peer") as (url, engine):
        copy = Stack(url, engine, stack.kinguin, stack.nowpayments, stack.resend, stack.s3, stack.bucket)
        order_ids = copy.paid_orders(n)
        resources = copy.resources()
        policy, mailer, r2 = resources["policy"], resources["mailer"], resources["r2"]
        schedule, vault = policy.retry_schedule(), r2.get_vault()
        store = resources["store"].get_store().sharing_flags(SWITCHES_MAX_AGE_SECONDS)  # as the batch's op
        cpu, lock = [0.0], threading.Lock()

        @contextmanager
        def open_services():
            with ExitStack() as clients:
                yield Services(store=store, vault=vault, sender=mailer.sender, frontend_url=policy.frontend_url,
                               presign_seconds=r2.presign_expiry_seconds,
                               nowpayments=clients.enter_context(resources["nowpayments"].get_client()),
                               kinguin=clients.enter_context(resources["kinguin"].get_client()),
                               mailer=clients.enter_context(mailer.get_client()))

        def work(services: Services, order_id: str):
            before = time.thread_time()
            result = work_order(services, order_id, who=Who("peer", "sensor", "peer", "benchmark"), policy=policy,
                                schedule=schedule)
            with lock:
                cpu[0] += time.thread_time() - before
            return result

        statements = Counter()

        @sa.event.listens_for(store.engine, "before_cursor_execute")
        def count(conn, cursor, statement, parameters, context, executemany):
            statements[statement.split(None, 1)[0].upper()] += 1

        calls, pg = len(stack.kinguin.requests), postgres_cpu()
        started = time.monotonic()
        outcomes = Counter(r.outcome for r in drain(order_ids, workers=8, open_services=open_services, work=work))
        wall = time.monotonic() - started
        pg = postgres_cpu() - pg
        sa.event.remove(store.engine, "before_cursor_execute", count)
        done = done_count(engine)
    return {"wall": wall, "cpu": cpu[0], "pg": pg, "calls": len(stack.kinguin.requests) - calls,
            "outcomes": dict(outcomes), "done": done, "statements": statements}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every simulator request")
    parser.add_argument("--sweep-seconds", type=int, default=4,
                        help="the sweep's minimum interval (Dagster's sensor loop runs every 5 s: 5 ticks every 10 s)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--admin-retry", action="store_true",
                        help="also launch one admin retry while the batches run and time it (its launch command "
                             "and its run add to the server's PostgreSQL CPU figure)")
    args = parser.parse_args()
    print_machine()
    n = args.orders
    logs = Path(tempfile.mkdtemp(prefix="backlog_drain_logs_"))
    with stand_ins() as stack:
        add_latency(stack, args.latency)
        peer = peer_side(stack, n)
        daemon = daemon_side(stack, n, args.sweep_seconds, logs, args.timeout, args.admin_retry)
        placed = Counter(o.order_external_id for o in stack.kinguin.orders.values())
        emails = Counter(m["idempotency_key"] for m in stack.resend.sent)
    floor = n * 4 * args.latency / 8

    def row(name: str, side: dict) -> list[object]:
        return [name, f"{side['wall']:.1f} s", f"{n / side['wall'] * 60:.0f}", f"{side['cpu'] / n:.3f}",
                f"{side['pg'] / n:.3f}", f"{(side['cpu'] + side['pg']) / n:.3f}", f"{side['calls'] / n:.2f}",
                f"{side['rss']:.0f} MB" if "rss" in side else "-"]

    print_table(f"Backlog of {n} stuck orders, {args.latency * 1000:.0f} ms per simulator request",
                ["path", "drain", "orders/min", "CPU-s/order (processes)", "PostgreSQL (server)", "CPU-s/order total",
                 "Kinguin calls/order", "peak RSS (run worker)"],
                [row("daemon: sweep -> fulfill_backlog", daemon), row("thread pool of 8 (same steps)", peer),
                 ["floor: N x 4 calls x latency / 8", f"{floor:.1f} s", f"{n / floor * 60:.0f}", "", "", "", "", ""]])
    statements = peer["statements"]
    console.print(
        f"daemon / peer: {daemon['wall'] / peer['wall']:.2f}x drain time, "
        f"{(daemon['cpu'] + daemon['pg']) / max(peer['cpu'] + peer['pg'], 1e-9):.2f}x CPU; "
        f"daemon / floor {daemon['wall'] / floor:.1f}x. Daemon runs: {daemon['runs']}, the longest from its start "
        f"to its end {daemon['run_body']:.1f} s; the first was created {daemon['timeline'][0]:.1f} s after the "
        f"switch (the sweep's next tick) and started {daemon['timeline'][1]:.1f} s after it (queue, run worker "
        f"start). Before the timing: the daemon's start to its first tick, {daemon['warm_up']:.1f} s.",
        highlight=False)
    console.print(
        f"SQL statements per order on the store (the step functions, counted on the peer's engine): "
        f"{sum(statements.values()) / n:.1f} ({', '.join(f'{k} {v / n:.1f}' for k, v in statements.most_common())}); "
        f"Dagster's database (daemon side), per order: {daemon['dagster_xacts'][0] / n:.1f} transactions, "
        f"{daemon['dagster_xacts'][1] / n:.2f} connections opened.",
        highlight=False)
    admin = daemon["admin"]
    if args.admin_retry:
        console.print(
            "An admin's retry launched during the drain (`dagster job launch`, as the launchpad does) once a batch "
            f"had started: run created {admin['created']:.1f} s, started {admin['started']:.1f} s, ended "
            f"{admin['ended']:.1f} s after the launch command ({admin['status']}, outcome {admin['outcome']})."
            if admin["ended"] is not None else f"An admin's retry during the drain: {admin}", highlight=False)
    console.print("Daemon side CPU-s by process: " + ", ".join(
        f"{name} {seconds:.1f}" for name, seconds in daemon["split"].items()), highlight=False)
    console.print(f"peer outcomes: {peer['outcomes']}; Kinguin orders per order id: "
                  f"{dict(Counter(placed.values()))}; emails per order: {dict(Counter(emails.values()))}; "
                  f"logs: {logs}", highlight=False)

if __name__ == "__main__":
    main()
