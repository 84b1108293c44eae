"""The operator's commands (`plan`, `history`, `retry`, `report`) against PostgreSQL, SeaweedFS and the simulators.

Commands run in process through click's CliRunner, with the environment a real shell would give them; the
GraphQL retry goes to a real `dagster-webserver` process.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from bitloot_reconcile import commands
from bitloot_reconcile.cli import main
from bitloot_reconcile.domain.delivery import key_object_path
from bitloot_reconcile.resources.r2 import R2Resource
from bitloot_reconcile.settings import ReconcileVariables
from bitloot_reconcile.store import schema
from bitloot_reconcile.store.schema import orders
from bitloot_reconcile.tags import OUTCOME_REFUSED
from tests.fixtures.report import NOON, plant
from tests.fixtures.world import World, world_env

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli_env(world: World) -> dict[str, str | None]:
    return {
        **world_env(world),
        "DAGSTER_HOME": None,
        "DAGSTER_WEBSERVER_URL": None,
        "COLUMNS": "250",
    }


def invoke(world: World | None, *args: str, **env: str | None) -> Result:
    return CliRunner().invoke(main, list(args), env={**(cli_env(world) if world else {}), **env})


def tables(world: World) -> dict[str, list[tuple]]:
    """Every row of every table the project and BitLoot share, in a stable order."""
    with world.engine.connect() as conn:
        return {
            table.name: [tuple(row) for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))]
            for table in schema.metadata.sorted_tables
        }


def bucket(world: World) -> list[tuple]:
    s3 = boto3.client("s3", endpoint_url=world.r2.endpoint, aws_access_key_id=world.r2.access_key_id,
                      aws_secret_access_key=world.r2.secret_access_key, region_name="us-east-1")
    listing = s3.list_objects_v2(Bucket=world.r2.bucket).get("Contents", [])
    return sorted((o["Key"], o["ETag"], o["LastModified"]) for o in listing)


def requests_seen(world: World) -> dict[str, int]:
    return {"kinguin": len(world.kinguin.requests), "nowpayments": len(world.nowpayments.requests),
            "resend": len(world.resend.requests)}


def age_orders(world: World) -> None:
    """Past the sweep's grace period (placing a reservation id touched "updatedAt")."""
    with world.engine.begin() as conn:
        conn.execute(sa.update(orders).values(updatedAt=sa.func.now() - sa.text("interval '30 minutes'")))


# ------------------------------------------------------------------------------------------------- plan
def test_plan_says_what_each_stuck_order_needs_and_changes_nothing(world: World):
    game = world.product()
    ids = {"place": world.order([game]), "custom": world.order([world.product(source_type="custom")]),
           "email": world.order([game], status="fulfilled")}
    ids["verify"] = world.order([game], status="waiting", payment_status="waiting", payment_id="7001")
    world.nowpayments.set_payment("7001", "finished", order_id=ids["verify"])
    ids["unpaid"] = world.order([game], status="confirming", payment_status="waiting", payment_id="7002")
    world.nowpayments.set_payment("7002", "waiting", order_id=ids["unpaid"])
    ids["adopt"] = world.order([game])
    world.store.record_placement_intent(ids["adopt"])
    adopted = plant(world, ids["adopt"], game, reserve=False)
    ids["canceled"] = world.order([game])
    canceled = plant(world, ids["canceled"], game, "canceled")
    ids["partial"] = world.order([game, game])
    partial = world.kinguin.plant_order(ids["partial"], [(game.kinguin_product_id, 2)], status="processing")
    world.kinguin.deliver(partial.order_id, 1)
    world.store.save_reservation_id(ids["partial"], partial.order_id)
    # A crash after uploading one key of two: the key is assigned and its object is in R2, nothing recorded.
    ids["resume"] = world.order([game, game])
    resumed = world.kinguin.plant_order(ids["resume"], [(game.kinguin_product_id, 2)])
    world.store.save_reservation_id(ids["resume"], resumed.order_id)
    resumed_item = world.store.load_order(ids["resume"]).items[0]
    world.store.assign_key(ids["resume"], resumed_item.id, resumed.keys[0].id)
    world.vault.put_key(key_object_path(ids["resume"], resumed_item.id, "text/plain"), b"KEY", "text/plain")
    age_orders(world)
    before, objects, seen = tables(world), bucket(world), requests_seen(world)

    result = invoke(world, "plan")
    resources = world.resources()
    with resources["kinguin"].get_client() as kinguin, resources["nowpayments"].get_client() as payments:
        readers = commands.Readers(world.store, kinguin, payments, world.vault)
        plans = {p.order_id: p for p in commands.plan(readers, ReconcileVariables())}

    assert result.exit_code == 0, result.output
    assert tables(world) == before
    assert bucket(world) == objects
    assert {r.method for r in world.kinguin.requests[seen["kinguin"]:]} == {"GET"}
    assert {r.route for r in world.kinguin.requests[seen["kinguin"]:]} == {"get_order", "search_orders", "get_keys",
                                                                     "get_product"}
    assert {r.method for r in world.nowpayments.requests[seen["nowpayments"]:]} == {"GET"}
    assert len(world.resend.requests) == seen["resend"]
    for order_id in ids.values():
        assert order_id in result.output

    ends = {name: (plans[order_id].outcome, plans[order_id].why) for name, order_id in ids.items()}
    assert ends == {
        "place": ("fulfilled", "keys stored and email sent"),
        "custom": ("needs_attention", "custom-inventory items are not handled here"),
        "email": ("fulfilled", "keys stored and email sent"),
        "verify": ("fulfilled", "keys stored and email sent"),
        "unpaid": ("payment_not_confirmed", "payment not confirmed (NOWPayments says waiting)"),
        "adopt": ("fulfilled", "keys stored and email sent"),
        "canceled": ("needs_attention", f"supplier canceled Kinguin order {canceled}"),
        "partial": ("waiting_for_supplier", "1 of 2 keys delivered by Kinguin so far"),
        "resume": ("fulfilled", "keys stored and email sent"),
    }
    steps = {name: plans[order_id].steps for name, order_id in ids.items()}
    assert steps["place"][0] == f"place Kinguin order (1 x {game.kinguin_product_id} at <= 5.00)"
    assert steps["verify"][0] == "verify payment (NOWPayments says finished) and mark paid"
    assert steps["email"] == ("send completion email",)
    assert steps["adopt"][0] == f"adopt Kinguin order {adopted} (found by orderExternalId after an earlier attempt)"
    assert "store 2 key(s) in R2, 1 already in R2 from an earlier attempt" in steps["resume"]


def test_plan_picks_stuck_orders_with_the_sweeps_grace_period(world: World):
    recent = world.order([world.product()], age=dt.timedelta(minutes=5))

    default = invoke(world, "plan")
    short_grace = invoke(world, "plan", RECONCILE_GRACE_MINUTES="1")

    assert default.exit_code == 0 and "no stuck orders" in default.output
    assert short_grace.exit_code == 0 and recent in short_grace.output


# ------------------------------------------------------------------------------------------------- history
@pytest.fixture
def dagster_home(tmp_path: Path) -> Path:
    """A real, empty Dagster home (SQLite), as `dagster dev` or the daemon would use it."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


def attempt_rows(output: str) -> list[str]:
    """The history table's rows, each one attempt: its lines joined, borders dropped."""
    rows, current = [], []
    for line in output.splitlines():
        if line.startswith("├") or line.startswith("└"):
            if current:
                rows.append(" ".join(current))
            current = []
        elif line.startswith("│"):
            current.append(" ".join(cell.strip() for cell in line.strip("│").split("│") if cell.strip()))
    return rows


def test_history_lists_every_attempt_failed_and_refused_ones_too_within_80_columns(world: World):
    slow = world.product(delivery_mode="manual")
    order_id = world.order([slow])
    first = world.run(order_id, reason="ticket 1")
    dead_r2 = R2Resource(endpoint="http://127.0.0.1:9", access_key_id="x", secret_access_key="y",
                         bucket=world.r2.bucket)
    (supplier,) = world.kinguin.orders_for_external_id(order_id)
    world.kinguin.deliver(supplier.order_id)
    failed = world.run(order_id, reason="ticket 2", r2=dead_r2)
    second = world.run(order_id, reason="ticket 3 with a reason long enough to wrap at eighty columns, twice over",
                       requested_by="ops@bitloot.io")
    # What the ops record when a launched run refuses an operator's request (nothing changed).
    refused_run = str(uuid.uuid4())
    world.store.append_audit(order_id=order_id, action=OUTCOME_REFUSED, trigger="admin", actor="ops@bitloot.io",
                             reason="ticket 4", run_id=refused_run, outcome=OUTCOME_REFUSED,
                             detail="Order is already fulfilled")
    assert not failed.success

    result = invoke(world, "history", order_id.upper(), COLUMNS="80")

    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    rows = attempt_rows(result.output.split("\nnow")[0])
    assert len(rows) == 4  # one per run: the `requested` and `fulfill_order` rows of a run are one attempt
    assert re.search(rf"admin run by admin@bitloot.io: ticket 1 run {first.run_id} "
                     rf"→ waiting_for_supplier: .*is processing", rows[0])
    assert re.search(rf"ticket 2 run {failed.run_id} → retry_later \(the run failed; swept again later\): "
                     r"store_keys failed", rows[1])
    assert re.search(rf"by ops@bitloot.io: ticket 3 with a reason long enough to wrap at eighty columns, twice over "
                     rf"run {second.run_id} → fulfilled: keys stored and email sent", rows[2])
    assert re.search(rf"ticket 4 run {refused_run} → refused \(nothing changed\): Order is already "
                     rf"fulfilled", rows[3])
    for run_id in (first.run_id, failed.run_id, second.run_id, refused_run):
        assert re.search(rf"run {run_id}\b", result.output)  # whole, on one line
    assert re.search(r"store status\s+│ fulfilled", result.output)
    assert re.search(r"attempts\s+│ 3", result.output)
    assert re.search(rf"last run id\s+│ {second.run_id}", result.output)
    assert re.search(rf"Kinguin order\s+│ {supplier.order_id}", result.output)
    assert "with DAGSTER_HOME set, runs that left no audit row show too" in result.output

    unknown = invoke(world, "history", str(uuid.uuid4()))
    assert unknown.exit_code == 2 and "not found and never reconciled" in unknown.output


def test_history_adds_the_runs_that_left_no_audit_row_from_dagster_home(world: World, dagster_home: Path):
    import dagster as dg

    from bitloot_reconcile.jobs import fulfill_order

    order_id = world.order([world.product()])
    config = {"order_id": order_id, "reason": "ticket 5", "requested_by": "ops@bitloot.io"}
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        tags = {"bitloot/order_id": order_id, "bitloot/trigger": "admin", "bitloot/requested_by": "ops@bitloot.io",
                "bitloot/reason": "ticket 5"}
        broken = instance.create_run_for_job(fulfill_order, run_config=config, tags=tags)
        instance.report_run_failed(broken)  # e.g. its run worker died before the first step
        queued = instance.create_run_for_job(fulfill_order, run_config=config, tags=tags)
        done = fulfill_order.execute_in_process(run_config=config, resources=world.resources(), instance=instance,
                                                tags=tags)
    assert done.success

    result = invoke(world, "history", order_id, DAGSTER_HOME=str(dagster_home), COLUMNS="80")

    assert result.exit_code == 0, result.output
    rows = attempt_rows(result.output.split("\nnow")[0])
    assert len(rows) == 3
    assert re.search(rf"run {broken.run_id} \(failure\) → failure before recording an outcome", rows[0])
    assert re.search(rf"run {queued.run_id} \(not_started\) → in progress", rows[1])
    assert re.search(rf"run {done.run_id} \(success\) → fulfilled: keys stored and email sent", rows[2])
    assert "runs that left no audit row show too" not in result.output


# ------------------------------------------------------------------------------------------------- retry
def test_retry_runs_in_process_on_the_instance_of_dagster_home(world: World, dagster_home: Path):
    import dagster as dg

    order_id = world.order([world.product()])

    result = invoke(world, "retry", order_id, "--reason", "customer ticket 9", "--by", "ops@bitloot.io",
                    DAGSTER_HOME=str(dagster_home))

    assert result.exit_code == 0, result.output
    run_id = re.search(r"run ([0-9a-f-]{36}): fulfilled \(keys stored and email sent\)", result.output).group(1)
    assert f"in the Dagster instance of DAGSTER_HOME={dagster_home}: its UI shows it at /runs/{run_id}" in (
        result.output.replace("\n", " "))
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        (run,) = instance.get_runs(filters=dg.RunsFilter(tags={"bitloot/order_id": order_id}))
    assert run.run_id == run_id and run.status == dg.DagsterRunStatus.SUCCESS
    assert {k: v for k, v in run.tags.items() if k.startswith("bitloot/") and k != "bitloot/outcome"} == {
        "bitloot/order_id": order_id, "bitloot/trigger": "admin", "bitloot/reason": "customer ticket 9",
        "bitloot/requested_by": "ops@bitloot.io", "bitloot/attempt": "1"}
    assert world.store.load_order(order_id).status == "fulfilled"
    audit = world.store.audit_trail(order_id)
    assert [(a["action"], a["trigger"], a["actor"], a["reason"], a["run_id"]) for a in audit] == [
        ("requested", "admin", "ops@bitloot.io", "customer ticket 9", run_id),
        ("fulfill_order", "admin", "ops@bitloot.io", "customer ticket 9", run_id),
    ]
    assert len(world.resend.sent) == 1


def test_retry_in_process_that_fails_says_how_the_run_ended(world: World, dagster_home: Path):
    order_id = world.order([world.product()])

    result = invoke(world, "retry", order_id, "--reason", "ticket 10", "--by", "ops@bitloot.io",
                    DAGSTER_HOME=str(dagster_home), R2_ENDPOINT=f"http://127.0.0.1:{_free_port()}")

    assert result.exit_code == 1, result.output
    run_id = re.search(r"run ([0-9a-f-]{36}): retry_later \(store_keys failed: TransientError: r2: put_object ",
                       result.output).group(1)
    assert "Error: the run failed: " in result.output and "Traceback" not in result.output
    assert world.store.get_state(order_id).last_run_id == run_id


def test_retry_without_dagster_home_or_webserver_refuses_to_run_out_of_sight(world: World):
    order_id = world.order([world.product()])
    before = tables(world)

    result = invoke(world, "retry", order_id, "--reason", "r", "--by", "me")
    missing_home = invoke(world, "retry", order_id, "--reason", "r", "--by", "me", DAGSTER_HOME="/nonexistent/home")

    assert result.exit_code == 2
    assert "DAGSTER_HOME" in result.output and "DAGSTER_WEBSERVER_URL" in result.output
    assert missing_home.exit_code == 2
    assert '"/nonexistent/home" is not a directory or does not exist' in missing_home.output
    assert "Traceback" not in missing_home.output
    assert tables(world) == before
    assert world.kinguin.requests == []


def test_retry_refuses_bad_requests_before_anything_is_submitted(world: World):
    game = world.product()
    paid = world.order([game])
    done = world.order([game], status="fulfilled", completion_email_sent=True)
    expired = world.order([game], status="expired")
    before, seen = tables(world), requests_seen(world)
    nowhere = "http://127.0.0.1:9"  # nothing listens: a submission would fail differently
    cases = [
        (("not-an-order", "--reason", "r", "--by", "me"), "'not-an-order' is not a valid order uuid"),
        ((str(uuid.uuid4()), "--reason", "r", "--by", "me"), "not found"),
        ((done, "--reason", "r", "--by", "me"), "Order is already fulfilled"),
        ((expired, "--reason", "r", "--by", "me"), "is 'expired'; only paid, waiting, confirming or failed"),
        ((paid, "--reason", "  ", "--by", "me"), "reason must not be empty"),
        ((paid, "--reason", "r", "--by", ""), "requested_by must not be empty"),
        # The launchpad's check: a NUL byte would fail in PostgreSQL after the claim.
        ((paid, "--reason", "ticket\x0012", "--by", "me"), "reason must not contain control characters"),
        ((paid, "--reason", "r", "--by", "me\tyou"), "requested_by must not contain control characters"),
    ]
    for args, message in cases:
        result = invoke(world, "retry", *args, "--dagster-url", nowhere)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
        assert "Traceback" not in result.output
    assert tables(world) == before
    assert requests_seen(world) == seen


def test_retry_refuses_a_remedy_the_order_does_not_allow_before_anything_is_submitted(world: World):
    pricey = world.order([world.product(price=5.8, cost=5.0)])
    never_placed = world.order([world.product()])
    before, seen = tables(world), requests_seen(world)
    nowhere = "http://127.0.0.1:9"
    cases = [
        ((pricey, "--max-unit-price", "6.01"), "max_unit_price_eur 6.01 is above the bound for product"),
        ((pricey, "--max-unit-price", "5"), "is not above any line's cost"),
        ((pricey, "--max-unit-price", "-1"), "max_unit_price_eur must be a price above 0 EUR"),
        ((never_placed, "--replace-canceled-supplier-order"), "has no Kinguin order to replace"),
        ((pricey, "--resolution", "written_off", "--max-unit-price", "6"), "cannot be combined"),
        ((pricey, "--resolution", "lost"), "'lost' is not one of"),
    ]
    for args, message in cases:
        result = invoke(world, "retry", *args, "--reason", "r", "--by", "me", "--dagster-url", nowhere)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    bounded = invoke(world, "retry", pricey, "--max-unit-price", "6.01", "--reason", "r", "--by", "me",
                     "--dagster-url", nowhere)
    assert "at most 6.00 (+20% or +5.00 EUR over cost, whichever is lower)" in " ".join(bounded.output.split())
    tuned = invoke(world, "retry", pricey, "--max-unit-price", "5.6", "--reason", "r", "--by", "me",
                   "--dagster-url", nowhere, RECONCILE_MAX_PRICE_OVER_COST_EUR="0.5")
    assert "at most 5.50 (+20% or +0.50 EUR" in " ".join(tuned.output.split())
    assert tables(world) == before
    assert requests_seen(world) == seen


def test_retry_with_a_raised_ceiling_runs_and_history_shows_the_remedy(world: World, dagster_home: Path):
    import dagster as dg

    order_id = world.order([world.product(price=5.8, cost=5.0)])
    assert world.run(order_id).success  # needs attention: Kinguin asks more than the cost

    result = invoke(world, "retry", order_id, "--max-unit-price", "6", "--reason", "ticket 12: pay a bit more",
                    "--by", "lead@bitloot.io", DAGSTER_HOME=str(dagster_home))

    assert result.exit_code == 0, result.output
    assert re.search(r"run [0-9a-f-]{36}: fulfilled \(keys stored and email sent; paid 5.80 per unit for \w+ "
                     r"against cost 5.00 \(\+0.80\)\)", result.output), result.output
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        (run,) = instance.get_runs(filters=dg.RunsFilter(tags={"bitloot/order_id": order_id}))
    assert run.tags["bitloot/remedy"] == "max_unit_price_eur=6.00"
    assert run.run_config["max_unit_price_eur"] == 6.0  # the flat launchpad config, as the UI shows it

    history = invoke(world, "history", order_id, DAGSTER_HOME=str(dagster_home), COLUMNS="80")
    assert history.exit_code == 0, history.output
    rows = attempt_rows(history.output.split("\nnow")[0])
    assert "remedy" not in rows[0]
    assert re.search(rf"admin run by lead@bitloot.io: ticket 12: pay a bit more remedy: max_unit_price_eur=6.00 "
                     rf"run {run.run_id} \(success\) → fulfilled: keys stored and email sent; paid 5.80", rows[1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def webserver(world: World, tmp_path: Path) -> Iterator[str]:
    """`dagster-webserver` on a free port, its own DAGSTER_HOME, runs launched at once (no daemon needed)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
        "telemetry:\n  enabled: false\n"
    )
    port = _free_port()
    env = {k: v for k, v in {**os.environ, **cli_env(world), "DAGSTER_HOME": str(home)}.items() if v is not None}
    with open(tmp_path / "webserver.log", "wb") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-webserver"), "-m", "bitloot_reconcile.definitions",
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_location(url, proc, tmp_path / "webserver.log")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _wait_for_location(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            body = httpx.post(f"{url}/graphql", json={"query": query}, timeout=5).json()
            entries = body["data"]["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError("dagster-webserver did not load the code location:\n" + log.read_text()[-3000:])


def test_retry_through_graphql_is_run_by_the_webserver_and_waited_for(world: World, webserver: str):
    order_id = world.order([world.product()])

    result = invoke(world, "retry", order_id, "--reason", "ticket 12", "--by", "ops@bitloot.io", "--wait",
                    DAGSTER_WEBSERVER_URL=webserver)

    assert result.exit_code == 0, result.output
    run_id = re.search(r"submitted fulfill_order run ([0-9a-f-]{36})", result.output).group(1)
    assert f"{webserver}/runs/{run_id}\n" in result.output
    assert f"run {run_id}: fulfilled (keys stored and email sent)" in result.output
    assert world.store.load_order(order_id).status == "fulfilled"
    assert [(a["action"], a["run_id"], a["trigger"], a["actor"]) for a in world.store.audit_trail(order_id)] == [
        ("requested", run_id, "admin", "ops@bitloot.io"), ("fulfill_order", run_id, "admin", "ops@bitloot.io")]
    run = httpx.post(f"{webserver}/graphql", timeout=10, json={
        "query": "query($id: ID!) { runOrError(runId: $id) { ... on Run { status tags { key value } } } }",
        "variables": {"id": run_id}}).json()["data"]["runOrError"]
    assert run["status"] == "SUCCESS"  # --wait returned only once the run had ended
    tags = {t["key"]: t["value"] for t in run["tags"] if t["key"].startswith("bitloot/")}
    assert {k: v for k, v in tags.items() if k != "bitloot/outcome"} == {
        "bitloot/order_id": order_id, "bitloot/trigger": "admin", "bitloot/reason": "ticket 12",
        "bitloot/requested_by": "ops@bitloot.io", "bitloot/attempt": "1"}


def test_retry_to_an_unreachable_or_wrong_url_says_so_in_one_line(world: World):
    order_id = world.order([world.product()])
    closed = f"http://127.0.0.1:{_free_port()}"  # bound once, nothing listens now
    before = tables(world)

    unreachable = invoke(world, "retry", order_id, "--reason", "r", "--by", "me", "--dagster-url", closed)
    no_such_host = invoke(world, "retry", order_id, "--reason", "r", "--by", "me",
                          "--dagster-url", "dagster.invalid:3000")
    not_dagster = invoke(world, "retry", order_id, "--reason", "r", "--by", "me",
                         "--dagster-url", world.nowpayments.url)  # a web server without /graphql

    assert unreachable.exit_code == 1
    assert unreachable.output == f"Error: cannot reach Dagster at {closed}\n"
    assert no_such_host.exit_code == 1
    assert no_such_host.output == "Error: cannot reach Dagster at http://dagster.invalid:3000\n"
    assert not_dagster.exit_code == 1
    assert re.fullmatch(rf"Error: Dagster at {world.nowpayments.url} answered HTTP 4\d\d; is this the Dagster "
                        r"webserver's address\?\n", not_dagster.output)
    assert tables(world) == before


# ------------------------------------------------------------------------------------------------- report
def test_report_prints_class_counts_and_writes_every_row(world: World, tmp_path: Path):
    game = world.product()
    not_placed = world.order([game])
    with world.engine.begin() as conn:
        conn.execute(sa.update(orders).values(createdAt=NOON.replace(tzinfo=None)))
    orphan = str(uuid.uuid4())
    plant(world, orphan, game, created_at=NOON + dt.timedelta(hours=1), reserve=False)
    seen = requests_seen(world)

    result = invoke(world, "report", "--since", "2026-03-10", "--csv", str(tmp_path / "report.csv"))

    assert result.exit_code == 0, result.output
    assert "2 rows: orders created from 2026-03-10 00:00 to 2026-03-11 00:00 UTC" in result.output
    assert re.search(r"orphan_supplier_order\s+│ error\s+│\s+1", result.output)
    assert re.search(r"paid_not_placed\s+│ warn\s+│\s+1", result.output)
    assert re.search(r"price_mismatch\s+│ warn\s+│\s+0", result.output)
    rows = pd.read_csv(tmp_path / "report.csv")
    assert dict(zip(rows["order_id"], rows["class"], strict=True)) == {
        orphan: "orphan_supplier_order", not_placed: "paid_not_placed"}
    assert {r.method for r in world.kinguin.requests[seen["kinguin"]:]} == {"GET"}


# ------------------------------------------------------------------------------------------------- settings
def test_env_file_sets_the_variables_for_one_command(world: World, tmp_path: Path):
    order_id = world.order([world.product()])
    env_file = tmp_path / "env"
    variables = {k: v for k, v in cli_env(world).items() if v and k != "COLUMNS"}
    env_file.write_text("# a comment\n" + "".join(f"{k}={v}\n" for k, v in variables.items()))
    environment = dict(os.environ)

    result = invoke(None, "--env-file", str(env_file), "history", order_id, DATABASE_URL="postgresql://nowhere/x")

    assert result.exit_code == 0, result.output
    assert order_id in result.output
    assert dict(os.environ) == environment  # put back as it was once the command ended

@pytest.mark.parametrize("command", [("plan",), ("history", "x"), ("retry", "x", "--reason", "r", "--by", "b"),
                                     ("report",), ("db", "upgrade")])
def test_a_missing_database_url_is_a_usage_error(command):
    result = invoke(None, *command, DATABASE_URL=None)
    assert result.exit_code == 2
    assert "DATABASE_URL is not set" in result.output
    assert "Traceback" not in result.output


def test_a_malformed_tunable_is_a_usage_error_naming_the_variable():
    result = invoke(None, "plan", RECONCILE_GRACE_MINUTES="abc")
    assert result.exit_code == 2
    assert "RECONCILE_GRACE_MINUTES" in result.output
    assert "Traceback" not in result.output
