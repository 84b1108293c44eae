"""Classifying: one row per order of the window, with exactly one class (the module docstring of the package
lists them, most serious first)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING

from bitloot_reconcile.adapters.kinguin import KinguinOrder
from bitloot_reconcile.domain.fulfilment import DEAD_SUPPLIER_STATUSES
from bitloot_reconcile.domain.reconciliation.collecting import Evidence, created_at, store_order_of
from bitloot_reconcile.store.repository import Order
from bitloot_reconcile.store.statuses import LOOKS_UNPAID, OrderStatus

if TYPE_CHECKING:  # pandas is imported where a report is built, so run workers of other jobs never load it
    import pandas as pd


class Mismatch(StrEnum):
    """Report classes in precedence order (see the module docstring)."""

    ORPHAN = "orphan_supplier_order"
    DUPLICATE = "duplicate_supplier_orders"
    MISSING_KEYS = "fulfilled_missing_keys"
    SUPPLIER_CANCELED = "supplier_canceled_or_refunded"
    UNPAID_BUT_FINISHED = "store_unpaid_but_payment_finished"
    SUPPLIER_COMPLETED = "supplier_completed_store_not_fulfilled"
    PLACED_NOT_DELIVERED = "placed_not_delivered"
    HELD_BY_SWITCH = "held_by_switch"
    PAID_NOT_PLACED = "paid_not_placed"
    PRICE_MISMATCH = "price_mismatch"
    MISSING_EMAIL = "fulfilled_missing_email"
    OK = "ok"


RANK = {cls: n for n, cls in enumerate(Mismatch)}
# Money spent for nothing or twice, or a customer told "fulfilled" without a key: a person must act today.
ERROR_CLASSES = frozenset({Mismatch.ORPHAN, Mismatch.DUPLICATE, Mismatch.MISSING_KEYS})
PRICE_TOLERANCE = 0.005  # Kinguin prices are floats of cents
COLUMNS = [
    "order_id", "source", "class", "severity", "flags", "store_status", "created_at", "items", "items_with_key",
    "payment", "kinguin_orders", "charged_eur", "email_sent", "detail",
]


def severity(cls: Mismatch) -> str:
    return "ok" if cls is Mismatch.OK else "error" if cls in ERROR_CLASSES else "warn"


def _iso(moment: dt.datetime | None) -> str:
    """UTC ISO text, the same for the store's naive UTC and Kinguin's offset timestamps (rows sort by it)."""
    if moment is None:
        return ""
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).astimezone(dt.UTC).isoformat(
        timespec="seconds")


def classify(evidence: Evidence) -> pd.DataFrame:
    """One row per store order of the window and one per orphan orderExternalId, worst first."""
    by_external: dict[str | None, list[KinguinOrder]] = defaultdict(list)
    for supplier in sorted(evidence.supplier_orders, key=lambda o: (o.created_at or "", o.order_id)):
        by_external[store_order_of(supplier) or supplier.order_external_id].append(supplier)
    by_id = {o.order_id: o for o in evidence.supplier_orders}
    claimed: set[str] = set()
    rows = []
    for order in evidence.orders:
        suppliers = list(by_external.get(order.id, []))
        reserved = by_id.get(order.kinguin_reservation_id or "")
        if reserved is not None and reserved not in suppliers:
            suppliers.append(reserved)
        claimed.update(s.order_id for s in suppliers)
        rows.append(_store_row(order, suppliers, evidence))
    orphans = [o for o in evidence.supplier_orders if o.order_id not in claimed]
    groups: dict[str, list[KinguinOrder]] = defaultdict(list)
    for supplier in orphans:  # orders sent without an orderExternalId are orphans one by one
        groups[store_order_of(supplier) or supplier.order_external_id or f"(none: {supplier.order_id})"].append(
            supplier)
    rows += [_orphan_row(external_id, suppliers) for external_id, suppliers in groups.items()]
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    if frame.empty:
        return frame
    frame["_rank"] = frame["class"].map(lambda c: RANK[Mismatch(c)])
    return frame.sort_values(["_rank", "created_at", "order_id"]).drop(columns="_rank").reset_index(drop=True)


def _store_row(order: Order, suppliers: list[KinguinOrder], evidence: Evidence) -> dict:
    found: dict[Mismatch, str] = {}
    primary = next((s for s in suppliers if s.order_id == order.kinguin_reservation_id), None)
    primary = primary or (suppliers[0] if suppliers else None)
    fulfilled = order.status == OrderStatus.FULFILLED
    # One live Kinguin order and any number Kinguin canceled or refunded (an admin replaced them) is fine.
    live = [s for s in suppliers if s.status not in DEAD_SUPPLIER_STATUSES]
    if len(live) > 1:
        found[Mismatch.DUPLICATE] = f"{len(live)} live Kinguin orders for one store order"
    if fulfilled:
        no_row = sum(1 for item in order.items if not item.key_refs)
        no_object = evidence.missing_objects.get(order.id, 0)
        if no_row or no_object:
            found[Mismatch.MISSING_KEYS] = f"fulfilled; {no_row} item(s) without keys row, {no_object} without object"
    if primary is not None and primary.status in ("canceled", "refunded"):
        found[Mismatch.SUPPLIER_CANCELED] = f"Kinguin {primary.status} {primary.order_id}; store says {order.status}"
    paid_remotely, seen = evidence.payments_seen.get(order.id, (False, ""))
    if order.status in LOOKS_UNPAID and paid_remotely:
        found[Mismatch.UNPAID_BUT_FINISHED] = f"store says {order.status}; {seen}"
    if primary is not None and not fulfilled:
        if primary.status == "completed":
            found[Mismatch.SUPPLIER_COMPLETED] = f"Kinguin completed {primary.order_id}; store says {order.status}"
        elif primary.status == "processing":
            found[Mismatch.PLACED_NOT_DELIVERED] = f"Kinguin {primary.order_id} still processing"
    if order.id in evidence.held:
        found[Mismatch.HELD_BY_SWITCH] = f"held by a BitLoot switch: {evidence.held[order.id]}"
    if order.status == OrderStatus.PAID and primary is None:
        unknown = order.kinguin_reservation_id in evidence.unknown_reservations
        found[Mismatch.PAID_NOT_PLACED] = (
            f"kinguinReservationId {order.kinguin_reservation_id} unknown to Kinguin" if unknown
            else "paid; no Kinguin order"
        )
    overcharged = _overcharges(order, suppliers)
    if overcharged:
        found[Mismatch.PRICE_MISMATCH] = overcharged
    if fulfilled and not order.completion_email_sent:
        found[Mismatch.MISSING_EMAIL] = "fulfilled; completion email not sent"
    return _row(
        found,
        order_id=order.id,
        source="store",
        store_status=order.status,
        created_at=_iso(order.created_at),
        items=len(order.items),
        items_with_key=sum(1 for item in order.items if item.key_refs),
        payment=", ".join(p.status for p in order.payments) + (f" ({seen})" if seen else ""),
        suppliers=suppliers,
        email_sent=order.completion_email_sent,
    )


def _overcharges(order: Order, suppliers: list[KinguinOrder]) -> str:
    """Kinguin's per-unit price above products.cost (the ceiling BitLoot sends) for any line."""
    cost = {item.kinguin_product_id: item.product_cost for item in order.items if item.kinguin_product_id}
    over = [
        f"{line.product_id} charged {line.price:.2f} > cost {Decimal(cost[line.product_id]):.2f}"
        for supplier in suppliers
        for line in supplier.products
        if cost.get(line.product_id) is not None and line.price is not None
        and line.price > float(cost[line.product_id]) + PRICE_TOLERANCE
    ]
    return "; ".join(over)


def _orphan_row(external_id: str, suppliers: list[KinguinOrder]) -> dict:
    found = {Mismatch.ORPHAN: f"{len(suppliers)} Kinguin order(s) for an orderExternalId that is no store order"}
    if len([s for s in suppliers if s.status not in DEAD_SUPPLIER_STATUSES]) > 1:
        found[Mismatch.DUPLICATE] = f"{len(suppliers)} Kinguin orders for one orderExternalId"
    return _row(found, order_id=external_id, source="kinguin", store_status=None,
                created_at=_iso(created_at(suppliers[0])),
                items=0, items_with_key=0, payment="", suppliers=suppliers, email_sent=None)


def _row(found: dict[Mismatch, str], *, suppliers: list[KinguinOrder], **values) -> dict:
    flags = sorted(found, key=RANK.get)
    cls = flags[0] if flags else Mismatch.OK
    return {
        **values,
        "class": cls.value,
        "severity": severity(cls),
        "flags": ",".join(flags),
        "kinguin_orders": ", ".join(f"{s.order_id}:{s.status}" for s in suppliers),
        "charged_eur": round(sum(s.payment_price or 0 for s in suppliers), 2),
        "detail": "; ".join(found[f] for f in flags),
    }


def class_counts(report: pd.DataFrame) -> dict[str, int]:
    """Every class, zeros included, in precedence order."""
    counts = report["class"].value_counts() if not report.empty else {}
    return {cls.value: int(counts.get(cls.value, 0)) for cls in Mismatch}
