"""Shared set-up for the benchmarks: throw-away PostgreSQL databases, the stand-ins, a Dagster home, printing.

Nothing here asserts a time: the machine is shared, the scripts only print figures.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from bitloot_reconcile.resources.kinguin import KinguinResource
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_reconcile.resources.policy import RecoveryPolicyResource
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.resources.resend import ResendResource
from bitloot_reconcile.resources.store import StoreResource
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import upgrade
from bitloot_standins.kinguin import KinguinSimulator
from bitloot_standins.nowpayments import NowPaymentsSimulator
from bitloot_standins.postgres import temporary_database
from bitloot_standins.resend import ResendSimulator
from bitloot_standins.s3 import SeaweedS3
from bitloot_standins.seed import SeedProduct, insert_order, insert_product

PG_SERVER_URL = os.environ.get("BENCH_PG_SERVER_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
REPO_ROOT = Path(__file__).resolve().parent.parent
console = Console(width=int(os.environ.get("COLUMNS", "170")))

KINGUIN_KEY, NOWPAYMENTS_KEY, RESEND_KEY = "bench-kinguin-key", "bench-nowpayments-key", "re_bench_resend_key"


# -- figures -------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float, digits: int = 1) -> str:
    return f"{seconds * 1000:.{digits}f} ms"


def spread(seconds: list[float]) -> str:
    """Median (minimum) of timings, in milliseconds."""
    return f"{ms(median(seconds))} ({ms(min(seconds))})"


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def print_machine() -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    console.print(
        f"[bold]{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}[/] on {os.cpu_count()} cores, load {load}, "
        f"Python {platform.python_version()}, dagster {dg.__version__}"
    )


@contextmanager
def stderr_to_file(prefix: str) -> Iterator[str]:
    """Send everything written to fd 2 (Dagster's DEBUG console logs, also from child processes started inside
    the block) to a log file that is kept for inspection; the figures go to stdout."""
    fd, path = tempfile.mkstemp(prefix=f"{prefix}_", suffix=".log")
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        console.print(f"(run logs: {path})", highlight=False)


# -- PostgreSQL ----------------------------------------------------------------------------------------------
@contextmanager
def temp_database(prefix: str = "bench", server_url: str = PG_SERVER_URL) -> Iterator[str]:
    """A brand-new empty database on the local server (or `server_url`), dropped (even on Ctrl-C) when the block
    ends."""
    with temporary_database(server_url, prefix) as name:
        yield f"{server_url}/{name}"


@contextmanager
def migrated_store(prefix: str = "bench", server_url: str = PG_SERVER_URL) -> Iterator[tuple[str, sa.Engine]]:
    """A temporary store database brought to head by the project's migrations (BitLoot tables + indexes)."""
    with temp_database(prefix, server_url) as url:
        engine = create_store_engine(url, statement_timeout_ms=600_000)
        try:
            upgrade(engine)
            yield url, engine
        finally:
            engine.dispose()


# -- Dagster -------------------------------------------------------------------------------------------------
@contextmanager
def dagster_home(extra_yaml: str = "") -> Iterator[dg.DagsterInstance]:
    """A real DagsterInstance on a temporary DAGSTER_HOME (SQLite storage, Dagster's defaults otherwise)."""
    home = tempfile.mkdtemp(prefix="bench_dagster_home_")
    Path(home, "dagster.yaml").write_text("telemetry:\n  enabled: false\n" + extra_yaml)
    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = home
    try:
        with dg.DagsterInstance.get() as instance:
            yield instance
    finally:
        if previous is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = previous
        for _ in range(5):  # a code server that is shutting down may still write its last files
            shutil.rmtree(home, ignore_errors=True)
            if not os.path.exists(home):
                break
            time.sleep(1)


# -- the stand-ins a fulfill_order run talks to --------------------------------------------------------------
@dataclass
class Stack:
    store_url: str
    engine: sa.Engine
    kinguin: KinguinSimulator
    nowpayments: NowPaymentsSimulator
    resend: ResendSimulator
    s3: SeaweedS3
    bucket: str

    def resources(self, **policy) -> dict[str, dg.ConfigurableResource]:
        return {
            "store": StoreResource(database_url=self.store_url),
            "kinguin": KinguinResource(base_url=self.kinguin.base_url, api_key=KINGUIN_KEY),
            "nowpayments": NowPaymentsResource(base_url=self.nowpayments.url, api_key=NOWPAYMENTS_KEY),
            "r2": R2Resource(endpoint=self.s3.endpoint_url, access_key_id=self.s3.access_key_id,
                             secret_access_key=self.s3.secret_access_key, bucket=self.bucket),
            "mailer": ResendResource(base_url=self.resend.url, api_key=RESEND_KEY),
            "policy": RecoveryPolicyResource(frontend_url="https://shop.example", **policy),
        }

    def env(self) -> dict[str, str]:
        """The same settings under the names `bitloot_reconcile.definitions` reads (for launched runs)."""
        return {
            "DATABASE_URL": self.store_url, "KINGUIN_BASE_URL": self.kinguin.base_url, "KINGUIN_API_KEY": KINGUIN_KEY,
            "NOWPAYMENTS_BASE": self.nowpayments.url, "NOWPAYMENTS_API_KEY": NOWPAYMENTS_KEY,
            "RESEND_BASE_URL": self.resend.url, "RESEND_API_KEY": RESEND_KEY, "R2_BUCKET": self.bucket,
            "FRONTEND_URL": "https://shop.example", **self.s3.env(),
        }

    def product(self, price: float = 5.0) -> SeedProduct:
        kinguin_id = uuid.uuid4().hex[:24]
        self.kinguin.add_product(kinguin_id, price=price, stock=100_000)
        return insert_product(self.engine, SeedProduct(kinguin_id, f"Game {kinguin_id}", cost=Decimal(str(price))))

    def paid_orders(self, n: int, product: SeedProduct | None = None) -> list[str]:
        """`n` one-item Kinguin orders stuck in `paid` (finished payment row) for 30 minutes."""
        product = product or self.product()
        return [insert_order(self.engine, [product], age=dt.timedelta(minutes=30)) for _ in range(n)]


@contextmanager
def stand_ins(server_url: str = PG_SERVER_URL) -> Iterator[Stack]:
    """Kinguin, NOWPayments and Resend simulators, SeaweedFS (S3) and a migrated store database."""
    with ExitStack() as stack:
        url, engine = stack.enter_context(migrated_store("bench_store", server_url))
        kinguin = stack.enter_context(KinguinSimulator(api_key=KINGUIN_KEY, balance=1_000_000.0))
        nowpayments = stack.enter_context(NowPaymentsSimulator(api_key=NOWPAYMENTS_KEY))
        resend = stack.enter_context(ResendSimulator(api_key=RESEND_KEY))
        s3 = stack.enter_context(SeaweedS3())
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        world = Stack(url, engine, kinguin, nowpayments, resend, s3, bucket)
        world.resources()["r2"].get_vault().ensure_bucket()
        yield world
