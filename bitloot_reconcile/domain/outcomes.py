"""What a run concluded for one order, and the small record passed between the job's steps."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bitloot_reconcile.domain.remedies import Remedy


class Outcome(StrEnum):
    FULFILLED = "fulfilled"
    ALREADY_FULFILLED = "already_fulfilled"
    WAITING_FOR_SUPPLIER = "waiting_for_supplier"
    PAYMENT_NOT_CONFIRMED = "payment_not_confirmed"
    NEEDS_ATTENTION = "needs_attention"
    BUSY = "busy"
    # A run that failed on an outside system's outage after its retries; the sweep comes back with backoff.
    RETRY_LATER = "retry_later"
    # One of BitLoot's own switches (feature flags) held the order back; no attempt is used up, the sweep
    # looks again after a short while.
    PAUSED = "paused"
    # An admin closed the order by hand (a `resolution` remedy): never swept or alerted again.
    RESOLVED = "resolved"


LEASE_LOST_REASON = "this run's lease on the order lapsed and another run took it over; nothing more written"


@dataclass(frozen=True)
class Progress:
    """Passed from step to step: ids and verdicts only, never key serials or URLs (outputs are pickled)."""

    order_id: str
    lease_owner: str
    # The lease's length: every step renews it for this long before it starts.
    lease_seconds: float = 900.0
    kinguin_order_id: str | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    # What the last step did, in words for the run's log and metadata (no secrets).
    note: str | None = None
    # What the outcome's reason must also say, whichever step ends the run: a replaced Kinguin order, the
    # price paid against cost when a line cost more (an admin's remedies).
    remarks: tuple[str, ...] = ()
    # The admin's remedy for this run (`domain.remedies`), None for a plain run.
    remedy: Remedy | None = None
    # Why the request was refused (an input error found with the store: nothing was changed); the run ends
    # here, failed with this sentence, and records no outcome.
    refusal: str | None = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None or self.refusal is not None

    def refuse(self, why: str) -> Progress:
        return replace(self, refusal=why, note=why)

    def stop(self, outcome: Outcome, reason: str | None = None) -> Progress:
        return replace(self, outcome=outcome, reason=reason, note=reason)

    def noted(self, note: str) -> Progress:
        return replace(self, note=note)

    def with_supplier_order(self, kinguin_order_id: str, note: str) -> Progress:
        return replace(self, kinguin_order_id=kinguin_order_id, note=note)

    def remarked(self, remark: str | None) -> Progress:
        if not remark or remark in self.remarks:
            return self
        return replace(self, remarks=(*self.remarks, remark))
