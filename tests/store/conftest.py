"""The store's tests run on PostgreSQL and on SQLite, and against a database shaped as BitLoot's own."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import upgrade
from bitloot_reconcile.store.repository import Store
from tests.store import bitloot_ddl as ddl


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated SQLite store file, copied for each test (quicker than migrating each time)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "store.db"
    engine = create_store_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request, tmp_path) -> Iterator[sa.Engine]:
    if request.param == "postgresql":
        yield request.getfixturevalue("store_engine")
        return
    path = tmp_path / "store.db"
    shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
    engine = create_store_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine) -> Store:
    return Store(engine)


@pytest.fixture
def bitloot_store(empty_pg_url) -> Iterator[tuple[Store, dict[str, str], str]]:
    ids = ddl.populate_bitloot_database(empty_pg_url)
    engine = create_store_engine(empty_pg_url)
    upgrade(engine)
    yield Store(engine), ids, empty_pg_url
    engine.dispose()
