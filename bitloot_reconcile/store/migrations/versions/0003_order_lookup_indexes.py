"""Indexes for the reads of one order: its items, its payments, its items' keys, its address's bounces.

BitLoot's schema indexes none of the columns an attempt reads one order by: `order_items."orderId"` and
`payments."orderId"` are foreign keys without an index (PostgreSQL does not index a foreign key by itself), and
its suppression list is indexed by `email` while BitLoot and the project match addresses case-insensitively.
Without these indexes every attempt reads those tables whole, so its cost grows with the shop's history.

On PostgreSQL each index is built with CREATE INDEX CONCURRENTLY, so a live shop keeps writing orders while it
builds: outside any transaction (an autocommit block) and without the store's statement timeout (a build on a
large table takes minutes). A build that was interrupted leaves an invalid index behind; it is dropped and built
again. `keys` gets an index only where none starts with "orderItemId" (BitLoot's migrations create one; a
database the project created does not), `email_bounces` only where BitLoot has the table.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from bitloot_reconcile.store.migrate import build_index_concurrently, concurrent_index_builds

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# name, table, the indexed expression, and the column an existing index of BitLoot's must start with to serve
# the same reads (None: only this index serves them).
LOOKUP_INDEXES = (
    ("ix_reconcile_order_items_order", "order_items", '"orderId"', "orderId"),
    ("ix_reconcile_payments_order", "payments", '"orderId"', "orderId"),
    ("ix_reconcile_keys_order_item", "keys", '"orderItemId"', "orderItemId"),
    ("ix_reconcile_email_bounces_address", "email_bounces", "lower(email)", None),
)


def _already_served(inspector: sa.Inspector, name: str, table: str, leading: str | None) -> bool:
    for index in inspector.get_indexes(table):
        if index["name"] == name:
            return False  # ours: rebuilt only if invalid (IF NOT EXISTS below)
        if leading is not None and index["column_names"][:1] == [leading]:
            return True
    return False


def _wanted(bind) -> list[tuple[str, str, str]]:
    inspector = sa.inspect(bind)
    tables = set(inspector.get_table_names())
    return [(name, table, expression) for name, table, expression, leading in LOOKUP_INDEXES
            if table in tables and not _already_served(inspector, name, table, leading)]


def upgrade() -> None:
    bind = op.get_bind()
    wanted = _wanted(bind)
    if bind.dialect.name != "postgresql":
        for name, table, expression in wanted:
            op.execute(f'CREATE INDEX IF NOT EXISTS {name} ON "{table}" ({expression})')
        return
    with concurrent_index_builds() as conn:
        for name, table, expression in wanted:
            build_index_concurrently(conn, name, f'CREATE INDEX {name} ON "{table}" ({expression})')


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        for name, _, _, _ in LOOKUP_INDEXES:
            op.execute(f"DROP INDEX IF EXISTS {name}")
        return
    with op.get_context().autocommit_block():
        for name, _, _, _ in LOOKUP_INDEXES:
            op.get_bind().exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
