"""What every part of the store shares: the engine, its statement-at-a-time connections, and the hooks through
which a write says what it changed.

The plain `Store` keeps nothing between calls, so the hooks do nothing here; `CachedAttemptView` (in
`repository`) keeps an attempt's order and state row and applies each change to them.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from bitloot_reconcile.store.models import Order, ReconcileState


class StoreBase:
    engine: sa.Engine

    def _autocommit(self) -> sa.Connection:
        """A connection on which each statement is its own transaction, without BEGIN and COMMIT/ROLLBACK round
        trips: for reads (under READ COMMITTED a transaction would not make two reads see one snapshot either)
        and for writes whose statements each stand alone."""
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def _has_table(self, table: sa.Table) -> bool:
        return sa.inspect(self.engine).has_table(table.name)

    # -- what a write changed (kept by an attempt's cached view) --------------------------------------------
    def _order_changed(self, order_id: str, change: Callable[[Order], Order] | None) -> None:
        """After a write to the order or its items: `change` applies it to the order as read; None (a guarded
        write that changed nothing: someone else moved the order) means the order must be read again."""

    def _state_changed(self, order_id: str, change: Callable[[ReconcileState], ReconcileState] | None) -> None:
        """After a write to the order's state row: `change` applies it to the row as read; None: read it again."""

    def _state_claimed(self, order_id: str, state: ReconcileState) -> None:
        """The state row a claim returned."""

    def _forget(self, order_id: str) -> None:
        """A write failed: what was read of the order and its state row may no longer hold."""
