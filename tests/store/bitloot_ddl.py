"""BitLoot's own tables, as its TypeORM migrations leave them at HEAD.

Raw PostgreSQL DDL, deliberately independent of `bitloot_reconcile.store.schema`: it is what a real BitLoot
database looks like before the project's migrations first run against it. It carries columns, tables and
indexes the project does not model (`products.qty`, `textQty`, `deliveryType`, `webhook_logs`, `users`,
BitLoot's own `orders` indexes, ...) so the tests can prove the project leaves them alone.

Also here: snapshot helpers (columns, indexes, constraints, enum types, rows) to compare a database before
and after the project's migrations.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import sqlalchemy as sa

from tests.fixtures.db import PG_SERVER_URL

BITLOOT_DDL = [
    """CREATE TYPE "product_source_type_enum" AS ENUM ('custom', 'kinguin')""",
    """CREATE TYPE "payments_status_enum" AS ENUM
           ('created', 'waiting', 'confirmed', 'finished', 'underpaid', 'failed')""",
    """CREATE TYPE "email_bounces_type_enum" AS ENUM ('hard', 'soft', 'complaint')""",
    """CREATE TABLE "users" (
        "id" uuid NOT NULL DEFAULT gen_random_uuid(),
        "email" character varying(320) NOT NULL,
        "role" character varying(20) NOT NULL DEFAULT 'user',
        "createdAt" TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
        "updatedAt" TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
        "deletedAt" TIMESTAMP WITH TIME ZONE,
        CONSTRAINT "PK_users_id" PRIMARY KEY ("id"),
        CONSTRAINT "UQ_users_email" UNIQUE ("email")
    )""",
    """CREATE TABLE "promocodes" (
        "id" uuid NOT NULL DEFAULT gen_random_uuid(),
        "code" character varying(50) NOT NULL,
        "discountPercent" numeric(5,2),
        "createdAt" TIMESTAMP NOT NULL DEFAULT now(),
        "deletedAt" TIMESTAMP,
        CONSTRAINT "PK_promocodes_id" PRIMARY KEY ("id")
    )""",
    """CREATE TABLE "products" (
        "id" uuid NOT NULL DEFAULT gen_random_uuid(),
        "title" text,
        "slug" text NOT NULL,
        "sourceType" "product_source_type_enum" NOT NULL DEFAULT 'custom',
        "kinguinId" integer,
        "kinguinProductId" character varying(100),
        "kinguinOfferId" character varying(255),
        "cost" numeric(20,8) NOT NULL DEFAULT 0,
        "price" numeric(20,8) NOT NULL DEFAULT 0,
        "currency" character(3) NOT NULL DEFAULT 'EUR',
        "qty" integer,
        "textQty" integer,
        "isPreorder" boolean DEFAULT false,
        "releaseDate" character varying(20),
        "businessCategory" character varying NOT NULL DEFAULT 'games',
        "deliveryType" character varying(20) NOT NULL DEFAULT 'key',
        "deliveryInstructions" text,
        "stockAvailable" integer NOT NULL DEFAULT 0,
        "createdAt" TIMESTAMP NOT NULL DEFAULT now(),
        "updatedAt" TIMESTAMP NOT NULL DEFAULT now(),
        CONSTRAINT "PK_products_id" PRIMARY KEY ("id")
    )""",
    """CREATE UNIQUE INDEX "IDX_products_slug" ON "products" ("slug")""",
    """CREATE INDEX "IDX_products_kinguinProductId" ON "products" ("kinguinProductId")""",
    """CREATE TABLE "orders" (
        "id" uuid NOT NULL DEFAULT gen_random_uuid(),
        "email" character varying(320) NOT NULL,
        "userId" uuid,
        "sourceType" "product_source_type_enum" NOT NULL DEFAULT 'custom',
        "status" character varying(20) NOT NULL DEFAULT 'created',
        "totalCrypto" numeric(20,8) NOT NULL DEFAULT 0,
        "originalTotal" numeric(20,8),
        "discountAmount" numeric(20,8),
        "promoCodeId" uuid,
        "kinguinReservationId" character varying(255),
        "completionEmailSent" boolean NOT NULL DEFAULT false,
        "createdAt" TIMESTAMP NOT NULL DEFAULT now(),
        "updatedAt" TIMESTAMP NOT NULL DEFAULT now(),
        CONSTRAINT "PK_orders_id" PRIMARY KEY ("id"),
        CONSTRAINT "FK_orders_userId" FOREIGN KEY ("userId") REFERENCES "users"("id") ON DELETE SET NULL,
        CONSTRAINT "FK_orders_promoCodeId" FOREIGN KEY ("promoCodeId") REFERENCES "promocodes"("id")
            ON DELETE SET NULL
    )""",
    """CREATE INDEX "IDX_orders_status_createdAt" ON "orders" ("status", "createdAt")""",
    """CREATE INDEX "IDX_orders_userId_createdAt" ON "orders" ("userId", "createdAt")""",
    """CREATE INDEX "IDX_orders_sourceType" ON "orders" ("sourceType")""",
    """CREATE INDEX "IDX_orders_promoCodeId" ON "orders" ("promoCodeId")""",
    """CREATE TABLE "order_items" (
        "id" uuid NOT NULL DEFAULT gen_random_uuid(),
        "orderId" uuid,
        "productId" character varying(100) NOT NULL,
        "quantity" integer NOT NULL DEFAULT 1,
        "unitPrice" numeric(10,2) NOT NULL DEFAULT 0,
        "productSourceType" "product_source_type_enum" NOT NULL DEFAULT 'custom',
        "signedUrl" text,
        "inventoryItemId" uuid,
        "createdAt" TIMESTAMP NOT NULL DEFAULT now(),
        "updatedAt" TIMESTAMP NOT NULL DEFAULT now(),
        CONSTRAINT "PK_order_items_id" PRIMARY KEY ("id"),
        CONSTRAINT "FK_order_items_orderId" FOREIGN KEY ("orderId") REFERENCES "orders"("id") ON DELETE CASCADE
    )""",
    """CREATE INDEX "IDX_order_items_inventoryItemId" ON "order_items" ("inventoryItemId")
           WHERE "inventoryItemId" IS NOT NULL""",
    """CREATE TABLE "keys" (
        "id" uuid NOT NULL DEFAULT gen_random_uuid(),
        "orderItemId" uuid NOT NULL,
        "storageRef" text,
        "encryptionKey" text,
        "contentType" text DEFAULT 'text/plain',
        "viewedAt" TIMESTAMP,
        "downloadCount" integer NOT NULL DEFAULT 0,
        "lastAccessIp" text,
        "lastAccessUserAgent" text,
        "createdAt" TIMESTAMP NOT NULL DEFAULT now(),
        "updatedAt" TIMESTAMP NOT NULL DEFAULT now(),
        CONSTRAINT "PK_keys_id" PRIMARY KEY ("id"),
        CONSTRAINT "FK_keys_orderItemId" FOREIGN KEY ("orderItemId") REFERENCES "order_items"("id")
            ON DELETE CASCADE
    )""",
    """CREATE INDEX "IDX_keys_orderItemId" ON "keys" ("orderItemId")""",
    """CREATE TABLE "payments" (
        "id" uuid NOT NULL DEFAULT gen_random_uuid(),
        "orderId" uuid NOT NULL,
        "externalId" character varying NOT NULL,
        "provider" character varying NOT NULL DEFAULT 'nowpayments',
        "status" "payments_status_enum" NOT NULL DEFAULT 'created',
        "rawPayload" jsonb,
        "priceAmount" numeric(20,8),
        "payAmount" numeric(20,8),
        "priceCurrency" character varying,
        "payCurrency" character varying,
        "confirmations" integer NOT NULL DEFAULT 0,
        "createdAt" TIMESTAMP NOT NULL DEFAULT now(),
        "updatedAt" TIMESTAMP NOT NULL DEFAULT now(),
        CONSTRAINT "PK_payments_id" PRIMARY KEY ("id"),
        CONSTRAINT "UQ_payments_externalId" UNIQUE ("externalId"),
        CONSTRAINT "FK_payments_orderId" FOREIGN KEY ("orderId") REFERENCES "orders"("id") ON DELETE CASCADE
    )""",
    """CREATE TABLE "webhook_logs" (
        "id" uuid NOT NULL DEFAULT gen_random_uuid(),
        "externalId" character varying(255) NOT NULL,
        "webhookType" character varying(50) NOT NULL,
        "payload" jsonb NOT NULL,
        "signature" text,
        "signatureValid" boolean NOT NULL DEFAULT false,
        "processed" boolean NOT NULL DEFAULT false,
        "orderId" uuid,
        "paymentId" character varying(255),
        "result" jsonb,
        "paymentStatus" character varying(50),
        "error" text,
        "sourceIp" character varying(45),
        "attemptCount" integer NOT NULL DEFAULT 1,
        "createdAt" TIMESTAMP NOT NULL DEFAULT now(),
        "updatedAt" TIMESTAMP NOT NULL DEFAULT now(),
        CONSTRAINT "PK_webhook_logs_id" PRIMARY KEY ("id"),
        CONSTRAINT "UQ_webhook_idempotency" UNIQUE ("externalId", "webhookType", "paymentStatus")
    )""",
    # CreateFeatureFlagsAndConfig: the table and the flags it seeds.
    """CREATE TABLE "feature_flags" (
        "id" uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        "name" character varying(100) NOT NULL,
        "enabled" boolean NOT NULL DEFAULT false,
        "description" text,
        "category" character varying(50) NOT NULL DEFAULT 'System',
        "createdAt" TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
        "updatedAt" TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
        "updatedById" uuid
    )""",
    """CREATE UNIQUE INDEX "IDX_feature_flags_name" ON "feature_flags" ("name")""",
    """INSERT INTO "feature_flags" ("name", "enabled", "category") VALUES
        ('auto_fulfill_enabled', true, 'Fulfillment'),
        ('captcha_enabled', true, 'Security'),
        ('custom_products_enabled', true, 'Products'),
        ('email_notifications_enabled', true, 'Notifications'),
        ('fulfillment_enabled', true, 'Fulfillment'),
        ('kinguin_enabled', true, 'Products'),
        ('maintenance_mode', false, 'System'),
        ('payment_processing_enabled', true, 'Payments')""",
    """CREATE TABLE "email_bounces" (
        "id" uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        "email" character varying(255) NOT NULL,
        "type" "email_bounces_type_enum" NOT NULL,
        "reason" text,
        "externalBounceId" character varying(255),
        "bouncedAt" TIMESTAMP NOT NULL DEFAULT now(),
        "createdAt" TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
    )""",
    """CREATE INDEX "IDX_email_bounces_email" ON "email_bounces" ("email")""",
    """CREATE INDEX "IDX_email_bounces_email_type" ON "email_bounces" ("email", "type")""",
    """CREATE INDEX "IDX_email_bounces_bouncedAt" ON "email_bounces" ("bouncedAt")""",
    """CREATE INDEX "IDX_email_bounces_type_createdAt" ON "email_bounces" ("type", "createdAt")""",
]

# BitLoot before CreateFeatureFlagsAndConfig: the same schema without the switches and the suppression list.
SWITCH_TABLES = ("feature_flags", "email_bounces")

# Every table the DDL creates; the first seven are the ones the project models.
MODELED_TABLES = ("orders", "order_items", "keys", "payments", "products", *SWITCH_TABLES)
BITLOOT_TABLES = (*MODELED_TABLES, "users", "promocodes", "webhook_logs")
BITLOOT_ENUMS = ("email_bounces_type_enum", "payments_status_enum", "product_source_type_enum")

# Columns BitLoot has and the project's schema does not model.
UNMODELED_COLUMNS = {
    "products": ("qty", "textQty", "businessCategory", "deliveryType", "deliveryInstructions", "stockAvailable"),
}

# The project's own objects (what its migrations may add, and must remove again on downgrade).
PROJECT_TABLES = ("reconcile_audit", "reconcile_key_assignment", "reconcile_state")
VERSION_TABLE = "reconcile_alembic_version"
PROJECT_ORDER_INDEXES = (
    "ix_reconcile_orders_email_pending",
    "ix_reconcile_orders_kinguin_reservation",
    "ix_reconcile_orders_status_updated",
)
# The indexes the project adds for the reads of one order, by table; `keys` only where BitLoot has none on
# "orderItemId" (a database the project created), so a BitLoot database gets the other three.
PROJECT_LOOKUP_INDEXES = {
    "order_items": "ix_reconcile_order_items_order",
    "payments": "ix_reconcile_payments_order",
    "email_bounces": "ix_reconcile_email_bounces_address",
}
PROJECT_KEYS_INDEX = ("keys", "ix_reconcile_keys_order_item")


def create_bitloot_schema(conn: sa.Connection, *, with_switches: bool = True) -> None:
    """BitLoot at HEAD; `with_switches=False`: an older BitLoot without `feature_flags` and `email_bounces`."""
    for statement in BITLOOT_DDL:
        if with_switches or not any(f'"{table}"' in statement for table in SWITCH_TABLES):
            conn.exec_driver_sql(statement)


def insert_bitloot_rows(conn: sa.Connection) -> dict[str, str]:
    """A handful of rows across every BitLoot table (values in the unmodeled columns too); returns their ids."""
    ids = {
        name: str(uuid.uuid4())
        for name in (
            "user",
            "promo",
            "product_kinguin",
            "product_custom",
            "order_paid",
            "order_fulfilled",
            "order_waiting",
            "item_paid",
            "item_fulfilled",
            "item_waiting",
            "key_fulfilled",
            "payment_paid",
            "payment_waiting",
        )
    }
    statements = [
        ("""INSERT INTO users (id, email) VALUES (:user, 'gamer@example.com')""", {}),
        ("""INSERT INTO promocodes (id, code, "discountPercent") VALUES (:promo, 'WINTER10', 10)""", {}),
        (
            """INSERT INTO products (id, title, slug, "sourceType", "kinguinId", "kinguinProductId",
                   "kinguinOfferId", cost, price, qty, "textQty", "deliveryType", "deliveryInstructions",
                   "stockAvailable")
               VALUES (:product_kinguin, 'Elden Ring (PC)', 'elden-ring-pc', 'kinguin', 12345,
                   '5c9b5f6b2539a4e8f172916a', 'offer-77', 23.45000000, 29.99000000, 17, 4, 'key',
                   'Redeem on Steam', 21)""",
            {},
        ),
        (
            """INSERT INTO products (id, title, slug, price, qty, "textQty", "deliveryType")
               VALUES (:product_custom, 'Gift card', 'gift-card', 10, 3, 3, 'code')""",
            {},
        ),
        (
            """INSERT INTO orders (id, email, "userId", "sourceType", status, "totalCrypto", "originalTotal",
                   "discountAmount", "promoCodeId", "createdAt", "updatedAt")
               VALUES (:order_paid, 'gamer@example.com', :user, 'kinguin', 'paid', 26.99100000, 29.99000000,
                   2.99900000, :promo, '2026-01-02 03:04:05.123456', '2026-01-02 03:05:00')""",
            {},
        ),
        (
            """INSERT INTO orders (id, email, "sourceType", status, "totalCrypto", "kinguinReservationId",
                   "completionEmailSent")
               VALUES (:order_fulfilled, 'guest@example.com', 'kinguin', 'fulfilled', 29.99, 'PHS84FJAG5U', true)""",
            {},
        ),
        (
            """INSERT INTO orders (id, email, status, "totalCrypto")
               VALUES (:order_waiting, 'late@example.com', 'waiting', 10)""",
            {},
        ),
        (
            """INSERT INTO order_items (id, "orderId", "productId", "unitPrice", "productSourceType")
               VALUES (:item_paid, :order_paid, :product_kinguin_text, 29.99, 'kinguin')""",
            {"product_kinguin_text": ids["product_kinguin"]},
        ),
        (
            """INSERT INTO order_items (id, "orderId", "productId", "unitPrice", "productSourceType", "signedUrl")
               VALUES (:item_fulfilled, :order_fulfilled, :product_kinguin_text, 29.99, 'kinguin',
                   'https://r2.example/orders/x/key-abc.txt?X-Amz-Signature=old')""",
            {"product_kinguin_text": ids["product_kinguin"]},
        ),
        (
            """INSERT INTO order_items (id, "orderId", "productId", "unitPrice")
               VALUES (:item_waiting, :order_waiting, :product_custom_text, 10)""",
            {"product_custom_text": ids["product_custom"]},
        ),
        (
            """INSERT INTO keys (id, "orderItemId", "storageRef", "encryptionKey", "downloadCount")
               VALUES (:key_fulfilled, :item_fulfilled, 'orders/x/key-abc.txt', 'raw:text/plain', 2)""",
            {},
        ),
        (
            """INSERT INTO payments (id, "orderId", "externalId", status, "rawPayload", "priceAmount",
                   "priceCurrency", "payCurrency", confirmations)
               VALUES (:payment_paid, :order_paid, '5077125051', 'finished',
                   '{"payment_status": "finished", "actually_paid": 0.0012}', 26.991, 'eur', 'btc', 3)""",
            {},
        ),
        (
            """INSERT INTO payments (id, "orderId", "externalId", status)
               VALUES (:payment_waiting, :order_waiting, '4522625843', 'waiting')""",
            {},
        ),
        (
            """INSERT INTO webhook_logs ("externalId", "webhookType", payload, "orderId", "paymentStatus")
               VALUES ('5077125051', 'nowpayments_ipn', '{"payment_status": "finished"}', :order_paid,
                   'finished')""",
            {},
        ),
    ]
    for sql, extra in statements:
        conn.execute(sa.text(sql), {**ids, **extra})
    return ids


def populate_bitloot_database(url: str, *, with_switches: bool = True) -> dict[str, str]:
    """Create BitLoot's schema in the (empty) database at `url` and fill it with the sample rows."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            create_bitloot_schema(conn, with_switches=with_switches)
            ids = insert_bitloot_rows(conn)
            if with_switches:
                conn.execute(sa.text(
                    """INSERT INTO email_bounces (email, type, reason, "externalBounceId")
                       VALUES ('gone@example.com', 'hard', '550 5.1.1 mailbox does not exist', 'bnc_1')"""
                ))
            return ids
    finally:
        engine.dispose()


# --- snapshots -----------------------------------------------------------------------------------------------
def column_snapshot(conn: sa.Connection, tables=BITLOOT_TABLES) -> list[tuple]:
    """information_schema.columns of `tables`: name, type (with length/precision), nullable, default."""
    return [
        tuple(row)
        for row in conn.execute(
            sa.text(
                """SELECT table_name, column_name, ordinal_position, data_type, udt_name,
                          character_maximum_length, numeric_precision, numeric_scale, datetime_precision,
                          is_nullable, column_default
                   FROM information_schema.columns
                   WHERE table_schema = 'public' AND table_name = ANY(:tables)
                   ORDER BY table_name, ordinal_position"""
            ),
            {"tables": list(tables)},
        )
    ]


def index_snapshot(conn: sa.Connection) -> dict[tuple[str, str], str]:
    """(table, index name) -> definition, for every index in the public schema."""
    rows = conn.execute(sa.text("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"))
    return {(r.tablename, r.indexname): r.indexdef for r in rows}


def constraint_snapshot(conn: sa.Connection, tables=BITLOOT_TABLES) -> set[tuple[str, str, str]]:
    rows = conn.execute(
        sa.text(
            """SELECT rel.relname, con.conname, pg_get_constraintdef(con.oid) AS definition
               FROM pg_constraint con JOIN pg_class rel ON rel.oid = con.conrelid
               JOIN pg_namespace ns ON ns.oid = rel.relnamespace
               WHERE ns.nspname = 'public' AND rel.relname = ANY(:tables)"""
        ),
        {"tables": list(tables)},
    )
    return {tuple(r) for r in rows}


def enum_snapshot(conn: sa.Connection) -> dict[str, list[str]]:
    rows = conn.execute(
        sa.text(
            """SELECT t.typname, e.enumlabel FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
               JOIN pg_namespace ns ON ns.oid = t.typnamespace WHERE ns.nspname = 'public'
               ORDER BY t.typname, e.enumsortorder"""
        )
    )
    enums: dict[str, list[str]] = {}
    for name, label in rows:
        enums.setdefault(name, []).append(label)
    return enums


def table_names(conn: sa.Connection) -> set[str]:
    rows = conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    return {r.tablename for r in rows}


def row_snapshot(conn: sa.Connection, tables=BITLOOT_TABLES) -> dict[str, list[str]]:
    """Every row of every BitLoot table, as PostgreSQL's own JSON text (all columns, exact values)."""
    return {
        table: [r[0] for r in conn.execute(sa.text(f'SELECT row_to_json(t)::text FROM "{table}" t ORDER BY t.id'))]
        for table in tables
    }


def full_snapshot(url: str) -> dict:
    """Everything about BitLoot's objects that the project's migrations must leave exactly as it was."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            indexes = index_snapshot(conn)
            tables = table_names(conn)
            return {
                "columns": column_snapshot(conn),
                "indexes": {k: v for k, v in indexes.items() if k[0] in BITLOOT_TABLES},
                "constraints": constraint_snapshot(conn),
                "enums": enum_snapshot(conn),
                "rows": row_snapshot(conn, [t for t in BITLOOT_TABLES if t in tables]),
                "tables": tables,
                "all_indexes": indexes,
            }
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "brtest_ddl") -> Iterator[str]:
    """A new empty PostgreSQL database on the test server, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{PG_SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield f"{PG_SERVER_URL}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
