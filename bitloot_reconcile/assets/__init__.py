"""Assets of the code location and their schedules."""

from bitloot_reconcile.assets.reconciliation_report import (
    reconciliation_report,
    reconciliation_report_job,
    reconciliation_report_schedule,
)

ASSETS = [reconciliation_report]
SCHEDULES = [reconciliation_report_schedule]

__all__ = ["ASSETS", "SCHEDULES", "reconciliation_report", "reconciliation_report_job",
           "reconciliation_report_schedule"]
