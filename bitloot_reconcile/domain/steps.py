"""The recovery of one order as one table: each step declared once (docs/design.md section 4). No Dagster here.

A row says what the step does (`run`, over `domain.fulfilment`), which of BitLoot's switches holds it first
(`hold`), which outside systems it calls (`calls`), how its failures are retried (`retry`), whether it polls
within the run (`polls_while`), what a failure that outlasts the retries means (`gives_up`: by default the
order's attempt fails and records `retry_later`) and what the dry run says of it (`plan`, with read calls only).

Three drivers walk the table: the `fulfill_order` job (one op per row, generated in `ops.fulfill_order`), the
batch (`domain.attempt`, one order after another) and the dry run (`domain.planning`). The claim comes first
in each (`claim`); what the dry run says of it is the planner's own derivation of the holds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from bitloot_reconcile.adapters.errors import TransientError
from bitloot_reconcile.adapters.kinguin import KinguinClient, KinguinKey, KinguinOrder, KinguinProduct
from bitloot_reconcile.adapters.nowpayments import NowPaymentsClient
from bitloot_reconcile.adapters.r2 import KeyVault
from bitloot_reconcile.adapters.resend import ResendClient
from bitloot_reconcile.domain import fulfilment, remedies, switches
from bitloot_reconcile.domain.delivery import key_object_path
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.fulfilment import PaymentReader, PlaceSupplierOrder, Stop
from bitloot_reconcile.domain.outcomes import Outcome, Progress
from bitloot_reconcile.domain.recording import record_refusal
from bitloot_reconcile.domain.remedies import NO_REMEDY, REMEDY_ACTION, PriceBound, Remedy
from bitloot_reconcile.domain.switches import Switches
from bitloot_reconcile.store.repository import EmailBounce, Order, ReconcileState, Store
from bitloot_reconcile.store.statuses import OrderStatus
from bitloot_reconcile.tags import TRIGGER_ADMIN, TRIGGER_REEXECUTION

CLAIM_STEP = "load_and_claim"  # the first step of every driver, before the table's rows


@dataclass(frozen=True)
class Who:
    """Who works the order, as its audit rows and history record it."""

    run_id: str
    trigger: str
    actor: str | None
    reason: str | None
    parent_run_id: str | None = None  # a re-execution's parent run

    @property
    def admin(self) -> bool:
        """A person's run with a reason: it may work a quarantined order and ignores the sweep's switches."""
        return self.trigger == TRIGGER_ADMIN or (self.trigger == TRIGGER_REEXECUTION and self.reason is not None)


@dataclass(frozen=True)
class Services:
    """What a step works with: the store (one attempt's view of it) and the clients of the systems it calls.
    A batch worker holds one for its orders; a `fulfill_order` step opens the same fields on first use."""

    store: Store
    nowpayments: NowPaymentsClient
    kinguin: KinguinClient
    vault: KeyVault
    mailer: ResendClient
    sender: str
    frontend_url: str
    presign_seconds: int


class KinguinReader(Protocol):
    def get_order(self, order_id: str) -> KinguinOrder: ...
    def search_orders(self, *, order_external_id: str | None = None) -> list[KinguinOrder]: ...
    def get_keys(self, order_id: str, *, expected: int | None = None) -> list[KinguinKey]: ...
    def get_product(self, product_id: str) -> KinguinProduct | None: ...


class VaultReader(Protocol):
    def exists(self, path: str) -> bool: ...


@dataclass
class DryRun:
    """What the dry run knows of one order as it walks the steps: the rows the caller loaded, read-only
    clients, and what the steps so far would do (`said`)."""

    order: Order
    state: ReconcileState
    assignments: dict[str, str]
    kinguin: KinguinReader
    payments: PaymentReader
    vault: VaultReader
    switches: Switches
    bounce: EmailBounce | None
    said: list[str] = field(default_factory=list)
    kinguin_order_id: str | None = None  # the Kinguin order the run would use
    placing: bool = False  # the run would place a Kinguin order: what follows cannot be read yet


@dataclass(frozen=True)
class Hold:
    """One of BitLoot's switches, checked before a step: in a run (`before_run`, reading the flags now) and in
    the dry run (`before_plan`)."""

    switch: str
    before_run: Callable[[Store, Progress], Progress]
    before_plan: Callable[[DryRun], Stop | None]


KINGUIN_HOLD = Hold(
    "kinguin_enabled", switches.hold_before_kinguin,
    lambda dry: switches.kinguin_held(dry.switches, dry.order),
)
EMAIL_HOLD = Hold(
    "email_notifications_enabled, the address's bounces", switches.hold_before_email,
    lambda dry: None if dry.order.completion_email_sent else switches.email_stop(dry.switches, dry.bounce),
)


@dataclass(frozen=True)
class Retry:
    """A retry class: how often a failing step is tried again, waiting `delay_seconds` doubling each time, with
    jitter; a service's Retry-After is honoured up to the policy's `max_retry_wait_seconds`."""

    max_retries: int
    delay_seconds: float


TRANSIENT = Retry(max_retries=3, delay_seconds=1.0)  # outages; bad input and refusals are never retried


def retry_after(error: Exception, cap: float) -> float | None:
    """The wait a service asked for (Retry-After), never past `cap` (the policy's `max_retry_wait_seconds`,
    well inside the lease, which the next try renews); None when it asked for none."""
    if isinstance(error, TransientError) and error.retry_after:
        return min(error.retry_after, cap)
    return None


@dataclass(frozen=True)
class Step:
    name: str  # the job's op name: the UI's step, re-execution's step selection
    does: str
    run: Callable[[Services, Progress], Progress]
    plan: Callable[[DryRun], Stop | None]  # appends what it would do to `said`; a Stop ends the dry run
    calls: frozenset[str] = frozenset()  # outside systems: nowpayments, kinguin, r2, resend
    hold: Hold | None = None
    retry: Retry = TRANSIENT
    # Run again, after the policy's `supplier_poll_seconds`, up to `supplier_poll_attempts` times, while it
    # ends with this outcome; longer waits end the run and the sweep returns.
    polls_while: Outcome | None = None
    # A failure that outlasted the retries: the progress to end the run with instead of failing, or None.
    gives_up: Callable[[Progress, Exception], Progress | None] | None = None


def run(step: Step, services: Services, progress: Progress) -> Progress:
    """One try of a step: its switch first, then its work; a finished progress passes straight through."""
    if progress.finished:
        return progress
    if step.hold is not None:
        progress = step.hold.before_run(services.store, progress)
    return step.run(services, progress)


def claim(store: Store, order_id: str, who: Who, *, lease_ttl: dt.timedelta, bound: PriceBound,
          remedy: Remedy = NO_REMEDY) -> Progress:
    """Check the request against the store, take the order's lease under `who.run_id` (or end as held, busy or
    already fulfilled), write the `requested` audit row (and the remedy's); a `resolution` remedy ends the
    order here. A request refused as an input error changes nothing: its `refused` audit row is written and the
    progress carries the refusal."""
    try:
        remedies.refuse_remedy_on_sweep_run(remedy, admin=who.admin)
        if who.trigger == TRIGGER_REEXECUTION and not who.admin:
            fulfilment.refuse_quarantined(store.get_state(order_id))
        progress = switches.hold_before_claim(
            store, order_id, owner=who.run_id, admin=who.admin
        ) or fulfilment.load_and_claim(
            store, order_id, owner=who.run_id, lease_ttl=lease_ttl, admin=who.admin, remedy=remedy, bound=bound,
        )
        if remedy.resolution:
            progress = fulfilment.resolve_by_hand(store, remedy.resolution, progress)
    except InvalidRequest as exc:
        record_refusal(store, order_id, run_id=who.run_id, trigger=who.trigger, actor=who.actor, reason=who.reason,
                       why=str(exc))
        return Progress(order_id=order_id, lease_owner=who.run_id).refuse(str(exc))
    store.append_audit(
        order_id=order_id, action="requested", trigger=who.trigger, actor=who.actor, reason=who.reason,
        run_id=who.run_id, outcome=progress.outcome.value if progress.outcome else None,
        detail=f"re-execution of run {who.parent_run_id}" if who.parent_run_id else None,
    )
    if remedy:
        store.append_audit(order_id=order_id, action=REMEDY_ACTION, trigger=who.trigger, actor=who.actor,
                           reason=who.reason, run_id=who.run_id, outcome=None, detail=remedy.label)
    return progress


# -- what each step does, in the run and in the dry run ------------------------------------------------------
def _plan_payment(dry: DryRun) -> Stop | None:
    payment = fulfilment.decide_payment(dry.order, dry.payments)
    if isinstance(payment, Stop):
        return payment
    if payment is not None:
        dry.said.append(f"verify payment ({payment.evidence}) and mark paid")
    return None


def placement_refusal(decision: PlaceSupplierOrder, kinguin: KinguinReader) -> Stop | None:
    """What Kinguin would answer the placement, from its offers now (the check a run with a price ceiling
    makes before it places)."""
    return fulfilment.offers_now(decision.lines, kinguin)[1]


def _plan_supplier_order(dry: DryRun) -> Stop | None:
    supplier = fulfilment.decide_supplier_order(dry.order, dry.state, dry.kinguin)
    if supplier is None or isinstance(supplier, Stop):
        return supplier
    if isinstance(supplier, PlaceSupplierOrder):
        wanted = ", ".join(f"{line.qty} x {line.product_id} at <= {line.price:.2f}" for line in supplier.lines)
        dry.said.append(f"place Kinguin order ({wanted})")
        dry.placing = True
        return placement_refusal(supplier, dry.kinguin)
    if supplier.found_by_search:
        dry.said.append(f"adopt Kinguin order {supplier.kinguin_order_id} ({supplier.why})")
    dry.kinguin_order_id = supplier.kinguin_order_id
    return None


def _plan_poll(dry: DryRun) -> Stop | None:
    if dry.placing:
        dry.said.append("poll it (waiting for supplier if Kinguin has not delivered yet)")
        return None
    if dry.kinguin_order_id is None:
        return None
    supplier_order = fulfilment.read_supplier_order(dry.kinguin, dry.kinguin_order_id)
    dry.said.append(f"poll Kinguin order {dry.kinguin_order_id} "
                    f"({supplier_order.status if supplier_order else 'unknown'})")
    return fulfilment.decide_after_poll(dry.order, dry.kinguin_order_id, supplier_order)


def _plan_keys(dry: DryRun) -> Stop | None:
    order = dry.order
    if dry.placing:
        dry.said.append("collect and store keys")
        return None
    if dry.kinguin_order_id is None or all(item.delivered for item in order.items):
        return None
    keys = dry.kinguin.get_keys(dry.kinguin_order_id, expected=len(order.items))
    match = fulfilment.match_keys(order, keys, dry.assignments)
    dry.said.append(f"collect {len(keys)} delivered key(s)")
    if match.pairs:
        stored = sum(dry.vault.exists(key_object_path(order.id, item.id, key.type)) for item, key, _ in match.pairs)
        earlier = f", {stored} already in R2 from an earlier attempt" if stored else ""
        dry.said.append(f"store {len(match.pairs)} key(s) in R2{earlier}")
    if match.missing:
        return fulfilment.keys_still_missing(order, match.missing)
    return None


def _plan_fulfilled(dry: DryRun) -> Stop | None:
    if dry.order.status != OrderStatus.FULFILLED:
        dry.said.append("mark fulfilled")
    return None


def _plan_email(dry: DryRun) -> Stop | None:
    if not dry.order.completion_email_sent:
        dry.said.append("send completion email")
    return None


def _email_deferred(progress: Progress, error: Exception) -> Progress | None:
    """The order is fulfilled here: when Resend stays down, end well and let the sweep send it later."""
    return fulfilment.email_deferred(progress, error) if isinstance(error, TransientError) else None


STEPS: tuple[Step, ...] = (
    Step("verify_payment", "paid passes; waiting/confirming/failed pass on a confirmed payment, then move to paid",
         run=lambda s, p: fulfilment.verify_payment(s.store, s.nowpayments, p), plan=_plan_payment,
         calls=frozenset({"nowpayments"})),
    Step("ensure_supplier_order", "reuse, adopt or place the one Kinguin order of the BitLoot order",
         run=lambda s, p: fulfilment.ensure_supplier_order(s.store, s.kinguin, p), plan=_plan_supplier_order,
         calls=frozenset({"kinguin"}), hold=KINGUIN_HOLD),
    Step("poll_supplier", "a short in-run poll while Kinguin is processing; longer waits end the run",
         run=lambda s, p: fulfilment.poll_supplier(s.store, s.kinguin, p), plan=_plan_poll,
         calls=frozenset({"kinguin"}), hold=KINGUIN_HOLD, polls_while=Outcome.WAITING_FOR_SUPPLIER),
    Step("store_keys", "fetch, decode and store the keys in one step: key serials never leave its memory",
         run=lambda s, p: fulfilment.store_keys(s.store, s.kinguin, s.vault, p, presign_seconds=s.presign_seconds),
         plan=_plan_keys, calls=frozenset({"kinguin", "r2"}), hold=KINGUIN_HOLD),
    Step("mark_fulfilled", "fulfilled once every item has its key stored and recorded",
         run=lambda s, p: fulfilment.mark_fulfilled(s.store, p), plan=_plan_fulfilled),
    Step("send_completion_email", "at most one completion email; when Resend stays down the sweep sends it later",
         run=lambda s, p: fulfilment.send_completion_email(s.store, s.mailer, p, sender=s.sender,
                                                           frontend_url=s.frontend_url),
         plan=_plan_email, calls=frozenset({"resend"}), hold=EMAIL_HOLD, gives_up=_email_deferred),
)


def dry_run(dry: DryRun) -> Stop:
    """How a run would end after its claim: the steps' holds and decisions, with read calls only."""
    for step in STEPS:
        if step.hold is not None and (held := step.hold.before_plan(dry)):
            return held
        if stop := step.plan(dry):
            return stop
    return Stop(Outcome.FULFILLED, fulfilment.FULFILLED_REASON)
