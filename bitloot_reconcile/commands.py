"""The operator's commands as plain functions (plan, board, history, retry, report); `cli.py` only parses and
prints.

Every command reads the environment through `settings.load_settings`, the same object the code location
uses, so `plan` sees the sweep's `RECONCILE_*` tunables. `plan`, `board`, `history` and `report` only read: Kinguin,
NOWPayments and R2 see GET/HEAD requests, the store sees SELECTs. `retry` validates like the launchpad before
anything is submitted or run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from bitloot_reconcile.adapters.kinguin import KinguinClient
from bitloot_reconcile.adapters.nowpayments import NowPaymentsClient
from bitloot_reconcile.adapters.r2 import KeyVault, resolve_endpoint
from bitloot_reconcile.domain import reconciliation
from bitloot_reconcile.domain.board import Board, load_board
from bitloot_reconcile.domain.fulfilment import parse_order_id, refusal, validate_admin_request
from bitloot_reconcile.domain.outcomes import InvalidRequest
from bitloot_reconcile.domain.planning import Plan, plan_order
from bitloot_reconcile.domain.switches import read_switches
from bitloot_reconcile.settings import RUN_SECRETS, Settings, SettingsError, Tunables
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.repository import Order, ReconcileState, Store, utcnow
from bitloot_reconcile.tags import TRIGGER_ADMIN, request_tags

GRAPHQL_TIMEOUT_SECONDS = 30

if TYPE_CHECKING:
    import pandas as pd


def r2_endpoint(settings: Settings) -> str:
    try:
        return resolve_endpoint(settings.r2_endpoint, settings.r2_account_id)
    except ValueError as exc:
        raise SettingsError(f"{exc} (the R2 endpoint)") from None


@contextmanager
def open_store(settings: Settings) -> Iterator[Store]:
    engine = create_store_engine(settings.secret("database_url"))
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
def open_readers(settings: Settings) -> Iterator[Readers]:
    with ExitStack() as stack:
        store = stack.enter_context(open_store(settings))
        kinguin = stack.enter_context(KinguinClient(settings.kinguin_base_url, settings.secret("kinguin_api_key")))
        nowpayments = stack.enter_context(
            NowPaymentsClient(settings.nowpayments_base, settings.secret("nowpayments_api_key"))
        )
        vault = stack.enter_context(
            KeyVault(r2_endpoint(settings), settings.secret("r2_access_key_id"),
                     settings.secret("r2_secret_access_key"), settings.r2_bucket)
        )
        yield Readers(store, kinguin, nowpayments, vault)


# ------------------------------------------------------------------------------------------------- plan
def plan(readers: Readers, tunables: Tunables, *, order_ids: tuple[str, ...] = (), limit: int = 100,
         now: dt.datetime | None = None) -> list[Plan]:
    """The next run of every stuck order the sweep would pick (with the sweep's grace period and age window),
    or of the given orders as an admin retry would run them. Nothing is written anywhere."""
    now = now or utcnow()
    store = readers.store
    if order_ids:
        ids = [parse_order_id(raw) for raw in order_ids]
    else:
        stuck = store.find_stuck_orders(
            now=now, grace=dt.timedelta(minutes=tunables.grace_minutes),
            max_age=dt.timedelta(days=tunables.max_age_days), limit=limit,
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


# ------------------------------------------------------------------------------------------------- board
def in_flight_runs(settings: Settings) -> dict[str, str]:
    """Order id -> its queued or running run, from the Dagster instance of DAGSTER_HOME. Without one, an order
    shows as in flight only while a run holds its lease."""
    if not settings.dagster_home:
        return {}
    import dagster as dg

    from bitloot_reconcile.sensors.sweep import runs_in_flight

    with dg.DagsterInstance.get() as instance:
        return runs_in_flight(instance)


def board(store: Store, tunables: Tunables, *, in_flight: dict[str, str], now: dt.datetime | None = None) -> Board:
    """Every order that is not done and its state, with the sweep's grace period and age window (the
    `order_backlog` asset's view)."""
    return load_board(store, in_flight=in_flight, now=now or utcnow(),
                      grace=dt.timedelta(minutes=tunables.grace_minutes),
                      max_age=dt.timedelta(days=tunables.max_age_days))


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


def run_retry(settings: Settings, store: Store, order_id: str, reason: str, requested_by: str) -> RunResult:
    """Run `fulfill_order` in this process with the code location's resources (from the environment) on the
    instance of DAGSTER_HOME, or an ephemeral one when it is unset."""
    import dagster as dg

    from bitloot_reconcile.definitions import build_resources
    from bitloot_reconcile.jobs import fulfill_order

    for name in RUN_SECRETS:  # the resources read them as EnvVar only when the run starts: check first
        settings.secret(name)
    r2_endpoint(settings)
    config, tags = _run_request(order_id, reason, requested_by)
    instance = dg.DagsterInstance.get() if settings.dagster_home else dg.DagsterInstance.ephemeral()
    with instance:
        result = fulfill_order.execute_in_process(
            run_config=config, resources=build_resources(settings), instance=instance, tags=tags,
            raise_on_error=False,
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
           progress: reconciliation.ReportProgress | None = None) -> pd.DataFrame:
    """The same report as the `reconciliation_report` asset, for any window."""
    return reconciliation.build_report(readers.store, readers.kinguin, readers.nowpayments, readers.vault,
                                       since, until, progress=progress)
