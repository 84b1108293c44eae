"""Per-run cost of a sensor-style `fulfill_order` run vs an empty 8-op job on the same instance (target <= 1.2x).

Stand-ins: Kinguin, NOWPayments and Resend simulators, SeaweedFS, a fresh PostgreSQL store with paid orders
stuck for 30 minutes. The run requests (run config and tags) come from evaluating `stuck_orders_sensor` on that
store, as the daemon would. One real DagsterInstance (temporary DAGSTER_HOME, SQLite storage) serves both modes:

1. in process: `execute_in_process` of each request vs of `empty_job` (in_process_executor for both);
2. launched: `instance.submit_run` through the DefaultRunCoordinator and DefaultRunLauncher against a code server
   loading `_launch_defs.py` (the project's definitions + `empty_job`), i.e. one fresh run-worker process per run,
   as with the daemon but without the sensor interval and queue wait. Runs go one at a time. The run workers
   inherit this shell's environment: with PYTHONDONTWRITEBYTECODE=1 they rely on the compiled bytecode that
   `make sync` (UV_COMPILE_BYTECODE=1) puts in .venv; the script says whether it is there.

The two jobs alternate run by run so other load on the shared cores hits both alike.

Usage: uv run python benchmarks/run_overhead.py [--runs 20] [--launched 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
from _harness import (
    REPO_ROOT,
    console,
    dagster_home,
    median,
    print_machine,
    print_table,
    stand_ins,
    stderr_to_file,
    timed,
)
from _launch_defs import empty_job
from dagster._cli.job import _create_run  # the steps of `dagster job launch`, with one workspace kept open
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import PythonFileTarget

from bitloot_reconcile.jobs import fulfill_order
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.store import StoreResource
from tests.fixtures.definitions import stuck_orders_sensor

COORDINATOR = "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def sensor_requests(stack, instance: dg.DagsterInstance, n: int) -> list[dg.RunRequest]:
    stack.paid_orders(n)
    # Per-order runs are measured here: the threshold keeps the sweep from batching them.
    policy = RecoveryPolicyResource(max_runs_per_tick=n, batch_threshold=n)
    context = dg.build_sensor_context(instance=instance, resources={
        "store": StoreResource(database_url=stack.store_url), "policy": policy})
    requests = stuck_orders_sensor(context).run_requests
    assert len(requests) == n, len(requests)
    return requests


def in_process(stack, instance: dg.DagsterInstance, requests: list[dg.RunRequest], warmup: int) -> dict:
    resources = stack.resources()
    times: dict[str, list[float]] = {"fulfill_order": [], "empty_job": []}
    outcomes = []
    for i, request in enumerate(requests):
        seconds, result = timed(lambda r=request: fulfill_order.execute_in_process(
            run_config=r.run_config, tags=r.tags, resources=resources, instance=instance, raise_on_error=False))
        outcomes.append(result.output_for_node("record_outcome") if result.success else "run failed")
        empty_seconds, _ = timed(lambda: empty_job.execute_in_process(instance=instance))
        if i >= warmup:
            times["fulfill_order"].append(seconds)
            times["empty_job"].append(empty_seconds)
    return {"times": times, "outcomes": outcomes}


def launched(stack, instance: dg.DagsterInstance, requests: list[dg.RunRequest], warmup: int) -> dict:
    os.environ.update(stack.env())  # read by the code server and run workers (the project's EnvVar resources)
    target = PythonFileTarget(str(Path(__file__).with_name("_launch_defs.py")), "defs", str(REPO_ROOT), "bench")
    rows: dict[str, list[dict]] = {"fulfill_order": [], "empty_job": []}
    outcomes = []
    with WorkspaceProcessContext(instance, target, version=dg.__version__,
                                 code_server_log_level="ERROR") as process_context:
        # private attribute: the code server processes, so that none outlives the script (see stop_process)
        servers = [p.server_process for p in process_context._grpc_server_registry._all_processes]
        workspace = process_context.create_request_context()
        location = workspace.get_code_location("bench")
        (repo,) = location.get_repositories().values()

        def launch(job_name: str, run_config: dict, tags: dict) -> dict:
            start = time.time()
            run = _create_run(instance, location, repo, repo.get_full_job(job_name), run_config, tags, None, None)
            instance.submit_run(run.run_id, workspace)
            while instance.get_run_by_id(run.run_id).status not in DONE:
                time.sleep(0.05)
            record = instance.get_run_record_by_id(run.run_id)
            return {"wall": time.time() - start, "to_start": record.start_time - start,
                    "body": record.end_time - record.start_time, "status": record.dagster_run.status}

        for i, request in enumerate(requests):
            fulfil = launch("fulfill_order", request.run_config, request.tags)
            empty = launch("empty_job", {}, {})
            outcomes.append(fulfil["status"].value)
            if i >= warmup:
                rows["fulfill_order"].append(fulfil)
                rows["empty_job"].append(empty)
    for server in servers:  # asked to shut down above; it normally exits by itself, but never leave one behind
        stop_process(server)
    return {"rows": rows, "outcomes": outcomes}


def stop_process(process: subprocess.Popen) -> None:
    for sig, grace in ((None, 30), (signal.SIGINT, 10), (signal.SIGKILL, 10)):
        if sig is not None:
            process.send_signal(sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="measured in-process runs of each job")
    parser.add_argument("--launched", type=int, default=8, help="measured launched runs of each job (0: skip)")
    args = parser.parse_args()
    print_machine()
    compiled = os.path.exists(importlib.util.cache_from_source(dg.__file__))
    console.print(f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}; compiled bytecode in "
                  f".venv: {'yes' if compiled else 'NO (run workers compile Dagster from source; run `make sync`)'}",
                  highlight=False)
    warm_in, warm_launch = 2, 1
    with stand_ins() as stack, dagster_home(COORDINATOR) as instance, stderr_to_file("run_overhead"):
        total = args.runs + warm_in + (args.launched + warm_launch if args.launched else 0)
        requests = sensor_requests(stack, instance, total)
        inproc = in_process(stack, instance, requests[: args.runs + warm_in], warm_in)
        console.print(f"in-process fulfill_order outcomes: {summarize(inproc['outcomes'])}", highlight=False)
        launch = None
        if args.launched:
            launch = launched(stack, instance, requests[args.runs + warm_in:], warm_launch)
            console.print(f"launched fulfill_order run statuses: {summarize(launch['outcomes'])}", highlight=False)
        kinguin_orders = len(stack.kinguin.orders)

    times = inproc["times"]
    rows = [[f"in process: {job}", len(values), f"{median(values):.3f} s", f"{min(values):.3f} s", "", "",
             f"{60 / median(values):.0f}"] for job, values in times.items()]
    if launch:
        for job, runs in launch["rows"].items():
            wall = [r["wall"] for r in runs]
            rows.append([f"launched: {job}", len(runs), f"{median(wall):.3f} s", f"{min(wall):.3f} s",
                         f"{median([r['to_start'] for r in runs]):.3f} s",
                         f"{median([r['body'] for r in runs]):.3f} s", f"{60 / median(wall):.0f}"])
    print_table("Per-run cost (one run at a time; medians)",
                ["mode: job", "runs", "per run", "fastest", "create + submit to RUN_START", "RUN_START to end",
                 "runs/min (1 lane)"], rows)
    ratio = median(times["fulfill_order"]) / median(times["empty_job"])
    console.print(f"in process: fulfill_order / empty_job = {ratio:.2f}x (target <= 1.2x); "
                  f"extra per run {median(times['fulfill_order']) - median(times['empty_job']):.3f} s",
                  highlight=False)
    if launch:
        wall = {job: median([r["wall"] for r in runs]) for job, runs in launch["rows"].items()}
        console.print(f"launched: fulfill_order / empty_job = {wall['fulfill_order'] / wall['empty_job']:.2f}x "
                      f"(target <= 1.2x); extra per run {wall['fulfill_order'] - wall['empty_job']:.3f} s",
                      highlight=False)
    console.print(f"Kinguin orders placed: {kinguin_orders}", highlight=False)


def summarize(values: list[str]) -> str:
    return ", ".join(f"{v} x{values.count(v)}" for v in sorted(set(values)))


if __name__ == "__main__":
    main()
