"""What the next `fulfill_order` run would do for one order, worked out without doing any of it (dry run).

It walks the steps of `domain.fulfilment` with their own rules (the payment verdict, `kinguin_lines`, the
adoption choice, RECOVERABLE_STATUSES) but only reads: the readers below expose nothing but Kinguin's
get_order / search_orders / get_keys, NOWPayments' get_payment and R2's exists, and the store rows are
loaded by the caller. No Dagster here.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from bitloot_reconcile.adapters.errors import ExternalServiceError
from bitloot_reconcile.adapters.kinguin import KinguinKey, KinguinOrder
from bitloot_reconcile.adapters.nowpayments import PaymentInfo, PaymentVerdict
from bitloot_reconcile.domain import fulfilment
from bitloot_reconcile.domain.delivery import key_object_path
from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.store.repository import Order, ReconcileState

LEFT_ALONE = "left_alone"  # no run would start (or it would refuse the order at once)
UNKNOWN = "unknown"        # an outside system did not answer the plan's own read


class KinguinReader(Protocol):
    def get_order(self, order_id: str) -> KinguinOrder: ...
    def search_orders(self, *, order_external_id: str | None = None) -> list[KinguinOrder]: ...
    def get_keys(self, order_id: str, *, expected: int | None = None) -> list[KinguinKey]: ...


class PaymentReader(Protocol):
    def get_payment(self, payment_id: str) -> PaymentInfo: ...


class VaultReader(Protocol):
    def exists(self, path: str) -> bool: ...


@dataclass(frozen=True)
class Plan:
    order_id: str
    status: str
    steps: tuple[str, ...]  # what the run would do, in order
    outcome: str            # how it would end: an Outcome value, LEFT_ALONE or UNKNOWN
    why: str


def admin_refusal(order: Order) -> str | None:
    """Why `load_and_claim` refuses this order for an admin run (it raises InvalidRequest), or None."""
    if not order.items:
        return f"Order {order.id} has no items"
    if order.status == "fulfilled" and order.completion_email_sent:
        return "Order is already fulfilled"
    if order.status not in (*fulfilment.RECOVERABLE_STATUSES, "fulfilled"):
        return f"Order {order.id} is {order.status!r}; only paid, waiting, confirming or failed orders are recovered"
    return None


def plan_order(order: Order, state: ReconcileState, assignments: dict[str, str], *, kinguin: KinguinReader,
               payments: PaymentReader, vault: VaultReader, now: dt.datetime, admin: bool = False) -> Plan:
    """The next run's steps and ending. `admin`: as `retry` would run it (the sweep's own holds do not apply)."""
    steps: list[str] = []

    def end(outcome: str, why: str) -> Plan:
        return Plan(order.id, order.status, tuple(steps), outcome, why)

    refusal = admin_refusal(order)
    if refusal:
        return end(LEFT_ALONE, refusal)
    if state.lease_owner and state.lease_expires_at and state.lease_expires_at > now:
        return end(Outcome.BUSY, f"run {state.lease_owner} holds the lease until {state.lease_expires_at:%H:%M}")
    if not admin and state.last_outcome == Outcome.NEEDS_ATTENTION:
        return end(LEFT_ALONE, f"needs attention: {state.last_reason}; only an admin retry runs it")
    if not admin and state.next_attempt_at and state.next_attempt_at > now:
        return end(LEFT_ALONE, f"backing off until {state.next_attempt_at:%Y-%m-%d %H:%M} UTC")
    try:
        return _walk(order, state, assignments, steps, end, kinguin=kinguin, payments=payments, vault=vault)
    except ExternalServiceError as exc:
        return end(UNKNOWN, f"could not check: {exc}")


def _walk(order, state, assignments, steps, end, *, kinguin, payments, vault) -> Plan:
    # verify payment
    if order.status in fulfilment.UNPAID_STATUSES:
        if not order.payments:
            return end(Outcome.PAYMENT_NOT_CONFIRMED, "no payment recorded for this order")
        verdict, seen = fulfilment.payment_verdict(order, payments)
        if verdict is not PaymentVerdict.PAID:
            return end(Outcome.PAYMENT_NOT_CONFIRMED, f"payment not confirmed ({seen})")
        steps.append(f"verify payment ({seen}) and mark paid")
    if order.status != "fulfilled":
        # ensure the supplier order
        if bad_data := fulfilment.undeliverable_items(order):
            return end(Outcome.NEEDS_ATTENTION, bad_data)
        kinguin_id = order.kinguin_reservation_id
        if kinguin_id is None:
            lines = fulfilment.kinguin_lines(order)
            if isinstance(lines, str):
                return end(Outcome.NEEDS_ATTENTION, lines)
            found = kinguin.search_orders(order_external_id=order.id) if state.placement_intent_at else []
            if not found:
                wanted = ", ".join(f"{line.qty} x {line.product_id} at <= {line.price:.2f}" for line in lines)
                steps += [f"place Kinguin order ({wanted})", "poll it", "collect and store keys", "mark fulfilled",
                          "send completion email"]
                return end(Outcome.FULFILLED, "if Kinguin delivers at once; else waiting for supplier")
            kinguin_id = fulfilment.choose_supplier_order(found).order_id
            steps.append(f"adopt Kinguin order {kinguin_id} (found by orderExternalId after an earlier attempt)")
        # poll
        supplier = kinguin.get_order(kinguin_id)
        steps.append(f"poll Kinguin order {kinguin_id} ({supplier.status})")
        if supplier.status in ("canceled", "refunded"):
            return end(Outcome.NEEDS_ATTENTION, f"supplier {supplier.status} Kinguin order {kinguin_id}")
        delivered = sum(1 for item in order.items if item.delivered)
        if supplier.status != "completed" and supplier.delivered_count <= delivered:
            return end(Outcome.WAITING_FOR_SUPPLIER, f"Kinguin order {kinguin_id} is {supplier.status}")
        # collect and store keys
        pending = [item for item in order.items if not item.delivered]
        if pending:
            keys = kinguin.get_keys(kinguin_id, expected=len(order.items))
            storable, stored = _storable(order, pending, keys, assignments, vault)
            steps.append(f"collect {len(keys)} delivered key(s)")
            if storable:
                earlier = f", {stored} already in R2 from an earlier attempt" if stored else ""
                steps.append(f"store {storable} key(s) in R2{earlier}")
            if storable < len(pending):
                have = len(order.items) - len(pending) + storable
                why = f"{have} of {len(order.items)} keys delivered by Kinguin so far"
                return end(Outcome.WAITING_FOR_SUPPLIER, why)
        steps.append("mark fulfilled")
    if not order.completion_email_sent:
        steps.append("send completion email")
    return end(Outcome.FULFILLED, "keys stored and email sent")


def _storable(order: Order, pending, keys: list[KinguinKey], assignments: dict[str, str],
              vault: VaultReader) -> tuple[int, int]:
    """How many pending items `store_keys` would fill (a key assigned earlier, else a free key of the same
    product), and how many of those objects an earlier attempt already uploaded."""
    by_id = {key.id: key for key in keys}
    free = Counter(key.product_id for key in keys if key.id not in set(assignments.values()))
    storable = stored = 0
    for item in pending:
        key = by_id.get(assignments.get(item.id, ""))
        if key is not None:
            storable += 1
            stored += vault.exists(key_object_path(order.id, item.id, key.type))
        elif free[item.kinguin_product_id] > 0:
            free[item.kinguin_product_id] -= 1
            storable += 1
    return storable, stored
