"""The store database as a Dagster resource."""

from __future__ import annotations

from functools import lru_cache

import dagster as dg
import sqlalchemy as sa

from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.repository import Store


@lru_cache(maxsize=8)
def _engine(url: str, statement_timeout_ms: int, pool_size: int) -> sa.Engine:
    # One pool per process and URL: sensor ticks and ops reuse connections instead of reconnecting.
    return create_store_engine(url, statement_timeout_ms=statement_timeout_ms, pool_size=pool_size)


class StoreResource(dg.ConfigurableResource):
    """BitLoot's database (DATABASE_URL): PostgreSQL in production, SQLite for the demo."""

    database_url: str
    statement_timeout_ms: int = 15000
    # Connections kept open per process: a batch run's workers each hold one at once, plus its own thread.
    pool_size: int = 10

    def get_store(self) -> Store:
        return Store(_engine(self.database_url, self.statement_timeout_ms, self.pool_size))
