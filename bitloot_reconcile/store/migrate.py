"""Run the project's Alembic migrations against a store database URL."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
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
