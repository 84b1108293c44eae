"""Engine construction for the store database (PostgreSQL through psycopg 3, or SQLite)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import make_url


def normalize_store_url(url: str) -> str:
    """BitLoot's `DATABASE_URL` is a plain `postgres://` / `postgresql://` URL; pin the psycopg 3 driver."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_store_engine(url: str, *, statement_timeout_ms: int = 15000) -> sa.Engine:
    """An engine with a connect timeout and, on PostgreSQL, a statement timeout on every connection."""
    url = normalize_store_url(url)
    # hide_parameters: error text would otherwise quote bound values (presigned URLs, customer data).
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # foreign keys and concurrent readers
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        hide_parameters=True,
        connect_args={"connect_timeout": 10, "options": f"-c statement_timeout={statement_timeout_ms}"},
    )
