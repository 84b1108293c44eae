"""Admin remedies: replacement Kinguin orders in the reconcile state; resolved orders leave the sweep.

Adds `reconcile_state.replacements` and `reconcile_state.replaced_kinguin_order_id`, and widens the sweep's
partial index of blocking state rows to the orders an admin resolved by hand. Only the project's own table is
touched. 0001 creates the project's tables from the current schema, so on a database created by it the
columns exist already: they are added only where missing, and the index is rebuilt either way.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from bitloot_reconcile.store import schema

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NEW_COLUMNS = ("replacements", "replaced_kinguin_order_id")
_OLD_BLOCKING = sa.text(
    "lease_owner IS NOT NULL OR next_attempt_at IS NOT NULL OR last_outcome = 'needs_attention'"
)


def _columns(bind) -> set[str]:
    return {column["name"] for column in sa.inspect(bind).get_columns(schema.reconcile_state.name)}


def upgrade() -> None:
    bind = op.get_bind()
    present = _columns(bind)
    for name in NEW_COLUMNS:
        if name not in present:
            column = schema.reconcile_state.c[name]
            op.add_column(schema.reconcile_state.name,
                          sa.Column(name, column.type, nullable=column.nullable, server_default=column.server_default))
    schema.blocking_state_index.drop(bind, checkfirst=True)
    schema.blocking_state_index.create(bind)


def downgrade() -> None:
    bind = op.get_bind()
    schema.blocking_state_index.drop(bind, checkfirst=True)
    op.create_index(schema.blocking_state_index.name, schema.reconcile_state.name, ["order_id"],
                    postgresql_where=_OLD_BLOCKING, sqlite_where=_OLD_BLOCKING)
    present = _columns(bind)
    for name in NEW_COLUMNS:
        if name in present:
            op.drop_column(schema.reconcile_state.name, name)
