"""The project's writes to BitLoot's tables (`orders`, `order_items`, `keys`). Each is fenced by the writing
run's lease and guarded by its WHERE clause: a status only moves from the states it may come from, a saved
Kinguin order id is never overwritten, an item gets one `keys` row."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace

import sqlalchemy as sa

from bitloot_reconcile.store.lease import Lease
from bitloot_reconcile.store.models import Order, naive_utc, utcnow
from bitloot_reconcile.store.schema import keys as keys_table
from bitloot_reconcile.store.schema import order_items, orders
from bitloot_reconcile.store.statuses import RECOVERABLE, UNPAID, OrderStatus


class BitLootWrites(Lease):
    def mark_paid(self, order_id: str, *, owner: str | None = None) -> bool:
        """waiting/confirming/failed -> paid, only after the payment was confirmed."""
        return self._set_order_status(order_id, OrderStatus.PAID, UNPAID, owner)

    def mark_fulfilled(self, order_id: str, *, owner: str | None = None) -> bool:
        """paid -> fulfilled; never touches an order an admin moved to refunded or cancelled meanwhile."""
        return self._set_order_status(order_id, OrderStatus.FULFILLED, (OrderStatus.PAID,), owner)

    def mark_refunded(self, order_id: str, *, owner: str | None = None) -> bool:
        """An admin's `refunded_to_customer` resolution: the status BitLoot's admin panel would set."""
        return self._set_order_status(
            order_id, OrderStatus.REFUNDED, (*RECOVERABLE, OrderStatus.FULFILLED), owner
        )

    def _set_order_status(
        self, order_id: str, status: OrderStatus, allowed_from: tuple[OrderStatus, ...], owner: str | None
    ) -> bool:
        now = naive_utc(utcnow())
        return self._write_order(order_id, owner, orders.c.status.in_([s.value for s in allowed_from]),
                                 sa.update(orders).values(status=status.value, updatedAt=now),
                                 lambda o: replace(o, status=status.value, updated_at=now))

    def save_reservation_id(self, order_id: str, kinguin_order_id: str, *, owner: str | None = None) -> None:
        """Saved at once, in its own transaction, and never overwritten once set."""
        now = naive_utc(utcnow())
        self._write_order(order_id, owner, orders.c.kinguinReservationId.is_(None),
                          sa.update(orders).values(kinguinReservationId=kinguin_order_id, updatedAt=now),
                          lambda o: replace(o, kinguin_reservation_id=kinguin_order_id, updated_at=now))

    def replace_reservation_id(self, order_id: str, replaced: str, replacement: str, *, owner: str | None = None
                               ) -> bool:
        """A replacement Kinguin order takes the place of the canceled one, only while the canceled one is the
        order's saved reservation (so a second attempt changes nothing)."""
        now = naive_utc(utcnow())
        return self._write_order(order_id, owner, orders.c.kinguinReservationId == replaced,
                                 sa.update(orders).values(kinguinReservationId=replacement, updatedAt=now),
                                 lambda o: replace(o, kinguin_reservation_id=replacement, updated_at=now))

    def mark_email_sent(self, order_id: str, *, owner: str | None = None) -> None:
        now = naive_utc(utcnow())
        self._write_order(order_id, owner, orders.c.completionEmailSent.is_(False),
                          sa.update(orders).values(completionEmailSent=True, updatedAt=now),
                          lambda o: replace(o, completion_email_sent=True, updated_at=now))

    def _write_order(self, order_id: str, owner: str | None, guard: sa.ColumnElement[bool], update: sa.Update,
                     change: Callable[[Order], Order]) -> bool:
        """`update` of the order's row where `guard` holds, under the lease; `change` is what it does to the order
        as read. False when the guard matched nothing: someone else moved the order, which is then read again."""
        with self._write(order_id, owner) as conn:
            changed = conn.execute(update.where(orders.c.id == order_id, guard)).rowcount == 1
        self._order_changed(order_id, change if changed else None)
        return changed

    def record_stored_key(
        self,
        order_id: str,
        order_item_id: str,
        storage_ref: str,
        content_type: str,
        signed_url: str,
        *,
        owner: str | None = None,
    ) -> None:
        """One `keys` row per item (inserted only if the item has none) and the item's signed URL.

        The item row is locked before the check, so two writers of one item take turns and the second sees
        the first one's row (BitLoot's `keys` has no unique rule on the item and may hold old duplicates)."""
        now = naive_utc(utcnow())
        with self._write(order_id, owner) as conn:
            conn.execute(sa.select(order_items.c.id).where(order_items.c.id == order_item_id).with_for_update())
            has_row = conn.execute(
                sa.select(keys_table.c.id).where(keys_table.c.orderItemId == order_item_id).limit(1)
            ).first()
            if has_row is None:
                conn.execute(
                    sa.insert(keys_table).values(
                        id=str(uuid.uuid4()),
                        orderItemId=order_item_id,
                        storageRef=storage_ref,
                        contentType=content_type,
                        encryptionKey=f"raw:{content_type}",
                        createdAt=now,
                        updatedAt=now,
                    )
                )
            conn.execute(
                sa.update(order_items)
                .where(order_items.c.id == order_item_id)
                .values(signedUrl=signed_url, updatedAt=now)
            )

        def stored(order: Order) -> Order:
            return replace(order, items=tuple(
                replace(item, signed_url=signed_url, key_refs=(storage_ref,)) if item.id == order_item_id else item
                for item in order.items))

        # Another writer's `keys` row (its storage ref) is only known by reading the order again.
        self._order_changed(order_id, stored if has_row is None else None)
