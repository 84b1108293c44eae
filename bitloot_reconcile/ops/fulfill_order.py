"""The `fulfill_order` job's ops: thin shells over `domain.fulfilment`, one op per step of docs/design.md section 4.

Ops pass a `Progress` (ids and verdicts only) from one to the next. Transient outside failures are retried by
Dagster's RetryPolicy (exponential backoff with jitter); bad input fails the run at once without retries.
"""


from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from bitloot_reconcile.adapters.errors import PermanentError, TransientError
from bitloot_reconcile.domain import fulfilment, switches
from bitloot_reconcile.domain.outcomes import InvalidRequest, Outcome, Progress
from bitloot_reconcile.domain.recording import record_outcome as record_outcome_step
from bitloot_reconcile.domain.redaction import describe_error
from bitloot_reconcile.resources.kinguin import KinguinResource
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_reconcile.resources.policy import ReconcilePolicy
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.resend import ResendResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.tags import (
    TAG_ATTEMPT,
    TAG_ORDER_ID,
    TAG_REASON,
    TAG_REQUESTED_BY,
    TAG_TRIGGER,
    TRIGGER_ADMIN,
    request_tags,
)

TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


class FulfillOrderRequest(dg.Config):
    order_id: str = Field(description="BitLoot order uuid (orders.id)")
    reason: str = Field(description="Why this order is being retried (required for admin runs)")
    requested_by: str = Field(description="Who asks for this run, e.g. admin@bitloot.io (required for admin runs)")


class StepError(Exception):
    """An unexpected error of a step, in words that are safe to record (see `step_errors`)."""


@contextmanager
def step_errors(policy: ReconcilePolicy) -> Iterator[None]:
    """Bad input and permanent refusals fail the step for good; transient errors go to the RetryPolicy,
    honouring the service's Retry-After when it gives one, but never waiting past `max_retry_wait_seconds`
    (kept below the lease, which the next attempt renews). Anything else (a database error, say) is retried
    too, re-raised as redacted text without its cause: Dagster records an error's message and chain in
    the event log, and driver errors can quote the statement's parameters (a presigned URL, for one)."""
    try:
        yield
    except InvalidRequest as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    except TransientError as exc:
        if exc.retry_after:
            wait = min(exc.retry_after, policy.max_retry_wait_seconds)
            raise dg.RetryRequested(max_retries=TRANSIENT_RETRY.max_retries, seconds_to_wait=wait) from exc
        raise
    except PermanentError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    except (dg.Failure, dg.RetryRequested):
        raise
    except Exception as exc:
        raise StepError(describe_error(exc)) from None


def _current_tags(context: dg.OpExecutionContext) -> dict[str, str]:
    run = context.instance.get_run_by_id(context.run_id)
    return dict(run.tags) if run else dict(context.run.tags)


@dg.op(retry_policy=TRANSIENT_RETRY)
def load_and_claim(
    context: dg.OpExecutionContext, config: FulfillOrderRequest, store: StoreResource, policy: ReconcilePolicy
) -> Progress:
    """Tag the run, check the request, take the order's lease."""
    with step_errors(policy):  # before tagging: Dagster's storage refuses a NUL byte in a tag
        fulfilment.validate_request_text(config.reason, config.requested_by)
    existing = _current_tags(context)
    trigger = existing.get(TAG_TRIGGER, TRIGGER_ADMIN)
    wanted = request_tags(config.order_id, trigger=trigger, reason=config.reason, requested_by=config.requested_by)
    missing = {k: v for k, v in wanted.items() if k not in existing}
    if missing:
        context.instance.add_run_tags(context.run_id, missing)
    repo = store.get_store()
    with step_errors(policy):
        order_id = fulfilment.parse_order_id(config.order_id)
        if trigger == TRIGGER_ADMIN:
            fulfilment.validate_admin_request(config.reason, config.requested_by)
        progress = switches.hold_before_claim(
            repo, order_id, owner=context.run_id, admin=trigger == TRIGGER_ADMIN
        ) or fulfilment.load_and_claim(
            repo, order_id, owner=context.run_id, lease_ttl=policy.lease_ttl, admin=trigger == TRIGGER_ADMIN
        )
    if TAG_ATTEMPT not in existing:
        context.instance.add_run_tags(context.run_id, {TAG_ATTEMPT: str(repo.get_state(order_id).attempts)})
    repo.append_audit(
        order_id=order_id,
        action="requested",
        trigger=trigger,
        actor=config.requested_by or None,
        reason=config.reason or None,
        run_id=context.run_id,
        outcome=progress.outcome.value if progress.outcome else None,
    )
    context.log.info(f"order {order_id}: {trigger} run, {progress.outcome or 'lease taken'}")
    return progress


@dg.op(retry_policy=TRANSIENT_RETRY)
def verify_payment(
    progress: Progress, store: StoreResource, nowpayments: NowPaymentsResource, policy: ReconcilePolicy
) -> Progress:
    with step_errors(policy), nowpayments.get_client() as client:
        return fulfilment.verify_payment(store.get_store(), client, progress)


@dg.op(retry_policy=TRANSIENT_RETRY)
def ensure_supplier_order(
    progress: Progress, store: StoreResource, kinguin: KinguinResource, policy: ReconcilePolicy
) -> Progress:
    with step_errors(policy), kinguin.get_client() as client:
        progress = switches.hold_before_kinguin(store.get_store(), progress)
        return fulfilment.ensure_supplier_order(store.get_store(), client, progress)


@dg.op(retry_policy=TRANSIENT_RETRY)
def poll_supplier(
    context: dg.OpExecutionContext,
    progress: Progress,
    store: StoreResource,
    kinguin: KinguinResource,
    policy: ReconcilePolicy,
) -> Progress:
    """A short in-run poll while Kinguin is processing; longer waits end the run and the sweep returns."""
    with step_errors(policy), kinguin.get_client() as client:
        progress = switches.hold_before_kinguin(store.get_store(), progress)
        result = fulfilment.poll_supplier(store.get_store(), client, progress)
    if result.outcome is Outcome.WAITING_FOR_SUPPLIER and context.retry_number < policy.supplier_poll_attempts:
        raise dg.RetryRequested(
            max_retries=policy.supplier_poll_attempts, seconds_to_wait=policy.supplier_poll_seconds
        )
    return result


@dg.op(retry_policy=TRANSIENT_RETRY)
def store_keys(
    context: dg.OpExecutionContext,
    progress: Progress,
    store: StoreResource,
    kinguin: KinguinResource,
    r2: R2Resource,
    policy: ReconcilePolicy,
) -> Progress:
    """Fetch, decode and store the keys in one step: key serials never leave this op's memory."""
    with step_errors(policy), kinguin.get_client() as client:
        progress = switches.hold_before_kinguin(store.get_store(), progress)
        result = fulfilment.store_keys(
            store.get_store(), client, r2.get_vault(), progress, presign_seconds=r2.presign_expiry_seconds
        )
    context.log.info(f"order {progress.order_id}: keys stored under orders/{progress.order_id}/")
    return result


@dg.op(retry_policy=TRANSIENT_RETRY)
def mark_fulfilled(progress: Progress, store: StoreResource, policy: ReconcilePolicy) -> Progress:
    with step_errors(policy):
        return fulfilment.mark_fulfilled(store.get_store(), progress)


@dg.op(retry_policy=TRANSIENT_RETRY)
def send_completion_email(
    context: dg.OpExecutionContext,
    progress: Progress,
    store: StoreResource,
    mailer: ResendResource,
    policy: ReconcilePolicy,
) -> Progress:
    """The order is already fulfilled here: when Resend stays down, end well and let the sweep send it later."""
    with step_errors(policy):
        progress = switches.hold_before_email(store.get_store(), progress)
        try:
            with mailer.get_client() as client:
                return fulfilment.send_completion_email(
                    store.get_store(), client, progress, sender=mailer.sender, frontend_url=policy.frontend_url
                )
        except TransientError as exc:
            if context.retry_number < TRANSIENT_RETRY.max_retries:
                raise  # retried by the policy (or after Retry-After) like every other step
            return progress.stop(Outcome.FULFILLED, f"keys delivered; completion email not sent yet ({exc})")


@dg.op
def record_outcome(
    context: dg.OpExecutionContext, progress: Progress, store: StoreResource, policy: ReconcilePolicy
) -> dg.Output[str]:
    """One outcome per run: into the reconcile state, the audit table and this run's metadata."""
    tags = _current_tags(context)
    final = record_outcome_step(
        store.get_store(),
        fulfilment.final_outcome(progress),
        run_id=context.run_id,
        trigger=tags.get(TAG_TRIGGER, TRIGGER_ADMIN),
        actor=tags.get(TAG_REQUESTED_BY),
        reason=tags.get(TAG_REASON),
        schedule=policy.retry_schedule(),
    )
    context.log.info(f"order {final.order_id}: {final.outcome} ({final.reason})")
    return dg.Output(
        final.outcome.value,
        metadata={"order_id": final.order_id, "outcome": final.outcome.value, "reason": final.reason or ""},
    )


@dg.failure_hook(required_resource_keys={"store", "policy"})
def record_failed_run(context: dg.HookContext) -> None:
    """A step failed for good while this run held the lease: record `retry_later` and hand the lease back."""
    tags = context.instance.get_run_by_id(context.run_id).tags
    try:
        order_id = fulfilment.parse_order_id(tags.get(TAG_ORDER_ID, ""))
    except InvalidRequest:
        return
    repo = context.resources.store.get_store()
    if repo.get_state(order_id).lease_owner != context.run_id:
        return  # never claimed (bad input, or failed before the claim): nothing to record or release
    error = context.op_exception
    reason = f"{context.op.name} failed" + (f": {describe_error(error)}" if error else "")
    record_outcome_step(
        repo,
        Progress(order_id=order_id, lease_owner=context.run_id).stop(Outcome.RETRY_LATER, reason[:500]),
        run_id=context.run_id,
        trigger=tags.get(TAG_TRIGGER, TRIGGER_ADMIN),
        actor=tags.get(TAG_REQUESTED_BY),
        reason=tags.get(TAG_REASON),
        schedule=context.resources.policy.retry_schedule(),
    )
