"""One order's whole attempt outside Dagster's step machinery: the driver of the batch path (docs/design.md
section 15). No Dagster here.

It calls the same step functions as the `fulfill_order` ops, in the same order and behind the same holds of
BitLoot's switches, under the same per-order lease, and ends with the same `record_outcome`. What Dagster does
for a per-order run, it does itself: a transient error is retried within the attempt with exponential backoff
(a service's Retry-After honoured, capped), the supplier poll is repeated a few times, and a step that still
fails records `retry_later` (or the quarantine it leads to), as the job's failure hook does. It never raises:
one order's failure must not stop the others of a batch.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from bitloot_reconcile.adapters.errors import PermanentError, TransientError
from bitloot_reconcile.adapters.kinguin import KinguinClient
from bitloot_reconcile.adapters.nowpayments import NowPaymentsClient
from bitloot_reconcile.adapters.r2 import KeyVault
from bitloot_reconcile.adapters.resend import ResendClient
from bitloot_reconcile.domain import fulfilment, switches
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.outcomes import Outcome, Progress
from bitloot_reconcile.domain.recording import record_failure, record_outcome, record_refusal
from bitloot_reconcile.domain.redaction import describe_error
from bitloot_reconcile.domain.remedies import PriceBound
from bitloot_reconcile.domain.schedule import RetrySchedule
from bitloot_reconcile.store.repository import Store
from bitloot_reconcile.tags import OUTCOME_REFUSED

log = logging.getLogger(__name__)

# The orders of one batch share one read of BitLoot's switches, taken again once it is this old
# (`Store.sharing_flags`): a switch an operator flips holds the batch's next steps within about a second.
SWITCHES_MAX_AGE_SECONDS = 1.0


@dataclass(frozen=True)
class Services:
    """The clients one worker uses for its orders (each worker has its own HTTP connection pools)."""

    store: Store
    nowpayments: NowPaymentsClient
    kinguin: KinguinClient
    vault: KeyVault
    mailer: ResendClient
    sender: str
    frontend_url: str
    presign_seconds: int


@dataclass(frozen=True)
class AttemptPolicy:
    lease_ttl: dt.timedelta
    schedule: RetrySchedule
    price_bound: PriceBound
    supplier_poll_attempts: int
    supplier_poll_seconds: float
    max_retry_wait_seconds: float
    # The ops' RetryPolicy: 3 retries, 1 s doubling, with jitter.
    max_retries: int = 3
    retry_delay_seconds: float = 1.0


@dataclass(frozen=True)
class Who:
    """Who works the order, as its audit rows and history record it."""

    run_id: str
    trigger: str
    actor: str | None
    reason: str | None


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


def work_order(services: Services, order_id: str, *, who: Who, policy: AttemptPolicy,
               sleep: Callable[[float], None] = time.sleep) -> AttemptResult:
    """Claim, recover and record one order, as one `fulfill_order` run launched by `who.trigger` would.
    The steps share one view of the order, read again only after their own writes (`Store.for_attempt`)."""
    services = replace(services, store=services.store.for_attempt())
    repo = services.store
    try:
        progress = _claim(services, order_id, who, policy, sleep)
        if isinstance(progress, str):  # refused: recorded in the audit, nothing changed
            return AttemptResult(order_id, OUTCOME_REFUSED, progress, False)
        progress = _steps(services, progress, policy, sleep)
        final = record_outcome(repo, fulfilment.final_outcome(progress), run_id=who.run_id, trigger=who.trigger,
                               actor=who.actor, reason=who.reason, schedule=policy.schedule)
        return AttemptResult(order_id, str(final.outcome), final.reason, True)
    except _StepFailed as failed:
        final = record_failure(repo, order_id, step=failed.step, error=failed.error, run_id=who.run_id,
                               trigger=who.trigger, actor=who.actor, reason=who.reason, schedule=policy.schedule)
        if final is None:  # failed before it held the order: nothing recorded, the lease is not this attempt's
            failure = f"{failed.step} failed: {describe_error(failed.error)}"
            return AttemptResult(order_id, str(Outcome.RETRY_LATER), failure, False)
        return AttemptResult(order_id, str(final.outcome), final.reason, True)
    except Exception as exc:  # recording itself failed (the store is down): the lease lapses, the sweep returns
        log.warning("order %s: attempt not recorded: %s", order_id, describe_error(exc))
        return AttemptResult(order_id, str(Outcome.RETRY_LATER), f"not recorded: {describe_error(exc)}", False)


def _claim(services: Services, order_id: str, who: Who, policy: AttemptPolicy,
           sleep: Callable[[float], None]) -> Progress | str:
    """The `load_and_claim` op's work for a sweep's order: the claim-time hold, the checks, the lease; or
    why the order is refused (an input error: audited, nothing changed)."""
    repo = services.store

    def claim() -> Progress:
        return switches.hold_before_claim(repo, order_id, owner=who.run_id, admin=False) or fulfilment.load_and_claim(
            repo, order_id, owner=who.run_id, lease_ttl=policy.lease_ttl, admin=False, bound=policy.price_bound)

    try:
        progress = _retried("load_and_claim", claim, policy, sleep)
    except _StepFailed as failed:
        if not isinstance(failed.error, InvalidRequest):
            raise
        record_refusal(repo, order_id, run_id=who.run_id, trigger=who.trigger, actor=who.actor, reason=who.reason,
                       why=str(failed.error))
        return str(failed.error)
    repo.append_audit(order_id=order_id, action="requested", trigger=who.trigger, actor=who.actor,
                      reason=who.reason, run_id=who.run_id,
                      outcome=progress.outcome.value if progress.outcome else None)
    return progress


def _steps(services: Services, progress: Progress, policy: AttemptPolicy, sleep: Callable[[float], None]) -> Progress:
    """The job's steps after the claim, in its order; each passes a finished progress straight through."""
    repo, kinguin = services.store, services.kinguin

    def before_kinguin(step: Callable[[Progress], Progress]) -> Callable[[Progress], Progress]:
        return lambda p: step(switches.hold_before_kinguin(repo, p))

    steps: list[tuple[str, Callable[[Progress], Progress]]] = [
        ("verify_payment", lambda p: fulfilment.verify_payment(repo, services.nowpayments, p)),
        ("ensure_supplier_order", before_kinguin(lambda p: fulfilment.ensure_supplier_order(repo, kinguin, p))),
        ("poll_supplier", before_kinguin(lambda p: fulfilment.poll_supplier(repo, kinguin, p))),
        ("store_keys", before_kinguin(lambda p: fulfilment.store_keys(
            repo, kinguin, services.vault, p, presign_seconds=services.presign_seconds))),
        ("mark_fulfilled", lambda p: fulfilment.mark_fulfilled(repo, p)),
    ]
    for name, step in steps:
        if progress.finished:
            return progress
        before = progress
        progress = _retried(name, lambda step=step, before=before: step(before), policy, sleep)
        polls = 0
        while name == "poll_supplier" and progress.outcome is Outcome.WAITING_FOR_SUPPLIER \
                and polls < policy.supplier_poll_attempts:
            polls += 1
            sleep(policy.supplier_poll_seconds)
            progress = _retried(name, lambda step=step, before=before: step(before), policy, sleep)
    if progress.finished:
        return progress
    return _email(services, progress, policy, sleep)


def _email(services: Services, progress: Progress, policy: AttemptPolicy, sleep: Callable[[float], None]) -> Progress:
    """The order is fulfilled here: when Resend stays down after the retries, end well, the sweep sends it later."""
    repo = services.store

    def send() -> Progress:
        held = switches.hold_before_email(repo, progress)
        return fulfilment.send_completion_email(repo, services.mailer, held, sender=services.sender,
                                                frontend_url=services.frontend_url)

    try:
        return _retried("send_completion_email", send, policy, sleep)
    except _StepFailed as failed:
        if isinstance(failed.error, TransientError):
            return fulfilment.email_deferred(progress, failed.error)
        raise


def _retried(name: str, call: Callable[[], Progress], policy: AttemptPolicy,
             sleep: Callable[[float], None]) -> Progress:
    """Bad input and permanent refusals fail the step at once; anything else is tried again, as the ops'
    RetryPolicy does, honouring a service's Retry-After up to `max_retry_wait_seconds`."""
    for retry in range(policy.max_retries + 1):
        try:
            return call()
        except (InvalidRequest, PermanentError) as exc:
            raise _StepFailed(name, exc) from None
        except Exception as exc:
            if retry == policy.max_retries:
                raise _StepFailed(name, exc) from None
            if isinstance(exc, TransientError) and exc.retry_after:
                wait = min(exc.retry_after, policy.max_retry_wait_seconds)
            else:
                wait = policy.retry_delay_seconds * 2**retry * random.uniform(0.5, 1.5)
            sleep(min(wait, policy.max_retry_wait_seconds))
    raise AssertionError("unreachable")

