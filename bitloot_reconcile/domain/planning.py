"""What the next `fulfill_order` run would do for one order, worked out without doing any of it (dry run).

The holds before the claim are derived here; after the claim it walks the steps of `domain.steps`, the same
table the run drives, with read calls only: the readers expose nothing but Kinguin's get_order /
search_orders / get_keys / get_product, NOWPayments' get_payment and R2's exists, and the store rows are
loaded by the caller. Where the run would place a Kinguin order, Kinguin's product read says whether an offer
matches first. No Dagster here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from bitloot_reconcile.adapters.errors import ExternalServiceError
from bitloot_reconcile.domain import eligibility, fulfilment
from bitloot_reconcile.domain.fulfilment import PaymentReader
from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.domain.steps import DryRun, KinguinReader, VaultReader, dry_run
from bitloot_reconcile.domain.switches import Switches, claim_hold
from bitloot_reconcile.store.repository import EmailBounce, Order, ReconcileState

LEFT_ALONE = "left_alone"  # no run would start (or it would refuse the order at once)
UNKNOWN = "unknown"        # an outside system did not answer the plan's own read


@dataclass(frozen=True)
class Plan:
    order_id: str
    status: str
    steps: tuple[str, ...]  # what the run would do, in order
    outcome: str            # how it would end: an Outcome value, LEFT_ALONE or UNKNOWN
    why: str


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
    dry = DryRun(order, state, assignments, kinguin=kinguin, payments=payments, vault=vault, switches=switches,
                 bounce=bounce, said=steps)
    try:
        stop = dry_run(dry)
    except ExternalServiceError as exc:
        return end(UNKNOWN, f"could not check: {exc}")
    return end(stop.outcome, stop.reason)
