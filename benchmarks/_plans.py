"""The statements a piece of code sends to one PostgreSQL database, and how PostgreSQL plans each of them.

Shared by `order_cost.py` and the test that holds every per-order statement to an index
(tests/store/test_order_plans.py): both look at the statements the code really sends, never a copy of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa

EXPLAINABLE = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")


@dataclass(frozen=True)
class Statement:
    sql: str
    parameters: dict

    @property
    def verb(self) -> str:
        return self.sql.split(None, 1)[0].upper()


@contextmanager
def statements_to(database: str) -> Iterator[list[Statement]]:
    """Every statement any engine of this process sends to `database` inside the block (Dagster's own storage and
    other databases left out), in order, with the parameters the driver gets."""
    seen: list[Statement] = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if conn.engine.url.database == database and not executemany:
            seen.append(Statement(statement, dict(parameters or {})))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", grab)
    try:
        yield seen
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", grab)


@dataclass(frozen=True)
class Scan:
    node: str  # Seq Scan, Index Scan, Index Only Scan, Bitmap Heap Scan, ...
    table: str
    index: str | None
    keyed: bool  # the index is searched by a condition (not walked whole for its order, filtering every row)

    @property
    def whole_table(self) -> bool:
        return not self.keyed


def plan_of(conn: sa.Connection, statement: Statement) -> dict:
    """EXPLAIN (FORMAT JSON) of the statement with its parameters: the plan, nothing executed."""
    return conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement.sql}", statement.parameters).scalar()[0]["Plan"]


def scans(plan: dict) -> list[Scan]:
    """Every read of a table in the plan, and the index it goes through (a bitmap scan's from its child)."""
    found, stack = [], [plan]
    while stack:
        node = stack.pop()
        children = node.get("Plans", [])
        if "Relation Name" in node and node["Node Type"].endswith("Scan"):  # not the write (ModifyTable)
            index = node.get("Index Name") or next((c.get("Index Name") for c in children if c.get("Index Name")),
                                                   None)
            keyed = "Index Cond" in node or "Recheck Cond" in node
            found.append(Scan(node["Node Type"], node["Relation Name"], index, keyed))
        stack.extend(children)
    return found


def scans_of(engine: sa.Engine, statements: list[Statement]) -> dict[str, list[Scan]]:
    """Each distinct explainable statement's table reads, by statement text."""
    plans: dict[str, list[Scan]] = {}
    with engine.connect() as conn:
        for statement in statements:
            if statement.verb in EXPLAINABLE and statement.sql not in plans:
                plans[statement.sql] = scans(plan_of(conn, statement))
    return plans
