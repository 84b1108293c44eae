"""The `fulfill_order` job's ops: the claim, then one op per row of the step table (`domain.steps`), each a
shell generated from its row, then `record_outcome`.

Ops pass a `Progress` (ids and verdicts only) from one to the next. A step's failures are retried by the
RetryPolicy of its row's retry class (exponential backoff with jitter); bad input fails the run at once
without retries.
"""

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from functools import cached_property

import dagster as dg
from pydantic import Field

from bitloot_reconcile.adapters.errors import PermanentError, TransientError
from bitloot_reconcile.adapters.kinguin import KinguinClient
from bitloot_reconcile.adapters.nowpayments import NowPaymentsClient
from bitloot_reconcile.adapters.r2 import KeyVault
from bitloot_reconcile.adapters.resend import ResendClient
from bitloot_reconcile.assets.order_history import add_order_partitions, attempt_event
from bitloot_reconcile.domain import fulfilment, steps
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.outcomes import Progress
from bitloot_reconcile.domain.recording import record_failure
from bitloot_reconcile.domain.recording import record_outcome as record_outcome_step
from bitloot_reconcile.domain.redaction import describe_error
from bitloot_reconcile.domain.remedies import Remedy, Resolution
from bitloot_reconcile.domain.steps import CLAIM_STEP, STEPS, TRANSIENT, Retry, Step, Who
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.repository import Store
from bitloot_reconcile.tags import (
    OUTCOME_REFUSED,
    TAG_ATTEMPT,
    TAG_ORDER_ID,
    TAG_OUTCOME,
    TAG_REASON,
    TAG_REQUESTED_BY,
    TAG_TRIGGER,
    TRIGGER_ADMIN,
    TRIGGER_REEXECUTION,
    request_tags,
)


def retry_policy(retry: Retry) -> dg.RetryPolicy:
    return dg.RetryPolicy(max_retries=retry.max_retries, delay=retry.delay_seconds, backoff=dg.Backoff.EXPONENTIAL,
                          jitter=dg.Jitter.PLUS_MINUS)


# The run's resource that opens each outside system a row `calls`.
RESOURCE_OF = {"nowpayments": "nowpayments", "kinguin": "kinguin", "r2": "r2", "resend": "mailer"}
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
    """The launch check (`fulfilment.check_launch`, the command line's too), with the id made canonical."""
    try:
        order_id = fulfilment.check_launch(request.order_id, request.reason, request.requested_by, request.remedy)
    except InvalidRequest as exc:
        raise RefusedLaunch(f"fulfill_order refused: {exc}") from None
    return request.model_copy(update={"order_id": order_id})


class StepError(Exception):
    """An unexpected error of a step, in words that are safe to record (see `step_errors`)."""


@contextmanager
def step_errors(policy: RecoveryPolicyResource, retry: Retry) -> Iterator[None]:
    """Bad input and permanent refusals fail the step for good; transient errors go to the RetryPolicy of the
    step's retry class, honouring the service's Retry-After when it gives one, but never waiting past
    `max_retry_wait_seconds` (kept below the lease, which the next attempt renews). Anything else (a database
    error, say) is retried too, re-raised as redacted text without its cause: Dagster records an error's
    message and chain in the event log, and driver errors can quote the statement's parameters (a presigned
    URL, for one)."""
    try:
        yield
    except InvalidRequest as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    except TransientError as exc:
        if (wait := steps.retry_after(exc, policy.max_retry_wait_seconds)) is not None:
            raise dg.RetryRequested(max_retries=retry.max_retries, seconds_to_wait=wait) from exc
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


def who_launched(context: dg.OpExecutionContext, config: FulfillOrderRequest) -> Who:
    """A run Dagster re-executed (it has a parent) is a person's act, whatever tags it copied from its parent:
    it keeps a reason only when the chain started with an admin's run, whose config (and reason) it repeats."""
    run = context.dagster_run
    if run.parent_run_id:
        root = context.instance.get_run_by_id(run.root_run_id or run.parent_run_id)
        root_trigger = (root.tags if root else {}).get(TAG_TRIGGER, TRIGGER_ADMIN)
        reason = config.reason if root_trigger == TRIGGER_ADMIN else None
        actor = config.requested_by if root_trigger == TRIGGER_ADMIN else None
        return Who(context.run_id, TRIGGER_REEXECUTION, actor, reason, run.parent_run_id)
    trigger = _run_tags(context).get(TAG_TRIGGER, TRIGGER_ADMIN)
    return Who(context.run_id, trigger, config.requested_by, config.reason)


# How a re-execution of a sensor run is tagged: a person started it, Dagster does not say who, nor why.
UNKNOWN_PERSON = "unknown (re-executed in Dagster)"
REEXECUTED_SENSOR_RUN = "re-execution of a sensor run"


def claim_order(context: dg.OpExecutionContext, request: FulfillOrderRequest) -> Progress:
    """Tag the run (canonical order id, who, why, the remedy), then the claim (`steps.claim`). A refused
    request (nobody is paged) is also the order's history; the run's remaining steps are skipped and
    `record_outcome` fails the run with the refusal's one sentence."""
    order_id = request.order_id  # canonical: checked when the run was launched (`checked_request`)
    policy: RecoveryPolicyResource = context.resources.policy
    who, remedy = who_launched(context, request), request.remedy
    _set_tags(context, request_tags(
        order_id, trigger=who.trigger, reason=who.reason or REEXECUTED_SENSOR_RUN,
        requested_by=who.actor or UNKNOWN_PERSON, remedy=remedy.label if remedy else None,
        parent_run_id=who.parent_run_id))
    repo = context.resources.store.get_store().for_attempt()  # the hold and the claim read the order once
    with step_errors(policy, TRANSIENT):
        progress = steps.claim(repo, order_id, who, lease_ttl=policy.lease_ttl, bound=policy.price_bound,
                               remedy=remedy)
    if progress.refusal:
        _set_tags(context, {TAG_OUTCOME: OUTCOME_REFUSED})
        add_order_partitions(context.instance, [order_id])
        context.log_event(attempt_event(order_id, outcome=OUTCOME_REFUSED, reason=progress.refusal,
                                        trigger=who.trigger, actor=who.actor, run_id=context.run_id,
                                        job=context.job_name))
        return progress
    _set_tags(context, {TAG_ATTEMPT: str(repo.get_state(order_id).attempts)})
    return progress


def held_by_this_run(context: dg.OpExecutionContext, progress: Progress) -> Progress:
    """The progress a step may act on: its own run's. The first step a re-execution executes (from failure,
    from a selected step) receives its parent's output, under the parent's lease: it first claims the order
    for this run, as `load_and_claim` does (tags, lease, audit row, refusals), and goes on from what the parent
    found, or ends as the claim decided (busy, already fulfilled, held)."""
    if progress.lease_owner == context.run_id:
        return progress
    request = checked_request(FulfillOrderRequest(**context.run_config))  # the parent's flat config, repeated
    return fulfilment.taken_over(progress, claim_order(context, request))


class StepServices:
    """`steps.Services` for one try of a step, from the run's resources: its own view of the store (the step's
    switch and its work read the order once) and the clients of the systems its row `calls`, opened on first
    use (a resource the row does not name is not there: Dagster provides only the op's required ones)."""

    def __init__(self, resources, stack: ExitStack):
        self._resources, self._stack = resources, stack

    @cached_property
    def store(self) -> Store:
        return self._resources.store.get_store().for_attempt()

    @cached_property
    def nowpayments(self) -> NowPaymentsClient:
        return self._stack.enter_context(self._resources.nowpayments.get_client())

    @cached_property
    def kinguin(self) -> KinguinClient:
        return self._stack.enter_context(self._resources.kinguin.get_client())

    @cached_property
    def vault(self) -> KeyVault:
        return self._resources.r2.get_vault()

    @cached_property
    def mailer(self) -> ResendClient:
        return self._stack.enter_context(self._resources.mailer.get_client())

    @property
    def sender(self) -> str:
        return self._resources.mailer.sender

    @property
    def frontend_url(self) -> str:
        return self._resources.policy.frontend_url

    @property
    def presign_seconds(self) -> int:
        return self._resources.r2.presign_expiry_seconds


def run_step(context: dg.OpExecutionContext, step: Step, progress: Progress) -> Iterator[dg.Output]:
    """One try of a row: under this run's lease, its switch and its work; a failure retried by the op's
    RetryPolicy, or, once the retries are used up, ended as the row `gives_up`; polled again while it waits."""
    policy: RecoveryPolicyResource = context.resources.policy
    progress = held_by_this_run(context, progress)
    try:
        with step_errors(policy, step.retry), ExitStack() as stack:
            try:
                result = steps.run(step, StepServices(context.resources, stack), progress)
            except Exception as exc:
                retries_left = context.retry_number < step.retry.max_retries
                ended = None if retries_left or step.gives_up is None else step.gives_up(progress, exc)
                if ended is None:
                    raise
                result = ended
    except Exception as exc:
        # An attempt that ends here is recorded by the step itself, so its event is in this run's log.
        if fails_for_good(context.retry_number, step.retry, exc) and (event := record_failed_attempt(
                context.instance, context.resources, context.run_id, context.job_name, step=step.name, error=exc)):
            context.log_event(event)
        raise
    if step.polls_while and result.outcome is step.polls_while \
            and context.retry_number < policy.supplier_poll_attempts:
        wait = policy.supplier_poll_seconds
        context.log.info(f"order {progress.order_id}: {result.reason}; polling again in {wait} s")
        raise dg.RetryRequested(max_retries=policy.supplier_poll_attempts, seconds_to_wait=wait)
    yield from step_result(context, result)


def step_op(step: Step) -> dg.OpDefinition:
    """The op of one row of the step table: its name, retry policy and resources come from the row."""

    @dg.op(name=step.name, description=step.does, retry_policy=retry_policy(step.retry), out=STEP_OUTS,
           required_resource_keys={"store", "policy", *(RESOURCE_OF[system] for system in step.calls)})
    def step_shell(context: dg.OpExecutionContext, progress: Progress) -> Iterator[dg.Output]:
        yield from run_step(context, step, progress)

    return step_shell


@dg.op(name=CLAIM_STEP, retry_policy=retry_policy(TRANSIENT), out=STEP_OUTS,
       required_resource_keys={"store", "policy"})
def load_and_claim(context: dg.OpExecutionContext, config: FulfillOrderRequest) -> Iterator[dg.Output]:
    """Tag the run, check the request against the store, take the order's lease (`claim_order`)."""
    yield from step_result(context, claim_order(context, config))


STEP_OPS = tuple(step_op(step) for step in STEPS)


@dg.op(ins={"ends": dg.In(list[Progress], description="The one step output where the order's run ended.")})
def record_outcome(
    context: dg.OpExecutionContext, ends: list[Progress], store: StoreResource, policy: RecoveryPolicyResource
) -> dg.Output[str]:
    """One outcome per run: into the reconcile state, the audit table, this run's metadata and its
    `bitloot/outcome` tag; or, for a refused request, the run's failure in one sentence."""
    (end,) = ends  # each step yields exactly one of its two outputs, so exactly one end reaches here
    end = held_by_this_run(context, end)
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


def fails_for_good(retry_number: int, retry: Retry, error: BaseException) -> bool:
    """Whether Dagster ends the step with this error rather than trying it again."""
    if isinstance(error, dg.RetryRequested):
        return retry_number >= error.max_retries
    if isinstance(error, dg.Failure) and not error.allow_retries:
        return True
    return retry_number >= retry.max_retries


def record_failed_attempt(instance: dg.DagsterInstance, resources, run_id: str, job_name: str, *, step: str,
                          error: BaseException | None) -> dg.AssetMaterialization | None:
    """A step failed for good while this run held the lease: record `retry_later` (or the quarantine it leads
    to), tag the run with it, hand the lease back; the attempt's event for the order's history. None when the
    run does not hold the order (never claimed, or already recorded)."""
    tags = instance.get_run_by_id(run_id).tags
    try:
        order_id = fulfilment.parse_order_id(tags.get(TAG_ORDER_ID, ""))
    except InvalidRequest:
        return None
    trigger, actor = tags.get(TAG_TRIGGER, TRIGGER_ADMIN), _recorded_actor(tags)
    final = record_failure(resources.store.get_store(), order_id, step=step, error=error, run_id=run_id,
                           trigger=trigger, actor=actor, reason=_recorded_reason(tags),
                           schedule=resources.policy.retry_schedule())
    if final is None:
        return None
    instance.add_run_tags(run_id, {TAG_OUTCOME: final.outcome.value})
    add_order_partitions(instance, [order_id])
    return attempt_event(order_id, outcome=final.outcome.value, reason=final.reason, trigger=trigger, actor=actor,
                         run_id=run_id, job=job_name)


@dg.failure_hook(required_resource_keys={"store", "policy"})
def record_failed_run(context: dg.HookContext) -> None:
    """What the failed step could not record itself (its own recording failed, or the claim or the outcome
    step failed while this run held the lease). A hook has no public way to log an event in its run, so this
    attempt's event is reported without one: the order's history counts it, the UI's list does not show it."""
    if event := record_failed_attempt(context.instance, context.resources, context.run_id, context.job_name,
                                      step=context.op.name, error=context.op_exception):
        context.instance.report_runless_asset_event(event)
