"""Seed BitLoot-shaped rows into a store database (tests, the demo, benchmarks)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

import sqlalchemy as sa

from bitloot_reconcile.store.repository import naive_utc, utcnow
from bitloot_reconcile.store.schema import email_bounces, feature_flags, order_items, orders, payments, products


@dataclass(frozen=True)
class SeedProduct:
    kinguin_product_id: str | None
    title: str
    cost: Decimal = Decimal("4.50")
    price: Decimal = Decimal("7.99")
    source_type: str = "kinguin"
    offer_id: str | None = None
    is_preorder: bool = False
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


def product_slug(product: SeedProduct) -> str:
    """BitLoot's `products.slug` is NOT NULL and unique: the title in URL form plus the start of the id."""
    words = re.sub(r"[^a-z0-9]+", "-", product.title.lower()).strip("-")
    return f"{words}-{product.id[:8]}" if words else product.id


def insert_product(engine: sa.Engine, product: SeedProduct) -> SeedProduct:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(products).values(
                id=product.id,
                slug=product_slug(product),
                title=product.title,
                sourceType=product.source_type,
                kinguinProductId=product.kinguin_product_id,
                kinguinOfferId=product.offer_id,
                cost=product.cost,
                price=product.price,
                isPreorder=product.is_preorder,
            )
        )
    return product


def insert_order(
    engine: sa.Engine,
    items: list[SeedProduct],
    *,
    status: str = "paid",
    email: str = "customer@example.com",
    age: dt.timedelta = dt.timedelta(minutes=30),
    payment_status: str | None = "finished",
    payment_id: str | None = None,
    kinguin_reservation_id: str | None = None,
    completion_email_sent: bool = False,
    order_id: str | None = None,
) -> str:
    """One order with one `order_items` row per unit (as BitLoot writes them) and optionally a payment row."""
    order_id = order_id or str(uuid.uuid4())
    moment = naive_utc(utcnow() - age)
    total = sum((p.price for p in items), Decimal("0"))
    with engine.begin() as conn:
        conn.execute(
            sa.insert(orders).values(
                id=order_id,
                email=email,
                sourceType="kinguin" if any(p.source_type == "kinguin" for p in items) else "custom",
                status=status,
                totalCrypto=total,
                kinguinReservationId=kinguin_reservation_id,
                completionEmailSent=completion_email_sent,
                createdAt=moment,
                updatedAt=moment,
            )
        )
        for product in items:
            conn.execute(
                sa.insert(order_items).values(
                    id=str(uuid.uuid4()),
                    orderId=order_id,
                    productId=product.id,
                    quantity=1,
                    unitPrice=product.price,
                    productSourceType=product.source_type,
                    createdAt=moment,
                    updatedAt=moment,
                )
            )
        if payment_status is not None:
            conn.execute(
                sa.insert(payments).values(
                    id=str(uuid.uuid4()),
                    orderId=order_id,
                    externalId=payment_id or str(uuid.uuid4().int)[:10],
                    status=payment_status,
                    priceAmount=total,
                    priceCurrency="eur",
                    createdAt=moment,
                    updatedAt=moment,
                )
            )
    return order_id


def set_feature_flag(engine: sa.Engine, name: str, enabled: bool) -> None:
    """Flip one of BitLoot's feature flags, as its admin panel does (the row is created if missing)."""
    with engine.begin() as conn:
        changed = conn.execute(
            sa.update(feature_flags).where(feature_flags.c.name == name).values(enabled=enabled)
        ).rowcount
        if not changed:
            conn.execute(sa.insert(feature_flags).values(name=name, enabled=enabled))


def insert_email_bounce(engine: sa.Engine, email: str, *, bounce_type: str = "hard", reason: str | None = None) -> None:
    """A row of BitLoot's suppression list, as its Resend bounce webhook writes it."""
    with engine.begin() as conn:
        conn.execute(sa.insert(email_bounces).values(email=email, type=bounce_type, reason=reason))


# A shop's past in bulk, around orders already in the table: the catalogue it sold from, one item per order (its
# `productId` the product's uuid as text, as BitLoot writes it), a finished payment per order, a `keys` row per
# item of a fulfilled order, and a suppression list. Only orders without items get lines.
_HISTORY_LINES = (
    """INSERT INTO products (id, slug, title, "sourceType", "kinguinProductId", cost, price)
       SELECT gen_random_uuid(), 'catalogue-' || g, 'Catalogue game ' || g, 'kinguin', md5(g::text), 4.5, 7.99
       FROM generate_series(1, :catalogue) AS g""",
    """CREATE TEMPORARY TABLE catalogue ON COMMIT DROP AS
       SELECT id, row_number() OVER (ORDER BY slug) - 1 AS n FROM products WHERE slug LIKE 'catalogue-%'""",
    """INSERT INTO order_items (id, "orderId", "productId", quantity, "unitPrice", "productSourceType", "signedUrl",
                                "createdAt", "updatedAt")
       SELECT gen_random_uuid(), o.id, c.id::text, 1, 7.99, 'kinguin',
              CASE WHEN o.status = 'fulfilled' THEN 'https://keys.example/' || o.id END, o."createdAt", o."updatedAt"
       FROM orders o JOIN catalogue c ON c.n = abs(hashtext(o.id::text)) % :catalogue
       WHERE NOT EXISTS (SELECT FROM order_items i WHERE i."orderId" = o.id)""",
    """INSERT INTO payments (id, "orderId", "externalId", status, "priceAmount", "priceCurrency", "createdAt",
                             "updatedAt")
       SELECT gen_random_uuid(), o.id, 'history-' || o.id, 'finished', 7.99, 'eur', o."createdAt", o."createdAt"
       FROM orders o WHERE NOT EXISTS (SELECT FROM payments p WHERE p."orderId" = o.id)""",
    """INSERT INTO keys (id, "orderItemId", "storageRef", "contentType", "createdAt", "updatedAt")
       SELECT gen_random_uuid(), i.id, 'keys/' || i.id, 'text/plain', i."updatedAt", i."updatedAt"
       FROM order_items i JOIN orders o ON o.id = i."orderId"
       WHERE o.status = 'fulfilled' AND NOT EXISTS (SELECT FROM keys k WHERE k."orderItemId" = i.id)""",
    """INSERT INTO email_bounces (id, email, type, reason, "bouncedAt")
       SELECT gen_random_uuid(), 'Bounced' || g || '@example.com', (ARRAY['hard', 'soft', 'complaint'])[1 + g % 3]
              ::email_bounces_type_enum, '550 mailbox unavailable', now() - g * interval '1 minute'
       FROM generate_series(1, :bounces) AS g""",
)


def add_history_lines(engine: sa.Engine, *, catalogue: int, bounces: int) -> None:
    """Give every order without items the lines a real shop's order has (see `_HISTORY_LINES`), then ANALYZE."""
    with engine.begin() as conn:
        for statement in _HISTORY_LINES:
            conn.execute(sa.text(statement), {"catalogue": catalogue, "bounces": bounces})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("orders", "order_items", "payments", "keys", "products", "email_bounces"):
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")


# What the project leaves behind after recovering an order: its state row, its key assignments, two audit rows.
_RECOVERY_HISTORY = (
    """INSERT INTO reconcile_state (order_id, attempts, last_outcome, last_run_id, created_at, updated_at)
       SELECT id, 1, 'fulfilled', 'run-' || left(id::text, 8), "updatedAt" AT TIME ZONE 'UTC',
              "updatedAt" AT TIME ZONE 'UTC'
       FROM orders o WHERE status = 'fulfilled' AND abs(hashtext(id::text)) % 100 < :percent
         AND NOT EXISTS (SELECT FROM reconcile_state s WHERE s.order_id = o.id)""",
    """INSERT INTO reconcile_key_assignment (order_item_id, order_id, kinguin_key_id, created_at)
       SELECT i.id, s.order_id, 'key-' || i.id, s.updated_at
       FROM reconcile_state s JOIN order_items i ON i."orderId" = s.order_id
       WHERE s.last_outcome = 'fulfilled' AND s.last_run_id LIKE 'run-%'
       ON CONFLICT DO NOTHING""",
    """INSERT INTO reconcile_audit (order_id, action, trigger, actor, run_id, outcome, created_at)
       SELECT s.order_id, a.action, 'sensor', 'sensor:stuck_orders', s.last_run_id, a.outcome, s.updated_at
       FROM reconcile_state s,
            (VALUES ('attempt_started', NULL), ('attempt_finished', 'fulfilled')) AS a(action, outcome)
       WHERE s.last_outcome = 'fulfilled' AND s.last_run_id LIKE 'run-%'""",
)


def add_recovery_history(engine: sa.Engine, *, percent: int) -> None:
    """The project's rows for `percent` % of the fulfilled orders, as if it had recovered them (see
    `_RECOVERY_HISTORY`), then ANALYZE."""
    with engine.begin() as conn:
        for statement in _RECOVERY_HISTORY:
            conn.execute(sa.text(statement), {"percent": percent})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("reconcile_state", "reconcile_key_assignment", "reconcile_audit"):
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
