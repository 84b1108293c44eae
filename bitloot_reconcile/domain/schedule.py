"""When the sweep may come back to an order, and when it stops trying (pure functions of time and state)."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from bitloot_reconcile.domain.outcomes import Outcome

# How a quarantine's reason starts: the sweep gave up on the order (attempts ran out, or the supplier deadline
# passed), as opposed to a definite problem a run found. The board tells the two apart by these.
ATTEMPTS_EXHAUSTED = "attempts exhausted"
SUPPLIER_DEADLINE_PASSED = "supplier did not deliver within"
GAVE_UP = (ATTEMPTS_EXHAUSTED, SUPPLIER_DEADLINE_PASSED)


@dataclass(frozen=True)
class RetrySchedule:
    backoff_base_seconds: float = 60.0
    backoff_cap_seconds: float = 3600.0
    jitter: float = 0.2  # +/- share of the delay, so a burst of failures does not come back in lockstep
    max_attempts: int = 8
    busy_retry_seconds: float = 60.0
    # A BitLoot switch held the order: look again after this long (BitLoot itself re-queues after 5 min).
    hold_recheck_seconds: float = 300.0
    # Kinguin delivery: most keys arrive within minutes; some take hours; pre-orders wait for release.
    supplier_poll_steps: tuple[tuple[float, float], ...] = ((900, 120), (7200, 600), (86400, 3600))
    supplier_poll_last_seconds: float = 3 * 3600
    preorder_poll_seconds: float = 6 * 3600
    supplier_deadline_hours: float = 72.0

    def backoff(self, attempts: int, rng: random.Random | None = None) -> dt.timedelta:
        """Exponential in the attempt number, capped, with jitter."""
        delay = min(self.backoff_cap_seconds, self.backoff_base_seconds * 2 ** max(attempts - 1, 0))
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return dt.timedelta(seconds=delay * (1 + spread))

    def supplier_poll(self, waited: dt.timedelta, *, preorder: bool) -> dt.timedelta:
        if preorder:
            return dt.timedelta(seconds=self.preorder_poll_seconds)
        for until, every in self.supplier_poll_steps:
            if waited.total_seconds() < until:
                return dt.timedelta(seconds=every)
        return dt.timedelta(seconds=self.supplier_poll_last_seconds)


@dataclass(frozen=True)
class NextStep:
    outcome: Outcome
    reason: str | None
    next_attempt_at: dt.datetime | None
    waiting_since: dt.datetime | None


def plan_next_step(
    schedule: RetrySchedule,
    *,
    outcome: Outcome,
    reason: str | None,
    attempts: int,
    waiting_since: dt.datetime | None,
    preorder: bool,
    now: dt.datetime,
    rng: random.Random | None = None,
) -> NextStep:
    """Turn a run's outcome into the order's next sweep time, quarantining it when attempts run out."""
    if outcome is Outcome.WAITING_FOR_SUPPLIER:
        since = waiting_since or now
        deadline = dt.timedelta(hours=schedule.supplier_deadline_hours)
        if not preorder and now - since >= deadline:
            return NextStep(
                Outcome.NEEDS_ATTENTION,
                f"{SUPPLIER_DEADLINE_PASSED} {schedule.supplier_deadline_hours:g} h ({reason})",
                None,
                None,
            )
        return NextStep(outcome, reason, now + schedule.supplier_poll(now - since, preorder=preorder), since)
    if outcome in (Outcome.RETRY_LATER, Outcome.PAYMENT_NOT_CONFIRMED):
        if attempts >= schedule.max_attempts:
            return NextStep(
                Outcome.NEEDS_ATTENTION, f"{ATTEMPTS_EXHAUSTED} after {attempts} attempts (last: {reason})", None, None
            )
        return NextStep(outcome, reason, now + schedule.backoff(attempts, rng), None)
    if outcome is Outcome.BUSY:
        return NextStep(outcome, reason, now + dt.timedelta(seconds=schedule.busy_retry_seconds), waiting_since)
    if outcome is Outcome.PAUSED:  # never quarantined: a switch is an operator's choice, not a failure
        return NextStep(outcome, reason, now + dt.timedelta(seconds=schedule.hold_recheck_seconds), waiting_since)
    return NextStep(outcome, reason, None, None)
