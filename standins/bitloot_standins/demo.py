"""`bitloot-reconcile demo`: stuck orders of every kind, recovered by the real sensor and jobs.

Runs on embedded defaults: a SQLite store and a Dagster home under `.demo/`, the stand-ins in this process,
and a real `dagster-daemon` (or `dagster dev` with `--ui`) evaluating `stuck_orders_sensor` and launching
`fulfill_order` runs. It prints each order before and after, and exits non-zero if any order did not end
where it should.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from bitloot_reconcile.domain.delivery import attachment_filename, key_object_path
from bitloot_reconcile.settings import ReconcileVariables
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import upgrade
from bitloot_reconcile.store.repository import Store
from bitloot_reconcile.store.schema import reconcile_audit
from bitloot_standins.httpserver import Fault
from bitloot_standins.seed import (
    SeedProduct,
    insert_email_bounce,
    insert_order,
    insert_product,
    set_feature_flag,
)
from bitloot_standins.standins import StandIns

# Short clocks so that the whole story plays out in a couple of minutes.
DEMO_TUNING = ReconcileVariables(
    sweep_interval_seconds=5,
    grace_minutes=0.05,
    backoff_base_seconds=3,
    backoff_cap_seconds=10,
    supplier_poll_attempts=2,
    supplier_poll_seconds=2,
    lease_seconds=120,
    hold_recheck_seconds=3,
)
DEMO_SHOP = {"FRONTEND_URL": "https://bitloot.example", "EMAIL_FROM": "orders@bitloot.example"}
SEEDED_AGE = dt.timedelta(minutes=20)  # past the grace period: every order is stuck from the first tick
DAGSTER_YAML = """\
telemetry: {enabled: false}
run_queue: {dequeue_interval_seconds: 1}
concurrency:
  runs:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - {key: bitloot/order_id, value: {applyLimitPerUniqueValue: true}, limit: 1}
"""


@dataclass
class Scenario:
    name: str
    story: str
    expect: str  # fulfilled | needs_attention | payment_not_confirmed | waiting_for_supplier | untouched
    seed: Callable[[DemoWorld], str]


@dataclass
class DemoWorld:
    engine: sa.Engine
    standins: StandIns
    # Things that happen while the sweep runs: each is called on every poll until it says it is done.
    later: list[Callable[[], bool]] = field(default_factory=list)
    # The demo's variables for the command line (`.demo/env`), once written: an admin's act uses them.
    env_file: Path | None = None
    admin_commands: list[subprocess.Popen] = field(default_factory=list)

    def run_later(self) -> None:
        self.later = [action for action in self.later if not action()]

    def product(self, title: str, price: float, *, key_type: str = "text/plain", stock: int = 100,
                delivery_mode: str | None = None, cost: float | None = None,
                source_type: str = "kinguin") -> SeedProduct:
        kinguin_id = f"{abs(hash(title)) % 16**24:024x}" if source_type == "kinguin" else None
        if kinguin_id:
            self.standins.kinguin.add_product(kinguin_id, price=price, stock=stock, key_type=key_type,
                                              name=title, delivery_mode=delivery_mode)
        return insert_product(self.engine, SeedProduct(kinguin_id, title, cost=Decimal(str(cost or price)),
                                                       source_type=source_type))

    def order(self, products: list[SeedProduct], **kwargs) -> str:
        return insert_order(self.engine, products, age=kwargs.pop("age", SEEDED_AGE), **kwargs)


def _lost_response(w: DemoWorld) -> str:
    order_id = w.order([w.product("Hollow Knight", 9.5)])
    w.standins.kinguin.inject(
        "place_order_v2", Fault(lose_response=True, match=lambda b: (b or {}).get("orderExternalId") == order_id)
    )
    return order_id


def _supplier_canceled(w: DemoWorld) -> str:
    game = w.product("Cyberpunk 2077", 19.0)
    order_id = str(uuid.uuid4())
    planted = w.standins.kinguin.plant_order(order_id, [(game.kinguin_product_id, 1)], status="canceled")
    return w.order([game], order_id=order_id, kinguin_reservation_id=planted.order_id)


def _partial_keys(w: DemoWorld) -> str:
    game = w.product("Elden Ring", 29.0, delivery_mode="manual")
    order_id = str(uuid.uuid4())
    planted = w.standins.kinguin.plant_order(order_id, [(game.kinguin_product_id, 2)], status="processing")
    w.standins.kinguin.deliver(planted.order_id, 1)
    return w.order([game, game], order_id=order_id, kinguin_reservation_id=planted.order_id)


def _unpaid(w: DemoWorld) -> str:
    order_id = w.order([w.product("Stardew Valley", 6.0)], status="waiting", payment_status="waiting",
                       payment_id="4800000001")
    w.standins.nowpayments.set_payment("4800000001", "waiting", order_id=order_id)
    return order_id


def _ipn_missed(w: DemoWorld) -> str:
    order_id = w.order([w.product("Hades", 12.0)], status="waiting", payment_status="waiting",
                       payment_id="4800000002")
    w.standins.nowpayments.set_payment("4800000002", "finished", order_id=order_id)
    return order_id


def _r2_outage(w: DemoWorld) -> str:
    order_id = w.order([w.product("Celeste", 4.0)])
    w.standins.r2_proxy.fail(f"orders/{order_id}/", times=12)
    return order_id


def _email_outage(w: DemoWorld) -> str:
    order_id = w.order([w.product("Portal 2", 3.0)], email="email-outage@example.com")
    w.standins.resend.inject(
        "send_email",
        Fault(status=503, times=4, match=lambda b: "email-outage@example.com" in (b or {}).get("to", [])),
    )
    return order_id


def _kinguin_switched_off(w: DemoWorld) -> str:
    """BitLoot's operators switch Kinguin off during a supplier incident: every order needing Kinguin is held
    (no attempt used up) until the switch is back on, which happens here once this order was held."""
    order_id = w.order([w.product("Katana Zero", 8.0)])
    set_feature_flag(w.engine, "kinguin_enabled", False)
    store = Store(w.engine)

    def switch_back_on() -> bool:
        if store.get_state(order_id).last_outcome != "paused":
            return False
        set_feature_flag(w.engine, "kinguin_enabled", True)
        return True

    w.later.append(switch_back_on)
    return order_id


ADMIN_CEILING = "10.00"  # within the bound: cost 9.00 + 20% = 10.80


def _price_rose(w: DemoWorld) -> str:
    """Kinguin's price rose above BitLoot's cost: the sweep leaves the order to a person; an admin then pays a
    little more with a remedy, through the command line (with `--ui`, the run is submitted to the UI)."""
    order_id = w.order([w.product("Dead Cells", 9.6, cost=9.0)])
    store = Store(w.engine)

    def admin_raises_the_ceiling() -> bool:
        if store.get_state(order_id).last_outcome != "needs_attention" or w.env_file is None:
            return False
        log = (w.env_file.parent / "admin-retry.log").open("ab")
        w.admin_commands.append(subprocess.Popen(
            [_bin("bitloot-reconcile"), "--env-file", str(w.env_file), "retry", order_id,
             "--max-unit-price", ADMIN_CEILING, "--reason", "Kinguin's price rose above our cost: pay up to 10.00",
             "--by", "admin@bitloot.example"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        log.close()
        return True

    w.later.append(admin_raises_the_ceiling)
    return order_id


def _bounced_address(w: DemoWorld) -> str:
    order_id = w.order([w.product("Inside", 6.5)], email="bounced@example.com")
    insert_email_bounce(w.engine, "bounced@example.com", reason="550 5.1.1 mailbox does not exist")
    return order_id


def _already_fulfilled(w: DemoWorld) -> str:
    """Delivered by BitLoot itself before: key stored and recorded, email sent. The sweep must leave it alone."""
    order_id = w.order([w.product("Tetris", 1.0)], status="fulfilled", completion_email_sent=True)
    store, vault = Store(w.engine), w.standins.vault()
    for item in store.load_order(order_id).items:
        path = key_object_path(order_id, item.id, "text/plain")
        vault.put_key(path, f"TETRIS-{item.id[:8]}".encode(), "text/plain")
        url = vault.presign_get(path, filename=attachment_filename(order_id, item.id, "text/plain"))
        store.record_stored_key(order_id, item.id, path, "text/plain", url)
    return order_id


SCENARIOS = [
    Scenario("webhook missed", "paid, Kinguin webhook never arrived", "fulfilled",
             lambda w: w.order([w.product("Minecraft", 19.9)])),
    Scenario("response lost", "Kinguin created the order, answer lost", "fulfilled", _lost_response),
    Scenario("Kinguin slow", "keys arrive after a few polls", "fulfilled",
             lambda w: w.order([w.product("Terraria", 5.0, delivery_mode="after_polls=2")])),
    Scenario("multi-item, image keys", "3 products, 6 units, PNG/JPEG keys", "fulfilled",
             lambda w: w.order([*[w.product("Doom", 7.0)] * 2, *[w.product("Myst", 5.0, key_type="image/png")] * 2,
                                *[w.product("Limbo", 4.0, key_type="image/jpeg")] * 2])),
    Scenario("IPN missed", "waiting, but NOWPayments says finished", "fulfilled", _ipn_missed),
    Scenario("R2 outage", "key storage down for a while", "fulfilled", _r2_outage),
    Scenario("email outage", "Resend down when the order completed", "fulfilled", _email_outage),
    Scenario("Kinguin switched off", "kinguin_enabled off in BitLoot for a while, then on", "fulfilled",
             _kinguin_switched_off),
    Scenario("bounced address", "customer's address hard-bounced: keys, no email", "fulfilled", _bounced_address),
    Scenario("supplier canceled", "Kinguin canceled the order", "needs_attention", _supplier_canceled),
    Scenario("price rose, admin pays more", "needs a person, then an admin's retry with max_unit_price_eur",
             "fulfilled", _price_rose),
    Scenario("out of stock", "no Kinguin offer at our cost", "needs_attention",
             lambda w: w.order([w.product("Outer Wilds", 15.0, stock=0)])),
    Scenario("custom product", "inventory item, not a Kinguin key", "needs_attention",
             lambda w: w.order([w.product("Gift card", 10.0, source_type="custom")])),
    Scenario("partial keys", "Kinguin delivered 1 of 2 keys", "waiting_for_supplier", _partial_keys),
    Scenario("unpaid", "waiting, crypto not received", "payment_not_confirmed", _unpaid),
    Scenario("already fulfilled", "delivered and emailed before", "untouched", _already_fulfilled),
]


def _settled(store: Store, order_id: str, expect: str) -> bool:
    order, state = store.load_order(order_id), store.get_state(order_id)
    if expect == "fulfilled":
        return order.status == "fulfilled" and order.completion_email_sent and all(i.delivered for i in order.items)
    if expect == "untouched":
        return state.last_outcome is None and order.status == "fulfilled"
    return state.last_outcome == expect


def _runs(engine: sa.Engine, order_id: str) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(reconcile_audit).where(
                reconcile_audit.c.order_id == order_id, reconcile_audit.c.action == "fulfill_order")
        ).scalar_one()


def run_demo(*, base_dir: Path, database_url: str | None, ui: bool, port: int, timeout: float) -> int:
    console = Console()
    base_dir = base_dir.resolve()  # the daemon and SeaweedFS run with working directories of their own
    if base_dir.exists():
        shutil.rmtree(base_dir)
    dagster_home = base_dir / "dagster_home"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    database_url = database_url or f"sqlite:///{(base_dir / 'store.db').resolve()}"
    engine = create_store_engine(database_url)
    upgrade(engine)
    store = Store(engine)

    # Ctrl-C and a plain `kill` (SIGTERM) stop the demo alike: every process it started ends with it. SIGINT is
    # handled explicitly too: a shell that starts the demo in the background hands it SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupted)
    with (StandIns(data_dir=base_dir / "s3", s3_stop_grace=S3_STOP_GRACE_SECONDS) as standins,
          (base_dir / "dagster.log").open("wb") as log):
        world = DemoWorld(engine, standins)
        seeded = [(scenario, scenario.seed(world)) for scenario in SCENARIOS]
        before = {order_id: store.load_order(order_id).status for _, order_id in seeded}
        demo_env = {**standins.env(), **DEMO_TUNING.as_environment(), **DEMO_SHOP, "DATABASE_URL": database_url,
                    "DAGSTER_HOME": str(dagster_home.resolve())}
        if ui:
            demo_env["DAGSTER_WEBSERVER_URL"] = f"http://127.0.0.1:{port}"
        env = {**os.environ, **demo_env}
        _init_instance(env)
        env_file = world.env_file = write_env_file(base_dir / "env", demo_env)
        command = (["dagster", "dev", "-m", "bitloot_reconcile.definitions", "-p", str(port)] if ui
                   else ["dagster-daemon", "run", "-m", "bitloot_reconcile.definitions"])
        dagster = subprocess.Popen([_bin(command[0]), *command[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        console.print(f"[bold]{len(seeded)} stuck orders seeded[/]; {command[0]} running "
                      f"(log: {base_dir / 'dagster.log'})" + (f", UI at http://127.0.0.1:{port}" if ui else ""))
        _print_env(console, demo_env, env_file)
        try:
            deadline = time.monotonic() + timeout
            with console.status("waiting for the sweep to settle every order...") as status:
                while time.monotonic() < deadline:
                    world.run_later()
                    done = sum(_settled(store, oid, s.expect) for s, oid in seeded)
                    status.update(f"{done}/{len(seeded)} orders settled")
                    if done == len(seeded):
                        break
                    time.sleep(2)
            ok = _print_table(console, store, engine, seeded, before)
            _materialize_board(console, env, log, database_url, ui=ui, port=port)
            if ui:
                console.print(f"Browse the runs at http://127.0.0.1:{port} (filter by tag bitloot/order_id). "
                              "Ctrl-C to stop.")
                dagster.wait()
        except KeyboardInterrupt:
            ok = True
        finally:
            _stop([*world.admin_commands, dagster])
    return 0 if ok else 1


ENV_FILE_HEADER = """\
# Written by `bitloot-reconcile demo`: where its store, Dagster home and stand-ins are while it runs.
# The keys below are the stand-ins' fake sandbox keys, not secrets. Use it with the command line:
#   bitloot-reconcile --env-file {path} history ORDER_ID
"""


def write_env_file(path: Path, env: dict[str, str]) -> Path:
    """The demo's variables as KEY=value lines, for `bitloot-reconcile --env-file`."""
    path.write_text(ENV_FILE_HEADER.format(path=_shown(path)) + "".join(f"{k}={v}\n" for k, v in env.items()))
    path.chmod(0o600)  # DATABASE_URL may be a scratch database's URL given with --database-url
    return path


def _shown(path: Path) -> str:
    """Relative to the working directory when it is below it, as the user typed `--dir`."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _print_env(console: Console, env: dict[str, str], env_file: Path) -> None:
    console.print(f"Variables for the command line written to {_shown(env_file)}; while the demo runs, try "
                  f"[bold]bitloot-reconcile --env-file {_shown(env_file)} plan[/] (or history, retry, report).",
                  highlight=False)
    for name, value in env.items():
        if name == "DATABASE_URL":  # a scratch database's password stays in the file
            value = sa.make_url(value).render_as_string(hide_password=True)
        console.print(f"  {name}={value}", style="dim", highlight=False, markup=False, soft_wrap=True)


def _bin(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def _init_instance(env: dict[str, str]) -> None:
    # Initialise the fresh SQLite Dagster home once, before the daemon and the webserver race to do it.
    subprocess.run([sys.executable, "-c", "import dagster; dagster.DagsterInstance.get()"], env=env, check=True)


# Within 10 s of Ctrl-C or SIGTERM every process the demo started is gone: Dagster's (its webserver, daemon,
# code servers and run workers share `dagster dev`'s process group) get a few seconds, then SeaweedFS, whose
# data the next demo wipes anyway.
DAGSTER_STOP_GRACE_SECONDS = 3.0
S3_STOP_GRACE_SECONDS = 1.0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(processes: list[subprocess.Popen]) -> None:
    """Ctrl-C to each process's whole group (each was started with start_new_session), then SIGKILL to whatever
    of the groups is left after one short grace: `dagster dev` ignores SIGTERM, and its children can outlive it."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
    deadline = time.monotonic() + DAGSTER_STOP_GRACE_SECONDS
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _print_table(console: Console, store: Store, engine: sa.Engine, seeded, before) -> bool:
    table = Table(title="bitloot-reconcile demo: before and after")
    for column in ("scenario", "before", "after", "outcome", "reason", "runs", "as expected"):
        table.add_column(column)
    all_ok = True
    for scenario, order_id in seeded:
        order, state = store.load_order(order_id), store.get_state(order_id)
        ok = _settled(store, order_id, scenario.expect)
        all_ok &= ok
        after = order.status + (" + email" if order.completion_email_sent and order.status == "fulfilled" else "")
        table.add_row(
            f"{scenario.name}\n[dim]{order_id[:8]} · {scenario.story}[/]",
            before[order_id],
            after,
            state.last_outcome or "-",
            state.last_reason or "",
            str(_runs(engine, order_id)),
            "[green]yes[/]" if ok else f"[red]no (expected {scenario.expect})[/]",
        )
    console.print(table)
    console.print("[green]every order settled as expected[/]" if all_ok else "[red]some orders did not settle[/]")
    return all_ok


def _materialize_board(console: Console, env: dict[str, str], log, database_url: str, *, ui: bool,
                       port: int) -> None:
    """Refresh the stuck-orders board once the orders settled, so the UI opens with it filled (its schedule
    refreshes it every 5 minutes after that), and say where to find it."""
    from bitloot_reconcile.domain.board import ASSET_NAME

    done = subprocess.run([_bin("dagster"), "asset", "materialize", "-m", "bitloot_reconcile.definitions",
                           "--select", ASSET_NAME], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=180)
    if done.returncode != 0:
        console.print(f"[yellow]the board ({ASSET_NAME}) could not be materialised; see the log[/]")
        return
    where = f"http://127.0.0.1:{port}/assets/{ASSET_NAME}" if ui else f"asset {ASSET_NAME} (with --ui)"
    shell = f"DATABASE_URL={database_url} " if database_url.startswith("sqlite") else ""
    console.print(f"The stuck-orders board: {where}; CSV under reports/board/ in bucket {env['R2_BUCKET']}; "
                  f"on the command line: {shell}bitloot-reconcile board", highlight=False, soft_wrap=True)
