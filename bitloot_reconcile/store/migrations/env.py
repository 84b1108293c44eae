"""Alembic environment: run with the connection handed over by `bitloot_reconcile.store.migrate`."""

from alembic import context

from bitloot_reconcile.store.schema import metadata

VERSION_TABLE = "reconcile_alembic_version"

connection = context.config.attributes["connection"]
# One transaction per migration: a migration that builds indexes concurrently commits the ones before it.
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
                  transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
