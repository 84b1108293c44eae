"""The reconciliation report: what the store, NOWPayments and Kinguin each believe about one window of orders.

`collecting.collect` gathers the evidence with read calls only (store queries, Kinguin searches and gets,
NOWPayments payment reads, R2 HEADs); `classifying.classify` turns it into one row per order with exactly one
class. Both are plain Python without Dagster, so the `reconciliation_report` asset and the `report` command
share them; how a report is shown belongs to each of those.

Classes, most serious first; an order matching several gets the first, and `flags` keeps all of them:

1. orphan_supplier_order: a Kinguin order whose orderExternalId is no store order (money spent for nothing)
2. duplicate_supplier_orders: more than one live Kinguin order for one store order (money spent twice); one
   live order beside canceled or refunded ones (an admin's replacements) is not a duplicate
3. fulfilled_missing_keys: the customer was told "fulfilled" and an item has no keys row or no stored object
4. supplier_canceled_or_refunded: Kinguin canceled or refunded the order; nothing arrives without a person
5. store_unpaid_but_payment_finished: the customer paid, the store still says created/waiting/confirming/failed
6. supplier_completed_store_not_fulfilled: the keys are waiting at Kinguin
7. placed_not_delivered: Kinguin is still processing the order
8. held_by_switch: one of BitLoot's own switches (a feature flag) holds the recovery back
9. paid_not_placed: paid, and Kinguin has no order for it
10. price_mismatch: Kinguin charged more per unit than the product cost BitLoot sends as the ceiling
11. fulfilled_missing_email: delivered, but the completion email never went out
12. ok
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from bitloot_reconcile.domain.reconciliation.classifying import (
    COLUMNS,
    ERROR_CLASSES,
    RANK,
    Mismatch,
    class_counts,
    classify,
    severity,
)
from bitloot_reconcile.domain.reconciliation.collecting import Evidence, ReportProgress, collect
from bitloot_reconcile.store.repository import Store

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMNS", "ERROR_CLASSES", "RANK", "Evidence", "Mismatch", "ReportProgress", "build_report",
           "class_counts", "classify", "collect", "severity"]


def build_report(store: Store, kinguin, nowpayments, vault, start: dt.datetime, end: dt.datetime, *,
                 progress: ReportProgress | None = None) -> pd.DataFrame:
    return classify(collect(store, kinguin, nowpayments, vault, start, end, progress=progress))
