"""Alert bookkeeping on `reconcile_state` (the alerts sensor): one alert per order per state change."""

from __future__ import annotations

import sqlalchemy as sa

from bitloot_reconcile.store.base import StoreBase
from bitloot_reconcile.store.models import ReconcileState, state_from_row
from bitloot_reconcile.store.schema import reconcile_state


class AlertMarks(StoreBase):
    def clear_resolved_alerts(self, outcomes: frozenset[str]) -> int:
        """Forget the alert mark of orders that left the alerting outcomes, so a return to one alerts again."""
        state = reconcile_state
        with self.engine.begin() as conn:
            return conn.execute(
                sa.update(state)
                .where(
                    state.c.alerted_outcome.is_not(None),
                    sa.or_(state.c.last_outcome.is_(None), state.c.last_outcome.not_in([str(o) for o in outcomes])),
                )
                .values(alerted_outcome=None)
            ).rowcount

    def pending_alerts(self, outcomes: frozenset[str], limit: int) -> list[ReconcileState]:
        """Orders in an alerting outcome not alerted on yet, oldest change first."""
        state = reconcile_state
        query = (
            sa.select(state)
            .where(
                state.c.last_outcome.in_([str(o) for o in outcomes]),
                state.c.alerted_outcome.is_distinct_from(state.c.last_outcome),
            )
            .order_by(state.c.updated_at)
            .limit(limit)
        )
        with self._autocommit() as conn:
            return [state_from_row(row) for row in conn.execute(query).mappings()]

    def mark_alerted(self, seen: ReconcileState) -> bool:
        """Record the alert only if the state is still the one alerted on: a newer outcome gets its own alert."""
        state = reconcile_state
        with self.engine.begin() as conn:
            return conn.execute(
                sa.update(state)
                .where(
                    state.c.order_id == seen.order_id,
                    state.c.last_outcome == seen.last_outcome,
                    state.c.last_run_id.is_not_distinct_from(seen.last_run_id),
                )
                .values(alerted_outcome=seen.last_outcome)
            ).rowcount == 1
