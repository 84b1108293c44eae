"""The `fulfill_order` job's ops: thin shells over `domain.fulfilment`, one op per step of docs/design.md section 4.

Ops pass a `Progress` (ids and verdicts only) from one to the next. Transient outside failures are retried by
Dagster's RetryPolicy (exponential backoff with jitter); bad input fails the run at once without retries.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg
from pydantic import Field

from bitloot_reconcile.adapters.errors import PermanentError, TransientError
from bitloot_reconcile.assets.order_history import add_order_partitions, attempt_event, report_in_run
from bitloot_reconcile.domain import fulfilment, remedies, switches
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.outcomes import Outcome, Progress
from bitloot_reconcile.domain.recording import record_failure, record_refusal
from bitloot_reconcile.domain.recording import record_outcome as record_outcome_step
from bitloot_reconcile.domain.redaction import describe_error
from bitloot_reconcile.domain.remedies import REMEDY_ACTION, Remedy, Resolution
from bitloot_reconcile.resources.kinguin import KinguinResource
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_reconcile.resources.policy import ReconcilePolicy
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.resend import ResendResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.tags import (
    ALERT_NONE,
    OUTCOME_IN_PROGRESS,
    OUTCOME_REFUSED,
    TAG_ALERT,
    TAG_ATTEMPT,
    TAG_ORDER_ID,
    TAG_OUTCOME,
    TAG_PARENT_RUN,
    TAG_REASON,
    TAG_REMEDY,
    TAG_REQUESTED_BY,
    TAG_TRIGGER,
    TRIGGER_ADMIN,
    TRIGGER_REEXECUTION,
    request_tags,
)

TRANSIENT_RETRY = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
# Every step has two optional outputs: `progress` when the order goes on to the next step, `stopped` when the
# order's run ends here. Dagster skips a step whose input was never produced, so the run's timeline shows
# where the order stopped; `record_outcome` collects whichever `stopped` (or the last `progress`) exists.
STEP_OUTS = {
    "progress": dg.Out(Progress, is_required=False, description="The order goes on to the next step."),
    "stopped": dg.Out(Progress, is_required=False, description="The order's run ends here, with an outcome."),
}


class FulfillOrderRequest(dg.Config):
    order_id: str = Field(description="BitLoot order uuid (orders.id)")
    reason: str = Field(description="Why this order is being retried (required for admin runs)")
    requested_by: str = Field(description="Who asks for this run, e.g. admin@bitloot.io (required for admin runs)")
    # An admin's remedies (docs/design.md section 14): optional, each recorded in the run's tags and the audit.
    max_unit_price_eur: float | None = Field(
        default=None, description="Remedy: pay Kinguin up to this much per unit for this run only, above cost "
        "but within the shop's bound (RECONCILE_MAX_PRICE_OVER_COST_PERCENT / _EUR)")
    replace_canceled_supplier_order: bool = Field(
        default=False, description="Remedy: buy again after Kinguin canceled or refunded the order, under a new "
        "orderExternalId (<order id>:r<n>)")
    resolution: Resolution | None = Field(
        default=None, description="Remedy: close the order by hand (refunded_to_customer | delivered_elsewhere | "
        "written_off); it is never swept or alerted again")

    @property
    def remedy(self) -> Remedy:
        return Remedy.from_fields(self.max_unit_price_eur, self.replace_canceled_supplier_order, self.resolution)


class RefusedLaunch(dg.DagsterError):
    """A request refused when it is launched, before a run exists: Dagster shows its message as it is."""


def checked_request(request: FulfillOrderRequest) -> FulfillOrderRequest:
    """The launch-time checks, which need no store: a well-formed id (made canonical), a reason and a requester
    without control characters."""
    try:
        fulfilment.validate_request_text(request.reason, request.requested_by)
        remedies.validate_remedy_request(request.remedy, request.reason, request.requested_by)
        fulfilment.validate_admin_request(request.reason, request.requested_by)
        order_id = fulfilment.parse_order_id(request.order_id)
    except InvalidRequest as exc:
        raise RefusedLaunch(f"fulfill_order refused: {exc}") from None
    return FulfillOrderRequest(
        order_id=order_id, reason=request.reason, requested_by=request.requested_by,
        max_unit_price_eur=request.max_unit_price_eur,
        replace_canceled_supplier_order=request.replace_canceled_supplier_order, resolution=request.resolution,
    )


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


def step_result(context: dg.OpExecutionContext, progress: Progress) -> Iterator[dg.Output]:
    """The step's one output, and what it did in the run's log and the output's metadata (ids and words only)."""
    said = progress.note or "nothing to do"
    metadata: dict[str, str] = {"order_id": progress.order_id, "did": said}
    if progress.kinguin_order_id:
        metadata["kinguin_order_id"] = progress.kinguin_order_id
    if progress.finished:
        metadata["outcome"] = OUTCOME_REFUSED if progress.refusal else str(progress.outcome)
        context.log.info(f"order {progress.order_id}: stops here, {metadata['outcome']}: {said}")
        yield dg.Output(progress, "stopped", metadata=metadata)
    else:
        context.log.info(f"order {progress.order_id}: {said}")
        yield dg.Output(progress, "progress", metadata=metadata)


def _run_tags(context: dg.OpExecutionContext) -> dict[str, str]:
    run = context.instance.get_run_by_id(context.run_id)
    return dict(run.tags) if run else dict(context.run.tags)


def _set_tags(context: dg.OpExecutionContext, tags: dict[str, str]) -> None:
    context.instance.add_run_tags(context.run_id, tags)


@dataclass(frozen=True)
class Launch:
    """Who and what started this run, as recorded in its tags and audit rows."""

    trigger: str
    actor: str | None
    reason: str | None
    parent_run_id: str | None = None

    @property
    def admin(self) -> bool:
        """A person's run with a reason: it may work a quarantined order and ignores the sweep's switches."""
        return self.trigger == TRIGGER_ADMIN or (self.trigger == TRIGGER_REEXECUTION and self.reason is not None)


def who_launched(context: dg.OpExecutionContext, config: FulfillOrderRequest) -> Launch:
    """A run Dagster re-executed (it has a parent) is a person's act, whatever tags it copied from its parent:
    it keeps a reason only when the chain started with an admin's run, whose config (and reason) it repeats."""
    run = context.dagster_run
    if run.parent_run_id:
        root = context.instance.get_run_by_id(run.root_run_id or run.parent_run_id)
        root_trigger = (root.tags if root else {}).get(TAG_TRIGGER, TRIGGER_ADMIN)
        reason = config.reason if root_trigger == TRIGGER_ADMIN else None
        actor = config.requested_by if root_trigger == TRIGGER_ADMIN else None
        return Launch(TRIGGER_REEXECUTION, actor, reason, run.parent_run_id)
    trigger = _run_tags(context).get(TAG_TRIGGER, TRIGGER_ADMIN)
    return Launch(trigger, config.requested_by, config.reason)


def launch_tags(order_id: str, launch: Launch, remedy: Remedy) -> dict[str, str]:
    tags = request_tags(order_id, trigger=launch.trigger, reason=launch.reason or REEXECUTED_SENSOR_RUN,
                        requested_by=launch.actor or UNKNOWN_PERSON)
    if remedy:
        tags[TAG_REMEDY] = remedy.label
    if launch.parent_run_id:
        tags[TAG_PARENT_RUN] = launch.parent_run_id
        tags[TAG_OUTCOME] = OUTCOME_IN_PROGRESS  # not the parent's, copied by Dagster
        tags[TAG_ALERT] = ALERT_NONE  # nor the parent's alert
    return tags


# How a re-execution of a sensor run is tagged: a person started it, Dagster does not say who, nor why.
UNKNOWN_PERSON = "unknown (re-executed in Dagster)"
REEXECUTED_SENSOR_RUN = "re-execution of a sensor run"


def claim_order(
    context: dg.OpExecutionContext, request: FulfillOrderRequest, store: StoreResource, policy: ReconcilePolicy
) -> Progress:
    """Tag the run (canonical order id, who, why, the remedy), check the request against the store, take the
    order's lease under this run's id and write the run's audit row; a `resolution` remedy ends the order's
    run here. A refusal is recorded and fails the step without retries."""
    order_id = request.order_id  # canonical: checked when the run was launched (`checked_request`)
    launch = who_launched(context, request)
    remedy = request.remedy
    _set_tags(context, launch_tags(order_id, launch, remedy))
    repo = store.get_store().for_attempt()  # the hold and the claim read the order once
    try:
        with step_errors(policy):
            remedies.refuse_remedy_on_sweep_run(remedy, admin=launch.admin)
            if launch.trigger == TRIGGER_REEXECUTION and not launch.admin:
                fulfilment.refuse_quarantined(repo.get_state(order_id))
            progress = switches.hold_before_claim(
                repo, order_id, owner=context.run_id, admin=launch.admin
            ) or fulfilment.load_and_claim(
                repo, order_id, owner=context.run_id, lease_ttl=policy.lease_ttl, admin=launch.admin,
                remedy=remedy, bound=policy.price_bound,
            )
            if remedy.resolution:
                progress = fulfilment.resolve_by_hand(repo, remedy.resolution, progress)
    except dg.Failure as failure:
        if failure.allow_retries is not False:
            raise
        # An input error: recorded as refused (nobody is paged); the run's remaining steps are skipped and
        # `record_outcome` fails the run with this one sentence.
        why = failure.description or "refused"
        _set_tags(context, {TAG_OUTCOME: OUTCOME_REFUSED})
        record_refusal(repo, order_id, run_id=context.run_id, trigger=launch.trigger, actor=launch.actor,
                       reason=launch.reason, why=why)
        add_order_partitions(context.instance, [order_id])
        context.log_event(attempt_event(order_id, outcome=OUTCOME_REFUSED, reason=why, trigger=launch.trigger,
                                        actor=launch.actor, run_id=context.run_id, job=context.job_name))
        return Progress(order_id=order_id, lease_owner=context.run_id).refuse(why)
    _set_tags(context, {TAG_ATTEMPT: str(repo.get_state(order_id).attempts)})
    repo.append_audit(
        order_id=order_id,
        action="requested",
        trigger=launch.trigger,
        actor=launch.actor,
        reason=launch.reason,
        run_id=context.run_id,
        outcome=progress.outcome.value if progress.outcome else None,
        detail=f"re-execution of run {launch.parent_run_id}" if launch.parent_run_id else None,
    )
    if remedy:
        repo.append_audit(order_id=order_id, action=REMEDY_ACTION, trigger=launch.trigger, actor=launch.actor,
                          reason=launch.reason, run_id=context.run_id, outcome=None, detail=remedy.label)
    return progress


def held_by_this_run(
    context: dg.OpExecutionContext, progress: Progress, store: StoreResource, policy: ReconcilePolicy
) -> Progress:
    """The progress a step may act on: its own run's. The first step a re-execution executes (from failure,
    from a selected step) receives its parent's output, under the parent's lease: it first claims the order
    for this run, as `load_and_claim` does (tags, lease, audit row, refusals), and goes on from what the parent
    found, or ends as the claim decided (busy, already fulfilled, held)."""
    if progress.lease_owner == context.run_id:
        return progress
    request = checked_request(FulfillOrderRequest(**context.run_config))  # the parent's flat config, repeated
    return fulfilment.taken_over(progress, claim_order(context, request, store, policy))


@dg.op(retry_policy=TRANSIENT_RETRY, out=STEP_OUTS)
def load_and_claim(
    context: dg.OpExecutionContext, config: FulfillOrderRequest, store: StoreResource, policy: ReconcilePolicy
) -> Iterator[dg.Output]:
    """Tag the run, check the request against the store, take the order's lease (`claim_order`)."""
    yield from step_result(context, claim_order(context, config, store, policy))


@dg.op(retry_policy=TRANSIENT_RETRY, out=STEP_OUTS)
def verify_payment(
    context: dg.OpExecutionContext,
    progress: Progress,
    store: StoreResource,
    nowpayments: NowPaymentsResource,
    policy: ReconcilePolicy,
) -> Iterator[dg.Output]:
    progress = held_by_this_run(context, progress, store, policy)
    with step_errors(policy), nowpayments.get_client() as client:
        progress = fulfilment.verify_payment(store.get_store(), client, progress)
    yield from step_result(context, progress)


@dg.op(retry_policy=TRANSIENT_RETRY, out=STEP_OUTS)
def ensure_supplier_order(
    context: dg.OpExecutionContext,
    progress: Progress,
    store: StoreResource,
    kinguin: KinguinResource,
    policy: ReconcilePolicy,
) -> Iterator[dg.Output]:
    progress = held_by_this_run(context, progress, store, policy)
    with step_errors(policy), kinguin.get_client() as client:
        progress = switches.hold_before_kinguin(store.get_store(), progress)
        progress = fulfilment.ensure_supplier_order(store.get_store(), client, progress)
    yield from step_result(context, progress)


@dg.op(retry_policy=TRANSIENT_RETRY, out=STEP_OUTS)
def poll_supplier(
    context: dg.OpExecutionContext,
    progress: Progress,
    store: StoreResource,
    kinguin: KinguinResource,
    policy: ReconcilePolicy,
) -> Iterator[dg.Output]:
    """A short in-run poll while Kinguin is processing; longer waits end the run and the sweep returns."""
    progress = held_by_this_run(context, progress, store, policy)
    with step_errors(policy), kinguin.get_client() as client:
        progress = switches.hold_before_kinguin(store.get_store(), progress)
        result = fulfilment.poll_supplier(store.get_store(), client, progress)
    if result.outcome is Outcome.WAITING_FOR_SUPPLIER and context.retry_number < policy.supplier_poll_attempts:
        wait = policy.supplier_poll_seconds
        context.log.info(f"order {progress.order_id}: {result.reason}; polling again in {wait} s")
        raise dg.RetryRequested(
            max_retries=policy.supplier_poll_attempts, seconds_to_wait=wait
        )
    yield from step_result(context, result)


@dg.op(retry_policy=TRANSIENT_RETRY, out=STEP_OUTS)
def store_keys(
    context: dg.OpExecutionContext,
    progress: Progress,
    store: StoreResource,
    kinguin: KinguinResource,
    r2: R2Resource,
    policy: ReconcilePolicy,
) -> Iterator[dg.Output]:
    """Fetch, decode and store the keys in one step: key serials never leave this op's memory."""
    progress = held_by_this_run(context, progress, store, policy)
    with step_errors(policy), kinguin.get_client() as client:
        progress = switches.hold_before_kinguin(store.get_store(), progress)
        progress = fulfilment.store_keys(
            store.get_store(), client, r2.get_vault(), progress, presign_seconds=r2.presign_expiry_seconds
        )
    yield from step_result(context, progress)


@dg.op(retry_policy=TRANSIENT_RETRY, out=STEP_OUTS)
def mark_fulfilled(
    context: dg.OpExecutionContext, progress: Progress, store: StoreResource, policy: ReconcilePolicy
) -> Iterator[dg.Output]:
    progress = held_by_this_run(context, progress, store, policy)
    with step_errors(policy):
        progress = fulfilment.mark_fulfilled(store.get_store(), progress)
    yield from step_result(context, progress)


@dg.op(retry_policy=TRANSIENT_RETRY, out=STEP_OUTS)
def send_completion_email(
    context: dg.OpExecutionContext,
    progress: Progress,
    store: StoreResource,
    mailer: ResendResource,
    policy: ReconcilePolicy,
) -> Iterator[dg.Output]:
    """The order is already fulfilled here: when Resend stays down, end well and let the sweep send it later."""
    progress = held_by_this_run(context, progress, store, policy)
    with step_errors(policy):
        repo = store.get_store().for_attempt()  # the hold and the email read the order once
        progress = switches.hold_before_email(repo, progress)
        try:
            with mailer.get_client() as client:
                progress = fulfilment.send_completion_email(
                    repo, client, progress, sender=mailer.sender, frontend_url=policy.frontend_url
                )
        except TransientError as exc:
            if context.retry_number < TRANSIENT_RETRY.max_retries:
                raise  # retried by the policy (or after Retry-After) like every other step
            progress = fulfilment.email_deferred(progress, exc)
    yield from step_result(context, progress)


@dg.op(ins={"ends": dg.In(list[Progress], description="The one step output where the order's run ended.")})
def record_outcome(
    context: dg.OpExecutionContext, ends: list[Progress], store: StoreResource, policy: ReconcilePolicy
) -> dg.Output[str]:
    """One outcome per run: into the reconcile state, the audit table, this run's metadata and its
    `bitloot/outcome` tag; or, for a refused request, the run's failure in one sentence."""
    (end,) = ends  # each step yields exactly one of its two outputs, so exactly one end reaches here
    end = held_by_this_run(context, end, store, policy)
    if end.refusal:
        # The run fails here, with the refusal's one sentence, after the steps between were skipped.
        raise dg.Failure(description=end.refusal, allow_retries=False)
    tags = _run_tags(context)
    final = record_outcome_step(
        store.get_store(),
        fulfilment.final_outcome(end),
        run_id=context.run_id,
        trigger=tags.get(TAG_TRIGGER, TRIGGER_ADMIN),
        actor=_recorded_actor(tags),
        reason=_recorded_reason(tags),
        schedule=policy.retry_schedule(),
    )
    _set_tags(context, {TAG_OUTCOME: final.outcome.value})
    context.log.info(f"order {final.order_id}: {final.outcome} ({final.reason})")
    add_order_partitions(context.instance, [final.order_id])
    context.log_event(attempt_event(
        final.order_id, outcome=final.outcome.value, reason=final.reason, trigger=tags.get(TAG_TRIGGER, TRIGGER_ADMIN),
        actor=_recorded_actor(tags), run_id=context.run_id, job=context.job_name))
    return dg.Output(
        final.outcome.value,
        metadata={"order_id": final.order_id, "outcome": final.outcome.value, "reason": final.reason or ""},
    )


def _recorded_actor(tags: Mapping[str, str]) -> str | None:
    actor = tags.get(TAG_REQUESTED_BY)
    return None if actor in (None, "", UNKNOWN_PERSON) else actor


def _recorded_reason(tags: Mapping[str, str]) -> str | None:
    reason = tags.get(TAG_REASON)
    return None if reason in (None, "", REEXECUTED_SENSOR_RUN) else reason


@dg.failure_hook(required_resource_keys={"store", "policy"})
def record_failed_run(context: dg.HookContext) -> None:
    """A step failed for good while this run held the lease: record `retry_later` (or the quarantine it
    leads to), tag the run with it and hand the lease back."""
    tags = context.instance.get_run_by_id(context.run_id).tags
    try:
        order_id = fulfilment.parse_order_id(tags.get(TAG_ORDER_ID, ""))
    except InvalidRequest:
        return
    final = record_failure(
        context.resources.store.get_store(),
        order_id,
        step=context.op.name,
        error=context.op_exception,
        run_id=context.run_id,
        trigger=tags.get(TAG_TRIGGER, TRIGGER_ADMIN),
        actor=_recorded_actor(tags),
        reason=_recorded_reason(tags),
        schedule=context.resources.policy.retry_schedule(),
    )
    if final is None:
        return  # never claimed (bad input, or failed before the claim): nothing to record or release
    context.instance.add_run_tags(context.run_id, {TAG_OUTCOME: final.outcome.value})
    add_order_partitions(context.instance, [order_id])
    report_in_run(context.instance, attempt_event(
        order_id, outcome=final.outcome.value, reason=final.reason, trigger=tags.get(TAG_TRIGGER, TRIGGER_ADMIN),
        actor=_recorded_actor(tags), run_id=context.run_id, job=context.job_name),
        run_id=context.run_id, job_name=context.job_name, step_key=context.step_key)
