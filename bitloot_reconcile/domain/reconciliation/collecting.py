"""Collecting: what the store, NOWPayments, Kinguin and R2 each say about one window of orders (read calls only)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from bitloot_reconcile.adapters.errors import NotFoundError
from bitloot_reconcile.adapters.kinguin import KinguinOrder
from bitloot_reconcile.adapters.nowpayments import PaymentVerdict
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.fulfilment import parse_order_id, payment_verdict
from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.domain.remedies import external_id_order, replacement_external_id
from bitloot_reconcile.store.repository import Order, Store
from bitloot_reconcile.store.statuses import LOOKS_UNPAID, OrderStatus

# BitLoot's store statuses that say "not paid yet"; `created` is only ever left by an IPN.
ReportProgress = Callable[[str, int, int], None]  # (stage, done, total), for a progress bar


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
    replacements: dict[str, int] = field(default_factory=dict)  # order id -> replacement Kinguin orders placed


def collect(store: Store, kinguin, nowpayments, vault, start: dt.datetime, end: dt.datetime, *,
            progress: ReportProgress | None = None) -> Evidence:
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
            if state.replacements:
                evidence.replacements[order_id] = state.replacements
        tick("store", n, len(ids))
    _collect_supplier(evidence, store, kinguin, start, end, tick)
    unpaid = [o for o in evidence.orders if o.status in LOOKS_UNPAID and o.payments]
    for n, order in enumerate(unpaid, 1):
        verdict, seen = payment_verdict(order, nowpayments)
        evidence.payments_seen[order.id] = (verdict is PaymentVerdict.PAID, seen)
        tick("NOWPayments", n, len(unpaid))
    fulfilled = [o for o in evidence.orders if o.status == OrderStatus.FULFILLED]
    for n, order in enumerate(fulfilled, 1):
        refs = [item.key_refs[0] for item in order.items if item.key_refs]
        missing = sum(1 for ref in refs if not ref or (vault is not None and not vault.exists(ref)))
        if missing:
            evidence.missing_objects[order.id] = missing
        tick("R2", n, len(fulfilled))
    return evidence


def _collect_supplier(evidence: Evidence, store: Store, kinguin, start: dt.datetime, end: dt.datetime,
                      tick: ReportProgress) -> None:
    """Kinguin orders created in the window, plus every Kinguin order of the window's store orders that were
    placed or were about to be (found by orderExternalId, whenever Kinguin created them), replacements too."""
    store_ids = {o.id for o in evidence.orders}
    window = [o for o in kinguin.search_orders(created_at_from=start, created_at_to=end)
              if _within(o, start, end)]
    # A window order for another day's store order belongs to that day's report, not to the orphans here.
    foreign = {store_order_of(o) for o in window if store_order_of(o) not in store_ids} - {None}
    elsewhere = store.existing_order_ids(foreign)
    found = {o.order_id: o for o in window if store_order_of(o) not in elsewhere}
    placed = [o for o in evidence.orders if o.kinguin_reservation_id or o.id in evidence.placement_intents]
    tick("Kinguin", 1, len(placed) + 1)
    for n, order in enumerate(placed, 2):
        external_ids = [order.id] + [replacement_external_id(order.id, number)
                                     for number in range(1, evidence.replacements.get(order.id, 0) + 1)]
        for external_id in external_ids:
            for supplier in kinguin.search_orders(order_external_id=external_id):
                found.setdefault(supplier.order_id, supplier)
        reservation = order.kinguin_reservation_id
        if reservation and reservation not in found:
            try:
                found[reservation] = kinguin.get_order(reservation)
            except NotFoundError:
                evidence.unknown_reservations.add(reservation)
        tick("Kinguin", n, len(placed) + 1)
    evidence.supplier_orders = list(found.values())


def created_at(order: KinguinOrder) -> dt.datetime | None:
    try:
        moment = dt.datetime.fromisoformat(order.created_at or "")
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _within(order: KinguinOrder, start: dt.datetime, end: dt.datetime) -> bool:
    """Kinguin's createdAtTo is inclusive and to the second: keep [start, end) exactly."""
    moment = created_at(order)
    return moment is None or start <= moment < end


def store_order_of(order: KinguinOrder) -> str | None:
    """The store order a Kinguin order was bought for: its orderExternalId is the order id, or a replacement's
    `<order id>:r<n>`; None when it is neither."""
    ours = external_id_order(order.order_external_id)
    if ours is None:
        return None
    try:
        return parse_order_id(ours[0])
    except InvalidRequest:
        return None
