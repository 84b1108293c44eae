"""The least rights the project needs in BitLoot's database, derived from the statements it runs.

Every statement the project sends to the store is built in the modules of `STATEMENT_MODULES`. This module reads
their source and collects, per table, what they do: the BitLoot tables they read, the exact columns they give
values to in an UPDATE or INSERT, and the kinds of statement they run on the project's own tables. The GRANT
statements follow from that, so a new write in the code is a new column in the grants, not a list to keep up by
hand. A write whose columns cannot be read from the code (`.values(**dynamic)` on a BitLoot table) stops the
derivation with its line, rather than granting too much or too little.

What the role gets: SELECT on the BitLoot tables the code reads; UPDATE and INSERT on exactly the columns the code
writes (a SELECT ... FOR UPDATE needs one UPDATE column of the table, which the code's writes give);
SELECT and each statement kind the code runs on its `reconcile_*` tables, and USAGE on their sequences. Nothing on
users, payments' columns, promocodes or any column the code does not write. `db upgrade` stays the owner's.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from bitloot_reconcile.store import (
    alert_marks,
    audit_counts,
    bitloot_writes,
    lease,
    order_reads,
    queries,
    reconcile_tables,
    schema,
    switches,
)

STATEMENT_MODULES: tuple[ModuleType, ...] = (
    lease, order_reads, queries, bitloot_writes, reconcile_tables, alert_marks, switches, audit_counts,
)
_DML = {"insert": "INSERT", "update": "UPDATE", "delete": "DELETE"}
_ROLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


class CannotDerive(RuntimeError):
    """A statement's columns are not visible in the code: the grants would be a guess."""


@dataclass
class TableUse:
    """A table the statements name (so read), and what they write to it."""

    table: sa.Table
    # "UPDATE" / "INSERT" / "DELETE" -> the columns given values (empty for DELETE)
    writes: dict[str, set[str]] = field(default_factory=dict)


def _tables_of(module: ModuleType) -> dict[str, sa.Table]:
    return {name: value for name, value in vars(module).items() if isinstance(value, sa.Table)}


def _dml_of(node: ast.AST, tables: dict[str, sa.Table]) -> tuple[str, sa.Table] | None:
    """The DML constructor at the root of a method chain (`sa.update(orders).where(...)`), if any."""
    while isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in _DML and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in tables:
            return _DML[name], tables[node.args[0].id]
        if not isinstance(func, ast.Attribute):
            return None
        node = func.value
    return None


def _keys(call: ast.Call) -> tuple[set[str], bool]:
    """The column names a `.values(...)`/`set_=` call names, and whether it also passes some it cannot see."""
    names = {kw.arg for kw in call.keywords if kw.arg is not None}
    dynamic = any(kw.arg is None and not isinstance(kw.value, ast.Dict) for kw in call.keywords) or bool(call.args)
    for kw in call.keywords:
        if kw.arg is None and isinstance(kw.value, ast.Dict):  # **{"a": ...}
            names |= {k.value for k in kw.value.keys if isinstance(k, ast.Constant)}
    return names, dynamic


def table_uses(modules: Iterable[ModuleType] = STATEMENT_MODULES) -> dict[str, TableUse]:
    """Table name -> what the statements of `modules` do with it."""
    uses: dict[str, TableUse] = {}
    for module in modules:
        tables = _tables_of(module)
        source = inspect.getsource(module)
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in tables:
                uses.setdefault(tables[node.id].name, TableUse(tables[node.id]))
            if not isinstance(node, ast.Call):
                continue
            found = _dml_of(node, tables)
            if found is None:
                continue
            kind, table = found
            use = uses.setdefault(table.name, TableUse(table))
            columns = use.writes.setdefault(kind, set())
            func = node.func
            if not (isinstance(func, ast.Attribute) and func.attr == "values"):
                continue
            names, dynamic = _keys(node)
            if dynamic and table.name not in {t.name for t in schema.PROJECT_TABLES}:
                raise CannotDerive(f"{module.__name__} line {node.lineno}: a write to {table.name} whose columns "
                                   "the code does not name")
            unknown = names - set(table.c.keys())
            if unknown:
                raise CannotDerive(f"{module.__name__} line {node.lineno}: {table.name} has no column "
                                   f"{', '.join(sorted(unknown))}")
            columns |= names
    return uses


def _quote(name: str) -> str:
    return postgresql.dialect().identifier_preparer.quote(name)


def check_role(role: str) -> str:
    if not _ROLE.match(role):
        raise ValueError(f"role name {role!r}: use letters, digits and underscores, at most 63, not starting "
                         "with a digit")
    return role


def grant_statements(role: str, *, existing: set[str] | None = None) -> list[str]:
    """The GRANTs for `role`, one statement each. `existing`: the tables the database has (a BitLoot older than
    its switches lacks `feature_flags` and `email_bounces`); None grants on every table the code uses."""
    who = _quote(check_role(role))
    uses = table_uses()
    project = {t.name for t in schema.PROJECT_TABLES}
    statements = [f"GRANT USAGE ON SCHEMA public TO {who}"]
    for name in sorted(uses, key=lambda n: (n in project, n)):
        if existing is not None and name not in existing:
            continue
        use, table = uses[name], _quote(name)
        if name in project:
            kinds = ["SELECT", *sorted(use.writes)]
            statements.append(f"GRANT {', '.join(kinds)} ON {table} TO {who}")
            statements += [f"GRANT USAGE ON SEQUENCE {_quote(seq)} TO {who}" for seq in _sequences(use.table)]
            continue
        statements.append(f"GRANT SELECT ON {table} TO {who}")
        for kind, columns in sorted(use.writes.items()):
            if kind == "DELETE":
                statements.append(f"GRANT DELETE ON {table} TO {who}")
            elif columns:
                statements.append(f"GRANT {kind} ({', '.join(_quote(c) for c in sorted(columns))}) ON {table} TO {who}")
    return statements


def _sequences(table: sa.Table) -> list[str]:
    """The sequences behind a table's serial columns (PostgreSQL names them `<table>_<column>_seq`)."""
    return [f"{table.name}_{column.name}_seq" for column in table.primary_key.columns
            if column.autoincrement is True and isinstance(column.type, sa.Integer | sa.BigInteger)]


def apply_grants(engine: sa.Engine, role: str) -> list[str]:
    """Run the GRANTs for `role` (which must exist) on the database of `engine`, as its owner; returns them."""
    existing = set(sa.inspect(engine).get_table_names())
    statements = grant_statements(role, existing=existing)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    return statements
