"""Alembic environment: run with the connection handed over by `bitloot_reconcile.store.migrate`."""

from alembic import context

from bitloot_reconcile.store.schema import metadata

VERSION_TABLE = "reconcile_alembic_version"

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
