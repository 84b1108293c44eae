"""Assets of the code location and their schedules."""

from bitloot_reconcile.assets.order_backlog import order_backlog, order_backlog_job, order_backlog_schedule
from bitloot_reconcile.assets.reconciliation_report import (
    reconciliation_report,
    reconciliation_report_job,
    reconciliation_report_schedule,
)
from bitloot_reconcile.order_history import order_attempts

ASSETS = [reconciliation_report, order_backlog, order_attempts]
SCHEDULES = [reconciliation_report_schedule, order_backlog_schedule]

__all__ = ["ASSETS", "SCHEDULES", "order_attempts", "order_backlog", "order_backlog_job", "order_backlog_schedule",
           "reconciliation_report", "reconciliation_report_job", "reconciliation_report_schedule"]
