"""Code location for the benchmarks: the project's own definitions plus an empty job of 8 trivial ops.

`run_overhead.py` loads it in a code server (like `workspace.yaml` does) and imports `empty_job` for its in-process
runs. The project's resources read their settings from the environment, which the script points at the stand-ins.
"""

import dagster as dg

from bitloot_reconcile.definitions import defs as project_defs


@dg.op
def noop_0() -> int:
    return 0


def _noop(i: int) -> dg.OpDefinition:
    @dg.op(name=f"noop_{i}")
    def _op(value: int) -> int:
        return value + 1

    return _op


NOOPS = [_noop(i) for i in range(1, 8)]


@dg.job(executor_def=dg.in_process_executor, description="8 trivial ops in a chain, same executor as fulfill_order")
def empty_job() -> None:
    value = noop_0()
    for op in NOOPS:
        value = op(value)


defs = dg.Definitions.merge(project_defs(), dg.Definitions(jobs=[empty_job]))
