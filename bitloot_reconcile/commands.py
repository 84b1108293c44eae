"""The operator's commands as plain functions (plan, board, history, retry, report); `cli.py` only parses and
prints.

Every command reads the environment through `settings.load_settings`, the same object the code location
uses, so `plan` sees the sweep's `RECONCILE_*` tunables. `plan`, `board`, `history` and `report` only read: Kinguin,
NOWPayments and R2 see GET/HEAD requests, the store sees SELECTs. `retry` runs the launchpad's check before
anything is submitted or run, and every run it starts is in a Dagster instance the UI shows: the webserver's,
or the one of DAGSTER_HOME.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from bitloot_reconcile.adapters.kinguin import KinguinClient
from bitloot_reconcile.adapters.nowpayments import NowPaymentsClient
from bitloot_reconcile.adapters.r2 import KeyVault, resolve_endpoint
from bitloot_reconcile.domain import reconciliation
from bitloot_reconcile.domain.board import Board, load_board
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.fulfilment import check_launch, parse_order_id, refusal
from bitloot_reconcile.domain.planning import Plan, plan_order
from bitloot_reconcile.domain.remedies import (
    NO_REMEDY,
    REMEDY_ACTION,
    PriceBound,
    Remedy,
    remedy_refusal,
)
from bitloot_reconcile.domain.switches import read_switches
from bitloot_reconcile.settings import RUN_SECRETS, ReconcileVariables, Settings, SettingsError
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.repository import Order, ReconcileState, Store, utcnow
from bitloot_reconcile.tags import (
    OUTCOME_REFUSED,
    TAG_ORDER_ID,
    TAG_OUTCOME,
    TAG_REASON,
    TAG_REMEDY,
    TAG_REQUESTED_BY,
    TAG_TRIGGER,
    TRIGGER_ADMIN,
    request_tags,
)

GRAPHQL_TIMEOUT_SECONDS = 30

if TYPE_CHECKING:
    import pandas as pd
    from dagster import DagsterInstance


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
def plan(readers: Readers, tunables: ReconcileVariables, *, order_ids: tuple[str, ...] = (), limit: int = 100,
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

    from bitloot_reconcile.runs_in_flight import runs_in_flight

    with dg.DagsterInstance.get() as instance:
        return runs_in_flight(instance)


def board(store: Store, tunables: ReconcileVariables, *, in_flight: dict[str, str],
          now: dt.datetime | None = None) -> Board:
    """Every order that is not done and its state, with the sweep's grace period and age window (the
    `order_backlog` asset's view)."""
    return load_board(store, in_flight=in_flight, now=now or utcnow(),
                      grace=dt.timedelta(minutes=tunables.grace_minutes),
                      max_age=dt.timedelta(days=tunables.max_age_days))


# ------------------------------------------------------------------------------------------------- history
@dataclass(frozen=True)
class Attempt:
    """One run's part in an order's history: who asked and why, and how it ended."""

    started_at: dt.datetime | None
    run_id: str | None
    trigger: str
    actor: str | None
    reason: str | None
    outcome: str | None  # an `Outcome` value, `refused`, or None when the run recorded none
    detail: str | None  # the outcome's reason, or the failure of a run that recorded nothing
    status: str | None = None  # the Dagster run's status, when the instance of DAGSTER_HOME was read
    remedy: str | None = None  # an admin's remedy for the run (`Remedy.label`)

    @property
    def in_progress(self) -> bool:
        return self.status in IN_PROGRESS_STATUSES


IN_PROGRESS_STATUSES = frozenset({"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"})


@dataclass(frozen=True)
class History:
    order_id: str
    order: Order | None
    state: ReconcileState
    attempts: list[Attempt]
    dagster_home: str | None  # whose runs were added; None: the audit table alone


def history(store: Store, raw_order_id: str, *, dagster_home: str | None = None) -> History:
    """The order's attempts from the audit table, plus (with `dagster_home`) its runs in that Dagster instance
    that left no audit row: runs that failed before they took the order, or are still queued or running."""
    order_id = parse_order_id(raw_order_id)
    order, audit = store.load_order(order_id), store.audit_trail(order_id)
    attempts = audit_attempts(audit)
    if dagster_home:
        attempts = with_dagster_runs(attempts, _runs_of_order(order_id))
    if order is None and not attempts:
        raise InvalidRequest(f"Order {order_id} not found and never reconciled")
    return History(order_id, order, store.get_state(order_id), attempts, dagster_home)


def audit_attempts(audit: list[dict]) -> list[Attempt]:
    """One attempt per run (its `requested` row says who and why, its last row with an outcome how it
    ended); a row without a run id stands alone."""
    by_run: dict[str, list[dict]] = {}
    groups: list[list[dict]] = []
    for row in audit:
        if row["run_id"] and row["run_id"] in by_run:
            by_run[row["run_id"]].append(row)
            continue
        groups.append([row])
        if row["run_id"]:
            by_run[row["run_id"]] = groups[-1]
    attempts = []
    for rows in groups:
        first = rows[0]
        ended = [r for r in rows if r["action"] != REMEDY_ACTION and (r["outcome"] or r["action"] == OUTCOME_REFUSED)]
        last = ended[-1] if ended else None
        remedy = next((r["detail"] for r in rows if r["action"] == REMEDY_ACTION), None)
        attempts.append(Attempt(
            started_at=first["created_at"], run_id=first["run_id"], trigger=first["trigger"], actor=first["actor"],
            reason=first["reason"], outcome=(last["outcome"] or last["action"]) if last else None,
            detail=last["detail"] if last else None, remedy=remedy,
        ))
    return attempts


def with_dagster_runs(attempts: list[Attempt], runs: list[Attempt]) -> list[Attempt]:
    """The audit's attempts with their runs' status, and the runs the audit never saw, oldest first."""
    by_id = {run.run_id: run for run in runs}
    known = {attempt.run_id for attempt in attempts}
    merged = [
        replace(a, status=by_id[a.run_id].status if a.run_id in by_id else None,
                remedy=a.remedy or (by_id[a.run_id].remedy if a.run_id in by_id else None))
        for a in attempts
    ] + [r for r in runs if r.run_id not in known]
    oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
    return sorted(merged, key=lambda a: a.started_at or oldest)


def _runs_of_order(order_id: str) -> list[Attempt]:
    """The `fulfill_order` runs tagged with the order in the instance of DAGSTER_HOME."""
    import dagster as dg

    with open_instance() as instance:
        records = instance.get_run_records(filters=dg.RunsFilter(tags={TAG_ORDER_ID: order_id}))
        return [
            Attempt(
                started_at=_utc(record.create_timestamp), run_id=record.dagster_run.run_id,
                trigger=record.dagster_run.tags.get(TAG_TRIGGER, "?"),
                actor=record.dagster_run.tags.get(TAG_REQUESTED_BY), reason=record.dagster_run.tags.get(TAG_REASON),
                outcome=record.dagster_run.tags.get(TAG_OUTCOME),
                detail=_failure(instance, record.dagster_run.run_id)
                if record.dagster_run.status == dg.DagsterRunStatus.FAILURE else None,
                status=record.dagster_run.status.value, remedy=record.dagster_run.tags.get(TAG_REMEDY),
            )
            for record in records
        ]


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _failure(instance, run_id: str) -> str | None:
    """The first failed step's one-line description (a `dg.Failure`'s), else the last line of its error."""
    import dagster as dg

    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        data = entry.dagster_event.step_failure_data if entry.dagster_event else None
        if data is None:
            continue
        if data.user_failure_data and data.user_failure_data.description:
            return f"{entry.step_key}: {data.user_failure_data.description}"
        if data.error:
            return f"{entry.step_key}: {data.error.message.strip().splitlines()[-1]}"
    return None


@contextmanager
def open_instance() -> Iterator[DagsterInstance]:
    """The Dagster instance of DAGSTER_HOME: the one the daemon and the UI use, so its runs show there."""
    import dagster as dg

    try:
        instance = dg.DagsterInstance.get()
    except dg.DagsterError as exc:  # DAGSTER_HOME unset, not absolute, or not an existing directory
        raise SettingsError(str(exc).split(". ")[0].replace("$DAGSTER_HOME", "DAGSTER_HOME")) from None
    with instance:
        yield instance


# ------------------------------------------------------------------------------------------------- retry
def validate_retry(store: Store, raw_order_id: str, reason: str, requested_by: str, remedy: Remedy = NO_REMEDY,
                   bound: PriceBound | None = None) -> str:
    """The launchpad's check (`fulfilment.check_launch`), then what the launchpad cannot know before the run:
    an order the run would not refuse, and a remedy the order allows (a price ceiling within `bound` over cost)."""
    order_id = check_launch(raw_order_id, reason, requested_by, remedy)
    order = _existing(store, order_id)
    refused = refusal(order, admin=True) or remedy_refusal(order, remedy, bound or PriceBound())
    if refused:
        raise InvalidRequest(refused)
    return order_id


def _run_request(order_id: str, reason: str, requested_by: str, remedy: Remedy = NO_REMEDY) -> tuple[dict, dict]:
    config = {"order_id": order_id, "reason": reason, "requested_by": requested_by, **remedy.as_config()}
    tags = request_tags(order_id, trigger=TRIGGER_ADMIN, reason=reason, requested_by=requested_by,
                        remedy=remedy.label if remedy else None)
    return config, tags


class DagsterUnavailable(Exception):
    """The Dagster webserver could not be reached or did not take the request; the message says which, in one
    line (never the GraphQL query)."""


def webserver_url(dagster_url: str) -> str:
    """`host:port` or a full URL, as the base of the UI's links (no trailing slash)."""
    return (dagster_url if "://" in dagster_url else f"http://{dagster_url}").rstrip("/")


def run_link(dagster_url: str, run_id: str) -> str:
    return f"{webserver_url(dagster_url)}/runs/{run_id}"


def submit_retry(dagster_url: str, order_id: str, reason: str, requested_by: str, remedy: Remedy = NO_REMEDY) -> str:
    """Submit `fulfill_order` to a running Dagster webserver; returns the run id."""
    from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

    from bitloot_reconcile.jobs import fulfill_order

    base = webserver_url(dagster_url)
    url = urlsplit(base)
    client = DagsterGraphQLClient(url.hostname or "localhost", port_number=url.port, use_https=url.scheme == "https",
                                  timeout=GRAPHQL_TIMEOUT_SECONDS, path_prefix=url.path.rstrip("/"))
    config, tags = _run_request(order_id, reason, requested_by, remedy)
    try:
        return client.submit_job_execution(fulfill_order.name, run_config=config, tags=tags)
    except DagsterGraphQLClientError as exc:
        raise DagsterUnavailable(_graphql_failure(exc, base)) from None


WRONG_ADDRESS = "is this the Dagster webserver's address?"


def _graphql_failure(exc: Exception, base: str) -> str:
    """The client's errors in one line. It wraps transport errors in a message quoting the whole query; the
    causes say what happened (gql wraps requests' connection errors and timeouts in its own)."""
    import requests
    from gql.transport.exceptions import TransportConnectionFailed, TransportServerError

    causes = []
    cause = exc.__cause__
    while cause is not None and len(causes) < 10:
        causes.append(cause)
        cause = cause.__cause__
    if any(isinstance(c, requests.ConnectionError | requests.Timeout | TransportConnectionFailed) for c in causes):
        return f"cannot reach Dagster at {base}"
    server = next((c for c in causes if isinstance(c, TransportServerError)), None)
    if server is not None:
        return f"Dagster at {base} answered HTTP {server.code}; {WRONG_ADDRESS}"
    if causes:
        return f"no Dagster GraphQL API at {base} ({type(causes[0]).__name__}); {WRONG_ADDRESS}"
    kind, *message = exc.args  # the client's own verdicts: ('JobNotFoundError', 'message'), ...
    return f"Dagster at {base} did not take the run: {kind}" + (f": {message[0]}" if message else "")


_RUN_QUERY = "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status tags { key value } } } }"
FINISHED_STATUSES = frozenset({"SUCCESS", "FAILURE", "CANCELED"})


def wait_for_run(dagster_url: str, run_id: str, *, timeout: float, poll_seconds: float = 1.0) -> tuple[str, dict]:
    """Poll the webserver until the run has ended; its status and tags."""
    import time

    import httpx

    base = webserver_url(dagster_url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = httpx.post(f"{base}/graphql", json={"query": _RUN_QUERY, "variables": {"id": run_id}},
                                timeout=GRAPHQL_TIMEOUT_SECONDS)
            answer.raise_for_status()
            run = answer.json()["data"]["runOrError"]
        except (httpx.ConnectError, httpx.TimeoutException):
            raise DagsterUnavailable(f"cannot reach Dagster at {base}") from None
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise DagsterUnavailable(f"Dagster at {base} gave no answer about run {run_id} "
                                     f"({type(exc).__name__})") from None
        if run.get("__typename") != "Run":
            raise DagsterUnavailable(f"Dagster at {base} does not know run {run_id} ({run.get('__typename')})")
        if run["status"] in FINISHED_STATUSES:
            return run["status"], {tag["key"]: tag["value"] for tag in run["tags"]}
        if time.monotonic() >= deadline:
            raise DagsterUnavailable(f"run {run_id} still {run['status']} after {timeout:.0f} s; "
                                     f"see {run_link(base, run_id)}")
        time.sleep(poll_seconds)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    success: bool
    outcome: str | None
    reason: str | None
    errors: tuple[str, ...] = ()


def run_outcome(store: Store, order_id: str, run_id: str, tags: dict[str, str]) -> tuple[str | None, str | None]:
    """How a finished run ended for its order: the run's outcome tag, else its last audit row with an
    outcome, else the reconcile state when this run recorded it; the reason from the audit row or the state."""
    ended = [a for a in audit_attempts(store.audit_trail(order_id)) if a.run_id == run_id and a.outcome]
    state = store.get_state(order_id)
    recorded = state.last_run_id == run_id
    outcome = tags.get(TAG_OUTCOME) or (ended[-1].outcome if ended else state.last_outcome if recorded else None)
    reason = ended[-1].detail if ended else state.last_reason if recorded else None
    return outcome, reason


def finished_run(store: Store, order_id: str, run_id: str, status: str, tags: dict[str, str]) -> RunResult:
    outcome, reason = run_outcome(store, order_id, run_id, tags)
    return RunResult(run_id, status == "SUCCESS", outcome, reason)


def run_retry(settings: Settings, store: Store, order_id: str, reason: str, requested_by: str,
              remedy: Remedy = NO_REMEDY) -> RunResult:
    """Run `fulfill_order` in this process with the code location's resources (from the environment), on the
    instance of DAGSTER_HOME so that the run is in its UI's history like any other."""
    from bitloot_reconcile.definitions import build_resources
    from bitloot_reconcile.jobs import fulfill_order

    for name in RUN_SECRETS:  # the resources read them as EnvVar only when the run starts: check first
        settings.secret(name)
    r2_endpoint(settings)
    config, tags = _run_request(order_id, reason, requested_by, remedy)
    with open_instance() as instance:
        result = fulfill_order.execute_in_process(
            run_config=config, resources=build_resources(settings), instance=instance, tags=tags,
            raise_on_error=False,
        )
        run = instance.get_run_by_id(result.run_id)
        run_tags = dict(run.tags) if run else tags
    outcome, why = run_outcome(store, order_id, result.run_id, run_tags)
    errors = () if result.success else tuple(
        event.step_failure_data.error.message.strip()
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error
    )
    return RunResult(result.run_id, result.success, outcome, why, errors)


# ------------------------------------------------------------------------------------------------- report
def report(readers: Readers, since: dt.datetime, until: dt.datetime, *,
           progress: reconciliation.ReportProgress | None = None) -> pd.DataFrame:
    """The same report as the `reconciliation_report` asset, for any window."""
    return reconciliation.build_report(readers.store, readers.kinguin, readers.nowpayments, readers.vault,
                                       since, until, progress=progress)
