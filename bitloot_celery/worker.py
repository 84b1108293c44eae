"""The Celery app a run-worker host starts (DAGSTER_HOME holding the layout's dagster.yaml):

    celery -A bitloot_celery.worker worker -Q orders,backlog --concurrency 2 --prefetch-multiplier 1

It executes the runs `QueuePerJobCeleryRunLauncher` sends, each in one of the worker's long-lived processes. The
code location is imported here, before the worker forks its processes, so no run pays for the import.

The task is dagster-celery's `execute_job` with one difference: each worker process keeps one DagsterInstance
whose storages hold pooled PostgreSQL connections (as Dagster's webserver does), where dagster-celery makes a new
instance per run whose storages open a new connection for every read and write: a PostgreSQL backend started
for each of a run's ~60 events cost the database host more CPU than the run itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dagster import DagsterInstance
from dagster._cli.api import _execute_run_command_body
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import unpack_value
from dagster_celery.config import DEFAULT_CONFIG, TASK_EXECUTE_JOB_NAME
from dagster_celery.make_app import make_app

import bitloot_reconcile.definitions  # noqa: F401  (warm: imported once, in the parent)

BROKER_VARIABLES = ("DAGSTER_CELERY_BROKER_URL", "DAGSTER_CELERY_BACKEND_URL")
if Path(sys.argv[0]).name == "celery" and not all(os.environ.get(name) for name in BROKER_VARIABLES):
    # Started as a worker without them, Celery would use its default broker (amqp on localhost) and wait there.
    raise SystemExit(f"set {' and '.join(BROKER_VARIABLES)} (the broker of the instance config's run launcher)")

app = make_app({
    "broker": os.environ.get(BROKER_VARIABLES[0]),
    "backend": os.environ.get(BROKER_VARIABLES[1]),
    "include": [],
    "config_source": DEFAULT_CONFIG,
    "task_default_queue": "orders",
})
# Celery would swap sys.stdout/stderr for a logger; Dagster's compute log capture needs the real file descriptors
# (else a run's stdout/stderr never reach the compute log manager, and the webserver shows nothing).
app.conf.worker_redirect_stdouts = False

_instance: DagsterInstance | None = None


def process_instance() -> DagsterInstance:
    """This worker process's DagsterInstance, made on its first run (after the fork), with pooled connections
    that are recycled after an hour; statements time out after 60 s."""
    global _instance
    if _instance is None:
        _instance = DagsterInstance.get()
        _instance.optimize_for_webserver(statement_timeout=60_000, pool_recycle=3600, max_overflow=10)
    return _instance


@app.task(bind=True, name=TASK_EXECUTE_JOB_NAME, track_started=True)
def execute_job(_task: object, execute_job_args_packed: dict) -> int:
    args = unpack_value(execute_job_args_packed, as_type=ExecuteRunArgs)
    return _execute_run_command_body(
        instance=process_instance(), run_id=args.run_id, write_stream_fn=lambda _event: None,
        set_exit_code_on_failure=args.set_exit_code_on_failure is not False)
