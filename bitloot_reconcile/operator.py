"""The operator's commands as plain functions (plan, history, retry, report); `cli.py` only parses and prints.

Settings come from the environment under the names of DESIGN section 3, the same ones the code location reads.
`plan`, `history` and `report` only read: Kinguin, NOWPayments and R2 see GET/HEAD requests, the store sees
SELECTs. `retry` validates like the launchpad before anything is submitted or run.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from bitloot_reconcile.adapters.kinguin import KinguinClient
from bitloot_reconcile.adapters.nowpayments import NowPaymentsClient
from bitloot_reconcile.adapters.r2 import KeyVault, resolve_endpoint
from bitloot_reconcile.domain import reconciliation
from bitloot_reconcile.domain.fulfilment import parse_order_id, refusal, validate_admin_request
from bitloot_reconcile.domain.outcomes import InvalidRequest
from bitloot_reconcile.domain.planning import Plan, plan_order
from bitloot_reconcile.domain.switches import read_switches
from bitloot_reconcile.resources.policy import ReconcilePolicy
from bitloot_reconcile.settings import env
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.repository import Order, ReconcileState, Store, utcnow
from bitloot_reconcile.tags import TRIGGER_ADMIN, request_tags

# What a `fulfill_order` run needs besides the defaults (definitions.build_resources reads the same names).
RUN_SETTINGS = ("DATABASE_URL", "KINGUIN_API_KEY", "NOWPAYMENTS_API_KEY", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY",
                "RESEND_API_KEY")
GRAPHQL_TIMEOUT_SECONDS = 30

if TYPE_CHECKING:
    import pandas as pd


class MissingSetting(RuntimeError):
    """An environment variable the command needs is not set."""


def setting(name: str) -> str:
    try:
        return env(name)
    except RuntimeError as exc:
        raise MissingSetting(str(exc)) from None


def r2_endpoint() -> str:
    try:
        return resolve_endpoint(os.environ.get("R2_ENDPOINT"), os.environ.get("R2_ACCOUNT_ID"))
    except ValueError as exc:
        raise MissingSetting(f"{exc} (the R2 endpoint)") from None


@contextmanager
def open_store() -> Iterator[Store]:
    engine = create_store_engine(setting("DATABASE_URL"))
    try:
        yield Store(engine)
    finally:
        engine.dispose()


@dataclass
class Readers:
    """The store and the three outside systems, for the read-only commands."""

    store: Store
    kinguin: KinguinClient
    nowpayments: NowPaymentsClient
    vault: KeyVault


@contextmanager
def open_readers() -> Iterator[Readers]:
    with ExitStack() as stack:
        store = stack.enter_context(open_store())
        kinguin = stack.enter_context(KinguinClient(setting("KINGUIN_BASE_URL"), setting("KINGUIN_API_KEY")))
        nowpayments = stack.enter_context(
            NowPaymentsClient(setting("NOWPAYMENTS_BASE"), setting("NOWPAYMENTS_API_KEY"))
        )
        vault = stack.enter_context(
            KeyVault(r2_endpoint(), setting("R2_ACCESS_KEY_ID"), setting("R2_SECRET_ACCESS_KEY"), setting("R2_BUCKET"))
        )
        yield Readers(store, kinguin, nowpayments, vault)


# ------------------------------------------------------------------------------------------------- plan
def plan(readers: Readers, *, order_ids: tuple[str, ...] = (), limit: int = 100,
         now: dt.datetime | None = None) -> list[Plan]:
    """The next run of every stuck order the sweep would pick (policy defaults), or of the given orders as an
    admin retry would run them. Nothing is written anywhere."""
    now = now or utcnow()
    store = readers.store
    if order_ids:
        ids = [parse_order_id(raw) for raw in order_ids]
    else:
        policy = ReconcilePolicy()
        stuck = store.find_stuck_orders(
            now=now, grace=dt.timedelta(minutes=policy.grace_minutes),
            max_age=dt.timedelta(days=policy.max_age_days), limit=limit,
        )
        ids = [order.id for order in stuck]
    switches = read_switches(store)
    plans = []
    for order_id in ids:
        order = _existing(store, order_id)
        plans.append(plan_order(
            order, store.get_state(order_id), store.key_assignments(order_id), kinguin=readers.kinguin,
            payments=readers.nowpayments, vault=readers.vault, switches=switches,
            bounce=store.email_suppression(order.email), now=now, admin=bool(order_ids),
        ))
    return plans


def _existing(store: Store, order_id: str) -> Order:
    order = store.load_order(order_id)
    if order is None:
        raise InvalidRequest(f"Order {order_id} not found")
    return order


# ------------------------------------------------------------------------------------------------- history
@dataclass(frozen=True)
class History:
    order: Order | None
    state: ReconcileState
    audit: list[dict]


def history(store: Store, raw_order_id: str) -> History:
    order_id = parse_order_id(raw_order_id)
    order, audit = store.load_order(order_id), store.audit_trail(order_id)
    if order is None and not audit:
        raise InvalidRequest(f"Order {order_id} not found and never reconciled")
    return History(order, store.get_state(order_id), audit)


# ------------------------------------------------------------------------------------------------- retry
def validate_retry(store: Store, raw_order_id: str, reason: str, requested_by: str) -> str:
    """The launchpad's checks, before anything is submitted: a valid id, a reason and a requester, an order
    the run would not refuse."""
    order_id = parse_order_id(raw_order_id)
    validate_admin_request(reason, requested_by)
    refused = refusal(_existing(store, order_id), admin=True)
    if refused:
        raise InvalidRequest(refused)
    return order_id


def _run_request(order_id: str, reason: str, requested_by: str) -> tuple[dict, dict]:
    config = {"order_id": order_id, "reason": reason, "requested_by": requested_by}
    return config, request_tags(order_id, trigger=TRIGGER_ADMIN, reason=reason, requested_by=requested_by)


def submit_retry(dagster_url: str, order_id: str, reason: str, requested_by: str) -> str:
    """Submit `fulfill_order` to a running Dagster webserver; returns the run id."""
    from dagster_graphql import DagsterGraphQLClient

    from bitloot_reconcile.jobs import fulfill_order

    url = urlsplit(dagster_url if "://" in dagster_url else f"http://{dagster_url}")
    client = DagsterGraphQLClient(url.hostname or "localhost", port_number=url.port, use_https=url.scheme == "https",
                                  timeout=GRAPHQL_TIMEOUT_SECONDS, path_prefix=url.path.rstrip("/"))
    config, tags = _run_request(order_id, reason, requested_by)
    return client.submit_job_execution(fulfill_order.name, run_config=config, tags=tags)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    success: bool
    outcome: str | None
    reason: str | None
    errors: tuple[str, ...] = ()


def run_retry(store: Store, order_id: str, reason: str, requested_by: str) -> RunResult:
    """Run `fulfill_order` in this process with the code location's resources (from the environment) on the
    instance of DAGSTER_HOME, or an ephemeral one when it is unset."""
    import dagster as dg

    from bitloot_reconcile.definitions import build_resources
    from bitloot_reconcile.jobs import fulfill_order

    for name in RUN_SETTINGS:
        setting(name)
    r2_endpoint()
    config, tags = _run_request(order_id, reason, requested_by)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    with instance:
        result = fulfill_order.execute_in_process(
            run_config=config, resources=build_resources(), instance=instance, tags=tags, raise_on_error=False
        )
    state = store.get_state(order_id)
    if result.success:
        return RunResult(result.run_id, True, result.output_for_node("record_outcome"), state.last_reason)
    errors = tuple(
        event.step_failure_data.error.message.strip()
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error
    )
    recorded = state.last_run_id == result.run_id  # the failure hook records only runs that held the lease
    return RunResult(result.run_id, False, state.last_outcome if recorded else None,
                     state.last_reason if recorded else None, errors)


# ------------------------------------------------------------------------------------------------- report
def report(readers: Readers, since: dt.datetime, until: dt.datetime, *,
           progress: reconciliation.Progress | None = None) -> pd.DataFrame:
    """The same report as the `reconciliation_report` asset, for any window."""
    return reconciliation.build_report(readers.store, readers.kinguin, readers.nowpayments, readers.vault,
                                       since, until, progress=progress)
