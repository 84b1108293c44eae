"""The run launcher of the production layout on several hosts: dagster-celery's `CeleryRunLauncher`, each run a
Celery task executed in a long-lived worker process on a run-worker host (`bitloot_reconcile.celery_worker`).

One addition: runs of a job named in `job_queues` go to that job's queue (a run's own `dagster-celery/queue` tag
still wins), so a long `fulfill_backlog` batch never sits in front of an admin's `fulfill_order` run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG


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
