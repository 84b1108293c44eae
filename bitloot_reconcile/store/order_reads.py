"""Reads of BitLoot's orders: one order with its items, products, keys and payments (two statements, built
once), and the reconciliation report's reads of the orders of a day."""

from __future__ import annotations

import datetime as dt
import functools

import sqlalchemy as sa

from bitloot_reconcile.store.base import StoreBase
from bitloot_reconcile.store.models import Item, Order, Payment, naive_utc
from bitloot_reconcile.store.schema import keys as keys_table
from bitloot_reconcile.store.schema import order_items, orders, payments, products

CANONICAL_UUID = sa.literal("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", literal_execute=True)


@functools.cache
def _order_queries(dialect: str) -> tuple[sa.Select, sa.Select]:
    """The two reads of an order, built once per dialect: building a statement costs about as much CPU as
    running it."""
    order_id = sa.bindparam("order_id", type_=orders.c.id.type)
    # order_items.productId holds products.id as dashed uuid text (no FK); sa.Uuid stores uuids on SQLite as 32
    # hex digits without dashes.
    if dialect == "sqlite":
        product_match = products.c.id == sa.func.replace(sa.func.lower(order_items.c.productId), "-", "")
    else:
        # Matched as BitLoot's text matches (`products.id::varchar = "productId"`: lowercase dashed uuid text) but
        # with the cast on the item's side, so the product is one probe of its primary key; text that is not a
        # lowercase dashed uuid matches no product, as before, and is never cast (the cast would fail on it).
        as_uuid = sa.case((order_items.c.productId.regexp_match(CANONICAL_UUID), sa.cast(order_items.c.productId,
                                                                                          products.c.id.type)))
        product_match = products.c.id == as_uuid
    # One row per payment (or one without), payments oldest first.
    with_payments = (
        sa.select(orders, payments.c.externalId.label("payment_id"), payments.c.status.label("payment_status"))
        .select_from(orders.outerjoin(payments, payments.c.orderId == orders.c.id))
        .where(orders.c.id == order_id)
        .order_by(payments.c.createdAt)
    )
    # One row per item and keys row (BitLoot's `keys` may hold several for an item), items in id order.
    items_with_keys = (
        sa.select(
            order_items,
            products.c.title,
            products.c.sourceType.label("product_source"),
            products.c.kinguinProductId,
            products.c.kinguinOfferId,
            products.c.cost,
            products.c.isPreorder,
            keys_table.c.storageRef.label("key_ref"),
            keys_table.c.id.label("key_id"),
        )
        .select_from(
            order_items.outerjoin(products, product_match)
            .outerjoin(keys_table, keys_table.c.orderItemId == order_items.c.id)
        )
        .where(order_items.c.orderId == order_id)
        .order_by(order_items.c.id)
    )
    return with_payments, items_with_keys


class OrderReads(StoreBase):
    def load_order(self, order_id: str, *, fresh: bool = False) -> Order | None:
        """The order with its items and payments, as it is now (`fresh` matters to an attempt's cached view)."""
        return self._read_order(order_id)

    def _read_order(self, order_id: str) -> Order | None:
        with_payments, items_with_keys = _order_queries(self.engine.dialect.name)
        with self._autocommit() as conn:
            order_rows = conn.execute(with_payments, {"order_id": order_id}).mappings().all()
            if not order_rows:
                return None
            row = order_rows[0]
            item_rows = conn.execute(items_with_keys, {"order_id": order_id}).mappings().all()
            firsts: dict[str, sa.RowMapping] = {}
            refs: dict[str, list[str]] = {}
            for r in item_rows:
                firsts.setdefault(r["id"], r)
                refs.setdefault(r["id"], [])
                if r["key_id"] is not None:
                    refs[r["id"]].append(r["key_ref"] or "")
            items = tuple(
                Item(id=r["id"], product_id=r["productId"], quantity=r["quantity"], unit_price=r["unitPrice"],
                     source_type=r["productSourceType"], signed_url=r["signedUrl"], product_title=r["title"],
                     product_source_type=r["product_source"], kinguin_product_id=r["kinguinProductId"],
                     kinguin_offer_id=r["kinguinOfferId"], product_cost=r["cost"], is_preorder=bool(r["isPreorder"]),
                     key_refs=tuple(refs[item_id]))
                for item_id, r in firsts.items()
            )
            pays = tuple(Payment(external_id=r["payment_id"], status=r["payment_status"])
                         for r in order_rows if r["payment_id"] is not None)
        return Order(id=row["id"], email=row["email"], status=row["status"], source_type=row["sourceType"],
                     total=row["totalCrypto"], kinguin_reservation_id=row["kinguinReservationId"],
                     completion_email_sent=bool(row["completionEmailSent"]), created_at=row["createdAt"],
                     updated_at=row["updatedAt"], items=items, payments=pays)

    # -- the reconciliation report (reads only) ------------------------------------------------------------
    def order_ids_created_between(self, start: dt.datetime, end: dt.datetime) -> list[str]:
        """Orders created in [start, end), oldest first. BitLoot indexes "createdAt" only behind status, so
        this scans; it runs once a day per window, never on the sweep's path."""
        with self._autocommit() as conn:
            return list(
                conn.execute(
                    sa.select(orders.c.id)
                    .where(orders.c.createdAt >= naive_utc(start), orders.c.createdAt < naive_utc(end))
                    .order_by(orders.c.createdAt, orders.c.id)
                ).scalars()
            )

    def existing_order_ids(self, order_ids: set[str]) -> set[str]:
        """Which of these order uuids are orders of the store (any day)."""
        if not order_ids:
            return set()
        with self._autocommit() as conn:
            return set(conn.execute(sa.select(orders.c.id).where(orders.c.id.in_(sorted(order_ids)))).scalars())

