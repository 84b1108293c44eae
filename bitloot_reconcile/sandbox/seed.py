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
