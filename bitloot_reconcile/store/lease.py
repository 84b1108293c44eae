"""The per-order lease on `reconcile_state`: the claim, the renewal, the fence every write of a run opens with,
and handing the lease (or the attempt) back."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from bitloot_reconcile.store.base import StoreBase
from bitloot_reconcile.store.models import LeaseLost, ReconcileState, state_from_row, utcnow
from bitloot_reconcile.store.schema import reconcile_state

# The lease's two most frequent statements (every step renews, every write is fenced), built once.
_HELD_BY = sa.and_(
    reconcile_state.c.order_id == sa.bindparam("held_order", type_=reconcile_state.c.order_id.type),
    reconcile_state.c.lease_owner == sa.bindparam("holder", type_=reconcile_state.c.lease_owner.type),
)
_RENEW = sa.update(reconcile_state).where(_HELD_BY).values(
    lease_expires_at=sa.bindparam("until", type_=reconcile_state.c.lease_expires_at.type),
    updated_at=sa.bindparam("now", type_=reconcile_state.c.updated_at.type),
)
_FENCE = sa.update(reconcile_state).where(_HELD_BY).values(
    updated_at=sa.bindparam("now", type_=reconcile_state.c.updated_at.type))

# A lease the attempt's view took or renewed itself, with at least this share of its period still ahead, is not
# renewed again: nobody else can take an order before its lease lapses, and the step ahead still has most of the
# period (the policy keeps every in-run wait under half of it).
LEASE_STILL_FRESH = 0.9


def lease_still_fresh(held: ReconcileState | None, owner: str, ttl: dt.timedelta, now: dt.datetime) -> bool:
    """Whether `held` (the state row as the holder last wrote it) shows `owner`'s lease with most of `ttl` ahead."""
    return (held is not None and held.lease_owner == owner and held.lease_expires_at is not None
            and held.lease_expires_at - now >= ttl * LEASE_STILL_FRESH)


@functools.cache
def _claim_statement(dialect: str) -> sa.Insert:
    """The claim, built once per dialect: a first claim inserts the state row; a later one updates it only
    where the lease is free, lapsed or already the claimer's."""
    insert = (postgresql if dialect == "postgresql" else sqlite).insert
    owner = sa.bindparam("claimer", type_=reconcile_state.c.lease_owner.type)
    now = sa.bindparam("now", type_=reconcile_state.c.updated_at.type)
    until = sa.bindparam("until", type_=reconcile_state.c.lease_expires_at.type)
    lease = {"lease_owner": owner, "lease_expires_at": until, "updated_at": now}
    return insert(reconcile_state).values(
        order_id=sa.bindparam("claimed_order", type_=reconcile_state.c.order_id.type), attempts=1, **lease,
    ).on_conflict_do_update(
        index_elements=["order_id"],
        set_={**lease, "attempts": reconcile_state.c.attempts + 1},
        where=sa.or_(
            reconcile_state.c.lease_owner.is_(None),
            reconcile_state.c.lease_expires_at < now,
            reconcile_state.c.lease_owner == owner,
        ),
    ).returning(*reconcile_state.c)


class Lease(StoreBase):
    def claim(self, order_id: str, owner: str, ttl: dt.timedelta) -> bool:
        """Take the order's lease if it is free, expired or already ours; one upsert decides and returns the row."""
        now = utcnow()
        with self._autocommit() as conn:
            row = conn.execute(_claim_statement(self.engine.dialect.name), {
                "claimed_order": order_id, "claimer": owner, "until": now + ttl, "now": now}).mappings().first()
        if row is not None:
            self._state_claimed(order_id, state_from_row(row))
        return row is not None

    def renew_lease(self, order_id: str, owner: str, ttl: dt.timedelta) -> bool:
        """Extend the lease from now, only while `owner` still holds it (even if it lapsed: nobody took it)."""
        now = utcnow()
        until = now + ttl
        with self._autocommit() as conn:
            renewed = conn.execute(_RENEW, {"held_order": order_id, "holder": owner, "until": until,
                                            "now": now}).rowcount == 1
        self._state_changed(order_id, (lambda state: replace(state, lease_owner=owner, lease_expires_at=until))
                            if renewed else None)
        return renewed

    @staticmethod
    def _fence(conn: sa.Connection, order_id: str, owner: str | None) -> None:
        """First statement of every write transaction of a run: it checks that `owner` holds the lease and
        keeps the state row locked until commit, so no other run can claim the order in between.
        `owner=None` is for writes made outside a run (seeding, fixtures)."""
        if owner is None:
            return
        held = conn.execute(_FENCE, {"held_order": order_id, "holder": owner, "now": utcnow()}).rowcount
        if held != 1:
            raise LeaseLost(order_id, owner)

    @contextmanager
    def _write(self, order_id: str, owner: str | None) -> Iterator[sa.Connection]:
        """A run's write transaction, fenced by its lease. A write to `orders` or its items then says what it
        changed (`_order_changed`); one that failed leaves what was read of the order to be read anew."""
        try:
            with self.engine.begin() as conn:
                self._fence(conn, order_id, owner)
                yield conn
        except BaseException:
            self._forget(order_id)
            raise

    def finish_run(self, order_id: str, owner: str, **values) -> bool:
        """The run's last write: its outcome into the state row and the lease handed back, in one statement
        that only applies while `owner` still holds the lease. False when another run took the order over."""
        self._state_changed(order_id, None)
        with self._autocommit() as conn:
            return conn.execute(
                sa.update(reconcile_state)
                .where(reconcile_state.c.order_id == order_id, reconcile_state.c.lease_owner == owner)
                .values(**values, lease_owner=None, lease_expires_at=None, updated_at=utcnow())
            ).rowcount == 1

    def give_back_attempt(self, order_id: str, owner: str) -> None:
        """Undo the attempt `claim` counted, for a run a BitLoot switch held: holds never use up attempts."""
        self._state_changed(order_id, None)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(reconcile_state)
                .where(reconcile_state.c.order_id == order_id, reconcile_state.c.lease_owner == owner,
                       reconcile_state.c.attempts > 0)
                .values(attempts=reconcile_state.c.attempts - 1, updated_at=utcnow())
            )
