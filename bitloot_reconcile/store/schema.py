"""The store database: BitLoot's tables as its migrations leave them, plus the project's own tables.

BitLoot's columns are quoted camelCase identifiers with varchar statuses and uuid keys; the definitions here
mirror the tables BitLoot's own migrations create and are only *created* on an empty database (demo, tests).
Against a real BitLoot database the project adds just its own tables and indexes (see the migrations).

Timestamps: BitLoot uses TIMESTAMP WITHOUT TIME ZONE holding UTC; the project's own tables use timestamptz.
"""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from bitloot_reconcile.domain import eligibility
from bitloot_reconcile.store.statuses import OrderStatus

metadata = sa.MetaData()


class UtcDateTime(sa.TypeDecorator):
    """timestamptz that always hands back aware UTC datetimes, on PostgreSQL and on SQLite alike."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UtcDateTime needs an aware datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


JSONB = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UUID = sa.Uuid(as_uuid=False)
SOURCE_TYPE = sa.Enum("custom", "kinguin", name="product_source_type_enum")
PAYMENT_STATUS = sa.Enum(
    "created", "waiting", "confirmed", "finished", "underpaid", "failed", name="payments_status_enum"
)
BOUNCE_TYPE = sa.Enum("hard", "soft", "complaint", name="email_bounces_type_enum")


def _bitloot_timestamps() -> list[sa.Column]:
    return [
        sa.Column("createdAt", sa.DateTime(), nullable=False, server_default=sa.func.now()),
        sa.Column("updatedAt", sa.DateTime(), nullable=False, server_default=sa.func.now()),
    ]


# --- BitLoot's tables (created only on an empty database) -------------------------------------------------
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("userId", UUID, nullable=True),
    sa.Column("sourceType", SOURCE_TYPE, nullable=False, server_default="custom"),
    sa.Column("status", sa.String(20), nullable=False, server_default="created"),
    sa.Column("totalCrypto", sa.Numeric(20, 8), nullable=False, server_default="0"),
    sa.Column("originalTotal", sa.Numeric(20, 8), nullable=True),
    sa.Column("discountAmount", sa.Numeric(20, 8), nullable=True),
    sa.Column("promoCodeId", UUID, nullable=True),
    sa.Column("kinguinReservationId", sa.String(255), nullable=True),
    sa.Column("completionEmailSent", sa.Boolean(), nullable=False, server_default=sa.false()),
    *_bitloot_timestamps(),
)

order_items = sa.Table(
    "order_items",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("orderId", UUID, sa.ForeignKey("orders.id", ondelete="CASCADE"), nullable=True),
    sa.Column("productId", sa.String(100), nullable=False),
    sa.Column("quantity", sa.Integer(), nullable=False, server_default="1"),
    sa.Column("unitPrice", sa.Numeric(10, 2), nullable=False, server_default="0"),
    sa.Column("productSourceType", SOURCE_TYPE, nullable=False, server_default="custom"),
    sa.Column("signedUrl", sa.Text(), nullable=True),
    sa.Column("inventoryItemId", UUID, nullable=True),
    *_bitloot_timestamps(),
)

keys = sa.Table(
    "keys",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("orderItemId", UUID, sa.ForeignKey("order_items.id", ondelete="CASCADE"), nullable=False),
    sa.Column("storageRef", sa.Text(), nullable=True),
    sa.Column("encryptionKey", sa.Text(), nullable=True),
    sa.Column("contentType", sa.Text(), nullable=True, server_default="text/plain"),
    sa.Column("viewedAt", sa.DateTime(), nullable=True),
    sa.Column("downloadCount", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("lastAccessIp", sa.Text(), nullable=True),
    sa.Column("lastAccessUserAgent", sa.Text(), nullable=True),
    *_bitloot_timestamps(),
)

payments = sa.Table(
    "payments",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("orderId", UUID, sa.ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    sa.Column("externalId", sa.String(), nullable=False, unique=True),
    sa.Column("provider", sa.String(), nullable=False, server_default="nowpayments"),
    sa.Column("status", PAYMENT_STATUS, nullable=False, server_default="created"),
    sa.Column("rawPayload", JSONB, nullable=True),
    sa.Column("priceAmount", sa.Numeric(20, 8), nullable=True),
    sa.Column("payAmount", sa.Numeric(20, 8), nullable=True),
    sa.Column("priceCurrency", sa.String(), nullable=True),
    sa.Column("payCurrency", sa.String(), nullable=True),
    sa.Column("confirmations", sa.Integer(), nullable=False, server_default="0"),
    *_bitloot_timestamps(),
)

products = sa.Table(
    "products",
    metadata,
    sa.Column("id", UUID, primary_key=True),
    sa.Column("slug", sa.Text(), nullable=False),
    sa.Column("title", sa.Text(), nullable=True),
    sa.Column("sourceType", SOURCE_TYPE, nullable=False, server_default="custom"),
    sa.Column("kinguinId", sa.Integer(), nullable=True),
    sa.Column("kinguinProductId", sa.String(100), nullable=True),
    sa.Column("kinguinOfferId", sa.String(255), nullable=True),
    sa.Column("cost", sa.Numeric(20, 8), nullable=False, server_default="0"),
    sa.Column("price", sa.Numeric(20, 8), nullable=False, server_default="0"),
    sa.Column("currency", sa.CHAR(3), nullable=False, server_default="EUR"),
    sa.Column("isPreorder", sa.Boolean(), nullable=True, server_default=sa.false()),
    sa.Column("releaseDate", sa.String(20), nullable=True),
    *_bitloot_timestamps(),
)

# BitLoot's operator switches (its migration CreateFeatureFlagsAndConfig creates and seeds them).
feature_flags = sa.Table(
    "feature_flags",
    metadata,
    sa.Column("id", UUID, primary_key=True, default=lambda: str(uuid.uuid4())),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("description", sa.Text(), nullable=True),
    sa.Column("category", sa.String(50), nullable=False, server_default="System"),
    sa.Column("createdAt", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updatedAt", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updatedById", UUID, nullable=True),
    sa.Index("IDX_feature_flags_name", "name", unique=True),
)
# The rows BitLoot's migration seeds: (name, enabled, category).
SEEDED_FEATURE_FLAGS = (
    ("auto_fulfill_enabled", True, "Fulfillment"),
    ("captcha_enabled", True, "Security"),
    ("custom_products_enabled", True, "Products"),
    ("email_notifications_enabled", True, "Notifications"),
    ("fulfillment_enabled", True, "Fulfillment"),
    ("kinguin_enabled", True, "Products"),
    ("maintenance_mode", False, "System"),
    ("payment_processing_enabled", True, "Payments"),
)

# BitLoot's suppression list: addresses that bounced or complained.
email_bounces = sa.Table(
    "email_bounces",
    metadata,
    sa.Column("id", UUID, primary_key=True, default=lambda: str(uuid.uuid4())),
    sa.Column("email", sa.String(255), nullable=False),
    sa.Column("type", BOUNCE_TYPE, nullable=False),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("externalBounceId", sa.String(255), nullable=True),
    sa.Column("bouncedAt", sa.DateTime(), nullable=False, server_default=sa.func.now()),
    sa.Column("createdAt", sa.DateTime(), nullable=False, server_default=sa.func.now()),
    sa.Index("IDX_email_bounces_email", "email"),
    sa.Index("IDX_email_bounces_email_type", "email", "type"),
    sa.Index("IDX_email_bounces_bouncedAt", "bouncedAt"),
    sa.Index("IDX_email_bounces_type_createdAt", "type", "createdAt"),
)

BITLOOT_TABLES = (orders, order_items, keys, payments, products, feature_flags, email_bounces)

# --- the project's own tables ------------------------------------------------------------------------------
reconcile_state = sa.Table(
    "reconcile_state",
    metadata,
    sa.Column("order_id", UUID, primary_key=True),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UtcDateTime(), nullable=True),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", UtcDateTime(), nullable=True),
    # Set just before POST /v2/order; a later run seeing it searches Kinguin before placing again.
    sa.Column("placement_intent_at", UtcDateTime(), nullable=True),
    sa.Column("waiting_since", UtcDateTime(), nullable=True),
    sa.Column("last_outcome", sa.String(32), nullable=True),
    sa.Column("last_reason", sa.Text(), nullable=True),
    sa.Column("last_run_id", sa.String(64), nullable=True),
    sa.Column("alerted_outcome", sa.String(32), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", UtcDateTime(), nullable=False, server_default=sa.func.now()),
    # Replacements of a Kinguin order Kinguin canceled or refunded (an admin's remedy): how many were placed
    # or about to be (the intent is recorded before the placement, as for the first order), and the canceled
    # order the latest one replaces. While the order's kinguinReservationId is still that canceled order, the
    # replacement may exist at Kinguin unsaved: a run searches for it before anything else.
    sa.Column("replacements", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("replaced_kinguin_order_id", sa.String(255), nullable=True),
)

reconcile_audit = sa.Table(
    "reconcile_audit",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("order_id", UUID, nullable=False, index=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(320), nullable=True),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("outcome", sa.String(32), nullable=True),
    sa.Column("detail", sa.Text(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False, server_default=sa.func.now()),
)

# Which delivered Kinguin key went to which order item; written before the key is uploaded so that a re-run
# after a crash stores the same key at the same path (never two contents at one path, never one key twice).
reconcile_key_assignment = sa.Table(
    "reconcile_key_assignment",
    metadata,
    sa.Column("order_item_id", UUID, primary_key=True),
    sa.Column("order_id", UUID, nullable=False, index=True),
    sa.Column("kinguin_key_id", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UtcDateTime(), nullable=False, server_default=sa.func.now()),
)

PROJECT_TABLES = (reconcile_state, reconcile_audit, reconcile_key_assignment)

# Indexes the project adds to BitLoot's tables (the sweep reads them; BitLoot has neither).
sweep_index = sa.Index("ix_reconcile_orders_status_updated", orders.c.status, orders.c.updatedAt)
email_pending_index = sa.Index(
    "ix_reconcile_orders_email_pending",
    orders.c.updatedAt,
    postgresql_where=sa.and_(orders.c.status == OrderStatus.FULFILLED.value, orders.c.completionEmailSent.is_(False)),
    sqlite_where=sa.and_(orders.c.status == OrderStatus.FULFILLED.value, orders.c.completionEmailSent.is_(False)),
)
reservation_index = sa.Index("ix_reconcile_orders_kinguin_reservation", orders.c.kinguinReservationId)
PROJECT_INDEXES = (sweep_index, email_pending_index, reservation_index)

# Only the state rows that can hold an order back from the sweep (leased, backing off, left to a person): the
# sweep's NOT EXISTS probes this small index instead of reading every order's history.
_BLOCKING = eligibility.may_hold_back_sql(reconcile_state)
blocking_state_index = sa.Index(
    "ix_reconcile_state_blocking", reconcile_state.c.order_id, postgresql_where=_BLOCKING, sqlite_where=_BLOCKING
)
