"""The per-order recovery, one plain function per step (docs/design.md section 4). No Dagster here.

Each step is a decision and its application. The decisions (`refusal`, `decide_payment`,
`decide_supplier_order`, `decide_after_poll`, `match_keys`, `undelivered_items`) are pure: they read the order,
its state and what the read calls answered, and say what to do. The steps apply them: the writes and the calls
that change something. The dry run (`domain.planning`) runs the same decisions and applies none of them.

Every step reloads the order from the store, so it is safe to run again from any point: a step whose work is
already done (reservation saved, key stored, order fulfilled, email flag set) passes straight through.
Steps return a `Progress`; once it carries an outcome, the remaining steps do nothing.
"""

from __future__ import annotations

import datetime as dt
import functools
import unicodedata
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Protocol

from bitloot_reconcile.adapters.errors import (
    DuplicateExternalIdError,
    NotFoundError,
    PermanentError,
    TransientError,
)
from bitloot_reconcile.adapters.kinguin import (
    MAX_LINES,
    MAX_QTY,
    KinguinClient,
    KinguinKey,
    KinguinOrder,
    KinguinProduct,
    OrderLine,
)
from bitloot_reconcile.adapters.nowpayments import (
    NowPaymentsClient,
    PaymentInfo,
    PaymentVerdict,
    classify_payment_status,
)
from bitloot_reconcile.adapters.r2 import KeyConflictError, KeyVault
from bitloot_reconcile.adapters.resend import ResendClient
from bitloot_reconcile.domain.completion_email import completion_html, completion_subject
from bitloot_reconcile.domain.delivery import attachment_filename, completion_idempotency_key, key_object_path
from bitloot_reconcile.domain.eligibility import LEFT_TO_A_PERSON
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.outcomes import LEASE_LOST_REASON, Outcome, Progress
from bitloot_reconcile.domain.remedies import (
    NO_REMEDY,
    PriceBound,
    Remedy,
    Resolution,
    price_against_cost,
    remedy_refusal,
    replacement_external_id,
    unit_price,
    validate_remedy_request,
)
from bitloot_reconcile.store.repository import Item, LeaseLost, Order, ReconcileState, Store
from bitloot_reconcile.store.statuses import RECOVERABLE, UNPAID, OrderStatus

PAID_PAYMENT_ROWS = ("finished", "confirmed")
# Kinguin permanent errors, in words an operator reads in the needs-attention alert.
KINGUIN_REFUSALS = {
    "InsufficientBalance": "insufficient Kinguin balance",
    "ProductUnavailable": "product unavailable at Kinguin (out of stock or price above cost)",
    "OrderFailed": "Kinguin could not place the order (OrderFailed)",
    "Preorder": "Kinguin refused the pre-order rules",
}
# Resend's answer when it will never accept this message (an invalid recipient address, for one).
RESEND_UNDELIVERABLE = 422


class PaymentReader(Protocol):
    def get_payment(self, payment_id: str) -> PaymentInfo: ...


class OrderReader(Protocol):
    def get_order(self, order_id: str) -> KinguinOrder: ...


class OrderSearch(Protocol):
    def search_orders(self, *, order_external_id: str | None = None) -> list[KinguinOrder]: ...


class SupplierOrders(OrderReader, OrderSearch, Protocol):
    """What the supplier-order decision reads: a replacement first asks how the saved order stands."""


class ProductReader(Protocol):
    def get_product(self, product_id: str) -> KinguinProduct | None: ...


@dataclass(frozen=True)
class Stop:
    """A decision that ends the run with this outcome."""

    outcome: Outcome
    reason: str


@dataclass(frozen=True)
class PaymentConfirmed:
    evidence: str  # which evidence passed, in words


@dataclass(frozen=True)
class UseSupplierOrder:
    kinguin_order_id: str
    found_by_search: bool  # adopted after an earlier attempt: its id is not saved yet
    why: str
    replaces: str | None = None  # a replacement found by search: the canceled order it takes the place of


@dataclass(frozen=True)
class PlaceSupplierOrder:
    lines: list[OrderLine]
    order_id: str = ""
    replaces: str | None = None  # an admin's replacement: the canceled Kinguin order it replaces
    replacement: int = 0  # its number (the first order is 0)

    @property
    def external_id(self) -> str:
        return replacement_external_id(self.order_id, self.replacement) if self.replaces else self.order_id


@dataclass(frozen=True)
class KeyMatch:
    """The keys `store_keys` would store now, and how many items still wait for one."""

    pairs: list[tuple[Item, KinguinKey, bool]]  # (item, key, newly assigned)
    missing: int


def parse_order_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw.strip()))
    except (ValueError, AttributeError):
        raise InvalidRequest(f"order_id {raw!r} is not a valid order uuid") from None


def check_launch(raw_order_id: str, reason: str, requested_by: str, remedy: Remedy = NO_REMEDY) -> str:
    """The one check of a person's request before a run exists, whether the launchpad or the command line's
    `retry` launches it (it needs no store): a reason and a requester without control characters (a NUL byte
    fails in PostgreSQL after the claim), neither empty, a remedy only with both, a well-formed order id.
    Returns the id made canonical."""
    for name, value in (("reason", reason), ("requested_by", requested_by)):
        if any(unicodedata.category(char) == "Cc" for char in value):
            raise InvalidRequest(f"{name} must not contain control characters (tabs, newlines, NUL bytes)")
    validate_remedy_request(remedy, reason, requested_by)
    if not reason.strip():
        raise InvalidRequest("reason must not be empty: say why this order is being retried")
    if not requested_by.strip():
        raise InvalidRequest("requested_by must not be empty: say who asks for this retry")
    return parse_order_id(raw_order_id)


def refuse_quarantined(state: ReconcileState) -> None:
    """A run nobody gave a reason for (a re-execution of a sweep run) leaves a quarantined order to a person."""
    if state.last_outcome in LEFT_TO_A_PERSON:
        raise InvalidRequest(
            f"order {state.order_id} is quarantined ({state.last_outcome}: {state.last_reason or 'no reason'}); "
            "re-executing a sweep run does not work it: launch fulfill_order with a reason and requested_by"
        )


def _load(store: Store, order_id: str) -> Order:
    order = store.load_order(order_id)
    if order is None:
        raise InvalidRequest(f"Order {order_id} not found")
    return order


def _status_now(store: Store, order_id: str) -> str:
    """The order's status after a guarded write changed nothing: someone else (an admin, another run) moved it."""
    return _load(store, order_id).status


def refusal(order: Order, *, admin: bool) -> str | None:
    """Why a run refuses this order as an input error (nothing is changed), or None."""
    if not order.items:
        return f"Order {order.id} has no items"
    if order.status == OrderStatus.FULFILLED and order.completion_email_sent:
        return "Order is already fulfilled" if admin else None
    if order.status not in (*RECOVERABLE, OrderStatus.FULFILLED):
        return f"Order {order.id} is {order.status!r}; only paid, waiting, confirming or failed orders are recovered"
    return None


def already_done(order: Order) -> Stop | None:
    if order.status == OrderStatus.FULFILLED and order.completion_email_sent:
        return Stop(Outcome.ALREADY_FULFILLED, "fulfilled and emailed before this run")
    return None


def load_and_claim(store: Store, order_id: str, *, owner: str, lease_ttl: dt.timedelta, admin: bool,
                   remedy: Remedy = NO_REMEDY, bound: PriceBound | None = None) -> Progress:
    """Refuse what cannot be recovered (or a remedy the order rules out), then take the per-order lease (or
    end as `busy`)."""
    order = _load(store, order_id)
    progress = Progress(order_id=order.id, lease_owner=owner, lease_seconds=lease_ttl.total_seconds(),
                        remedy=remedy or None)
    if refused := refusal(order, admin=admin) or remedy_refusal(order, remedy, bound or PriceBound()):
        raise InvalidRequest(refused)
    if done := already_done(order):
        return progress.stop(done.outcome, done.reason)
    if not store.claim(order.id, owner, lease_ttl):
        return progress.stop(Outcome.BUSY, "another run holds this order's lease")
    return progress.noted(f"lease taken on the {order.status} order")


def taken_over(inherited: Progress, claimed: Progress) -> Progress:
    """A re-execution's first step goes on from its parent's progress (what the parent found: the Kinguin
    order, the remarks) under the lease it just claimed for itself; or ends as its claim decided. A parent's
    end it only records (`record_outcome` re-executed alone) becomes its own under its lease."""
    if claimed.finished:
        return claimed
    return replace(inherited, lease_owner=claimed.lease_owner, lease_seconds=claimed.lease_seconds,
                   remedy=claimed.remedy, note=claimed.note if not inherited.finished else inherited.note)


def under_lease(step: Callable[..., Progress]) -> Callable[..., Progress]:
    """Run a step only while this run holds the order's lease: renew it first, and end as `busy` when it
    lapsed and another run took the order (the store also refuses that run's writes, `LeaseLost`).
    The step's `Progress` is its last positional argument."""

    @functools.wraps(step)
    def fenced_step(store: Store, *args, **kwargs) -> Progress:
        progress: Progress = args[-1]
        if progress.finished:
            return progress
        ttl = dt.timedelta(seconds=progress.lease_seconds)
        if not store.renew_lease(progress.order_id, progress.lease_owner, ttl):
            return progress.stop(Outcome.BUSY, LEASE_LOST_REASON)
        try:
            return step(store, *args, **kwargs)
        except LeaseLost:
            return progress.stop(Outcome.BUSY, LEASE_LOST_REASON)

    return fenced_step


@under_lease
def resolve_by_hand(store: Store, resolution: Resolution, progress: Progress) -> Progress:
    """An admin closes the order: no outside call. BitLoot's status changes only when the shop refunded."""
    order = _load(store, progress.order_id)
    if resolution is Resolution.refunded_to_customer:
        refunded = store.mark_refunded(order.id, owner=progress.lease_owner)
        status = (f"orders.status {order.status} -> refunded" if refunded
                  else f"orders.status left {_status_now(store, order.id)}")
    else:
        status = f"orders.status left {order.status}"
    return progress.stop(Outcome.RESOLVED, f"resolved by hand: {resolution} ({status})")


def decide_payment(order: Order, nowpayments: PaymentReader) -> Stop | PaymentConfirmed | None:
    """`paid` (or later) needs no check (None); waiting/confirming/failed pass only on a confirmed payment."""
    if order.status not in UNPAID:
        return None
    if not order.payments:
        return Stop(Outcome.PAYMENT_NOT_CONFIRMED, "no payment recorded for this order")
    verdict, seen = payment_verdict(order, nowpayments)
    if verdict is not PaymentVerdict.PAID:
        return Stop(Outcome.PAYMENT_NOT_CONFIRMED, f"payment not confirmed ({seen})")
    return PaymentConfirmed(seen)


@under_lease
def verify_payment(store: Store, nowpayments: NowPaymentsClient, progress: Progress) -> Progress:
    """`paid` passes; waiting/confirming/failed pass only on a confirmed payment, then move to `paid`."""
    order = _load(store, progress.order_id)
    decision = decide_payment(order, nowpayments)
    if decision is None:
        return progress.noted(f"no check needed: the order is {order.status}")
    if isinstance(decision, Stop):
        return progress.stop(decision.outcome, decision.reason)
    moved_by_someone_else = not store.mark_paid(order.id, owner=progress.lease_owner)
    if moved_by_someone_else and (current := _status_now(store, order.id)) != OrderStatus.PAID:
        return progress.stop(Outcome.NEEDS_ATTENTION, f"order moved to {current!r} during recovery")
    return progress.noted(f"payment confirmed ({decision.evidence}); order moved from {order.status} to paid")


def payment_verdict(order: Order, nowpayments: PaymentReader) -> tuple[PaymentVerdict, str]:
    if any(p.status in PAID_PAYMENT_ROWS for p in order.payments):
        return PaymentVerdict.PAID, "payment row confirmed"
    seen = []
    for payment in order.payments:
        try:
            status = nowpayments.get_payment(payment.external_id).payment_status
        except NotFoundError:
            seen.append(f"NOWPayments does not know payment {payment.external_id}")
            continue
        if classify_payment_status(status) is PaymentVerdict.PAID:
            return PaymentVerdict.PAID, f"NOWPayments says {status}"
        seen.append(f"NOWPayments says {status}")
    return PaymentVerdict.PENDING, "; ".join(seen)


def undeliverable_items(order: Order) -> str | None:
    """BitLoot writes one `order_items` row per unit, quantity 1, and delivers one key per row; any other
    quantity is bad data that would buy keys no row can hold. Refused before anything is bought."""
    odd = [item for item in order.items if item.quantity != 1]
    if not odd:
        return None
    shown = ", ".join(f"{item.id[:8]} has quantity {item.quantity}" for item in odd[:3])
    return f"order items must be one unit each (quantity 1); {shown}: fix the order in BitLoot first"


def kinguin_lines(order: Order, ceiling: Decimal | None = None) -> list[OrderLine] | str:
    """The v2 order lines for the order's items, or the reason they cannot be bought automatically. Each
    line's price is the product's cost, or an admin's higher ceiling for this run."""
    units: Counter[tuple[str, str | None, float]] = Counter()
    for item in order.items:
        if item.product_source_type != "kinguin" or not item.kinguin_product_id:
            return "custom-inventory items are not handled here"
        if not item.product_cost or item.product_cost <= 0:
            return f"product {item.product_id} has no cost to send to Kinguin"
        price = float(unit_price(item.product_cost, ceiling))
        units[(item.kinguin_product_id, item.kinguin_offer_id, price)] += item.quantity
    if len(units) > MAX_LINES or any(qty > MAX_QTY for qty in units.values()):
        return f"order exceeds Kinguin's limits ({MAX_LINES} lines, {MAX_QTY} units per product)"
    return [
        OrderLine(product_id=product, qty=qty, price=price, offer_id=offer)
        for (product, offer, price), qty in sorted(units.items(), key=lambda kv: kv[0][0])
    ]


def decide_supplier_order(
    order: Order, state: ReconcileState, kinguin: SupplierOrders, remedy: Remedy = NO_REMEDY
) -> Stop | UseSupplierOrder | PlaceSupplierOrder | None:
    """Exactly one live Kinguin order per BitLoot order: reuse the saved one, adopt one an earlier attempt
    placed (searched only after a recorded intent), or place one; an admin's replacement of a canceled one
    likewise. None: the order is fulfilled, nothing to buy."""
    if order.status == OrderStatus.FULFILLED:
        return None
    if bad_data := undeliverable_items(order):
        return Stop(Outcome.NEEDS_ATTENTION, bad_data)
    ceiling = remedy.max_unit_price_eur
    if saved := order.kinguin_reservation_id:
        # A replacement intent with the canceled order still saved: an earlier attempt may have placed it.
        pending = state.replacements if state.replaced_kinguin_order_id == saved and state.replacements else 0
        if pending:
            external_id = replacement_external_id(order.id, pending)
            if existing := kinguin.search_orders(order_external_id=external_id):
                chosen = choose_supplier_order(existing)
                why = f"replacement found by orderExternalId {external_id} after an earlier attempt"
                return UseSupplierOrder(chosen.order_id, True, why, replaces=saved)
        if not remedy.replace_canceled_supplier_order:
            return UseSupplierOrder(saved, False, "saved kinguinReservationId")
        current = read_supplier_order(kinguin, saved)
        if current is None or current.status not in DEAD_SUPPLIER_STATUSES:
            standing = current.status if current else "unknown to Kinguin"
            return UseSupplierOrder(saved, False, f"saved kinguinReservationId, {standing}: nothing to replace")
        lines = kinguin_lines(order, ceiling)
        if isinstance(lines, str):
            return Stop(Outcome.NEEDS_ATTENTION, lines)
        return PlaceSupplierOrder(lines, order.id, replaces=saved, replacement=pending or state.replacements + 1)
    lines = kinguin_lines(order, ceiling)
    if isinstance(lines, str):
        return Stop(Outcome.NEEDS_ATTENTION, lines)
    # After a recorded intent, an earlier attempt may have placed the order and died before saving its id.
    if state.placement_intent_at is not None and (existing := kinguin.search_orders(order_external_id=order.id)):
        chosen = choose_supplier_order(existing)
        return UseSupplierOrder(chosen.order_id, True, "found by orderExternalId after an earlier attempt")
    return PlaceSupplierOrder(lines, order.id)


# Kinguin's terminal statuses that deliver nothing more: only an admin's replacement buys again.
DEAD_SUPPLIER_STATUSES = ("canceled", "refunded")


def offers_now(lines: list[OrderLine], kinguin: ProductReader) -> tuple[str, Stop | None]:
    """Kinguin's offers for each line now (product read calls), in words, and the refusal its placement
    would get: `ProductUnavailable` for a line no offer matches (stock, a price at most the line's, the offer
    named)."""
    said, refused = [], None
    for line in lines:
        product = kinguin.get_product(line.product_id)
        offers = [o for o in (product.offers if product else []) if line.offer_id in (None, o.offer_id)]
        fitting = [o for o in offers if o.price <= line.price + 1e-9 and o.qty >= line.qty]
        if offers:
            cheapest = min(offers, key=lambda o: o.price)
            said.append(f"{line.product_id}: from {cheapest.price:.2f} EUR ({sum(o.qty for o in offers)} on offer), "
                        f"paying at most {line.price:.2f} for {line.qty}")
        else:
            said.append(f"{line.product_id}: no offer (out of stock)")
        if not fitting:
            refused = Stop(Outcome.NEEDS_ATTENTION, KINGUIN_REFUSALS["ProductUnavailable"])
    return "; ".join(said), refused


@under_lease
def ensure_supplier_order(store: Store, kinguin: KinguinClient, progress: Progress) -> Progress:
    """Apply `decide_supplier_order`: save an adopted order's id, or record the intent and place the order.
    With an admin's price ceiling, Kinguin's offers are read first and the run says what it will pay."""
    order = _load(store, progress.order_id)
    remedy = progress.remedy or NO_REMEDY
    decision = decide_supplier_order(order, store.get_state(order.id), kinguin, remedy)
    if decision is None:
        return progress.noted("nothing to buy: the order is already fulfilled")
    if isinstance(decision, Stop):
        return progress.stop(decision.outcome, decision.reason)
    if isinstance(decision, UseSupplierOrder):
        if decision.replaces:
            return _take_replacement(store, progress, decision.replaces, decision.kinguin_order_id, decision.why)
        if decision.found_by_search:
            store.save_reservation_id(order.id, decision.kinguin_order_id, owner=progress.lease_owner)
            return progress.with_supplier_order(
                decision.kinguin_order_id, f"adopted Kinguin order {decision.kinguin_order_id}: {decision.why}"
            )
        return progress.with_supplier_order(
            decision.kinguin_order_id, f"Kinguin order {decision.kinguin_order_id} already placed ({decision.why})"
        )
    lines, offers = decision.lines, ""
    if remedy.max_unit_price_eur is not None:
        offers, refused = offers_now(lines, kinguin)
        if refused:
            return progress.stop(refused.outcome, f"{refused.reason}: no offer within max_unit_price_eur "
                                                  f"{remedy.max_unit_price_eur} ({offers})")
    if decision.replaces:
        store.record_replacement_intent(order.id, decision.replaces, decision.replacement, owner=progress.lease_owner)
    else:
        store.record_placement_intent(order.id, owner=progress.lease_owner)
    try:
        placed = kinguin.place_order(decision.external_id, lines)
    except DuplicateExternalIdError:
        existing = kinguin.search_orders(order_external_id=decision.external_id)
        if not existing:
            raise TransientError("kinguin", "orderExternalId reported as used but no order found yet") from None
        if decision.replaces:
            chosen = choose_supplier_order(existing)
            why = f"Kinguin reported orderExternalId {decision.external_id} as used: an earlier attempt placed it"
            return _take_replacement(store, progress, decision.replaces, chosen.order_id, why)
        return _adopt(store, progress, existing)
    except PermanentError as exc:
        return progress.stop(Outcome.NEEDS_ATTENTION, KINGUIN_REFUSALS.get(exc.kind or "", f"Kinguin refused: {exc}"))
    units = sum(line.qty for line in lines)
    paid = price_against_cost(order, [(p.product_id or "", p.price) for p in placed.products])
    said = f"placed Kinguin order {placed.order_id} for {units} key(s)" + (f"; offers now: {offers}" if offers else "")
    if decision.replaces:
        return _take_replacement(store, progress, decision.replaces, placed.order_id, said).remarked(paid)
    store.save_reservation_id(order.id, placed.order_id, owner=progress.lease_owner)
    return progress.with_supplier_order(placed.order_id, said).remarked(paid)


def _take_replacement(store: Store, progress: Progress, replaced: str, replacement: str, why: str) -> Progress:
    """The replacement becomes the order's saved Kinguin order; both ids stay on record in the outcome."""
    store.replace_reservation_id(progress.order_id, replaced, replacement, owner=progress.lease_owner)
    remark = f"canceled Kinguin order {replaced} replaced by {replacement}"
    return progress.with_supplier_order(replacement, f"{remark}: {why}").remarked(remark)


def choose_supplier_order(found: list[KinguinOrder]) -> KinguinOrder:
    """The order to adopt: a live one before a canceled one, then the oldest; the report flags duplicates."""
    rank = {"completed": 0, "processing": 1}
    return min(found, key=lambda o: (rank.get(o.status, 2), str(o.created_at or "")))


def _adopt(store: Store, progress: Progress, found: list[KinguinOrder]) -> Progress:
    chosen = choose_supplier_order(found)
    store.save_reservation_id(progress.order_id, chosen.order_id, owner=progress.lease_owner)
    why = "Kinguin reported the orderExternalId as used: an earlier attempt placed it"
    return progress.with_supplier_order(chosen.order_id, f"adopted Kinguin order {chosen.order_id}: {why}")


@under_lease
def poll_supplier(store: Store, kinguin: KinguinClient, progress: Progress) -> Progress:
    """completed -> go on; processing -> waiting for supplier (after storing any keys delivered so far);
    canceled/refunded, or an order id Kinguin does not know -> needs a human, never re-placed automatically."""
    if progress.kinguin_order_id is None:
        return progress.noted("nothing to poll: no Kinguin order needed")
    order = _load(store, progress.order_id)
    if order.status == OrderStatus.FULFILLED:
        return progress.noted("nothing to poll: the order is already fulfilled")
    supplier_order = read_supplier_order(kinguin, progress.kinguin_order_id)
    decision = decide_after_poll(order, progress.kinguin_order_id, supplier_order)
    if decision:
        return progress.stop(decision.outcome, decision.reason)
    assert supplier_order is not None  # decide_after_poll stops on an unknown order
    paid = price_against_cost(order, [(p.product_id or "", p.price) for p in supplier_order.products])
    return progress.remarked(paid).noted(
        f"Kinguin order {progress.kinguin_order_id} is {supplier_order.status}, "
        f"{supplier_order.delivered_count} key(s) delivered"
    )


def read_supplier_order(kinguin: OrderReader, kinguin_order_id: str) -> KinguinOrder | None:
    """The Kinguin order, or None when Kinguin does not know it."""
    try:
        return kinguin.get_order(kinguin_order_id)
    except NotFoundError:
        return None


def decide_after_poll(order: Order, kinguin_order_id: str, supplier_order: KinguinOrder | None) -> Stop | None:
    """None to go on and store keys, or how the run ends."""
    if supplier_order is None:
        why = f"Kinguin does not know order {kinguin_order_id} (the order's kinguinReservationId)"
        return Stop(Outcome.NEEDS_ATTENTION, why)
    status = supplier_order.status
    if status == "completed":
        return None
    if status in ("canceled", "refunded"):
        return Stop(Outcome.NEEDS_ATTENTION, f"supplier {status} Kinguin order {kinguin_order_id}")
    if supplier_order.delivered_count > sum(1 for item in order.items if item.delivered):
        return None  # partly delivered: store what has arrived; the keys step then ends the run as waiting
    return Stop(Outcome.WAITING_FOR_SUPPLIER, f"Kinguin order {kinguin_order_id} is {status}")


@under_lease
def store_keys(
    store: Store, kinguin: KinguinClient, vault: KeyVault, progress: Progress, *, presign_seconds: int
) -> Progress:
    """Page all keys, match them to items by Kinguin productId, store one object and one `keys` row per item."""
    if progress.kinguin_order_id is None:
        return progress.noted("no keys to store: no Kinguin order needed")
    order = _load(store, progress.order_id)
    pending = [item for item in order.items if not item.delivered]
    if order.status == OrderStatus.FULFILLED or not pending:
        return progress.noted(f"no keys to store: all {len(order.items)} already stored")
    keys = kinguin.get_keys(progress.kinguin_order_id, expected=len(order.items))
    match = match_keys(order, keys, store.key_assignments(order.id))
    for item, key, newly_assigned in match.pairs:
        if newly_assigned:  # recorded before the upload, so a re-run stores this same key for this item
            store.assign_key(order.id, item.id, key.id, owner=progress.lease_owner)
        path = key_object_path(order.id, item.id, key.type)
        try:
            vault.put_key(path, key.content(), key.type, metadata={"order-id": order.id, "order-item-id": item.id})
        except KeyConflictError:
            return progress.stop(Outcome.NEEDS_ATTENTION, f"a different key is already stored at {path}")
        url = vault.presign_get(
            path,
            expires_in=presign_seconds,
            filename=attachment_filename(order.id, item.id, key.type),
            content_type=key.type,
        )
        store.record_stored_key(order.id, item.id, path, key.type, url, owner=progress.lease_owner)
    if match.missing:
        waiting = keys_still_missing(order, match.missing)
        stopped = progress.stop(waiting.outcome, waiting.reason)
        return stopped.noted(f"{waiting.reason}; {len(match.pairs)} stored by this run")
    before = len(order.items) - len(pending)
    return progress.noted(
        f"stored {len(match.pairs)} of {len(order.items)} key(s)" + (f" ({before} stored before)" if before else "")
    )


def match_keys(order: Order, keys: list[KinguinKey], assigned: dict[str, str]) -> KeyMatch:
    """The key of each undelivered item: the one an earlier attempt assigned to it, else a free key of the
    item's Kinguin product (lowest key id first, so every attempt picks alike)."""
    by_id = {key.id: key for key in keys}
    taken = set(assigned.values())
    free: dict[str, list[KinguinKey]] = defaultdict(list)
    for key in sorted(keys, key=lambda k: k.id):
        if key.id not in taken:
            free[key.product_id].append(key)
    pairs, missing = [], 0
    for item in order.items:
        if item.delivered:
            continue
        key = by_id.get(assigned.get(item.id, ""))
        if key is not None:
            pairs.append((item, key, False))
        elif free[item.kinguin_product_id]:
            pairs.append((item, free[item.kinguin_product_id].pop(0), True))
        else:
            missing += 1
    return KeyMatch(pairs, missing)


def keys_still_missing(order: Order, missing: int) -> Stop:
    delivered = len(order.items) - missing
    return Stop(Outcome.WAITING_FOR_SUPPLIER, f"{delivered} of {len(order.items)} keys delivered by Kinguin so far")


def undelivered_items(order: Order) -> Stop | None:
    """`fulfilled` only when every item has its key stored and recorded."""
    undelivered = [item.id for item in order.items if not item.delivered]
    if undelivered:
        return Stop(Outcome.WAITING_FOR_SUPPLIER, f"{len(undelivered)} item(s) still without a key")
    return None


@under_lease
def mark_fulfilled(store: Store, progress: Progress) -> Progress:
    """Only when every item has its key stored and recorded; never over refunded/cancelled."""
    order = _load(store, progress.order_id)
    if order.status == OrderStatus.FULFILLED:
        return progress.noted("already fulfilled")
    if waiting := undelivered_items(order):
        return progress.stop(waiting.outcome, waiting.reason)
    moved_by_someone_else = not store.mark_fulfilled(order.id, owner=progress.lease_owner)
    if moved_by_someone_else and (current := _status_now(store, order.id)) != OrderStatus.FULFILLED:
        return progress.stop(Outcome.NEEDS_ATTENTION, f"keys stored but order is {current!r}; left as it is")
    return progress.noted(f"order moved from {order.status} to fulfilled")


@under_lease
def send_completion_email(
    store: Store, mailer: ResendClient, progress: Progress, *, sender: str, frontend_url: str
) -> Progress:
    """At most one completion email: only while the flag is false, with a per-order idempotency key.
    Resend refusing the message itself (422, e.g. an invalid address) needs a person, once: retrying the
    same message cannot help."""
    order = _load(store, progress.order_id)
    if order.status != OrderStatus.FULFILLED:
        return progress.noted(f"no completion email: the order is {order.status}")
    if order.completion_email_sent:
        return progress.noted("completion email already sent")
    try:
        mailer.send_email(
            sender=sender,
            to=[order.email],
            subject=completion_subject(order),
            html=completion_html(order, frontend_url),
            idempotency_key=completion_idempotency_key(order.id),
        )
    except PermanentError as exc:
        if exc.status != RESEND_UNDELIVERABLE:
            raise  # a refused API key or request is the shop's to fix, not this order's
        return progress.stop(
            Outcome.NEEDS_ATTENTION, f"keys delivered; completion email undeliverable, Resend refused it ({exc})"
        )
    store.mark_email_sent(order.id, owner=progress.lease_owner)
    return progress.noted("completion email sent")


def email_deferred(progress: Progress, error: Exception) -> Progress:
    """Resend stayed down through the step's retries: the order is fulfilled, the sweep sends the email later."""
    return progress.stop(Outcome.FULFILLED, f"keys delivered; completion email not sent yet ({error})")


FULFILLED_REASON = "keys stored and email sent"


def final_outcome(progress: Progress) -> Progress:
    """The run's one outcome; its reason also says what the remarks carried (a replacement, the price paid)."""
    ended = progress if progress.finished else progress.stop(Outcome.FULFILLED, FULFILLED_REASON)
    if not ended.remarks or ended.outcome is Outcome.BUSY:
        return ended
    assert ended.outcome is not None
    return ended.stop(ended.outcome, "; ".join(r for r in (ended.reason, *ended.remarks) if r))
