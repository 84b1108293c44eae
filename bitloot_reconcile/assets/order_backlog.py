"""`order_backlog`: the stuck-orders board, every order that is not done, its state and the trend.

A thin shell over `domain.board`: two bounded reads of the store and the queued or running runs of Dagster (no
outside calls). The oldest rows are shown as a Markdown table with short ids, each a link (an order's id to its
runs, a run's id to the run), narrow enough to read without scrolling sideways; every row, every column, is
written as CSV to `reports/board/{time}.csv` in the bucket beside the reconciliation reports. The figures
Dagster plots over materialisations go into the metadata, the count of orders in each state among them. Three
asset checks: the oldest stuck order against the SLA (ERROR), orders needing a person (WARN) and quarantined
orders (WARN). A schedule refreshes it every 5 minutes; `board_alerts.py` alerts on a check that turns failed.
"""


import datetime as dt
from functools import partial

import dagster as dg

from bitloot_reconcile.domain import board as bd
from bitloot_reconcile.domain.alerting import order_runs_url, run_url
from bitloot_reconcile.resources.alerts import AlertsResource
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.runs_in_flight import runs_in_flight
from bitloot_reconcile.store.repository import utcnow

ASSET_NAME = bd.ASSET_NAME
TABLE_ROWS = 50  # shown in the UI, oldest first; the CSV holds every row
SCHEDULE = "*/5 * * * *"
SEVERITY = {"ERROR": dg.AssetCheckSeverity.ERROR, "WARN": dg.AssetCheckSeverity.WARN}


def report_path(moment: dt.datetime) -> str:
    return f"reports/board/{moment.astimezone(dt.UTC):%Y-%m-%dT%H-%M-%SZ}.csv"


def build_order_backlog(sla: dt.timedelta) -> dg.AssetsDefinition:
    """The board asset; `sla` is how old the oldest stuck order may be before its check fails
    (RECONCILE_BOARD_SLA_MINUTES, fixed when the code location loads)."""

    @dg.asset(
        name=ASSET_NAME,
        check_specs=[dg.AssetCheckSpec(name, asset=ASSET_NAME, description=text)
                     for name, text in bd.CHECK_DESCRIPTIONS.items()],
        group_name="operations",
        kinds={"s3"},
        description="Every order that is not done: stuck, in flight, backing off, waiting for the supplier, payment "
        "not confirmed, quarantined or needing a person, oldest first; the trend over the last 24 h.",
    )
    def order_backlog(
        context: dg.AssetExecutionContext,
        store: StoreResource,
        policy: RecoveryPolicyResource,
        r2: R2Resource,
        alerts: AlertsResource,
    ) -> dg.MaterializeResult:
        now = utcnow()
        board = bd.load_board(store.get_store(), in_flight=runs_in_flight(context.instance), now=now,
                              grace=dt.timedelta(minutes=policy.grace_minutes),
                              max_age=dt.timedelta(days=policy.max_age_days))
        link = partial(run_url, alerts.dagster_base_url)
        runs_of_order = partial(order_runs_url, alerts.dagster_base_url)
        vault, path = r2.get_vault(), report_path(now)
        vault.put_object(path, bd.to_csv(board.rows, link).encode(), "text/csv")
        shown = board.rows[:TABLE_ROWS]
        context.log.info(f"board: {len(board.rows)} orders not done; {board.counts()}")
        return dg.MaterializeResult(
            metadata={
                "board": dg.MetadataValue.md(bd.to_markdown(shown, runs_of_order=runs_of_order, run_url=link)),
                "shown": f"the oldest {len(shown)} of {len(board.rows)}"
                         + (" (cut short at the read's limit)" if board.truncated else ""),
                "dagster/row_count": len(board.rows),
                **{f"orders_{state}": dg.MetadataValue.int(count) for state, count in board.counts().items()},
                **{name: (dg.MetadataValue.int(value) if isinstance(value, int) else dg.MetadataValue.float(value))
                   for name, value in board.figures().items()},
                "sla_minutes": dg.MetadataValue.float(sla.total_seconds() / 60),
                "csv_path": dg.MetadataValue.path(f"{vault.bucket}/{path}"),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=verdict.name, passed=verdict.passed, severity=SEVERITY[verdict.severity],
                    description=verdict.description,
                    metadata={"count": len(verdict.order_ids),
                              "orders": dg.MetadataValue.json(list(verdict.order_ids[:bd.SAMPLE_IDS * 2]))},
                )
                for verdict in bd.checks(board, sla=sla)
            ],
        )

    return order_backlog


order_backlog_job = dg.define_asset_job("order_backlog_job", selection=[ASSET_NAME])


@dg.schedule(cron_schedule=SCHEDULE, execution_timezone="UTC", job=order_backlog_job,
             default_status=dg.DefaultScheduleStatus.RUNNING)
def order_backlog_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return dg.RunRequest(run_key=context.scheduled_execution_time.isoformat())
