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


POOL_RECYCLE_SECONDS = 600


def create_store_engine(url: str, *, statement_timeout_ms: int = 15000, pool_size: int = 5) -> sa.Engine:
    """An engine with a connect timeout and, on PostgreSQL, a statement timeout on every connection.
    `pool_size`: connections kept open; more threads than that at once would open and close connections."""
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
    # No ping before each checkout (a round trip per transaction): connections are replaced after
    # `POOL_RECYCLE_SECONDS`, and one the server closed fails a single statement, which the step's retry or
    # the next sweep tick repeats on a fresh connection (SQLAlchemy discards the pool after a disconnect).
    return sa.create_engine(
        url,
        pool_recycle=POOL_RECYCLE_SECONDS,
        pool_size=pool_size,
        hide_parameters=True,
        connect_args={"connect_timeout": 10, "options": f"-c statement_timeout={statement_timeout_ms}"},
    )
