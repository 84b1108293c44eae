"""The stuck-orders board: every order that is not done, the state it is in and why, and the trend (plain Python).

The store hands over the not-done orders with their reconcile state (`Store.backlog_orders`) and the orders
fulfilled lately (`Store.fulfilled_since`); Dagster hands over the orders with a run queued or running. This
module sorts each order into one state, in this order of precedence:

| state | meaning |
|---|---|
| `in_flight` | a run is queued or running for it, or a run holds its lease |
| `needs_attention` | a run found a problem a person must act on (the reason says which) |
| `quarantined` | the sweep gave up: attempts exhausted, or the supplier deadline passed |
| `waiting_for_supplier`, `payment_not_confirmed`, `held`, `backing_off` | the sweep comes back at `next_attempt_at` |
| `inside_grace` | changed less than the grace period ago: BitLoot may still be working on it |
| `past_age_window` | older than the sweep's age window: the sweep no longer looks at it |
| `stuck` / `email_pending` | due: the sweep launches a run on its next tick (email only, for a fulfilled order) |

The four waits: Kinguin is still processing; no confirmed payment yet; a BitLoot switch held it; an outage or
a busy order.

The sweep's skip message, `bitloot-reconcile plan` and `board`, and the `order_backlog` asset all use it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from bitloot_reconcile.domain import eligibility
from bitloot_reconcile.domain.eligibility import Hold
from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.domain.schedule import GAVE_UP
from bitloot_reconcile.store.repository import BacklogOrder, FulfilledOrder, Store
from bitloot_reconcile.store.statuses import OrderStatus


class BoardState(StrEnum):
    IN_FLIGHT = "in_flight"
    NEEDS_ATTENTION = "needs_attention"
    QUARANTINED = "quarantined"
    WAITING_FOR_SUPPLIER = "waiting_for_supplier"
    PAYMENT_NOT_CONFIRMED = "payment_not_confirmed"
    HELD = "held"
    BACKING_OFF = "backing_off"
    INSIDE_GRACE = "inside_grace"
    PAST_AGE_WINDOW = "past_age_window"
    STUCK = "stuck"
    EMAIL_PENDING = "email_pending"


# Words for messages: "3 backing off", "1 needing a person".
LABELS = {
    BoardState.IN_FLIGHT: "in flight",
    BoardState.NEEDS_ATTENTION: "needing a person",
    BoardState.QUARANTINED: "quarantined",
    BoardState.WAITING_FOR_SUPPLIER: "waiting for the supplier",
    BoardState.PAYMENT_NOT_CONFIRMED: "payment not confirmed",
    BoardState.HELD: "held by a BitLoot switch",
    BoardState.BACKING_OFF: "backing off",
    BoardState.INSIDE_GRACE: "inside the grace period",
    BoardState.PAST_AGE_WINDOW: "past the age window",
    BoardState.STUCK: "stuck, due now",
    BoardState.EMAIL_PENDING: "email pending, due now",
}
# The sweep launches a run for these on its next tick; every other state is skipped, for the reason it names.
DUE = frozenset({BoardState.STUCK, BoardState.EMAIL_PENDING})
# Orders the automation still owns and a customer still waits on: the SLA is measured on these. Orders that
# need a person have their own checks; an unconfirmed payment is not money taken; the grace period is BitLoot's.
STUCK = frozenset({BoardState.STUCK, BoardState.EMAIL_PENDING, BoardState.IN_FLIGHT, BoardState.BACKING_OFF,
                   BoardState.WAITING_FOR_SUPPLIER, BoardState.HELD, BoardState.PAST_AGE_WINDOW})
_BACKOFF_STATES = {
    Outcome.WAITING_FOR_SUPPLIER: BoardState.WAITING_FOR_SUPPLIER,
    Outcome.PAYMENT_NOT_CONFIRMED: BoardState.PAYMENT_NOT_CONFIRMED,
    Outcome.PAUSED: BoardState.HELD,
}
SAMPLE_IDS = 5  # order ids named per state in one-line messages
MAX_ROWS = 10_000  # a bound on one read; past it the board says it is cut short
TREND_WINDOW = dt.timedelta(hours=24)
COLUMNS = ("order_id", "state", "status", "age_minutes", "attempts", "last_outcome", "reason", "next_attempt_at",
           "run_id", "run_url")


@dataclass(frozen=True)
class BoardRow:
    order_id: str
    state: BoardState
    status: str  # BitLoot's status
    age: dt.timedelta  # since the order was placed (BitLoot keeps no payment time on the order)
    changed_at: dt.datetime  # the order's last change (BitLoot's "updatedAt", UTC): the grace period runs from it
    attempts: int
    last_outcome: str | None
    reason: str | None  # the last run's reason, or why the order is held (the run and its lease)
    next_attempt_at: dt.datetime | None
    run_id: str | None  # the run in flight, else the last run that recorded an outcome

    @property
    def age_minutes(self) -> int:
        return int(self.age.total_seconds() // 60)

    def record(self, run_url: str | None) -> dict[str, str | int | None]:
        """The row as the table and the CSV show it."""
        return {
            "order_id": self.order_id, "state": self.state.value, "status": self.status,
            "age_minutes": self.age_minutes, "attempts": self.attempts, "last_outcome": self.last_outcome or "",
            "reason": self.reason or "", "next_attempt_at": _when(self.next_attempt_at), "run_id": self.run_id or "",
            "run_url": run_url or "",
        }


def classify(order: BacklogOrder, *, in_flight: Mapping[str, str], now: dt.datetime, grace: dt.timedelta,
             max_age: dt.timedelta) -> BoardRow:
    """The one state of a not-done order (precedence as in the module's table). `in_flight`: order id -> the id
    of its queued or running run."""
    state, reason, run_id = order.state, order.state.last_reason, order.state.last_run_id
    hold = eligibility.hold(status=order.status, completion_email_sent=order.completion_email_sent,
                            updated_at=order.updated_at, state=state, now=now, grace=grace, max_age=max_age)
    waits = eligibility.backing_off(state, now)
    if order.id in in_flight or hold is Hold.LEASED:
        kind = BoardState.IN_FLIGHT
        run_id = in_flight.get(order.id) or state.lease_owner
        reason = (f"run {state.lease_owner} holds the lease until {_when(state.lease_expires_at)}"
                  if hold is Hold.LEASED else "a run is queued or starting")
    elif hold is Hold.LEFT_TO_A_PERSON:
        kind = BoardState.QUARANTINED if (reason or "").startswith(GAVE_UP) else BoardState.NEEDS_ATTENTION
    elif hold is Hold.BACKING_OFF:
        kind = _BACKOFF_STATES.get(state.last_outcome, BoardState.BACKING_OFF)
    elif hold is Hold.INSIDE_GRACE:
        kind = BoardState.INSIDE_GRACE
    elif hold is Hold.PAST_AGE_WINDOW:
        kind = BoardState.PAST_AGE_WINDOW
    elif order.status == OrderStatus.FULFILLED:
        kind = BoardState.EMAIL_PENDING
    else:
        kind = BoardState.STUCK
    return BoardRow(
        order_id=order.id, state=kind, status=order.status, age=now - order.created_at.replace(tzinfo=dt.UTC),
        changed_at=order.updated_at.replace(tzinfo=dt.UTC),
        attempts=state.attempts, last_outcome=state.last_outcome, reason=reason,
        next_attempt_at=state.next_attempt_at if waits else None, run_id=run_id,
    )


@dataclass(frozen=True)
class Trend:
    """The last 24 h, from the store's own timestamps."""

    recovered: int  # orders fulfilled by a run of the project
    payment_to_fulfilment_p50: dt.timedelta | None  # order placed -> last change as fulfilled
    payment_to_fulfilment_p95: dt.timedelta | None
    kinguin_orders_placed: int  # by the project's runs: a placement intent and a saved Kinguin order id


def trend(fulfilled: Iterable[FulfilledOrder], backlog: Iterable[BacklogOrder], *, since: dt.datetime) -> Trend:
    fulfilled = list(fulfilled)
    minutes = sorted((o.updated_at - o.created_at).total_seconds() / 60 for o in fulfilled)
    placed = {o.id for o in fulfilled if _placed_since(o.placement_intent_at, o.kinguin_reservation_id, since)}
    # Orders placed lately and not fulfilled yet are on the board instead.
    placed |= {o.id for o in backlog if _placed_since(o.state.placement_intent_at, o.kinguin_reservation_id, since)}
    return Trend(
        recovered=sum(o.last_outcome == Outcome.FULFILLED for o in fulfilled),
        payment_to_fulfilment_p50=_percentile(minutes, 50),
        payment_to_fulfilment_p95=_percentile(minutes, 95),
        kinguin_orders_placed=len(placed),
    )


def _placed_since(intent_at: dt.datetime | None, kinguin_id: str | None, since: dt.datetime) -> bool:
    return intent_at is not None and intent_at >= since and bool(kinguin_id)


def _percentile(minutes: list[float], pct: int) -> dt.timedelta | None:
    if not minutes:
        return None
    if len(minutes) == 1:
        return dt.timedelta(minutes=minutes[0])
    return dt.timedelta(minutes=statistics.quantiles(minutes, n=100, method="inclusive")[pct - 1])


@dataclass(frozen=True)
class Board:
    rows: tuple[BoardRow, ...]  # oldest first
    trend: Trend
    truncated: bool  # the store query hit its row limit: counts are lower bounds

    def count(self, state: BoardState) -> int:
        return sum(row.state is state for row in self.rows)

    def counts(self) -> dict[str, int]:
        found = Counter(row.state for row in self.rows)
        return {state.value: found.get(state, 0) for state in BoardState}

    def of(self, *states: BoardState) -> list[BoardRow]:
        return [row for row in self.rows if row.state in states]

    @property
    def stuck(self) -> list[BoardRow]:
        return [row for row in self.rows if row.state in STUCK]

    @property
    def oldest_stuck(self) -> BoardRow | None:
        return max(self.stuck, key=lambda row: row.age, default=None)

    def figures(self) -> dict[str, float | int]:
        """The numbers plotted over time: stuck now, the oldest's age, people needed, the last 24 h."""
        oldest = self.oldest_stuck
        figures: dict[str, float | int] = {
            "stuck_now": len(self.stuck),
            "oldest_stuck_minutes": round(oldest.age.total_seconds() / 60, 1) if oldest else 0.0,
            "needs_attention_now": self.count(BoardState.NEEDS_ATTENTION),
            "quarantined_now": self.count(BoardState.QUARANTINED),
            "recovered_24h": self.trend.recovered,
            "kinguin_orders_placed_24h": self.trend.kinguin_orders_placed,
        }
        for name, value in (("payment_to_fulfilment_p50_minutes", self.trend.payment_to_fulfilment_p50),
                            ("payment_to_fulfilment_p95_minutes", self.trend.payment_to_fulfilment_p95)):
            if value is not None:  # no fulfilment in 24 h: no point rather than a false zero
                figures[name] = round(value.total_seconds() / 60, 1)
        return figures


def build_board(backlog: Iterable[BacklogOrder], fulfilled: Iterable[FulfilledOrder], *, in_flight: Mapping[str, str],
                now: dt.datetime, grace: dt.timedelta, max_age: dt.timedelta, limit: int | None = None) -> Board:
    backlog = [o for o in backlog if o.state.last_outcome != Outcome.RESOLVED]  # closed by hand: done
    rows = tuple(classify(o, in_flight=in_flight, now=now, grace=grace, max_age=max_age) for o in backlog)
    return Board(rows, trend(fulfilled, backlog, since=now - TREND_WINDOW),
                 truncated=limit is not None and len(backlog) >= limit)


def load_board(store: Store, *, in_flight: Mapping[str, str], now: dt.datetime, grace: dt.timedelta,
               max_age: dt.timedelta, limit: int = MAX_ROWS, with_trend: bool = True) -> Board:
    """The board from the store's two bounded reads (the trend's only when asked for)."""
    backlog = store.backlog_orders(now=now, max_age=max_age, limit=limit)
    fulfilled = store.fulfilled_since(now - TREND_WINDOW) if with_trend else ()
    return build_board(backlog, fulfilled, in_flight=in_flight, now=now, grace=grace, max_age=max_age, limit=limit)


# -------------------------------------------------------------------------------------------- what was skipped
def skipped_summary(rows: Iterable[BoardRow], *, grace: dt.timedelta, sample: int = SAMPLE_IDS) -> str:
    """What the sweep did not launch and why, per state: "3 skipped: 2 in flight (id, id); 1 backing off, next
    attempt from 12:30 UTC (id)". The first `sample` ids of each state (oldest first) are named; empty when
    nothing was skipped."""
    by_state: dict[BoardState, list[BoardRow]] = {}
    for row in rows:
        if row.state not in DUE:
            by_state.setdefault(row.state, []).append(row)
    parts = []
    for state in BoardState:
        found = by_state.get(state)
        if not found:
            continue
        ids = ", ".join(row.order_id for row in found[:sample]) + (", ..." if len(found) > sample else "")
        parts.append(f"{len(found)} {LABELS[state]}{_next_look(state, found, grace)} ({ids})")
    total = sum(map(len, by_state.values()))
    return f"{total} skipped: " + "; ".join(parts) if parts else ""


def _next_look(state: BoardState, rows: list[BoardRow], grace: dt.timedelta) -> str:
    """When the sweep looks at the first of them again, where that is known."""
    if state is BoardState.INSIDE_GRACE:
        due = min(row.changed_at for row in rows) + grace
        return f", due from {due:%H:%M} UTC"
    upcoming = [row.next_attempt_at for row in rows if row.next_attempt_at]
    return f", next attempt from {min(upcoming):%H:%M} UTC" if upcoming else ""


# -------------------------------------------------------------------------------------------- the checks
@dataclass(frozen=True)
class CheckVerdict:
    name: str
    passed: bool
    severity: str  # ERROR | WARN (the asset maps it to Dagster's severity)
    description: str
    order_ids: tuple[str, ...]  # the orders that fail it, oldest first


ASSET_NAME = "order_backlog"  # the Dagster asset that shows the board; its checks are these
SLA_CHECK = "oldest_stuck_within_sla"
NEEDS_PERSON_CHECK = "no_order_needs_a_person"
QUARANTINE_CHECK = "no_order_quarantined"
CHECK_DESCRIPTIONS = {
    SLA_CHECK: "the oldest stuck order is younger than the SLA (RECONCILE_BOARD_SLA_MINUTES)",
    NEEDS_PERSON_CHECK: "no order needs a person",
    QUARANTINE_CHECK: "no order is quarantined (the sweep gave up on none)",
}


def checks(board: Board, *, sla: dt.timedelta, sample: int = SAMPLE_IDS) -> list[CheckVerdict]:
    oldest = board.oldest_stuck
    late = [row for row in board.stuck if row.age >= sla]
    if late:
        sla_text = (f"{len(late)} stuck order(s) older than the SLA of {sla.total_seconds() / 60:g} min; the oldest, "
                    f"{oldest.order_id}, is {short_age(oldest.age)} old ({LABELS[oldest.state]})")
    else:
        sla_text = f"no stuck order older than the SLA of {sla.total_seconds() / 60:g} min" + (
            f" (oldest: {short_age(oldest.age)})" if oldest else "")
    verdicts = [CheckVerdict(SLA_CHECK, not late, "ERROR", sla_text,
                             tuple(row.order_id for row in sorted(late, key=lambda r: -r.age.total_seconds())))]
    for name, state in ((NEEDS_PERSON_CHECK, BoardState.NEEDS_ATTENTION), (QUARANTINE_CHECK, BoardState.QUARANTINED)):
        found = board.of(state)
        text = (f"{len(found)} order(s) {LABELS[state]}: "
                + "; ".join(f"{row.order_id} ({row.reason or 'no reason recorded'})" for row in found[:sample])
                + ("; ..." if len(found) > sample else "")) if found else f"no order {LABELS[state]}"
        verdicts.append(CheckVerdict(name, not found, "WARN", text, tuple(row.order_id for row in found)))
    return verdicts


# -------------------------------------------------------------------------------------------- CSV
def to_csv(rows: Iterable[BoardRow], run_url) -> str:
    """Every row, the columns of `COLUMNS`; `run_url(run_id)` makes the link."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row.record(run_url(row.run_id)))
    return out.getvalue()


# -------------------------------------------------------------------------------------------- Markdown
SHORT_ID = 8  # the first characters of a uuid: unique enough to read, one line wide
MAX_REASON_CHARS = 140


def to_markdown(rows: Iterable[BoardRow], *, runs_of_order: Callable[[str], str],
                run_url: Callable[[str | None], str | None]) -> str:
    """The rows as a Markdown table narrow enough to read without scrolling sideways: short ids, each linked
    (the order's id to its runs, where the full id is; the run's to the run), the state in words, short ages."""
    lines = ["| order | state | age | runs | last run | reason |", "|---|---|--:|--:|---|---|"]
    for row in rows:
        link = run_url(row.run_id)
        last = f"[{row.run_id[:SHORT_ID]}]({link})" if row.run_id and link else ""
        if row.last_outcome:
            last = f"{last} {row.last_outcome.replace('_', ' ')}".strip()
        reason = row.reason or ""
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS - 1] + "…"
        if row.next_attempt_at:
            reason = f"{reason} (next look {row.next_attempt_at.astimezone(dt.UTC):%H:%M} UTC)".strip()
        cells = [f"[{row.order_id[:SHORT_ID]}]({runs_of_order(row.order_id)})", LABELS[row.state],
                 short_age(row.age), str(row.attempts), last, reason]
        lines.append("| " + " | ".join(_md_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def short_age(delta: dt.timedelta) -> str:
    """90m, 5h, 40d: minutes up to 2 h, hours up to 2 days."""
    minutes = int(delta.total_seconds() // 60)
    return f"{minutes}m" if minutes < 120 else f"{minutes // 60}h" if minutes < 48 * 60 else f"{minutes // 1440}d"


def _when(moment: dt.datetime | None) -> str:
    return f"{moment.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC" if moment else ""
