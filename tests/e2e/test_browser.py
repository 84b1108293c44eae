"""What an admin sees in the Dagster UI of `bitloot-reconcile demo --ui`, read from the rendered pages in headless
Chromium (Debian's `chromium`, driven by Playwright; no browser download). Skipped when Chromium is missing.

The demo runs as a user runs it, with an alert webhook of this test's, so "nobody was paged" is checked where
pages would go.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa
from dotenv import dotenv_values

from bitloot_reconcile.store.schema import reconcile_audit, reconcile_state
from bitloot_standins.demo import SCENARIOS
from tests.e2e.test_daemon import free_port
from tests.fixtures.webhook import Receiver

SETTLE_SECONDS = 600  # the demo's own bound; on a loaded 2-core machine its 16 orders take minutes
# The demo's start and settling count against the first test that uses it.
pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.timeout(SETTLE_SECONDS + 300)]

CHROMIUM = Path("/usr/bin/chromium")
# As the machine's browser probe starts it: no sandbox as root, and no background calls to a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_MS = 30_000
WIDTH = 1440  # a laptop's browser window
STEPS = ["load_and_claim", "verify_payment", "ensure_supplier_order", "poll_supplier", "store_keys",
         "mark_fulfilled", "send_completion_email", "record_outcome"]


@dataclass
class DemoUI:
    url: str
    env: dict[str, str]
    receiver: Receiver
    shots: Path

    def needs_attention_orders(self) -> set[str]:
        """The orders a person has to look at now."""
        with sa.create_engine(self.env["DATABASE_URL"]).connect() as conn:
            return set(conn.execute(sa.select(reconcile_state.c.order_id).where(
                reconcile_state.c.last_outcome == "needs_attention")).scalars())

    def orders_ever_left_to_a_person(self) -> set[str]:
        """The orders any run ended as needs_attention, from the store's audit table (an admin may have fixed
        one since: the demo's "price rose" order)."""
        with sa.create_engine(self.env["DATABASE_URL"]).connect() as conn:
            return set(conn.execute(sa.select(reconcile_audit.c.order_id).where(
                reconcile_audit.c.action == "fulfill_order",
                reconcile_audit.c.outcome == "needs_attention")).scalars())


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"the browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium); "
                    ".ci/run installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def demo_ui(browser, tmp_path_factory) -> Iterator[DemoUI]:
    """`bitloot-reconcile demo --ui`, once every seeded order settled."""
    workdir = tmp_path_factory.mktemp("demo_ui")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DAGSTER_HOME")}
    output = workdir / "demo.out"
    with Receiver() as receiver, output.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "bitloot_reconcile.cli", "demo", "--ui", "--port", str(port),
             "--timeout", str(SETTLE_SECONDS)],
            cwd=workdir, env={**env, "COLUMNS": "200", "ALERT_WEBHOOK_URL": receiver.hook_url},
            stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + SETTLE_SECONDS + 120
            while "Browse the runs at" not in output.read_text():
                assert demo.poll() is None and time.monotonic() < deadline, output.read_text()[-4000:]
                time.sleep(1)
            assert "every order settled as expected" in output.read_text()
            variables = {k: v for k, v in dotenv_values(workdir / ".demo" / "env").items() if v is not None}
            # What "Skip" on Dagster's one-time community dialog does, so no page opens behind it.
            httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": "mutation { setNuxSeen }"}, timeout=30)
            yield DemoUI(f"http://127.0.0.1:{port}", variables, receiver, workdir / "screenshots")
        finally:
            demo.send_signal(signal.SIGINT)  # the demo stops dagster dev and its stand-ins on Ctrl-C
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()


@pytest.fixture
def page(browser, demo_ui: DemoUI, request):
    context = browser.new_context(viewport={"width": WIDTH, "height": 1000})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    yield page
    demo_ui.shots.mkdir(exist_ok=True)
    page.screenshot(path=str(demo_ui.shots / f"{request.node.name}.png"))  # kept for a person to look at
    context.close()


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_load_state("networkidle")


def test_filtering_runs_by_outcome_lists_exactly_the_orders_that_need_a_person(page, demo_ui: DemoUI):
    expected = demo_ui.orders_ever_left_to_a_person()
    assert demo_ui.needs_attention_orders() <= expected
    assert len(demo_ui.needs_attention_orders()) == sum(s.expect == "needs_attention" for s in SCENARIOS)

    open_page(page, f"{demo_ui.url}/runs?q%5B0%5D=tag%3Abitloot%2Foutcome%3Dneeds_attention")
    tags = page.get_by_text(re.compile(r"^bitloot/order_id: "))
    tags.first.wait_for()

    shown = {text.split(": ", 1)[1] for text in tags.all_inner_texts()}
    assert shown == expected
    assert page.get_by_text(re.compile(r"^bitloot/outcome: needs_attention$")).count() == len(expected)


def test_a_needs_attention_run_shows_the_steps_after_it_stopped_as_skipped(page, demo_ui: DemoUI):
    open_page(page, f"{demo_ui.url}/runs?q%5B0%5D=tag%3Abitloot%2Foutcome%3Dneeds_attention")
    page.locator("a[href^='/runs/']").first.wait_for()
    run_links = page.locator("a[href^='/runs/']").evaluate_all("links => links.map(l => l.getAttribute('href'))")

    open_page(page, demo_ui.url + run_links[0])
    page.get_by_text("RUN_SUCCESS").first.wait_for()

    skipped = page.get_by_text(re.compile(r"^Skipping step \w+ due to skipped dependencies")).all_inner_texts()
    assert skipped, "no step shows as skipped"
    steps = [re.match(r"Skipping step (\w+)", line).group(1) for line in skipped]
    assert "send_completion_email" in steps and "record_outcome" not in steps
    assert page.get_by_text("STEP_SKIPPED", exact=True).count() == len(steps)
    # The run's step panel does not count them as succeeded: of its eight steps, the rest did run.
    page.get_by_text(f"Succeeded ({len(STEPS) - len(steps)})", exact=True).wait_for()
    assert page.get_by_text(re.compile(r"needs_attention")).count() >= 1


def open_launchpad(page, url: str) -> None:
    """The launchpad of `fulfill_order` of the UI at `url` (the site's root: the href already holds any path
    prefix the webserver was started with)."""
    open_page(page, f"{url}/jobs")
    job = page.locator("a[href*='/jobs/fulfill_order']").first.get_attribute("href")
    root = url.split("/", 3)[:3]
    open_page(page, "/".join(root) + job.split("/jobs/fulfill_order")[0] + "/jobs/fulfill_order/playground")


def launch_from_launchpad(page, url: str, config: str) -> None:
    open_launchpad(page, url)
    page.locator(".CodeMirror").first.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text(config)
    page.get_by_role("button", name=re.compile("Launch Run")).click()


def demo_instance(demo_ui: DemoUI):
    import dagster as dg

    return dg.DagsterInstance.from_config(demo_ui.env["DAGSTER_HOME"])


def runs_for(demo_ui: DemoUI, order_id: str) -> list:
    """The demo's runs launched with this `order_id` in their config (the sweep keeps launching others)."""
    with demo_instance(demo_ui) as instance:
        return [run for run in instance.get_runs() if (run.run_config or {}).get("order_id") == order_id]


def test_a_launchpad_launch_with_a_malformed_order_id_is_refused_before_a_run_exists(page, demo_ui: DemoUI):
    launch_from_launchpad(page, demo_ui.url,
                          "order_id: not-a-uuid\nreason: browser test\nrequested_by: ops@bitloot.io\n")

    refusal = "fulfill_order refused: order_id 'not-a-uuid' is not a valid order uuid"
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(refusal).first.wait_for()
    # The dialog's first line is the one sentence. Dagster shows every error a code location raises at launch
    # with the code server's stack below it (its launch dialog has no other form for it): the screenshot keeps
    # what a person sees.
    lines = [line for line in dialog.inner_text().splitlines() if line.strip()]
    assert lines[0] == "Error" and lines[1].endswith(refusal), lines[:2]
    assert runs_for(demo_ui, "not-a-uuid") == []
    assert not [text for text in demo_ui.receiver.texts if "not-a-uuid" in text]


def test_a_launch_for_an_unknown_order_fails_with_the_one_line_reason_and_pages_nobody(page, demo_ui: DemoUI):
    unknown = str(uuid.uuid4())

    launch_from_launchpad(page, demo_ui.url,
                          f"order_id: {unknown}\nreason: browser test\nrequested_by: ops@bitloot.io\n")

    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    (run,) = runs_for(demo_ui, unknown)
    page.get_by_text("RUN_FAILURE").first.wait_for()
    page.get_by_text(f"Order {unknown} not found").first.wait_for()
    # Its steps after the claim are skipped, not a column of red "Not executing" rows; the run fails at its last
    # step with the sentence.
    assert page.get_by_text(re.compile("Not executing")).count() == 0
    page.get_by_text(re.compile(r"^Skipping step verify_payment due to skipped dependencies")).first.wait_for()
    with demo_instance(demo_ui) as instance:
        deadline = time.monotonic() + 90  # the run-failure sensor looks every 30 s at most
        while instance.get_run_by_id(run.run_id).tags.get("bitloot/alert") != "input_error":
            assert time.monotonic() < deadline, instance.get_run_by_id(run.run_id).tags
            time.sleep(1)
        assert instance.get_run_by_id(run.run_id).tags["bitloot/outcome"] == "refused"
    assert not [text for text in demo_ui.receiver.texts if unknown in text]


def test_the_board_reads_at_1440_px_with_short_linked_ids_and_plots_its_figures(page, demo_ui: DemoUI):
    open_page(page, f"{demo_ui.url}/assets/order_backlog?view=events")
    page.get_by_text("[Show Markdown]").first.click()
    board = page.get_by_role("dialog")
    board.get_by_role("columnheader", name="reason").wait_for()
    demo_ui.shots.mkdir(exist_ok=True)
    page.screenshot(path=str(demo_ui.shots / "board_at_1440_px.png"))  # the table itself, for a person to look at

    for column in ("order", "state", "age", "runs", "last run", "reason"):
        assert board.get_by_role("columnheader", name=column, exact=True).is_visible()
    # Every column within the window, nothing to scroll sideways.
    box = board.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= WIDTH
    scrolls = board.evaluate("d => [d, ...d.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1 "
                             "&& getComputedStyle(e).overflowX !== 'visible').length")
    assert scrolls == 0
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH
    # Each order: its short id on one line, a link to its runs (where the full id is); its last run one click away.
    for order_id in demo_ui.needs_attention_orders():
        link = board.get_by_role("link", name=order_id[:8], exact=True)
        assert link.get_attribute("href").endswith(f"/runs?q%5B0%5D=tag%3Abitloot%2Forder_id%3D{order_id}")
        assert link.evaluate("a => a.getClientRects().length") == 1  # not wrapped
    run_links = board.locator("a[href*='/runs/']")
    assert run_links.count() >= len(demo_ui.needs_attention_orders())
    assert all(len(text) == 8 for text in run_links.all_inner_texts())
    # The asset's overview plots each figure, the count of orders in each state among them.
    open_page(page, f"{demo_ui.url}/assets/order_backlog")
    page.get_by_text("Plots", exact=True).first.click()
    page.locator("canvas").first.wait_for()
    for figure in ("stuck_now", "needs_attention_now", "orders_needs_attention", "orders_in_flight"):
        page.get_by_text(figure, exact=True).first.wait_for()


def test_an_orders_history_lists_every_attempt_its_failed_one_included(page, demo_ui: DemoUI):
    with sa.create_engine(demo_ui.env["DATABASE_URL"]).connect() as conn:
        audit = conn.execute(sa.select(reconcile_audit.c.order_id, reconcile_audit.c.outcome).where(
            reconcile_audit.c.action == "fulfill_order")).all()
    # The R2 outage's order: a run failed (retry_later), a later one fulfilled it.
    (order_id,) = {o for o, outcome in audit if outcome == "retry_later"}
    attempts = [outcome for o, outcome in audit if o == order_id]

    open_page(page, f"{demo_ui.url}/assets/order_attempts?view=partitions&partition={order_id}")
    page.get_by_text(f"View all historical events ({len(attempts)})").click()
    history = page.get_by_role("dialog")
    history.get_by_text("Historical events for").wait_for()
    page.wait_for_load_state("networkidle")

    listed = history.locator("tbody tr").filter(has_text=order_id)
    assert listed.count() == len(attempts)
    for text in ("retry_later", "fulfilled"):  # the outcomes, shown in each event's metadata
        assert text in attempts
    with demo_instance(demo_ui) as instance:
        runs = {r.run_id for r in instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("order_attempts"), asset_partitions=[order_id]),
            limit=20).records}
    assert len(runs) == len(attempts) and "" not in runs  # each attempt in its own run's log
    for run_id in runs:
        history.get_by_text(run_id[:8]).first.wait_for()
