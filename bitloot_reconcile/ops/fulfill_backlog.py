"""The `fulfill_backlog` job's one op: a thin shell over `domain.attempt` and `domain.backlog`.

The sweep launches it when more orders are due than `batch_threshold`: one run works them all on a bounded
pool of threads, each order exactly as a `fulfill_order` run would (same steps, same lease, same recording),
with the batch's run id in each order's audit rows and history.
"""

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import dagster as dg
from pydantic import Field

from bitloot_reconcile.assets.order_history import (
    add_order_partitions,
    attempt_event,
    hold_event_connections,
)
from bitloot_reconcile.domain import backlog, fulfilment
from bitloot_reconcile.domain.attempt import (
    SWITCHES_MAX_AGE_SECONDS,
    AttemptResult,
    work_order,
)
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.steps import Services, Who
from bitloot_reconcile.domain.sweep import SENSOR_ACTOR
from bitloot_reconcile.resources.kinguin import KinguinResource
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.resend import ResendResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.tags import OUTCOME_REFUSED, TAG_OUTCOME, TRIGGER_SENSOR

PROGRESS_EVERY_SECONDS = 10.0


def _worked(counts: dict[str, int], total: int) -> str:
    outcomes = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "none"
    return f"{sum(counts.values())} of {total} order(s) worked: {outcomes}"


class DueOrder(dg.Config):
    order_id: str = Field(description="BitLoot order uuid, canonical (the sweep's)")
    reason: str = Field(description="Why the sweep takes it up, e.g. 'stuck in paid for 20 min'")


class BacklogRequest(dg.Config):
    orders: list[DueOrder] = Field(description="The due orders, oldest first; at most batch_max_orders are worked")


@dg.op
def work_backlog(
    context: dg.OpExecutionContext,
    config: BacklogRequest,
    store: StoreResource,
    nowpayments: NowPaymentsResource,
    kinguin: KinguinResource,
    r2: R2Resource,
    mailer: ResendResource,
    policy: RecoveryPolicyResource,
) -> dg.Output[dict[str, int]]:
    """Work every order on `batch_workers` threads. An order's failure is that order's outcome (`retry_later`
    after its retries), never the run's; a killed run leaves each order it held to its lapsing lease."""
    orders = config.orders[: policy.batch_max_orders]
    try:  # the sweep gives canonical ids; a hand-made config is checked before anything is claimed
        reasons = {fulfilment.parse_order_id(due.order_id): due.reason for due in orders}
    except InvalidRequest as exc:  # an operator's typo: refused, and nobody is paged
        context.instance.add_run_tags(context.run_id, {TAG_OUTCOME: OUTCOME_REFUSED})
        raise dg.Failure(description=f"fulfill_backlog refused: {exc}", allow_retries=False) from None
    repo = store.get_store().sharing_flags(SWITCHES_MAX_AGE_SECONDS)
    vault, schedule = r2.get_vault(), policy.retry_schedule()
    hold_event_connections(context.instance)
    add_order_partitions(context.instance, list(reasons))

    @contextmanager
    def open_services() -> Iterator[Services]:
        with ExitStack() as stack:
            yield Services(
                store=repo, vault=vault,
                nowpayments=stack.enter_context(nowpayments.get_client()),
                kinguin=stack.enter_context(kinguin.get_client()),
                mailer=stack.enter_context(mailer.get_client()),
                sender=mailer.sender, frontend_url=policy.frontend_url, presign_seconds=r2.presign_expiry_seconds,
            )

    def work(services: Services, order_id: str) -> AttemptResult:
        who = Who(run_id=context.run_id, trigger=TRIGGER_SENSOR, actor=SENSOR_ACTOR, reason=reasons[order_id])
        return work_order(services, order_id, who=who, policy=policy, schedule=schedule)

    context.log.info(f"working {len(reasons)} order(s) on {policy.batch_workers} worker(s)")
    counts: dict[str, int] = {}
    said = time.monotonic()
    # Every event is a write to Dagster's storage: an attempt's event (its outcome) as soon as it ends; the run's
    # log gets a line per order only for attempts without an event, plus a running count.
    for result in backlog.drain(list(reasons), workers=policy.batch_workers, open_services=open_services,
                                work=work):
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
        if result.recorded or result.outcome == OUTCOME_REFUSED:  # every attempt on the order, refusals too
            context.log_event(attempt_event(
                result.order_id, outcome=result.outcome, reason=result.reason, trigger=TRIGGER_SENSOR,
                actor=SENSOR_ACTOR, run_id=context.run_id, job=context.job_name))
        else:
            context.log.info(f"order {result.order_id}: {result.outcome} ({result.reason})")
        if time.monotonic() - said >= PROGRESS_EVERY_SECONDS:
            said = time.monotonic()
            context.log.info(_worked(counts, len(reasons)))
    unworked = len(reasons) - sum(counts.values())
    if unworked:
        context.log.warning(f"{unworked} order(s) not worked by this run; the sweep takes them up again")
    context.log.info(_worked(counts, len(reasons)))
    return dg.Output(counts, metadata={"orders": len(reasons), **{k: v for k, v in sorted(counts.items())}})
