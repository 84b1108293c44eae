"""Who the sweep may work now, written once: the grace period, the lease, the backoff, the outcomes left to a
person and the age window.

The rule comes in two forms built side by side: SQLAlchemy expressions, from which the store builds the sweep's
query, the board's read and the schema's partial index; and the Python verdict (`hold`) the board and the dry run
apply to rows they already hold. `tests/domain/test_eligibility.py` holds both to the same answer on a table of
states. The expressions are built over the tables the caller passes (this module does not import the schema), so
the schema can take its index predicate from here. No Dagster here.

An order is due when it is not done (a recoverable status, or fulfilled without the completion email) and nothing
holds it: a lease (a run holds it; a lease without an expiry never lapses), a person's outcome, a backoff still
ahead, the grace period (BitLoot may still be working on it) or the age window (too old to take up by itself).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

import sqlalchemy as sa

from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.store.models import ReconcileState, naive_utc
from bitloot_reconcile.store.statuses import RECOVERABLE, OrderStatus

# Outcomes after which the sweep leaves the order alone until a person acts (an admin run still works it):
# the order needs a person, or a person closed it by hand.
LEFT_TO_A_PERSON = (Outcome.NEEDS_ATTENTION, Outcome.RESOLVED)


class Hold(StrEnum):
    """Why the sweep does not work an order now; the first that applies, in this order."""

    DONE = "done"  # nothing left to do: a status never recovered, or fulfilled and emailed
    LEASED = "leased"
    LEFT_TO_A_PERSON = "left_to_a_person"
    BACKING_OFF = "backing_off"
    INSIDE_GRACE = "inside_grace"
    PAST_AGE_WINDOW = "past_age_window"


# -------------------------------------------------------------------------------------------- in Python
def leased(state: ReconcileState, now: dt.datetime) -> bool:
    return state.lease_owner is not None and (state.lease_expires_at is None or state.lease_expires_at >= now)


def backing_off(state: ReconcileState, now: dt.datetime) -> bool:
    return state.next_attempt_at is not None and state.next_attempt_at > now


def state_hold(state: ReconcileState, now: dt.datetime) -> Hold | None:
    """What in the order's reconcile state holds it back: its lease, a person's outcome or its backoff."""
    if leased(state, now):
        return Hold.LEASED
    if state.last_outcome in LEFT_TO_A_PERSON:
        return Hold.LEFT_TO_A_PERSON
    if backing_off(state, now):
        return Hold.BACKING_OFF
    return None


def hold(*, status: str, completion_email_sent: bool, updated_at: dt.datetime, state: ReconcileState,
         now: dt.datetime, grace: dt.timedelta, max_age: dt.timedelta) -> Hold | None:
    """Why the sweep would not work this order now, or None when it is due. `updated_at`: BitLoot's "updatedAt"
    (naive UTC); the grace period and the age window run from it."""
    if not (status in RECOVERABLE or (status == OrderStatus.FULFILLED and not completion_email_sent)):
        return Hold.DONE
    if held := state_hold(state, now):
        return held
    changed = updated_at.replace(tzinfo=dt.UTC)
    if changed > now - grace:
        return Hold.INSIDE_GRACE
    if changed < now - max_age:
        return Hold.PAST_AGE_WINDOW
    return None


# -------------------------------------------------------------------------------------------- in SQL
def _rendered(value: str) -> sa.BindParameter:
    """Rendered into the SQL text, not bound: a generic plan (plan_cache_mode) can then still match the partial
    indexes whose predicates name these values."""
    return sa.literal(value, literal_execute=True)


def recoverable_sql(orders: sa.FromClause) -> sa.ColumnElement[bool]:
    return orders.c.status.in_([s.value for s in RECOVERABLE])


def email_pending_sql(orders: sa.FromClause) -> sa.ColumnElement[bool]:
    return sa.and_(orders.c.status == _rendered(OrderStatus.FULFILLED.value), orders.c.completionEmailSent.is_(False))


def held_back_sql(state: sa.FromClause, now: dt.datetime) -> sa.ColumnElement[bool]:
    """`state_hold` in SQL: the state row holds the order back now."""
    return sa.or_(
        sa.and_(state.c.lease_owner.is_not(None),
                sa.or_(state.c.lease_expires_at.is_(None), state.c.lease_expires_at >= now)),
        state.c.next_attempt_at > now,
        *(state.c.last_outcome == _rendered(outcome.value) for outcome in LEFT_TO_A_PERSON),
    )


def may_hold_back_sql(state: sa.FromClause, *, outcomes: tuple[Outcome, ...] = LEFT_TO_A_PERSON
                      ) -> sa.ColumnElement[bool]:
    """The state rows that can hold an order back at some time (the partial index the sweep probes): every row
    `held_back_sql` matches, whatever the time."""
    return sa.or_(
        state.c.lease_owner.is_not(None),
        state.c.next_attempt_at.is_not(None),
        *(state.c.last_outcome == _rendered(outcome.value) for outcome in outcomes),
    )


def due_sql(orders: sa.FromClause, state: sa.FromClause, *, now: dt.datetime, grace: dt.timedelta,
            max_age: dt.timedelta) -> sa.ColumnElement[bool]:
    """`hold(...) is None` in SQL, for the rows of `orders`; `state` is an alias of the reconcile state probed
    per order. Each kind of not-done order is its own branch with its own range on "updatedAt", so each is
    served by its own index (the sweep's (status, "updatedAt") and the partial email-pending index)."""
    recent = orders.c.updatedAt.between(naive_utc(now - max_age), naive_utc(now - grace))
    held_back = sa.exists().where(state.c.order_id == orders.c.id, held_back_sql(state, now))
    return sa.and_(
        sa.or_(sa.and_(recoverable_sql(orders), recent), sa.and_(email_pending_sql(orders), recent)),
        ~held_back,
    )


def inside_age_window_sql(orders: sa.FromClause, *, now: dt.datetime, max_age: dt.timedelta
                          ) -> sa.ColumnElement[bool]:
    """Not done and changed inside the age window (grace period included): the board's recent orders, one
    branch per index as in `due_sql`."""
    recent = orders.c.updatedAt >= naive_utc(now - max_age)
    return sa.or_(sa.and_(recoverable_sql(orders), recent), sa.and_(email_pending_sql(orders), recent))


def kept_on_board_sql(orders: sa.FromClause, state: sa.FromClause) -> sa.ColumnElement[bool]:
    """Not done and held back by the project at any age (leased, a backoff set, needing a person: served by the
    partial index of `may_hold_back_sql`), so a quarantined order never drops off the board. An order closed by
    hand is done."""
    return sa.and_(may_hold_back_sql(state, outcomes=(Outcome.NEEDS_ATTENTION,)),
                   sa.or_(recoverable_sql(orders), email_pending_sql(orders)))
