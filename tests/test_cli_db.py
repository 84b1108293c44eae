"""`bitloot-reconcile db upgrade`, run as a real process against a BitLoot-shaped PostgreSQL database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.store import bitloot_ddl as ddl

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from bitloot_reconcile.cli import main; main()"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.run(
        [*CLI, *args], cwd=REPO_ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def bitloot_style_url(test_url: str, password: str = "s3cr3t-pw") -> str:
    """As BitLoot's `.env` writes it: plain postgresql:// (no driver), with a password (trust auth ignores it)."""
    url = make_url(test_url).set(drivername="postgresql", password=password)
    return url.render_as_string(hide_password=False)


def test_db_upgrade_on_a_bitloot_database(empty_pg_url):
    ddl.populate_bitloot_database(empty_pg_url)
    before = ddl.full_snapshot(empty_pg_url)
    url = bitloot_style_url(empty_pg_url)

    result = run_cli("db", "upgrade", "--database-url", url)

    assert result.returncode == 0, result.stderr
    assert "is up to date" in result.stdout
    assert make_url(empty_pg_url).database in result.stdout
    assert "s3cr3t-pw" not in result.stdout + result.stderr  # the password is never printed
    after = ddl.full_snapshot(empty_pg_url)
    for part in ("columns", "constraints", "enums", "rows"):
        assert after[part] == before[part], part
    assert after["tables"] - before["tables"] == {*ddl.PROJECT_TABLES, ddl.VERSION_TABLE}
    added = set(after["indexes"]) - set(before["indexes"])
    assert added == {("orders", name) for name in ddl.PROJECT_ORDER_INDEXES} | set(ddl.PROJECT_LOOKUP_INDEXES.items())
    assert "CREATE INDEX CONCURRENTLY" in result.stdout and "keeps writing" in result.stdout

    # Again, now through DATABASE_URL in BitLoot's short postgres:// form: nothing more changes.
    short_url = url.replace("postgresql://", "postgres://", 1)
    again = run_cli("db", "upgrade", env={"DATABASE_URL": short_url})
    assert again.returncode == 0, again.stderr
    assert "is up to date" in again.stdout
    assert make_url(empty_pg_url).database in again.stdout
    assert "s3cr3t-pw" not in again.stdout + again.stderr
    assert ddl.full_snapshot(empty_pg_url) == after


def test_db_upgrade_without_a_url_fails_clearly():
    result = run_cli("db", "upgrade")
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stdout + result.stderr
    assert "is up to date" not in result.stdout


def test_plan_against_a_database_without_the_project_tables_says_what_to_do(empty_pg_url):
    ddl.populate_bitloot_database(empty_pg_url)  # BitLoot's tables only: `db upgrade` never ran
    outside = {"KINGUIN_API_KEY": "k", "NOWPAYMENTS_API_KEY": "n", "R2_ACCOUNT_ID": "acct",
               "R2_ACCESS_KEY_ID": "a", "R2_SECRET_ACCESS_KEY": "s"}

    result = run_cli("plan", env={"DATABASE_URL": empty_pg_url, **outside})

    assert result.returncode == 1
    assert "run `bitloot-reconcile db upgrade` first" in result.stderr
    assert "Traceback" not in result.stderr
