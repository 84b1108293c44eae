"""The `bitloot-reconcile` command line."""

from __future__ import annotations

import click

from bitloot_reconcile.settings import env


@click.group()
def main() -> None:
    """Find BitLoot orders stuck after payment and drive each one to fulfilled or to a recorded state."""


@main.group()
def db() -> None:
    """The store database."""


@db.command("upgrade")
@click.option("--database-url", envvar="DATABASE_URL", help="Store database URL (default: $DATABASE_URL).")
def db_upgrade(database_url: str | None) -> None:
    """Create the project's tables and indexes (and BitLoot's tables on an empty database)."""
    from bitloot_reconcile.store.engine import create_store_engine
    from bitloot_reconcile.store.migrate import upgrade

    engine = create_store_engine(database_url or env("DATABASE_URL"))
    upgrade(engine)
    click.echo(f"store database at {engine.url.render_as_string(hide_password=True)} is up to date")
