"""The store: every read and write the project makes to the store database, as SQLAlchemy Core statements.

`Store` is composed of one part per concern: the lease (`lease`), one order's reads (`order_reads`), the reads
across orders (`queries`), the writes to BitLoot's tables (`bitloot_writes`), the project's own tables
(`reconcile_tables`), the alert bookkeeping (`alert_marks`) and BitLoot's switches (`switches`). Each method runs
in its own short transaction, so a step's result is committed before the next step starts (a crash between steps
loses nothing that was already done). The read models are in `models`, and importable from here with the `Store`.

`CachedAttemptView` is the store one attempt works through: it keeps what it read of its order and the state
row its claim returned, and applies its own writes to them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import sqlalchemy as sa

from bitloot_reconcile.store.alert_marks import AlertMarks
from bitloot_reconcile.store.bitloot_writes import BitLootWrites
from bitloot_reconcile.store.lease import lease_still_fresh
from bitloot_reconcile.store.models import (
    BacklogOrder,
    EmailBounce,
    FulfilledOrder,
    Item,
    LeaseLost,
    Order,
    Payment,
    ProjectTablesMissing,
    ReconcileState,
    StuckOrder,
    naive_utc,
    utcnow,
)
from bitloot_reconcile.store.order_reads import OrderReads
from bitloot_reconcile.store.queries import Queries
from bitloot_reconcile.store.reconcile_tables import ReconcileTables
from bitloot_reconcile.store.switches import BitLootSwitches, SharedFlags

__all__ = [
    "BacklogOrder", "CachedAttemptView", "EmailBounce", "FulfilledOrder", "Item", "LeaseLost", "Order", "Payment",
    "ProjectTablesMissing", "ReconcileState", "Store", "StuckOrder", "naive_utc", "utcnow",
]


class Store(BitLootWrites, ReconcileTables, OrderReads, Queries, AlertMarks, BitLootSwitches):
    def __init__(self, engine: sa.Engine, *, flags: SharedFlags | None = None):
        self.engine = engine
        self._flags = flags

    def for_attempt(self) -> CachedAttemptView:
        """A view for one attempt (or one step of a run) on one thread (`CachedAttemptView`)."""
        return CachedAttemptView(self.engine, flags=self._flags)

    def sharing_flags(self, max_age_seconds: float) -> Store:
        """This store, with its attempt views sharing one read of BitLoot's flags (`SharedFlags`)."""
        return Store(self.engine, flags=SharedFlags(max_age_seconds))


class CachedAttemptView(Store):
    """The store as one attempt sees it: it reads its order once and applies its own writes to what it read (a
    reservation id saved, a key stored, the status moved, the email flag set), and keeps the state row its claim
    returned. A change by someone else is caught where it matters: every write is guarded by its WHERE clause and
    the lease, a guarded write that changed nothing reads the order again, and the email step reads it fresh
    (`load_order(fresh=True)`). It renews a lease it took or renewed itself only once a tenth of the lease's
    period has passed (`lease.LEASE_STILL_FRESH`). One thread only."""

    def __init__(self, engine: sa.Engine, *, flags: SharedFlags | None = None):
        super().__init__(engine, flags=flags)
        self._orders: dict[str, Order] = {}
        self._states: dict[str, ReconcileState] = {}

    def load_order(self, order_id: str, *, fresh: bool = False) -> Order | None:
        if order_id in self._orders and not fresh:
            return self._orders[order_id]
        order = super().load_order(order_id)
        if order is not None:
            self._orders[order_id] = order
        return order

    def get_state(self, order_id: str) -> ReconcileState:
        if order_id in self._states:
            return self._states[order_id]
        return super().get_state(order_id)

    def renew_lease(self, order_id: str, owner: str, ttl: dt.timedelta) -> bool:
        if lease_still_fresh(self._states.get(order_id), owner, ttl, utcnow()):
            return True
        return super().renew_lease(order_id, owner, ttl)

    def _order_changed(self, order_id: str, change: Callable[[Order], Order] | None) -> None:
        kept = self._orders.pop(order_id, None)
        if kept is not None and change is not None:
            self._orders[order_id] = change(kept)

    def _state_changed(self, order_id: str, change: Callable[[ReconcileState], ReconcileState] | None) -> None:
        kept = self._states.pop(order_id, None)
        if kept is not None and change is not None:
            self._states[order_id] = change(kept)

    def _state_claimed(self, order_id: str, state: ReconcileState) -> None:
        self._states[order_id] = state

    def _forget(self, order_id: str) -> None:
        self._orders.pop(order_id, None)
        self._states.pop(order_id, None)
