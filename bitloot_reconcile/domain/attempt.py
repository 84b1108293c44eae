"""One order's whole attempt outside Dagster's step machinery: the driver of the batch path (docs/design.md
section 15). No Dagster here.

It walks the steps of `domain.steps` (the claim, then the table), the same the `fulfill_order` job's ops
are made of, under the same per-order lease, and ends with the same `record_outcome`. What Dagster does for a
per-order run, it does itself from the table: a failing step is retried as its retry class says (a service's
Retry-After honoured, capped), a polling step runs again while it waits, a failure that outlasts the retries
ends as the step's `gives_up` says or records `retry_later` (or the quarantine it leads to), as the job's
failure hook does. It never raises: one order's failure must not stop the others of a batch.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from bitloot_reconcile.adapters.errors import PermanentError
from bitloot_reconcile.domain import fulfilment, steps
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.outcomes import Outcome, Progress
from bitloot_reconcile.domain.recording import record_failure, record_outcome
from bitloot_reconcile.domain.redaction import describe_error
from bitloot_reconcile.domain.schedule import RetrySchedule
from bitloot_reconcile.domain.steps import CLAIM_STEP, STEPS, TRANSIENT, Retry, Services, Step, Who
from bitloot_reconcile.settings import RecoveryPolicy
from bitloot_reconcile.tags import OUTCOME_REFUSED

log = logging.getLogger(__name__)

# The orders of one batch share one read of BitLoot's switches, taken again once it is this old
# (`Store.sharing_flags`): a switch an operator flips holds the batch's next steps within about a second.
SWITCHES_MAX_AGE_SECONDS = 1.0


@dataclass(frozen=True)
class AttemptResult:
    """How one order's attempt ended: an `Outcome` value, or `refused` (nothing changed). Ids and words only."""

    order_id: str
    outcome: str
    reason: str | None
    recorded: bool  # False: the attempt ended before it held the order (refused, or a failure before the claim)


class _StepFailed(Exception):
    def __init__(self, step: str, error: BaseException):
        super().__init__(step)
        self.step = step
        self.error = error


def work_order(services: Services, order_id: str, *, who: Who, policy: RecoveryPolicy, schedule: RetrySchedule,
               sleep: Callable[[float], None] = time.sleep) -> AttemptResult:
    """Claim, recover and record one order, as one `fulfill_order` run launched by `who.trigger` would, under
    the same policy (the values the `RecoveryPolicyResource` carries) and retry schedule. The steps share one
    view of the order, read again only after their own writes (`Store.for_attempt`)."""
    services = replace(services, store=services.store.for_attempt())
    repo = services.store
    try:
        progress = _retried(CLAIM_STEP, TRANSIENT, lambda: steps.claim(
            repo, order_id, who, lease_ttl=dt.timedelta(seconds=policy.lease_seconds), bound=policy.price_bound),
            policy, sleep)
        if progress.refusal:  # an input error: audited, nothing changed
            return AttemptResult(order_id, OUTCOME_REFUSED, progress.refusal, False)
        for step in STEPS:
            progress = _worked(step, services, progress, policy, sleep)
        final = record_outcome(repo, fulfilment.final_outcome(progress), run_id=who.run_id, trigger=who.trigger,
                               actor=who.actor, reason=who.reason, schedule=schedule)
        return AttemptResult(order_id, str(final.outcome), final.reason, True)
    except _StepFailed as failed:
        final = record_failure(repo, order_id, step=failed.step, error=failed.error, run_id=who.run_id,
                               trigger=who.trigger, actor=who.actor, reason=who.reason, schedule=schedule)
        if final is None:  # failed before it held the order: nothing recorded, the lease is not this attempt's
            failure = f"{failed.step} failed: {describe_error(failed.error)}"
            return AttemptResult(order_id, str(Outcome.RETRY_LATER), failure, False)
        return AttemptResult(order_id, str(final.outcome), final.reason, True)
    except Exception as exc:  # recording itself failed (the store is down): the lease lapses, the sweep returns
        log.warning("order %s: attempt not recorded: %s", order_id, describe_error(exc))
        return AttemptResult(order_id, str(Outcome.RETRY_LATER), f"not recorded: {describe_error(exc)}", False)


def _worked(step: Step, services: Services, progress: Progress, policy: RecoveryPolicy,
            sleep: Callable[[float], None]) -> Progress:
    """One row of the table, as its op would run it: retried, polled while it waits, given up as it says."""
    if progress.finished:
        return progress
    try:
        result = _retried(step.name, step.retry, lambda: steps.run(step, services, progress), policy, sleep)
        polls = 0
        while step.polls_while and result.outcome is step.polls_while and polls < policy.supplier_poll_attempts:
            polls += 1
            sleep(policy.supplier_poll_seconds)
            result = _retried(step.name, step.retry, lambda: steps.run(step, services, progress), policy, sleep)
        return result
    except _StepFailed as failed:
        if step.gives_up and (ended := step.gives_up(progress, failed.error)):
            return ended
        raise


def _retried(name: str, retry: Retry, call: Callable[[], Progress], policy: RecoveryPolicy,
             sleep: Callable[[float], None]) -> Progress:
    """Bad input and permanent refusals fail the step at once; anything else is tried again, as the ops'
    RetryPolicy does, honouring a service's Retry-After up to `max_retry_wait_seconds`."""
    for attempt in range(retry.max_retries + 1):
        try:
            return call()
        except (InvalidRequest, PermanentError) as exc:
            raise _StepFailed(name, exc) from None
        except Exception as exc:
            if attempt == retry.max_retries:
                raise _StepFailed(name, exc) from None
            wait = steps.retry_after(exc, policy.max_retry_wait_seconds)
            if wait is None:
                wait = retry.delay_seconds * 2**attempt * random.uniform(0.5, 1.5)
            sleep(min(wait, policy.max_retry_wait_seconds))
    raise AssertionError("unreachable")
