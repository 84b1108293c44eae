"""The reads across many orders: the sweep's stuck orders, the board's not-done and lately fulfilled orders, and
which orders are settled (for pruning their history). Who is due is `domain.eligibility`'s rule; these
statements add the ordering, the limits and the joins that keep each read's cost to the orders it returns."""

from __future__ import annotations

import datetime as dt
from dataclasses import fields

import sqlalchemy as sa

from bitloot_reconcile.domain import eligibility
from bitloot_reconcile.store.base import StoreBase
from bitloot_reconcile.store.models import (
    BacklogOrder,
    FulfilledOrder,
    ReconcileState,
    StuckOrder,
    naive_utc,
    needs_project_tables,
    state_from_row,
)
from bitloot_reconcile.store.schema import orders, reconcile_state
from bitloot_reconcile.store.statuses import OrderStatus

# Rendered into the SQL text, not bound, as `domain.eligibility` renders its values: the partial indexes match.
FULFILLED = sa.literal(OrderStatus.FULFILLED.value, literal_execute=True)


class Queries(StoreBase):
    @needs_project_tables
    def find_stuck_orders(
        self, *, now: dt.datetime, grace: dt.timedelta, max_age: dt.timedelta, limit: int
    ) -> list[StuckOrder]:
        """Oldest first: paid-but-undelivered orders past the grace period, and fulfilled orders whose email
        never went out, minus those leased, backing off or waiting for a person.

        Both branches are served by the project's indexes on `orders` (status, "updatedAt") and the partial
        email-pending index, so the cost follows the number of stuck orders, not the size of the table.
        """
        blocker = reconcile_state.alias("blocker")
        # Order and limit on `orders` alone, then fetch the attempt counts of just those rows.
        due = (
            sa.select(orders.c.id, orders.c.status, orders.c.updatedAt, orders.c.completionEmailSent)
            .where(eligibility.due_sql(orders, blocker, now=now, grace=grace, max_age=max_age))
            .order_by(orders.c.updatedAt)
            .limit(limit)
            .subquery()
        )
        query = (
            sa.select(
                due, sa.func.coalesce(reconcile_state.c.attempts, 0).label("attempts"), reconcile_state.c.last_run_id
            )
            .select_from(due.outerjoin(reconcile_state, reconcile_state.c.order_id == due.c.id))
            .order_by(due.c.updatedAt)
        )
        with self._autocommit() as conn:
            return [
                StuckOrder(r.id, r.status, r.updatedAt, bool(r.completionEmailSent), r.attempts, r.last_run_id)
                for r in conn.execute(query)
            ]

    @needs_project_tables
    def backlog_orders(self, *, now: dt.datetime, max_age: dt.timedelta, limit: int) -> list[BacklogOrder]:
        """Every order that is not done, oldest first (by creation), with its reconcile state: orders in a
        recoverable status or fulfilled without the email, updated inside the age window (the sweep's two
        index branches, grace period included), plus those the project holds back at any age (the partial
        blocking index: leased, backing off or needing a person), so a quarantined order never drops off.

        The cost follows the number of such orders, not the size of `orders` or of the project's history."""
        columns = (orders.c.id, orders.c.status, orders.c.completionEmailSent, orders.c.createdAt, orders.c.updatedAt,
                   orders.c.kinguinReservationId)
        recent = sa.select(*columns).where(eligibility.inside_age_window_sql(orders, now=now, max_age=max_age))
        # Each branch reads whole order rows, so the union is never joined back to `orders` by status (which
        # would read every open order of the history, inside the window or not).
        held = (
            sa.select(*columns)
            .select_from(reconcile_state.join(orders, orders.c.id == reconcile_state.c.order_id))
            .where(eligibility.kept_on_board_sql(orders, reconcile_state))
        )
        wanted = sa.union(recent, held).subquery("wanted")
        joined, state = self._with_state(wanted)
        query = (
            sa.select(wanted, *[state.c[f.name].label(f"state_{f.name}") for f in fields(ReconcileState)])
            .select_from(joined)
            .order_by(wanted.c.createdAt, wanted.c.id)
            .limit(limit)
        )
        with self._autocommit() as conn:
            return [
                BacklogOrder(
                    r["id"], r["status"], bool(r["completionEmailSent"]), r["createdAt"], r["updatedAt"],
                    r["kinguinReservationId"],
                    state_from_row(r, prefix="state_") if r["state_order_id"] else ReconcileState(order_id=r["id"]),
                )
                for r in conn.execute(query).mappings()
            ]

    def fulfilled_since(self, since: dt.datetime) -> list[FulfilledOrder]:
        """Orders whose last change, as fulfilled, is at or after `since`; served by the sweep's (status,
        "updatedAt") index, so the cost follows the orders fulfilled in the window."""
        fulfilled = (
            sa.select(orders.c.id, orders.c.createdAt, orders.c.updatedAt, orders.c.kinguinReservationId)
            .where(orders.c.status == FULFILLED, orders.c.updatedAt >= naive_utc(since))
            .subquery("fulfilled")
        )
        joined, state = self._with_state(fulfilled)
        query = sa.select(fulfilled, state.c.last_outcome, state.c.placement_intent_at).select_from(joined)
        with self._autocommit() as conn:
            return [
                FulfilledOrder(r.id, r.createdAt, r.updatedAt, r.kinguinReservationId,
                               r.last_outcome, r.placement_intent_at)
                for r in conn.execute(query)
            ]

    def _with_state(self, rows: sa.Subquery) -> tuple[sa.FromClause, sa.FromClause]:
        """`rows` (with an `id` column) left-joined to their reconcile state. On PostgreSQL one primary-key
        probe per row: with a plain join the planner may hash all of reconcile_state, which grows with every
        order the project ever recovered."""
        if self.engine.dialect.name == "postgresql":
            state = (sa.select(reconcile_state).where(reconcile_state.c.order_id == rows.c.id)
                     .limit(1).lateral("state"))
            return rows.outerjoin(state, sa.true()), state
        return rows.outerjoin(reconcile_state, reconcile_state.c.order_id == rows.c.id), reconcile_state

    def settled_before(self, order_ids: list[str], cutoff: dt.datetime) -> set[str]:
        """Which of these orders are settled and untouched since `cutoff`: fulfilled with the email sent,
        refunded or cancelled (BitLoot's word), or resolved by an admin; no lease held, and neither the order nor
        its reconcile state changed since. One primary-key probe per id on each table."""
        if not order_ids:
            return set()
        state = reconcile_state
        done = sa.or_(
            sa.and_(orders.c.status == FULFILLED, orders.c.completionEmailSent.is_(True)),
            orders.c.status.in_([OrderStatus.REFUNDED.value, OrderStatus.CANCELLED.value]),
            state.c.last_outcome == sa.literal("resolved", literal_execute=True),
        )
        query = (
            sa.select(orders.c.id)
            .select_from(orders.outerjoin(state, state.c.order_id == orders.c.id))
            .where(orders.c.id.in_(sorted(order_ids)), orders.c.updatedAt < naive_utc(cutoff), done,
                   state.c.lease_owner.is_(None), sa.or_(state.c.updated_at.is_(None), state.c.updated_at < cutoff))
        )
        with self._autocommit() as conn:
            return {str(order_id) for order_id in conn.execute(query).scalars()}
