"""The run launcher of the production layout on several hosts: dagster-celery's `CeleryRunLauncher`, each run a
Celery task executed in a long-lived worker process on a run-worker host (`bitloot_celery.worker`).

Two changes:
- runs of a job named in `job_queues` go to that job's queue (a run's own `dagster-celery/queue` tag still wins),
  so a long `fulfill_backlog` batch never sits in front of an admin's `fulfill_order` run;
- crash detection: dagster-celery judges a run's health by its task's state in the result backend, which stays
  STARTED forever when the worker's host dies, so run monitoring never failed such a run. Here a STARTED task
  counts as running only while the worker that started it says it is still executing it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG, DAGSTER_CELERY_TASK_ID_TAG

# How long run monitoring waits for the worker's answer: a worker busy with runs answers from its main process.
WORKER_ANSWER_SECONDS = 5.0


class QueuePerJobCeleryRunLauncher(CeleryRunLauncher):
    def __init__(self, job_queues: Mapping[str, str] | None = None, **kwargs: Any):
        self.job_queues = dict(job_queues or {})
        super().__init__(**kwargs)

    @classmethod
    def config_type(cls) -> dict:
        return {
            **super().config_type(),
            "job_queues": dg.Field(dg.Permissive(), is_required=False,
                                   description="Job name -> the Celery queue its runs go to."),
        }

    def _launch_celery_task_run(self, run: dg.DagsterRun, task_signature: Any, routing_key: str) -> None:
        queue = self.job_queues.get(run.job_name)
        if queue and DAGSTER_CELERY_QUEUE_TAG not in run.tags:
            run = run.with_tags({**run.tags, DAGSTER_CELERY_QUEUE_TAG: queue})
        super()._launch_celery_task_run(run, task_signature, routing_key)

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        health = super().check_run_worker_health(run)
        if health.status != WorkerStatus.RUNNING:
            return health
        task_id = run.tags[DAGSTER_CELERY_TASK_ID_TAG]
        started = self.celery.AsyncResult(task_id).info
        worker = started.get("hostname") if isinstance(started, dict) else None
        if worker is None:
            return health
        answers = self.celery.control.inspect(destination=[worker], timeout=WORKER_ANSWER_SECONDS).query_task(
            task_id) or {}
        if any(task_id in tasks for tasks in answers.values()):
            return health
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"Celery worker {worker} is not executing this run's task any more (its host is "
            f"gone, cut off or restarted)")
