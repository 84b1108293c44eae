"""Rows for the store's tests: orders inserted as BitLoot stores them, and what the database holds after a write."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import sqlalchemy as sa

from bitloot_reconcile.store import schema

OLD = dt.datetime(2026, 1, 2, 3, 4, 5)  # BitLoot timestamps are naive UTC


def new_id() -> str:
    return str(uuid.uuid4())



def insert_order(engine: sa.Engine, *, status: str = "paid", items: int = 1, **values) -> tuple[str, list[str]]:
    order_id = new_id()
    item_ids = [new_id() for _ in range(items)]
    with engine.begin() as conn:
        conn.execute(
            sa.insert(schema.orders).values(
                id=order_id,
                email="gamer@example.com",
                status=status,
                sourceType="kinguin",
                totalCrypto=Decimal("29.99"),
                createdAt=OLD,
                updatedAt=OLD,
                **values,
            )
        )
        for item_id in item_ids:
            conn.execute(
                sa.insert(schema.order_items).values(
                    id=item_id, orderId=order_id, productId=new_id(), createdAt=OLD, updatedAt=OLD
                )
            )
    return order_id, item_ids


def order_row(engine: sa.Engine, order_id: str):
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.orders).where(schema.orders.c.id == order_id)).mappings().one()


def key_rows(engine: sa.Engine, item_id: str) -> list:
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.keys).where(schema.keys.c.orderItemId == item_id)).mappings().all()



def count_statements(engine: sa.Engine) -> list[str]:
    seen: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    return seen
