"""The `bitloot-reconcile` command line. The work is in `commands.py`; this module parses, prints and turns bad
input or missing or malformed settings into a usage error (never a traceback).

Heavy imports (pandas, Dagster, the HTTP clients) happen inside the commands, so `--help` and `db upgrade`
start quickly.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import click

DATES = click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"])


@click.group()
@click.option("--env-file", type=click.Path(exists=True, dir_okay=False),
              help="Read variables from this file first (KEY=value lines; they win over the environment), "
              "e.g. .demo/env, which `demo` writes.")
@click.pass_context
def main(ctx: click.Context, env_file: str | None) -> None:
    """Find BitLoot orders stuck after payment and drive each one to fulfilled or to a recorded state."""
    if env_file:
        ctx.with_resource(environment_from(env_file))


@contextmanager
def environment_from(path: str) -> Iterator[None]:
    """The file's variables in the environment while the command runs (Dagster reads DAGSTER_HOME there)."""
    import os

    from dotenv import dotenv_values

    values = {name: value for name, value in dotenv_values(path).items() if value is not None}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def usage_errors() -> Iterator[None]:
    from bitloot_reconcile.domain.errors import InvalidRequest
    from bitloot_reconcile.settings import SettingsError
    from bitloot_reconcile.store.repository import ProjectTablesMissing

    try:
        yield
    except (InvalidRequest, SettingsError) as exc:
        raise click.UsageError(str(exc)) from None
    except ProjectTablesMissing as exc:
        raise click.ClickException(str(exc)) from None


def _settings():
    """The environment's settings; a missing or malformed variable is a usage error."""
    from bitloot_reconcile.settings import load_settings

    with usage_errors():
        return load_settings()


def _console():
    from rich.console import Console

    return Console()


def _when(moment: dt.datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}" if moment else ""


# ------------------------------------------------------------------------------------------------- db
@main.group()
def db() -> None:
    """The store database."""


@db.command("upgrade")
@click.option("--database-url", help="Store database URL (default: $DATABASE_URL).")
def db_upgrade(database_url: str | None) -> None:
    """Create the project's tables and indexes (and BitLoot's tables on an empty database)."""
    from bitloot_reconcile.store.engine import create_store_engine
    from bitloot_reconcile.store.migrate import upgrade

    settings = _settings()
    if not database_url and not settings.database_url:
        raise click.UsageError("environment variable DATABASE_URL is not set (or pass --database-url)")
    engine = create_store_engine(database_url or settings.secret("database_url"))
    click.echo("indexes on BitLoot's tables (orders for the sweep; order_items and payments by order, keys by "
               "item, email_bounces by address for one order's reads) are built with CREATE INDEX CONCURRENTLY "
               "where missing: the shop keeps writing while they build (minutes on a large shop)")
    upgrade(engine)
    click.echo(f"store database at {engine.url.render_as_string(hide_password=True)} is up to date")


@db.command("grants")
@click.argument("role")
@click.option("--apply", "apply_them", is_flag=True, help="Also run them on the database, as its owner.")
@click.option("--database-url", help="With --apply: the store database, as its owner (default: $DATABASE_URL).")
def db_grants(role: str, apply_them: bool, database_url: str | None) -> None:
    """Print the GRANT statements that let ROLE do exactly what the project does, and nothing else.

    SELECT on the BitLoot tables it reads, UPDATE and INSERT on exactly the columns it writes, its rights on the
    `reconcile_*` tables and their sequences. Create ROLE first and run `db upgrade` as the owner; then point
    DATABASE_URL of every process at ROLE.
    """
    from bitloot_reconcile.store.grants import apply_grants, check_role, grant_statements

    try:
        check_role(role)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not apply_them:
        click.echo(";\n".join(grant_statements(role)) + ";")
        return
    import sqlalchemy as sa

    from bitloot_reconcile.store.engine import create_store_engine

    settings = _settings()
    if not database_url and not settings.database_url:
        raise click.UsageError("environment variable DATABASE_URL is not set (or pass --database-url)")
    engine = create_store_engine(database_url or settings.secret("database_url"))
    try:
        statements = apply_grants(engine, role)
    except sa.exc.DBAPIError as exc:  # e.g. the role does not exist: the server's one line says so
        raise click.ClickException(f"granting failed: {str(exc.orig).strip().splitlines()[0]}") from None
    finally:
        engine.dispose()
    click.echo(";\n".join(statements) + ";")
    click.echo(f"granted to {role} on {engine.url.render_as_string(hide_password=True)}")


# ------------------------------------------------------------------------------------------------- metrics
@main.command("metrics")
@click.option("--port", default=9477, show_default=True, help="Port of the /metrics endpoint.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--cache-seconds", default=5.0, show_default=True,
              help="Scrapes within this many seconds of a read share it.")
def metrics_cmd(port: int, host: str, cache_seconds: float) -> None:
    """Serve the project's state for Prometheus at /metrics until stopped.

    Stuck orders by board state, the oldest one's age, orders needing a person, runs in flight, seconds since
    the sweep's last tick, and counters of outcomes, fulfilled orders and outside-call failures from the audit
    table. Reads the store (DATABASE_URL) and the Dagster instance of DAGSTER_HOME when scraped.
    """
    import signal
    import threading

    import sqlalchemy as sa

    from bitloot_reconcile import commands, metrics

    settings = _settings()
    if not settings.dagster_home:
        raise click.UsageError("set DAGSTER_HOME: runs in flight and the sweep's ticks are read from that instance")
    if cache_seconds < 0:
        raise click.UsageError("--cache-seconds must not be negative")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with usage_errors(), commands.open_store(settings) as store, commands.open_instance() as instance:
        source = metrics.MetricsSource(store, instance, settings.reconcile, cache_seconds=cache_seconds)
        try:
            source.prime()
        except sa.exc.DBAPIError as exc:  # down for now: each scrape tries again and says up{source="store"} 0
            click.echo(f"the store cannot be read yet ({str(exc.orig).strip().splitlines()[0]}); serving anyway",
                       err=True)
        try:
            server = metrics.serve(source, host=host, port=port)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        click.echo(f"serving metrics at http://{host}:{port}/metrics", err=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()


# ------------------------------------------------------------------------------------------------- plan
@main.command("plan")
@click.argument("order_ids", nargs=-1)
@click.option("--limit", default=100, show_default=True, help="At most this many stuck orders.")
def plan_cmd(order_ids: tuple[str, ...], limit: int) -> None:
    """Dry run: what the next run would do for each stuck order, or for ORDER_IDS as `retry` would run them.

    Without ORDER_IDS it also lists the orders the sweep would skip, and why (in flight, backing off,
    quarantined, inside the grace period...). Only reads (GET/HEAD to Kinguin, NOWPayments and R2, SELECT on
    the store); nothing is written anywhere.
    """
    from rich.table import Table

    from bitloot_reconcile import commands
    from bitloot_reconcile.domain.board import DUE

    settings = _settings()
    with usage_errors(), commands.open_readers(settings) as readers:
        plans = commands.plan(readers, settings.reconcile, order_ids=order_ids, limit=limit)
        skipped = [] if order_ids else [
            row for row in commands.board(readers.store, settings.reconcile,
                                          in_flight=commands.in_flight_runs(settings)).rows
            if row.state not in DUE]
    console = _console()
    if plans:
        table = Table("order", "status", "next run would", "ends as", "why", title="next run per order (dry run)")
        for plan in plans:
            table.add_row(plan.order_id, plan.status, " → ".join(plan.steps) or "leave it", str(plan.outcome),
                          plan.why)
        console.print(table)
    elif not order_ids:
        click.echo("no stuck orders due" if skipped else "no stuck orders")
    if skipped:
        console.print(_board_table(skipped, title=f"not run now: {len(skipped)} order(s) the sweep skips"))


def _board_table(rows, *, title: str):
    """Readable at 80 columns: the full order id (never cut) with its state under it, the age, and why."""
    from rich.table import Table

    from bitloot_reconcile.domain.board import LABELS, short_age

    table = Table(title=title, title_justify="left")
    table.add_column("order / state", no_wrap=True, min_width=36)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("why")
    for row in rows:
        why = [f"next attempt {row.next_attempt_at:%m-%d %H:%M} UTC" if row.next_attempt_at else "",
               f"{row.attempts} attempt(s)" if row.attempts else "", row.reason or ""]
        table.add_row(f"{row.order_id}\n[dim]{LABELS[row.state]} · {row.status}[/]", short_age(row.age),
                      "; ".join(part for part in why if part))
    return table


# ------------------------------------------------------------------------------------------------- board
@main.command("board")
@click.option("--limit", default=50, show_default=True, help="At most this many rows, oldest first (the counts "
              "and the checks cover every order).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write every row to this CSV file.")
def board_cmd(limit: int, csv_path: str | None) -> None:
    """The stuck-orders board: every order that is not done, its state and why, the trend and the checks.

    The same view as the `order_backlog` asset; only reads the store (and, with DAGSTER_HOME, Dagster's runs).
    """
    from bitloot_reconcile import commands
    from bitloot_reconcile.domain import board as bd
    from bitloot_reconcile.domain.alerting import run_url
    from bitloot_reconcile.resources.alerts import DEFAULT_WEBSERVER_URL

    settings = _settings()
    with usage_errors(), commands.open_store(settings) as store:
        found = commands.board(store, settings.reconcile, in_flight=commands.in_flight_runs(settings))
    console = _console()
    counts = ", ".join(f"{n} {bd.LABELS[bd.BoardState(state)]}" for state, n in found.counts().items() if n)
    console.print(f"[bold]{len(found.rows)} order(s) not done[/]" + (f": {counts}" if counts else "")
                  + (" (cut short at the read's limit)" if found.truncated else ""), highlight=False)
    figures = found.figures()
    console.print(" · ".join(f"{name.replace('_', ' ')} {value:g}" for name, value in figures.items()),
                  highlight=False, style="dim")
    if found.rows:
        shown = found.rows[:limit]
        console.print(_board_table(shown, title=f"oldest first ({len(shown)} of {len(found.rows)})"))
    sla = dt.timedelta(minutes=settings.reconcile.board_sla_minutes)
    for verdict in bd.checks(found, sla=sla):
        mark = "[green]ok[/]" if verdict.passed else ("[red]FAIL[/]" if verdict.severity == "ERROR"
                                                     else "[yellow]WARN[/]")
        console.print(f"{mark} {verdict.name}: {verdict.description}", highlight=False)
    if csv_path:
        link = partial(run_url, settings.dagster_webserver_url or DEFAULT_WEBSERVER_URL)
        with open(csv_path, "w", newline="") as out:
            out.write(bd.to_csv(found.rows, link))
        click.echo(f"all {len(found.rows)} rows written to {csv_path}")


# ------------------------------------------------------------------------------------------------- history
@main.command("history")
@click.argument("order_id")
def history_cmd(order_id: str) -> None:
    """Every attempt on ORDER_ID and its reconcile state now.

    From the audit table, with each run's status and the runs that left no audit row (failed before they took
    the order, or still queued) from the Dagster instance of DAGSTER_HOME when it is set.
    """
    from rich.table import Table

    from bitloot_reconcile import commands

    settings = _settings()
    with usage_errors(), commands.open_store(settings) as store:
        found = commands.history(store, order_id, dagster_home=settings.dagster_home)
    console = _console()
    console.print(f"order {found.order_id}", highlight=False)  # not a table title: those wrap at the table's width
    # Two columns, one row per attempt with its fields on lines of their own: ids stay whole at 80 columns.
    timeline = Table("started (UTC)", "attempt")
    timeline.columns[0].no_wrap = True
    timeline.columns[1].overflow = "fold"
    for attempt in found.attempts:
        timeline.add_row(_when(attempt.started_at), _attempt_text(attempt), end_section=True)
    console.print(timeline if found.attempts else "no attempt recorded yet")
    if not found.dagster_home:
        click.echo("(audit table only: with DAGSTER_HOME set, runs that left no audit row show too)")
    state = found.state
    console.print("now")
    now = Table("", "", show_header=False)
    now.columns[0].no_wrap = True
    now.columns[1].overflow = "fold"
    for label, value in (
        ("store status", found.order.status if found.order else "(order no longer in the store)"),
        ("completion email sent", str(found.order.completion_email_sent) if found.order else ""),
        ("Kinguin order", (found.order.kinguin_reservation_id or "") if found.order else ""),
        ("attempts", str(state.attempts)),
        ("last outcome", state.last_outcome or ""),
        ("last reason", state.last_reason or ""),
        ("last run id", state.last_run_id or ""),
        ("next attempt at", _when(state.next_attempt_at)),
        ("waiting for supplier since", _when(state.waiting_since)),
        ("placement intent at", _when(state.placement_intent_at)),
        ("replacements", f"{state.replacements}, the last of canceled Kinguin order {state.replaced_kinguin_order_id}"
         if state.replacements else "none"),
        ("lease", f"{state.lease_owner} until {_when(state.lease_expires_at)}" if state.lease_owner else "free"),
    ):
        now.add_row(label, value)
    console.print(now)


# Outcomes that mean the run did not do what was asked: shown in red, with words saying so.
_NOT_DONE = {"refused": "nothing changed", "retry_later": "the run failed; swept again later",
             "needs_attention": "needs a person"}


def _attempt_text(attempt):
    from rich.text import Text

    who = f"{attempt.trigger} run" + (f" by {attempt.actor}" if attempt.actor else "")
    text = Text(who + (f": {attempt.reason}" if attempt.reason else ""))
    if attempt.remedy:
        text.append(f"\nremedy: {attempt.remedy}", style="bold")
    if attempt.run_id:
        text.append(f"\nrun {attempt.run_id}" + (f" ({attempt.status.lower()})" if attempt.status else ""))
    if attempt.outcome:
        label = attempt.outcome + (f" ({_NOT_DONE[attempt.outcome]})" if attempt.outcome in _NOT_DONE else "")
        ended = f"→ {label}" + (f": {attempt.detail}" if attempt.detail else "")
    elif attempt.in_progress:
        ended = "→ in progress"
    elif attempt.status == "FAILURE" or attempt.status == "CANCELED":
        ended = f"→ {attempt.status.lower()} before recording an outcome" + (
            f": {attempt.detail}" if attempt.detail else "")
    else:
        ended = "→ no outcome recorded"
    failed = attempt.outcome in _NOT_DONE or attempt.status in ("FAILURE", "CANCELED")
    text.append("\n" + ended, style="bold red" if failed else "green" if attempt.outcome else "")
    return text


# ------------------------------------------------------------------------------------------------- retry
@main.command("retry")
@click.argument("order_id")
@click.option("--reason", required=True, help="Why this order is being retried (recorded in the audit table).")
@click.option("--by", "requested_by", required=True, help="Who asks, e.g. admin@bitloot.io.")
@click.option("--max-unit-price", "max_unit_price_eur", type=float, metavar="EUR",
              help="Remedy: pay Kinguin up to this much per unit, this run only (within the shop's bound over cost).")
@click.option("--replace-canceled-supplier-order", is_flag=True,
              help="Remedy: buy again after Kinguin canceled or refunded the order (orderExternalId <order id>:r<n>).")
@click.option("--resolution", type=click.Choice(["refunded_to_customer", "delivered_elsewhere", "written_off"]),
              help="Remedy: close the order by hand; it is never swept or alerted again.")
@click.option("--dagster-url", help="Submit to this Dagster webserver (default: $DAGSTER_WEBSERVER_URL); unset: "
              "run here, on the Dagster instance of $DAGSTER_HOME.")
@click.option("--wait", is_flag=True, help="With a webserver: wait for the run to end and print its outcome.")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds --wait waits at most.")
def retry_cmd(order_id: str, reason: str, requested_by: str, max_unit_price_eur: float | None,
              replace_canceled_supplier_order: bool, resolution: str | None, dagster_url: str | None, wait: bool,
              timeout: float) -> None:
    """Run `fulfill_order` for ORDER_ID as an admin retry, after the launchpad's checks, with a remedy if asked.

    The run is recorded in the Dagster instance the UI shows: submitted to the webserver at --dagster-url, or
    run in this process on the instance of DAGSTER_HOME (refused when neither is set).
    """
    from bitloot_reconcile import commands
    from bitloot_reconcile.domain.remedies import Remedy

    settings = _settings()
    dagster_url = dagster_url or settings.dagster_webserver_url
    with usage_errors(), commands.open_store(settings) as store:
        if not dagster_url and not settings.dagster_home:
            raise click.UsageError("set DAGSTER_WEBSERVER_URL (or pass --dagster-url) to submit the run to Dagster, "
                                   "or DAGSTER_HOME to run it here on that instance, so that the Dagster UI shows it")
        remedy = Remedy.from_fields(max_unit_price_eur, replace_canceled_supplier_order, resolution)
        order_id = commands.validate_retry(store, order_id, reason, requested_by, remedy,
                                           settings.reconcile.price_bound)
        try:
            if dagster_url:
                run_id = commands.submit_retry(dagster_url, order_id, reason, requested_by, remedy)
                click.echo(f"submitted fulfill_order run {run_id} for order {order_id}")
                click.echo(commands.run_link(dagster_url, run_id))
                if not wait:
                    return
                status, tags = commands.wait_for_run(dagster_url, run_id, timeout=timeout)
                result = commands.finished_run(store, order_id, run_id, status, tags)
            else:
                result = commands.run_retry(settings, store, order_id, reason, requested_by, remedy)
        except commands.DagsterUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"run {result.run_id}: {result.outcome or 'no outcome recorded'}"
               + (f" ({result.reason})" if result.reason else ""))
    if not dagster_url:
        click.echo(f"the run is in the Dagster instance of DAGSTER_HOME={settings.dagster_home}: its UI shows it "
                   f"at /runs/{result.run_id}")
    if not result.success:
        raise click.ClickException("the run failed: " + ("; ".join(result.errors) or "see the run's logs"))


# ------------------------------------------------------------------------------------------------- report
@main.command("report")
@click.option("--since", type=DATES, help="Start of the window (UTC; default: the day before --until).")
@click.option("--until", type=DATES, help="End of the window, exclusive (UTC; default: today 00:00, or a day "
              "after --since).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write every row to this CSV file.")
def report_cmd(since: dt.datetime | None, until: dt.datetime | None, csv_path: str | None) -> None:
    """Reconcile the orders created in a window: store vs NOWPayments vs Kinguin, class counts.

    The same report as the daily `reconciliation_report` asset; only reads.
    """
    from rich.console import Console
    from rich.progress import Progress as ProgressBar
    from rich.table import Table

    from bitloot_reconcile import commands
    from bitloot_reconcile.domain import reconciliation

    since, until = (moment.replace(tzinfo=dt.UTC) if moment else None for moment in (since, until))
    midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    until = until or (since + dt.timedelta(days=1) if since else midnight)
    since = since or until - dt.timedelta(days=1)
    if since >= until:
        raise click.UsageError("--since must be before --until")
    settings = _settings()
    with usage_errors(), commands.open_readers(settings) as readers, ProgressBar(console=Console(stderr=True)) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        frame = commands.report(readers, since, until, progress=progress)
    counts = reconciliation.class_counts(frame)
    click.echo(f"{len(frame)} rows: orders created from {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC "
               "and Kinguin orders without a store order")
    table = Table("class", "severity", "orders")
    for name, count in counts.items():
        table.add_row(name, reconciliation.severity(reconciliation.Mismatch(name)), str(count))
    _console().print(table)
    if csv_path:
        frame.to_csv(csv_path, index=False)
        click.echo(f"all rows written to {csv_path}")


STANDINS_MISSING = (
    "the demo and the stand-ins are development tools, not part of a production install: run them from a clone "
    "of the repository, where `make demo` (or `uv sync`) installs the bitloot-standins package with them"
)


def _standins(module: str):
    """A module of the development-only `bitloot_standins` package, or a usage error saying how to get it."""
    import importlib

    try:
        return importlib.import_module(f"bitloot_standins.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != "bitloot_standins":
            raise
        raise click.ClickException(STANDINS_MISSING) from None


@main.command()
@click.option("--ui", is_flag=True, help="Also start the Dagster UI (dagster dev) on the same state and keep it up.")
@click.option("--port", default=3000, show_default=True, help="Port of the UI with --ui.")
@click.option("--dir", "base_dir", default=".demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo keeps its SQLite store, Dagster home and S3 data (wiped at start).")
@click.option("--database-url", help="A scratch store database to seed instead of the embedded SQLite one "
              "(default: $DATABASE_URL).")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for every order to settle.")
def demo(ui: bool, port: int, base_dir: str, database_url: str | None, timeout: float) -> None:
    """Seed stuck orders of every kind and let the real sensor and jobs recover them."""
    from pathlib import Path

    run_demo = _standins("demo").run_demo
    settings = _settings()
    database_url = database_url or (settings.database_url.get_secret_value() if settings.database_url else None)
    raise SystemExit(run_demo(base_dir=Path(base_dir), database_url=database_url, ui=ui, port=port, timeout=timeout))


@main.command()
def sandbox() -> None:
    """Start every stand-in (Kinguin, NOWPayments, Resend, S3) on 127.0.0.1 and print how to reach them."""
    import signal
    import sys
    import time

    standins_module = _standins("standins")
    with standins_module.StandIns() as standins:
        products = standins.add_sample_products()
        for name, value in standins.env().items():
            click.echo(f"{name}={value}")
        for product_id, title in products.items():
            click.echo(f"# Kinguin product {product_id}: {title}")
        first = next(iter(products))
        click.echo(
            f"# try: curl -s -X POST {standins.kinguin.base_url}/v2/order "
            f"-H 'X-Api-Key: {standins_module.KINGUIN_KEY}' -H 'Content-Type: application/json' "
            f"-d '{{\"products\":[{{\"productId\":\"{first}\",\"qty\":1,\"price\":25}}],"
            f"\"orderExternalId\":\"demo-1\"}}'"
        )
        click.echo("# stand-ins running; Ctrl-C to stop")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop SeaweedFS on a plain kill too
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
