"""The reconciliation report: what the store, NOWPayments and Kinguin each believe about one window of orders.

`collect` gathers the evidence with read calls only (store queries, Kinguin searches and gets, NOWPayments
payment reads, R2 HEADs); `classify` turns it into one row per order with exactly one class. Both are plain
Python without Dagster, so the `reconciliation_report` asset and the `report` command share them.

Classes, most serious first; an order matching several gets the first, and `flags` keeps all of them:

1. orphan_supplier_order: a Kinguin order whose orderExternalId is no store order (money spent for nothing)
2. duplicate_supplier_orders: more than one Kinguin order for one store order (money spent twice)
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
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING

from bitloot_reconcile.adapters.errors import NotFoundError
from bitloot_reconcile.adapters.kinguin import KinguinOrder
from bitloot_reconcile.adapters.nowpayments import PaymentVerdict
from bitloot_reconcile.domain.fulfilment import UNPAID_STATUSES, parse_order_id, payment_verdict
from bitloot_reconcile.domain.outcomes import InvalidRequest, Outcome
from bitloot_reconcile.store.repository import Order, Store

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
# BitLoot's store statuses that say "not paid yet"; `created` is only ever left by an IPN.
LOOKS_UNPAID = (*UNPAID_STATUSES, "created")
PRICE_TOLERANCE = 0.005  # Kinguin prices are floats of cents
COLUMNS = [
    "order_id", "source", "class", "severity", "flags", "store_status", "created_at", "items", "items_with_key",
    "payment", "kinguin_orders", "charged_eur", "email_sent", "detail",
]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def severity(cls: Mismatch) -> str:
    return "ok" if cls is Mismatch.OK else "error" if cls in ERROR_CLASSES else "warn"


@dataclass
class Evidence:
    """What each system said about one window of orders (gathered by `collect`, or built by hand in tests)."""

    orders: list[Order]
    placement_intents: set[str] = field(default_factory=set)  # order ids with a recorded intent to place
    supplier_orders: list[KinguinOrder] = field(default_factory=list)  # window's and the orders' Kinguin orders
    unknown_reservations: set[str] = field(default_factory=set)  # kinguinReservationIds Kinguin does not know
    payments_seen: dict[str, tuple[bool, str]] = field(default_factory=dict)  # order id -> (paid?, what was seen)
    missing_objects: dict[str, int] = field(default_factory=dict)  # fulfilled order id -> items without object
    held: dict[str, str] = field(default_factory=dict)  # order id -> why a BitLoot switch holds its recovery


# ------------------------------------------------------------------------------------------------ collecting
def collect(store: Store, kinguin, nowpayments, vault, start: dt.datetime, end: dt.datetime, *,
            progress: Progress | None = None) -> Evidence:
    """Read everything the report lines up for orders created in [start, end). Read calls only.

    `kinguin` needs search_orders/get_order, `nowpayments` get_payment, `vault` exists (None skips the
    object check).
    """
    tick = progress or (lambda stage, done, total: None)
    ids = store.order_ids_created_between(start, end)
    evidence = Evidence(orders=[])
    for n, order_id in enumerate(ids, 1):
        order = store.load_order(order_id)
        if order is not None:
            evidence.orders.append(order)
            state = store.get_state(order_id)
            if state.placement_intent_at is not None:
                evidence.placement_intents.add(order_id)
            if state.last_outcome == Outcome.PAUSED:
                evidence.held[order_id] = state.last_reason or "held"
        tick("store", n, len(ids))
    _collect_supplier(evidence, store, kinguin, start, end, tick)
    unpaid = [o for o in evidence.orders if o.status in LOOKS_UNPAID and o.payments]
    for n, order in enumerate(unpaid, 1):
        verdict, seen = payment_verdict(order, nowpayments)
        evidence.payments_seen[order.id] = (verdict is PaymentVerdict.PAID, seen)
        tick("NOWPayments", n, len(unpaid))
    fulfilled = [o for o in evidence.orders if o.status == "fulfilled"]
    for n, order in enumerate(fulfilled, 1):
        refs = [item.key_refs[0] for item in order.items if item.key_refs]
        missing = sum(1 for ref in refs if not ref or (vault is not None and not vault.exists(ref)))
        if missing:
            evidence.missing_objects[order.id] = missing
        tick("R2", n, len(fulfilled))
    return evidence


def _collect_supplier(evidence: Evidence, store: Store, kinguin, start: dt.datetime, end: dt.datetime,
                      tick: Progress) -> None:
    """Kinguin orders created in the window, plus every Kinguin order of the window's store orders that were
    placed or were about to be (found by orderExternalId, whenever Kinguin created them)."""
    store_ids = {o.id for o in evidence.orders}
    window = [o for o in kinguin.search_orders(created_at_from=start, created_at_to=end)
              if _within(o, start, end)]
    # A window order for another day's store order belongs to that day's report, not to the orphans here.
    foreign = {_as_uuid(o.order_external_id) for o in window if o.order_external_id not in store_ids} - {None}
    elsewhere = store.existing_order_ids(foreign)
    found = {o.order_id: o for o in window if o.order_external_id not in elsewhere}
    placed = [o for o in evidence.orders if o.kinguin_reservation_id or o.id in evidence.placement_intents]
    tick("Kinguin", 1, len(placed) + 1)
    for n, order in enumerate(placed, 2):
        for supplier in kinguin.search_orders(order_external_id=order.id):
            found.setdefault(supplier.order_id, supplier)
        reservation = order.kinguin_reservation_id
        if reservation and reservation not in found:
            try:
                found[reservation] = kinguin.get_order(reservation)
            except NotFoundError:
                evidence.unknown_reservations.add(reservation)
        tick("Kinguin", n, len(placed) + 1)
    evidence.supplier_orders = list(found.values())


def _created(order: KinguinOrder) -> dt.datetime | None:
    try:
        moment = dt.datetime.fromisoformat(order.created_at or "")
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _iso(moment: dt.datetime | None) -> str:
    """UTC ISO text, the same for the store's naive UTC and Kinguin's offset timestamps (rows sort by it)."""
    if moment is None:
        return ""
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).astimezone(dt.UTC).isoformat(
        timespec="seconds")


def _within(order: KinguinOrder, start: dt.datetime, end: dt.datetime) -> bool:
    """Kinguin's createdAtTo is inclusive and to the second: keep [start, end) exactly."""
    moment = _created(order)
    return moment is None or start <= moment < end


def _as_uuid(value: str | None) -> str | None:
    try:
        return parse_order_id(value or "")
    except InvalidRequest:
        return None


# ------------------------------------------------------------------------------------------------ classifying
def classify(evidence: Evidence) -> pd.DataFrame:
    """One row per store order of the window and one per orphan orderExternalId, worst first."""
    by_external: dict[str | None, list[KinguinOrder]] = defaultdict(list)
    for supplier in sorted(evidence.supplier_orders, key=lambda o: (o.created_at or "", o.order_id)):
        by_external[supplier.order_external_id].append(supplier)
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
        groups[supplier.order_external_id or f"(none: {supplier.order_id})"].append(supplier)
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
    fulfilled = order.status == "fulfilled"
    if len(suppliers) > 1:
        found[Mismatch.DUPLICATE] = f"{len(suppliers)} Kinguin orders for one store order"
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
    if order.status == "paid" and primary is None:
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
    if len(suppliers) > 1:
        found[Mismatch.DUPLICATE] = f"{len(suppliers)} Kinguin orders for one orderExternalId"
    return _row(found, order_id=external_id, source="kinguin", store_status=None,
                created_at=_iso(_created(suppliers[0])),
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


def build_report(store: Store, kinguin, nowpayments, vault, start: dt.datetime, end: dt.datetime, *,
                 progress: Progress | None = None) -> pd.DataFrame:
    return classify(collect(store, kinguin, nowpayments, vault, start, end, progress=progress))


# ------------------------------------------------------------------------------------------------ presenting
def class_counts(report: pd.DataFrame) -> dict[str, int]:
    """Every class, zeros included, in precedence order."""
    counts = report["class"].value_counts() if not report.empty else {}
    return {cls.value: int(counts.get(cls.value, 0)) for cls in Mismatch}


def worst_rows_markdown(report: pd.DataFrame, limit: int = 20) -> str:
    bad = report[report["class"] != Mismatch.OK.value].head(limit)
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

