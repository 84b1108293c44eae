"""`reconciliation_report`: one daily partition of orders, lined up across the store, NOWPayments and Kinguin.

A thin shell over `domain.reconciliation`: it reads (never writes) the three systems, stores the full table as
CSV in the R2 bucket under `reports/reconciliation/{day}.csv`, and reports one asset check per mismatch class
(ERROR for money spent for nothing or twice and for fulfilled orders missing keys, WARN for the rest). The
worst rows and the class counts are shown as Markdown in the materialisation's metadata.
"""

import datetime as dt
import math
from typing import TYPE_CHECKING

import dagster as dg

from bitloot_reconcile.domain import reconciliation as rec
from bitloot_reconcile.resources.kinguin import KinguinResource
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.store import StoreResource

if TYPE_CHECKING:  # as in domain.reconciliation: run workers of other jobs never load pandas
    import pandas as pd

# end_offset=1: today's partial day can be reported on demand; the schedule reports the day just ended.
DAILY = dg.DailyPartitionsDefinition(start_date="2026-01-01", timezone="UTC", end_offset=1)
CHECKED = [cls for cls in rec.Mismatch if cls is not rec.Mismatch.OK]
SAMPLE_IDS = 10


def report_path(partition_key: str) -> str:
    return f"reports/reconciliation/{partition_key}.csv"


def worst_rows_markdown(report: "pd.DataFrame", limit: int = 20) -> str:
    bad = report[report["class"] != rec.Mismatch.OK.value].head(limit)
    if bad.empty:
        return "No mismatches: every order is ok."
    head = "| class | order | store status | Kinguin orders | detail |\n|---|---|---|---|---|\n"
    return head + "\n".join(
        "| " + " | ".join(_cell(row[c]) for c in ("class", "order_id", "store_status", "kinguin_orders", "detail"))
        + " |"
        for _, row in bad.iterrows()
    )


def bar_chart(counts: dict[str, int], width: int = 30) -> str:
    """A text bar chart in a code block: renders in Dagster's markdown metadata with nothing extra."""
    top = max(counts.values(), default=0) or 1
    label = max(map(len, counts), default=0)
    lines = [f"{name:<{label}} {'█' * math.ceil(n / top * width)} {n}" for name, n in counts.items()]
    return "```\n" + "\n".join(lines) + "\n```"


def _cell(value: object) -> str:
    return "" if value is None or value != value else str(value).replace("|", "/").replace("\n", " ")


@dg.asset(
    partitions_def=DAILY,
    check_specs=[
        dg.AssetCheckSpec(cls.value, asset="reconciliation_report", description=f"no {cls.value} orders")
        for cls in CHECKED
    ],
    retry_policy=dg.RetryPolicy(max_retries=2, delay=60, backoff=dg.Backoff.EXPONENTIAL),
    group_name="reconciliation",
    kinds={"pandas", "s3"},
    description="Orders created on the partition's day (UTC): store vs NOWPayments vs Kinguin, one class each.",
)
def reconciliation_report(
    context: dg.AssetExecutionContext,
    store: StoreResource,
    kinguin: KinguinResource,
    nowpayments: NowPaymentsResource,
    r2: R2Resource,
):
    start, end = context.partition_time_window
    vault = r2.get_vault()
    with kinguin.get_client() as kinguin_client, nowpayments.get_client() as payments_client:
        report = rec.build_report(store.get_store(), kinguin_client, payments_client, vault, start, end)
    path = report_path(context.partition_key)
    vault.put_object(path, report.to_csv(index=False).encode(), "text/csv")
    counts = rec.class_counts(report)
    yield dg.Output(
        report,
        metadata={
            "counts": dg.MetadataValue.json(counts),
            "worst_rows": dg.MetadataValue.md(worst_rows_markdown(report)),
            "chart": dg.MetadataValue.md(bar_chart(counts)),
            "dagster/row_count": dg.MetadataValue.int(len(report)),
            "report_path": dg.MetadataValue.path(f"{vault.bucket}/{path}"),
        },
    )
    for cls in CHECKED:
        ids = report.loc[report["class"] == cls.value, "order_id"].tolist() if counts[cls] else []
        yield dg.AssetCheckResult(
            check_name=cls.value,
            passed=not ids,
            severity=dg.AssetCheckSeverity.ERROR if cls in rec.ERROR_CLASSES else dg.AssetCheckSeverity.WARN,
            metadata={"count": len(ids), "orders": dg.MetadataValue.json(ids[:SAMPLE_IDS])},
        )


reconciliation_report_job = dg.define_asset_job("reconciliation_report_job", selection=[reconciliation_report])
# An hour after the UTC day closes, so Kinguin orders placed around midnight are in; it reports the day just ended
# (the partitions also offer today, for on-demand runs).
@dg.schedule(
    cron_schedule="0 1 * * *",
    execution_timezone="UTC",
    job=reconciliation_report_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def reconciliation_report_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = (context.scheduled_execution_time - dt.timedelta(days=1)).strftime("%Y-%m-%d")
    return dg.RunRequest(run_key=day, partition_key=day)
