"""The run worker of the chaos run: one `fulfill_order` run in its own process, as a launched run would be.

`chaos.py` starts each run through a multiprocessing fork server that has already imported Dagster and the code
location (this module is preloaded), so a worker costs a fork instead of seconds of imports, and the harness can
SIGKILL it at any moment. The code location reads its settings and secrets from the environment the fork server
inherited (EnvVar, as in production), and the run uses the filesystem IO manager, so op outputs land in the
instance's storage directory like a launched run's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import dagster as dg

from bitloot_reconcile.adapters.r2 import KeyVault
from bitloot_reconcile.definitions import defs

JOB = defs().resolve_job_def("fulfill_order")


@dg.op
def _noop() -> None:
    return None


@dg.job
def _warm_up_job() -> None:
    _noop()


def _warm_up() -> None:
    """Import, once in the fork server, what a run imports lazily (storage, the execution machinery, boto3):
    otherwise every worker compiles hundreds of modules again."""
    with dg.DagsterInstance.get() as instance:
        instance.get_runs(limit=1)
    _warm_up_job.execute_in_process(instance=dg.DagsterInstance.ephemeral())
    KeyVault("http://127.0.0.1:9", "warm-up", "warm-up", "warm-up").close()


_warm_up()


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    run_config: dict[str, str]
    tags: dict[str, str]
    output_path: str  # the process's stdout and stderr (the "run output" the checker scans)


def run_one(spec: RunSpec) -> None:
    fd = os.open(spec.output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    with dg.DagsterInstance.get() as instance:
        JOB.execute_in_process(
            run_config=spec.run_config,
            instance=instance,
            run_id=spec.run_id,
            tags=spec.tags,
            resources={"io_manager": dg.FilesystemIOManager()},
            raise_on_error=False,
        )
