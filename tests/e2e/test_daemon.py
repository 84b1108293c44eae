"""Production shape, end to end: a real `dagster-daemon`, `dagster-webserver` and one `dagster api grpc` code
server, as separate processes, on a PostgreSQL instance configured by the repo's dagster.yaml and
workspace.yaml, sweeping a fresh store database whose outside services are the simulators and SeaweedFS of
this test process (threads on 127.0.0.1, reachable from the run workers the code server launches).

The sensors' tick floors are shortened through the environment (RECONCILE_SWEEP_INTERVAL_SECONDS,
RECONCILE_ALERT_INTERVAL_SECONDS); the test polls the store until every order reached its end state, within
BUDGET_SECONDS. Most of the time goes into starting Python processes: the code server and one run worker per
run, each importing the code location.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import httpx
import pytest
from dagster._core.scheduler.instigation import InstigatorType
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from bitloot_reconcile.store.repository import Store
from bitloot_standins.httpserver import Fault
from bitloot_standins.postgres import temporary_database
from tests.fixtures.db import PG_SERVER_URL
from tests.fixtures.kinguin import KINGUIN_TEST_KEY
from tests.fixtures.payments_mail import NOWPAYMENTS_TEST_KEY, RESEND_TEST_KEY
from tests.fixtures.webhook import Receiver
from tests.fixtures.world import migrated_world, world_env

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# One bound for all waiting, under the test's timeout so a slow run fails here, with the daemon's log.
BUDGET_SECONDS = 300
LEASE_SECONDS = 20  # short, so a killed run worker's order comes back within the test
SWEEP_SECONDS = 10
TAGS = ("bitloot/order_id", "bitloot/trigger", "bitloot/reason", "bitloot/requested_by", "bitloot/attempt")
STUCK = dt.timedelta(minutes=30)  # past the sweep's default 10 min grace period
REEXECUTE = """mutation($parentRunId: String!, $strategy: ReexecutionStrategy!) {
  launchPipelineReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: $strategy}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Child processes, each in its own process group so teardown also ends their code servers and run workers."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.phases: list[tuple[str, float]] = []  # (what was waited for, when it was reached)
        self.pending: list[str] = []  # what convergence still waits for
        self.diagnose: Callable[[], str] = lambda: ""

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.tail(name)}"

    def tail(self, name: str, lines: int = 40) -> str:
        return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.procs.values() if p.poll() is None]
            for proc in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            deadline = time.monotonic() + grace
            for proc in alive:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():  # the group's other members (code servers, run workers)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def production_env(tmp_path: Path, dagster_db: str, world, code_port: int, monkeypatch, **settings: str
                   ) -> tuple[Path, dict[str, str]]:
    """A Dagster home with the repo's dagster.yaml on `dagster_db`, and the environment its processes share:
    the world's store and outside services, the code server's address, and `settings` (RECONCILE_*, or an R2
    endpoint of the test's own). DAGSTER_HOME and DAGSTER_PG_URL are set for this process too."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ, "DAGSTER_HOME": str(home),
        "DAGSTER_PG_URL": f"postgresql+psycopg2://{PG_SERVER_URL.split('://', 1)[1]}/{dagster_db}",
        **world_env(world), "DAGSTER_CODE_SERVER_HOST": "127.0.0.1", "DAGSTER_CODE_SERVER_PORT": str(code_port),
        **settings,
    }
    for name in ("DAGSTER_HOME", "DAGSTER_PG_URL"):
        monkeypatch.setenv(name, env[name])
    return home, env


def start_code_server_and_daemon(procs: Processes, env: dict[str, str], code_port: int) -> None:
    """The production layout: one long-lived code server, and a daemon reaching it through workspace.yaml."""
    procs.start("code server", [str(BIN / "dagster"), "api", "grpc", "-m", "bitloot_reconcile.definitions",
                                "-h", "127.0.0.1", "-p", str(code_port)], env)
    procs.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")], env)


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int:
    """The process executing a run, from the pid its run worker stamps on the run's start event."""
    (start,) = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)
    assert start.dagster_event and start.dagster_event.pid, f"run {run_id} has no worker pid on record"
    return start.dagster_event.pid


def done_in(store: Store, order_id: str) -> bool:
    order = store.load_order(order_id)
    return order.status == "fulfilled" and order.completion_email_sent


def wait_for(what: str, check: Callable[[], bool], deadline: float, procs: Processes, every: float = 1.0) -> None:
    while not check():
        procs.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"out of time waiting for {what} {procs.pending}\n{procs.diagnose()}"
                        f"\n--- daemon:\n{procs.tail('daemon')}")
        time.sleep(every)
    procs.phases.append((what, time.monotonic()))


def location_loaded(port: int, location: str = "bitloot_reconcile") -> bool:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "\
            "locationOrLoadError { __typename } } } } }"
    try:
        body = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    entries = (body.get("data") or {}).get("workspaceOrError", {}).get("locationEntries") or []
    return any(
        e["name"] == location and e["loadStatus"] == "LOADED"
        and e["locationOrLoadError"]["__typename"] != "PythonError"
        for e in entries
    )


def has_ticked(instance: dg.DagsterInstance, sensor_name: str) -> bool:
    states = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
    return any(
        instance.get_ticks(s.instigator_origin_id, s.selector_id, limit=1)
        for s in states
        if s.instigator_name == sensor_name
    )


@pytest.mark.timeout(BUDGET_SECONDS + 60)
def test_daemon_sweeps_stuck_orders_to_their_end_state_and_admins_trigger_runs_over_graphql(
    tmp_path, kinguin_sim, nowpayments_sim, resend_sim, seaweed, monkeypatch
):
    started = time.monotonic()
    deadline = started + BUDGET_SECONDS
    with (
        temporary_database(PG_SERVER_URL, "bre2e_store") as store_db,
        temporary_database(PG_SERVER_URL, "bre2e_dagster") as dagster_db,
        Receiver() as receiver,
        contextlib.ExitStack() as stack,
    ):
        # -- the store, its outside services, and the stuck orders ---------------------------------------------
        store_url = f"{PG_SERVER_URL}/{store_db}"
        world = migrated_world(store_url, kinguin_sim, nowpayments_sim, resend_sim, seaweed)
        stack.callback(world.engine.dispose)
        game = world.product(price=5.0)

        webhook_missed = world.order([game], age=STUCK)
        worker_killed = world.order([game], age=STUCK)  # its run worker is SIGKILLed while placing the order
        kinguin_sim.inject("place_order_v2", Fault(latency=45, match=lambda b: b["orderExternalId"] == worker_killed))
        response_lost = world.order([game], age=STUCK)
        kinguin_sim.inject("place_order_v2", Fault(lose_response=True))  # whichever other order places first
        paid_at_nowpayments = world.order([game], status="waiting", payment_status="waiting",
                                          payment_id="5077125051", age=STUCK)
        nowpayments_sim.set_payment("5077125051", "finished", order_id=paid_at_nowpayments)
        unpaid = world.order([game], status="waiting", payment_status="waiting", payment_id="42", age=STUCK)
        nowpayments_sim.set_payment("42", "waiting", order_id=unpaid)
        canceled = str(uuid.uuid4())
        planted = kinguin_sim.plant_order(canceled, [(game.kinguin_product_id, 1)], status="canceled")
        world.order([game], order_id=canceled, kinguin_reservation_id=planted.order_id, age=STUCK)
        admin_order = world.order([game], age=dt.timedelta(minutes=1))  # not stuck yet: only the admin run
        fulfilled_by_sweep = [webhook_missed, response_lost, paid_at_nowpayments, worker_killed]

        # -- the Dagster instance: the repo's dagster.yaml on a fresh PostgreSQL database -----------------------
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        port = free_port()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_URL": f"postgresql+psycopg2://{PG_SERVER_URL.split('://', 1)[1]}/{dagster_db}",
            **world_env(world),
            "EMAIL_FROM": "orders@bitloot.io",
            "ALERT_WEBHOOK_URL": receiver.hook_url,
            "DAGSTER_WEBSERVER_URL": f"http://127.0.0.1:{port}",
            # Tick floors (30 s sweep, 60 s alerts in production) shortened so the test does not wait on them.
            "RECONCILE_SWEEP_INTERVAL_SECONDS": str(SWEEP_SECONDS),
            "RECONCILE_ALERT_INTERVAL_SECONDS": "10",
            "RECONCILE_LEASE_SECONDS": str(LEASE_SECONDS),
            "RECONCILE_MAX_RETRY_WAIT_SECONDS": "5",
        }
        for name in ("DAGSTER_HOME", "DAGSTER_PG_URL"):
            monkeypatch.setenv(name, env[name])
        # Create Dagster's tables from this process first: two processes initialising one database race.
        instance = stack.enter_context(dg.DagsterInstance.from_config(str(home)))
        assert instance.run_coordinator.dequeue_interval_seconds == 1
        assert instance.get_concurrency_config().run_queue_config.tag_concurrency_limits[0]["key"] == TAGS[0]
        assert instance.run_retries_max_retries == 1 and instance.run_monitoring_enabled

        procs = Processes(tmp_path)
        stack.callback(procs.stop)
        procs.diagnose = lambda: f"SeaweedFS running: {seaweed.is_running()}, log: {seaweed.log_path}"
        # The production layout: one long-lived code server, reached through the repository's workspace.yaml.
        code_port = free_port()
        env |= {"DAGSTER_CODE_SERVER_HOST": "127.0.0.1", "DAGSTER_CODE_SERVER_PORT": str(code_port)}
        procs.start("code server", [str(BIN / "dagster"), "api", "grpc", "-m", "bitloot_reconcile.definitions",
                                    "-h", "127.0.0.1", "-p", str(code_port)], env)
        workspace = ["-w", str(REPO / "workspace.yaml")]
        procs.start("daemon", [str(BIN / "dagster-daemon"), "run", *workspace], env)
        procs.start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), *workspace],
                    env)

        # -- an admin run over GraphQL; a malformed launch (refused, no run) and an unknown order (a refused run,
        # nobody paged) ------------------------------------------------------------------------------------------
        wait_for("the webserver to load the code location", lambda: location_loaded(port), deadline, procs)
        # A run status sensor starts from the newest event on its first tick: fail the bad run only after it.
        wait_for("the first tick of run_failure_alert_sensor",
                 lambda: has_ticked(instance, "run_failure_alert_sensor"), deadline, procs)
        client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=30)
        admin_run = client.submit_job_execution(
            "fulfill_order",
            repository_location_name="bitloot_reconcile",
            run_config={"order_id": admin_order, "reason": "ticket 7", "requested_by": "ops@bitloot.io"},
            tags={"bitloot/order_id": admin_order},  # so the per-order queue limit applies from the start
        )
        with pytest.raises(DagsterGraphQLClientError, match="is not a valid order uuid"):
            client.submit_job_execution(
                "fulfill_order",
                repository_location_name="bitloot_reconcile",
                run_config={"order_id": "not-a-uuid", "reason": "ticket 8", "requested_by": "ops@bitloot.io"},
            )
        # No run exists for it (the sweep is launching runs of its own meanwhile).
        assert not [r for r in instance.get_runs() if (r.run_config or {}).get("order_id") == "not-a-uuid"]
        unknown_order = str(uuid.uuid4())
        bad_run = client.submit_job_execution(
            "fulfill_order",
            repository_location_name="bitloot_reconcile",
            run_config={"order_id": f" {unknown_order.upper()} ", "reason": "ticket 8",
                        "requested_by": "ops@bitloot.io"},
        )

        # -- a run worker killed while its Kinguin order is being placed ----------------------------------------
        store = world.store

        def placing_killed_order() -> bool:
            return any(r.body and r.body.get("orderExternalId") == worker_killed
                       for r in kinguin_sim.requests_to("place_order_v2"))

        wait_for("the run of one order to reach Kinguin", placing_killed_order, deadline, procs, every=0.2)
        killed_run = store.get_state(worker_killed).lease_owner
        os.kill(run_worker_pid(instance, killed_run), signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for("a new run to claim the killed run's order",
                 lambda: store.get_state(worker_killed).lease_owner not in (None, killed_run)
                 or done_in(store, worker_killed), deadline, procs, every=0.5)
        taken_up_after = time.monotonic() - killed_at
        print(f"e2e: order of the killed run worker taken up again {taken_up_after:.0f} s after the kill "
              f"(lease {LEASE_SECONDS} s, sweep every {SWEEP_SECONDS} s)")
        # The lease lapses, then one sweep tick fails the dead run and requests a new one; the rest is launching.
        assert taken_up_after < LEASE_SECONDS + SWEEP_SECONDS + 30

        # -- wait for every order to converge through sensor-launched runs -------------------------------------

        def alerted(*parts: str) -> list[str]:
            return [t for t in receiver.texts if all(p in t for p in parts)]

        converged = {
            "fulfilled": lambda: all(done_in(store, o) for o in [*fulfilled_by_sweep, admin_order]),
            "payment not confirmed": lambda: store.get_state(unpaid).last_outcome == "payment_not_confirmed",
            "needs attention": lambda: store.get_state(canceled).last_outcome == "needs_attention",
            "admin runs finished": lambda: client.get_run_status(admin_run) == dg.DagsterRunStatus.SUCCESS
            and client.get_run_status(bad_run) == dg.DagsterRunStatus.FAILURE,
            "alerts": lambda: bool(alerted(canceled, "needs_attention"))
            and instance.get_run_by_id(bad_run).tags.get("bitloot/alert") == "input_error",
        }

        def all_converged() -> bool:
            pending = [name for name, check in converged.items() if not check()]
            procs.pending = pending
            return not pending

        wait_for("convergence", all_converged, deadline, procs)
        print("\n".join(f"e2e: {what} after {at - started:.0f} s" for what, at in procs.phases))

        # -- what converged, and how -------------------------------------------------------------------------
        fulfilled = [*fulfilled_by_sweep, admin_order]
        assert all(len(kinguin_sim.orders_for_external_id(o)) == 1 for o in fulfilled)
        searched = [r.query["orderExternalId"] for r in kinguin_sim.requests_to("search_orders")]
        # The lost response was adopted, not re-placed; the killed run's successor searched before placing.
        others = set(searched) - {worker_killed}
        assert len(others) == 1 and others <= set(fulfilled) and worker_killed in searched
        # Failed by whichever notices first: the code server that spawned the worker, while it lives, or the
        # sweep once the lease lapsed (a restarted code server or a lost host; see test_sensors).
        assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.FAILURE
        emails = sorted(e["idempotency_key"] for e in resend_sim.sent)
        assert emails == sorted(f"order-completed/{o}" for o in fulfilled)  # one each
        assert kinguin_sim.orders_for_external_id(unpaid) == []  # no key bought for money not received
        assert store.load_order(unpaid).status == "waiting"
        assert len(kinguin_sim.orders_for_external_id(canceled)) == 1  # never re-placed
        assert "supplier canceled" in store.get_state(canceled).last_reason

        runs = instance.get_runs(filters=dg.RunsFilter(job_name="fulfill_order"))
        sensor_runs = [r for r in runs if r.tags.get("bitloot/trigger") == "sensor"]
        assert {r.tags["bitloot/order_id"] for r in sensor_runs} >= {*fulfilled_by_sweep, unpaid, canceled}
        assert all(set(TAGS) <= set(r.tags) for r in sensor_runs)
        assert all(r.tags.get("dagster/sensor_name") == "stuck_orders_sensor" for r in sensor_runs)
        assert admin_order not in {r.tags["bitloot/order_id"] for r in sensor_runs}
        admin_tags = instance.get_run_by_id(admin_run).tags
        assert {k: admin_tags[k] for k in TAGS if k != "bitloot/attempt"} == {
            "bitloot/order_id": admin_order,
            "bitloot/trigger": "admin",
            "bitloot/reason": "ticket 7",
            "bitloot/requested_by": "ops@bitloot.io",
        }
        assert admin_tags["bitloot/attempt"] == "1"

        # One alert for the order itself (the board's checks, on their 5-minute schedule, may name it too).
        (attention_alert,) = alerted(f"BitLoot order {canceled}: needs_attention")
        assert f"http://127.0.0.1:{port}/runs/{store.get_state(canceled).last_run_id}" in attention_alert
        bad_tags = instance.get_run_by_id(bad_run).tags
        assert bad_tags["bitloot/order_id"] == unknown_order and bad_tags["bitloot/outcome"] == "refused"
        assert not alerted(unknown_order) and not alerted(unknown_order.upper())
        assert {r.tags["bitloot/outcome"] for r in sensor_runs if r.status == dg.DagsterRunStatus.SUCCESS} >= {
            "fulfilled", "needs_attention", "payment_not_confirmed"}
        attention_runs = instance.get_runs(filters=dg.RunsFilter(tags={"bitloot/outcome": "needs_attention"}))
        assert {r.tags["bitloot/order_id"] for r in attention_runs} == {canceled}

        # -- "Re-execute" in the UI (GraphQL launchPipelineReexecution) is recorded as a person's act ----------
        def reexecute(parent_run_id: str) -> str:
            answer = httpx.post(f"http://127.0.0.1:{port}/graphql", timeout=30, json={
                "query": REEXECUTE, "variables": {"parentRunId": parent_run_id, "strategy": "ALL_STEPS"}}).json()
            launched = answer["data"]["launchPipelineReexecution"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            return launched["run"]["runId"]

        def finished(run_id: str) -> bool:
            return instance.get_run_by_id(run_id).status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)

        unpaid_parent = store.get_state(unpaid).last_run_id
        attempts_before = store.get_state(unpaid).attempts
        canceled_parent = store.get_state(canceled).last_run_id
        reexecuted = {parent: reexecute(parent) for parent in (unpaid_parent, canceled_parent)}
        wait_for("the re-executions", lambda: all(finished(r) for r in reexecuted.values()), deadline, procs)
        repeat = instance.get_run_by_id(reexecuted[unpaid_parent])
        assert repeat.tags["bitloot/trigger"] == "reexecution" and repeat.tags["bitloot/parent_run_id"] == unpaid_parent
        assert repeat.tags["bitloot/attempt"] == str(attempts_before + 1) == str(store.get_state(unpaid).attempts)
        assert repeat.tags["bitloot/outcome"] == "payment_not_confirmed"
        assert repeat.tags["bitloot/requested_by"] != "stuck_orders_sensor"
        rows = [r for r in store.audit_trail(unpaid) if r["run_id"] == repeat.run_id]
        assert rows and all(r["trigger"] == "reexecution" and r["actor"] is None for r in rows)
        # A quarantined order is a person's to decide: re-executing the sweep's run, with no reason, refuses it.
        quarantined = instance.get_run_by_id(reexecuted[canceled_parent])
        assert quarantined.status == dg.DagsterRunStatus.FAILURE
        assert quarantined.tags["bitloot/outcome"] == "refused" and quarantined.tags["bitloot/trigger"] == "reexecution"
        assert len(kinguin_sim.orders_for_external_id(canceled)) == 1
        assert store.get_state(canceled).last_outcome == "needs_attention"
        assert all(secret not in text for text in receiver.texts
                   for secret in (KINGUIN_TEST_KEY, RESEND_TEST_KEY, NOWPAYMENTS_TEST_KEY, seaweed.secret_access_key))
