"""Create the project's tables and indexes; create BitLoot's tables only on an empty database.

On a real BitLoot database BitLoot's tables exist and are left exactly as they are: no column is added,
altered or dropped, and a BitLoot table an older BitLoot lacks (`feature_flags`, `email_bounces`) is not
created either: BitLoot's own migration will create it, and the recovery reads its absence as "all on".
Only the project's own tables and three indexes on `orders` are created; on PostgreSQL the indexes are built
with CREATE INDEX CONCURRENTLY, so a live shop keeps writing orders while they build.
On an empty database (demo, tests) BitLoot's tables are created first, with the feature flags BitLoot seeds.
The project's tables come with their own indexes (the audit's order index, the sweep's blocking-state index).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from bitloot_reconcile.store import schema
from bitloot_reconcile.store.migrate import build_index_concurrently, concurrent_index_builds

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    if not existing & {table.name for table in schema.BITLOOT_TABLES}:
        for table in schema.BITLOOT_TABLES:
            table.create(bind)
        op.bulk_insert(
            schema.feature_flags,
            [{"name": name, "enabled": enabled, "category": category}
             for name, enabled, category in schema.SEEDED_FEATURE_FLAGS],
        )
    for table in schema.PROJECT_TABLES:
        table.create(bind)
    existing_indexes = {ix["name"] for ix in sa.inspect(bind).get_indexes("orders")}
    missing = [index for index in schema.PROJECT_INDEXES if index.name not in existing_indexes]
    if bind.dialect.name != "postgresql" or not missing:
        for index in missing:
            index.create(bind)
        return
    # On a live shop's `orders`: built concurrently, so the shop keeps taking orders meanwhile.
    with concurrent_index_builds() as conn:
        for index in missing:
            build_index_concurrently(conn, index.name, str(sa.schema.CreateIndex(index).compile(dialect=bind.dialect)))


def downgrade() -> None:
    bind = op.get_bind()
    for index in schema.PROJECT_INDEXES:
        index.drop(bind, checkfirst=True)
    for table in reversed(schema.PROJECT_TABLES):
        table.drop(bind)
