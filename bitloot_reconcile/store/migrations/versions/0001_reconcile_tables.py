"""Create the project's tables and indexes; create BitLoot's tables only where they are missing.

On a real BitLoot database the five BitLoot tables exist and are left exactly as they are: no column is
added, altered or dropped. Only the project's own tables and three indexes on `orders` are created.
On an empty database (demo, tests) BitLoot's tables are created first, as `reference/bitloot.md` gives them.
The project's tables come with their own indexes (the audit's order index, the sweep's blocking-state index).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from bitloot_reconcile.store import schema

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    for table in schema.BITLOOT_TABLES:
        if table.name not in existing:
            table.create(bind)
    for table in schema.PROJECT_TABLES:
        table.create(bind)
    existing_indexes = {ix["name"] for ix in sa.inspect(bind).get_indexes("orders")}
    for index in schema.PROJECT_INDEXES:
        if index.name not in existing_indexes:
            index.create(bind)


def downgrade() -> None:
    bind = op.get_bind()
    for index in schema.PROJECT_INDEXES:
        index.drop(bind, checkfirst=True)
    for table in reversed(schema.PROJECT_TABLES):
        table.drop(bind)
