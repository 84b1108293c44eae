"""The store database as a Dagster resource."""

from __future__ import annotations

from functools import lru_cache

import dagster as dg
import sqlalchemy as sa

from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.repository import Store


@lru_cache(maxsize=8)
def _engine(url: str, statement_timeout_ms: int) -> sa.Engine:
    # One pool per process and URL: sensor ticks and ops reuse connections instead of reconnecting.
    return create_store_engine(url, statement_timeout_ms=statement_timeout_ms)


class StoreResource(dg.ConfigurableResource):
    """BitLoot's database (DATABASE_URL): PostgreSQL in production, SQLite for the demo."""

    database_url: str
    statement_timeout_ms: int = 15000

    def get_store(self) -> Store:
        return Store(_engine(self.database_url, self.statement_timeout_ms))
