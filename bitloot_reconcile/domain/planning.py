"""What the next `fulfill_order` run would do for one order, worked out without doing any of it (dry run).

It runs the decisions of `domain.fulfilment` and `domain.switches` (the same functions the run applies) with
read calls only: the readers below expose nothing but Kinguin's get_order / search_orders / get_keys /
get_product, NOWPayments' get_payment and R2's exists, and the store rows are loaded by the caller. Where the
run would place a Kinguin order, Kinguin's product read says whether an offer matches first. No Dagster here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from bitloot_reconcile.adapters.errors import ExternalServiceError
from bitloot_reconcile.adapters.kinguin import KinguinKey, KinguinOrder, KinguinProduct
from bitloot_reconcile.domain import eligibility, fulfilment
from bitloot_reconcile.domain.delivery import key_object_path
from bitloot_reconcile.domain.fulfilment import PaymentReader, PlaceSupplierOrder, Stop, UseSupplierOrder
from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.domain.switches import Switches, claim_hold, email_suppressed, email_waits
from bitloot_reconcile.store.repository import EmailBounce, Order, ReconcileState
from bitloot_reconcile.store.statuses import OrderStatus

LEFT_ALONE = "left_alone"  # no run would start (or it would refuse the order at once)
UNKNOWN = "unknown"        # an outside system did not answer the plan's own read


class KinguinReader(Protocol):
    def get_order(self, order_id: str) -> KinguinOrder: ...
    def search_orders(self, *, order_external_id: str | None = None) -> list[KinguinOrder]: ...
    def get_keys(self, order_id: str, *, expected: int | None = None) -> list[KinguinKey]: ...
    def get_product(self, product_id: str) -> KinguinProduct | None: ...


class VaultReader(Protocol):
    def exists(self, path: str) -> bool: ...


@dataclass(frozen=True)
class Plan:
    order_id: str
    status: str
    steps: tuple[str, ...]  # what the run would do, in order
    outcome: str            # how it would end: an Outcome value, LEFT_ALONE or UNKNOWN
    why: str


def placement_refusal(decision: PlaceSupplierOrder, kinguin: KinguinReader) -> Stop | None:
    """What Kinguin would answer the placement, from its offers now (the check a run with a price ceiling
    makes before it places)."""
    return fulfilment.offers_now(decision.lines, kinguin)[1]


def plan_order(order: Order, state: ReconcileState, assignments: dict[str, str], *, kinguin: KinguinReader,
               payments: PaymentReader, vault: VaultReader, switches: Switches, bounce: EmailBounce | None,
               now: dt.datetime, admin: bool = False) -> Plan:
    """The next run's steps and ending. `admin`: as `retry` would run it (the sweep's own holds do not apply)."""
    steps: list[str] = []

    def end(outcome: str, why: str) -> Plan:
        return Plan(order.id, order.status, tuple(steps), outcome, why)

    if refused := fulfilment.refusal(order, admin=admin):
        return end(LEFT_ALONE, refused)
    if held := claim_hold(switches, order, admin=admin):
        return end(Outcome.PAUSED, held)
    if done := fulfilment.already_done(order):
        return end(done.outcome, done.reason)
    hold = eligibility.state_hold(state, now)
    if hold is eligibility.Hold.LEASED:
        until = f" until {state.lease_expires_at:%H:%M}" if state.lease_expires_at else " (no expiry)"
        return end(Outcome.BUSY, f"run {state.lease_owner} holds the lease{until}")
    if not admin and hold is eligibility.Hold.LEFT_TO_A_PERSON:
        left = "needs attention" if state.last_outcome == Outcome.NEEDS_ATTENTION else "resolved by hand"
        return end(LEFT_ALONE, f"{left}: {state.last_reason}; only an admin retry runs it")
    if not admin and hold is eligibility.Hold.BACKING_OFF:
        return end(LEFT_ALONE, f"backing off until {state.next_attempt_at:%Y-%m-%d %H:%M} UTC")
    try:
        stop = _walk(order, state, assignments, steps, kinguin=kinguin, payments=payments, vault=vault,
                     switches=switches, bounce=bounce)
    except ExternalServiceError as exc:
        return end(UNKNOWN, f"could not check: {exc}")
    return end(stop.outcome, stop.reason)


def _walk(order: Order, state: ReconcileState, assignments: dict[str, str], steps: list[str], *,
          kinguin: KinguinReader, payments: PaymentReader, vault: VaultReader, switches: Switches,
          bounce: EmailBounce | None) -> Stop:
    payment = fulfilment.decide_payment(order, payments)
    if isinstance(payment, Stop):
        return payment
    if payment is not None:
        steps.append(f"verify payment ({payment.evidence}) and mark paid")
    if order.status != OrderStatus.FULFILLED:
        if held := switches.kinguin_hold:
            return Stop(Outcome.PAUSED, held)
        supplier = fulfilment.decide_supplier_order(order, state, kinguin)
        if isinstance(supplier, Stop):
            return supplier
        if isinstance(supplier, PlaceSupplierOrder):
            wanted = ", ".join(f"{line.qty} x {line.product_id} at <= {line.price:.2f}" for line in supplier.lines)
            steps.append(f"place Kinguin order ({wanted})")
            if refused := placement_refusal(supplier, kinguin):
                return refused
            steps += ["poll it (waiting for supplier if Kinguin has not delivered yet)", "collect and store keys",
                      "mark fulfilled"]
        else:
            waiting = _walk_supplier_order(order, supplier, assignments, steps, kinguin=kinguin, vault=vault)
            if waiting:
                return waiting
    if not order.completion_email_sent:
        if held := switches.email_hold:
            return Stop(Outcome.PAUSED, email_waits(held))
        if bounce is not None:
            return Stop(Outcome.FULFILLED, email_suppressed(bounce))
        steps.append("send completion email")
    return Stop(Outcome.FULFILLED, fulfilment.FULFILLED_REASON)


def _walk_supplier_order(order: Order, supplier: UseSupplierOrder, assignments: dict[str, str], steps: list[str],
                         *, kinguin: KinguinReader, vault: VaultReader) -> Stop | None:
    kinguin_id = supplier.kinguin_order_id
    if supplier.found_by_search:
        steps.append(f"adopt Kinguin order {kinguin_id} ({supplier.why})")
    supplier_order = fulfilment.read_supplier_order(kinguin, kinguin_id)
    steps.append(f"poll Kinguin order {kinguin_id} ({supplier_order.status if supplier_order else 'unknown'})")
    stop = fulfilment.decide_after_poll(order, kinguin_id, supplier_order)
    if stop:
        return stop
    if any(not item.delivered for item in order.items):
        keys = kinguin.get_keys(kinguin_id, expected=len(order.items))
        match = fulfilment.match_keys(order, keys, assignments)
        steps.append(f"collect {len(keys)} delivered key(s)")
        if match.pairs:
            stored = sum(vault.exists(key_object_path(order.id, item.id, key.type)) for item, key, _ in match.pairs)
            earlier = f", {stored} already in R2 from an earlier attempt" if stored else ""
            steps.append(f"store {len(match.pairs)} key(s) in R2{earlier}")
        if match.missing:
            return fulfilment.keys_still_missing(order, match.missing)
    steps.append("mark fulfilled")
    return None
