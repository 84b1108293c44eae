"""The end of every run: the order's reconcile state, one audit row, and the lease handed back."""

from __future__ import annotations

import datetime as dt
import random

from bitloot_reconcile.domain.outcomes import LEASE_LOST_REASON, Outcome, Progress
from bitloot_reconcile.domain.redaction import describe_error
from bitloot_reconcile.domain.schedule import NextStep, RetrySchedule, plan_next_step
from bitloot_reconcile.store.repository import Store, utcnow
from bitloot_reconcile.tags import OUTCOME_REFUSED

MAX_FAILURE_REASON_CHARS = 500


def record_outcome(
    store: Store,
    progress: Progress,
    *,
    run_id: str,
    trigger: str,
    actor: str | None,
    reason: str | None,
    schedule: RetrySchedule,
    now: dt.datetime | None = None,
    rng: random.Random | None = None,
) -> Progress:
    """Persist the outcome (quarantining when attempts run out) and release the lease, if this run still holds it."""
    assert progress.outcome is not None, "record_outcome needs a finished progress"
    now = now or utcnow()
    state = store.get_state(progress.order_id)
    order = store.load_order(progress.order_id)
    preorder = bool(order and any(item.is_preorder for item in order.items))
    step = plan_next_step(
        schedule,
        outcome=progress.outcome,
        reason=progress.reason,
        attempts=state.attempts,
        waiting_since=state.waiting_since,
        preorder=preorder,
        now=now,
        rng=rng,
    )
    result = dict(
        last_outcome=step.outcome.value,
        last_reason=step.reason,
        last_run_id=run_id,
        next_attempt_at=step.next_attempt_at,
        waiting_since=step.waiting_since,
    )
    # A switch can hold a run before it claims the order: such a run changes nothing but its audit row.
    held_before_claim = progress.outcome is Outcome.PAUSED and state.lease_owner != progress.lease_owner
    if progress.outcome is Outcome.PAUSED and not held_before_claim:
        store.give_back_attempt(progress.order_id, progress.lease_owner)
    if progress.outcome is Outcome.ALREADY_FULFILLED:
        store.update_state(progress.order_id, **result)  # decided before any lease was taken; nothing written
    elif progress.outcome is not Outcome.BUSY and not held_before_claim and not store.finish_run(
        progress.order_id, progress.lease_owner, **result
    ):
        # The lease lapsed and another run owns the order now: its outcome is the one that counts.
        step = NextStep(Outcome.BUSY, LEASE_LOST_REASON, None, None)
    store.append_audit(
        order_id=progress.order_id,
        action="fulfill_order",
        trigger=trigger,
        actor=actor,
        reason=reason,
        run_id=run_id,
        outcome=step.outcome.value,
        detail=step.reason,
    )
    return progress.stop(step.outcome, step.reason)


def record_failure(
    store: Store,
    order_id: str,
    *,
    step: str,
    error: BaseException | None,
    run_id: str,
    trigger: str,
    actor: str | None,
    reason: str | None,
    schedule: RetrySchedule,
) -> Progress | None:
    """A step failed for good: record `retry_later` (or the quarantine it leads to) with the error in words and
    hand the lease back, when this run holds the order's lease. None when it never claimed the order."""
    if store.get_state(order_id).lease_owner != run_id:
        return None
    failure = f"{step} failed" + (f": {describe_error(error)}" if error else "")
    stopped = Progress(order_id=order_id, lease_owner=run_id).stop(
        Outcome.RETRY_LATER, failure[:MAX_FAILURE_REASON_CHARS])
    return record_outcome(store, stopped, run_id=run_id, trigger=trigger, actor=actor, reason=reason,
                          schedule=schedule)


def record_refusal(store: Store, order_id: str, *, run_id: str, trigger: str, actor: str | None,
                   reason: str | None, why: str) -> None:
    """An input error found with the store: nothing changed but this audit row."""
    store.append_audit(order_id=order_id, action="refused", trigger=trigger, actor=actor, reason=reason,
                       run_id=run_id, outcome=OUTCOME_REFUSED, detail=why)
