"""The project's own tables: the reconcile state of an order (outside the lease's own statements), the append-only
audit trail and the record of which Kinguin key went to which item."""

from __future__ import annotations

from dataclasses import replace

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from bitloot_reconcile.store.lease import Lease
from bitloot_reconcile.store.models import (
    LeaseLost,
    ReconcileState,
    needs_project_tables,
    state_from_row,
    utcnow,
)
from bitloot_reconcile.store.schema import reconcile_audit, reconcile_key_assignment, reconcile_state


def _insert_ignore(engine: sa.Engine, table: sa.Table, values: dict, index: list[str]) -> sa.Insert:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).values(**values).on_conflict_do_nothing(index_elements=index)


class ReconcileTables(Lease):
    # -- reads ---------------------------------------------------------------------------------------
    @needs_project_tables
    def get_state(self, order_id: str) -> ReconcileState:
        """The order's reconcile state (a default one when the project never touched the order)."""
        with self._autocommit() as conn:
            row = conn.execute(
                sa.select(reconcile_state).where(reconcile_state.c.order_id == order_id)
            ).mappings().first()
        if row is None:
            return ReconcileState(order_id=order_id)
        return state_from_row(row)

    def states_of(self, order_ids: set[str]) -> dict[str, ReconcileState]:
        """The reconcile state of each order that has one."""
        if not order_ids:
            return {}
        with self._autocommit() as conn:
            rows = conn.execute(
                sa.select(reconcile_state).where(reconcile_state.c.order_id.in_(sorted(order_ids)))
            ).mappings()
            return {row["order_id"]: state_from_row(row) for row in rows}

    def attempted_by(self, run_id: str, order_ids: set[str]) -> set[str]:
        """Which of these orders have an audit row written by this run (a batch's orders it got to)."""
        if not order_ids:
            return set()
        with self._autocommit() as conn:
            rows = conn.execute(
                sa.select(reconcile_audit.c.order_id).distinct()
                .where(reconcile_audit.c.order_id.in_(sorted(order_ids)), reconcile_audit.c.run_id == run_id)
            )
            return {str(row.order_id) for row in rows}

    def audit_trail(self, order_id: str) -> list[dict]:
        with self._autocommit() as conn:
            rows = conn.execute(
                sa.select(reconcile_audit)
                .where(reconcile_audit.c.order_id == order_id)
                .order_by(reconcile_audit.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    def key_assignments(self, order_id: str) -> dict[str, str]:
        with self._autocommit() as conn:
            rows = conn.execute(
                sa.select(reconcile_key_assignment.c.order_item_id, reconcile_key_assignment.c.kinguin_key_id)
                .where(reconcile_key_assignment.c.order_id == order_id)
            )
            return {r.order_item_id: r.kinguin_key_id for r in rows}

    # -- writes -------------------------------------------------------------------------------------
    def record_placement_intent(self, order_id: str, *, owner: str | None = None) -> None:
        """Kept from the first placement on; one statement under the lease, fenced by its own WHERE clause."""
        now = utcnow()
        intent = (
            sa.update(reconcile_state)
            .where(reconcile_state.c.order_id == order_id)
            .values(placement_intent_at=sa.func.coalesce(reconcile_state.c.placement_intent_at, now), updated_at=now)
        )
        if owner is None:  # outside a run (fixtures): the state row may not exist yet
            with self.engine.begin() as conn:
                conn.execute(_insert_ignore(self.engine, reconcile_state, {"order_id": order_id}, ["order_id"]))
                conn.execute(intent)
            return
        with self._autocommit() as conn:
            if conn.execute(intent.where(reconcile_state.c.lease_owner == owner)).rowcount != 1:
                self._forget(order_id)
                raise LeaseLost(order_id, owner)
        self._state_changed(order_id, lambda state: replace(
            state, placement_intent_at=state.placement_intent_at or now))

    def record_replacement_intent(self, order_id: str, replaced: str, number: int, *, owner: str | None = None
                                  ) -> None:
        """Before placing replacement `number` of the canceled Kinguin order `replaced`: a run that finds
        this intent with the canceled order still saved searches Kinguin for the replacement first."""
        self._state_changed(order_id, None)
        with self._write(order_id, owner) as conn:
            conn.execute(
                sa.update(reconcile_state)
                .where(reconcile_state.c.order_id == order_id, reconcile_state.c.replacements == number - 1)
                .values(replacements=number, replaced_kinguin_order_id=replaced, updated_at=utcnow())
            )

    def assign_key(self, order_id: str, order_item_id: str, kinguin_key_id: str, *, owner: str | None = None) -> None:
        with self._write(order_id, owner) as conn:
            conn.execute(
                sa.insert(reconcile_key_assignment).values(
                    order_id=order_id, order_item_id=order_item_id, kinguin_key_id=kinguin_key_id
                )
            )

    def update_state(self, order_id: str, **values) -> None:
        self._state_changed(order_id, None)
        with self.engine.begin() as conn:
            conn.execute(_insert_ignore(self.engine, reconcile_state, {"order_id": order_id}, ["order_id"]))
            conn.execute(
                sa.update(reconcile_state)
                .where(reconcile_state.c.order_id == order_id)
                .values(**values, updated_at=utcnow())
            )

    def append_audit(self, *, order_id: str, action: str, trigger: str, actor: str | None, reason: str | None,
                     run_id: str | None, outcome: str | None, detail: str | None = None) -> None:
        with self._autocommit() as conn:
            conn.execute(sa.insert(reconcile_audit).values(
                order_id=order_id, action=action, trigger=trigger, actor=actor, reason=reason, run_id=run_id,
                outcome=outcome, detail=detail, created_at=utcnow()))
