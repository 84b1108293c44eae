"""The Celery app a run-worker host starts (DAGSTER_HOME holding the layout's dagster.yaml):

    celery -A bitloot_reconcile.celery_worker worker -Q orders,backlog --concurrency 2 --prefetch-multiplier 1

It executes the runs `QueuePerJobCeleryRunLauncher` sends, each in one of the worker's long-lived processes. The
code location is imported here, before the worker forks its processes, so no run pays for the import."""

from __future__ import annotations

import os

from dagster_celery.config import DEFAULT_CONFIG
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task

import bitloot_reconcile.definitions  # noqa: F401  (warm: imported once, in the parent)

app = make_app({
    "broker": os.environ["DAGSTER_CELERY_BROKER_URL"],
    "backend": os.environ["DAGSTER_CELERY_BACKEND_URL"],
    "include": [],
    "config_source": DEFAULT_CONFIG,
    "task_default_queue": "orders",
})
# Celery would swap sys.stdout/stderr for a logger; Dagster's compute log capture needs the real file descriptors
# (else a run's stdout/stderr never reach the compute log manager, and the webserver shows nothing).
app.conf.worker_redirect_stdouts = False
execute_job = create_execute_job_task(app)
