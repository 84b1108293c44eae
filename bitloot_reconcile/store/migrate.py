"""Run the project's Alembic migrations against a store database URL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command, op
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def _alembic_config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the store database to `revision`; safe to run again (already-applied steps are skipped).
    Each migration runs in its own transaction (Alembic's), so one may build indexes concurrently outside it."""
    with engine.connect() as connection:
        command.upgrade(_alembic_config(connection), revision)


def downgrade(engine: sa.Engine, revision: str) -> None:
    with engine.connect() as connection:
        command.downgrade(_alembic_config(connection), revision)


@contextmanager
def concurrent_index_builds() -> Iterator[sa.Connection]:
    """Inside a migration on PostgreSQL: a connection outside any transaction (CREATE INDEX CONCURRENTLY refuses
    to run in one; the migration's earlier statements are committed first) and without the statement timeout (a
    build on a large table takes minutes)."""
    with op.get_context().autocommit_block():
        conn = op.get_bind()
        conn.exec_driver_sql("SET statement_timeout = 0")
        try:
            yield conn
        finally:
            conn.exec_driver_sql("RESET statement_timeout")


def build_index_concurrently(conn: sa.Connection, name: str, create_index_sql: str) -> None:
    """`CREATE INDEX name ...` built with CONCURRENTLY, so writes to the table go on meanwhile; an invalid index of
    that name (left by an interrupted build) is dropped first, a valid one is kept."""
    invalid = conn.exec_driver_sql(
        "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = %(name)s",
        {"name": name}).scalar()
    if invalid:
        conn.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    conn.exec_driver_sql(create_index_sql.replace("CREATE INDEX ", "CREATE INDEX CONCURRENTLY IF NOT EXISTS ", 1))
