"""The front door of the production layout: Debian's nginx with `deploy/nginx/bitloot-reconcile.conf.template`
(basic authentication) in front of the full webserver for admins and a `--read-only` one for support, both on
the repository's dagster.yaml and workspace.yaml with one code server. Checked from headless Chromium through the
proxy: nobody gets in without credentials, support browses runs but cannot launch, an admin launches.

nginx runs as a private, non-daemon process of this test (`-p`, `-c`, free ports); the machine's own nginx is
never touched. No dagster-daemon: a launched run stays queued, which is all a launch needs to show.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import dagster as dg
import httpx
import pytest

from bitloot_standins.hosts import NGINX, front_door_config, location_loaded
from bitloot_standins.postgres import temporary_database
from tests.e2e.test_browser import PAGE_TIMEOUT_MS, browser, launch_from_launchpad, open_launchpad
from tests.e2e.test_daemon import BIN, REPO, Processes, free_port
from tests.fixtures.db import PG_SERVER_URL

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ADMIN = ("ops@bitloot.io", "admin-" + uuid.uuid4().hex)
SUPPORT = ("support@bitloot.io", "support-" + uuid.uuid4().hex)
LAUNCH = """mutation($order: String!) { launchRun(executionParams: {
  selector: {repositoryLocationName: "bitloot_reconcile", repositoryName: "__repository__", jobName: "fulfill_order"},
  runConfigData: {order_id: $order, reason: "support tries", requested_by: "support@bitloot.io"}}) { __typename } }"""

__all__ = ["browser"]  # the module-scoped Chromium of the browser tests


def start_nginx(procs: Processes, root: Path, admin_port: int, support_port: int) -> int:
    """The deployment file, filled in, inside a minimal nginx.conf of this test's own (paths under `root`)."""
    port = free_port()
    config = front_door_config(root, f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}", f"127.0.0.1:{support_port}",
                               ADMIN, SUPPORT)
    procs.start("nginx", [str(NGINX), "-p", str(root), "-c", str(config)], {"PATH": "/usr/bin:/bin"})
    return port


def wait_until(what: str, check, procs: Processes, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        procs.check_alive()
        assert time.monotonic() < deadline, f"out of time waiting for {what}"
        time.sleep(1)


@pytest.mark.timeout(400)
def test_the_front_door_lets_admins_launch_support_only_browse_and_nobody_in_without_credentials(
    browser, tmp_path, monkeypatch
):
    if not NGINX.exists():
        pytest.skip(f"the front door test needs Debian's nginx at {NGINX} (apt-get install nginx); .ci/run installs it")
    with temporary_database(PG_SERVER_URL, "brdoor_dagster") as dagster_db, contextlib.ExitStack() as stack:
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        code_port, admin_port, support_port = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_URL": f"postgresql+psycopg2://{PG_SERVER_URL.split('://', 1)[1]}/{dagster_db}",
            "DAGSTER_CODE_SERVER_HOST": "127.0.0.1",
            "DAGSTER_CODE_SERVER_PORT": str(code_port),
            # A launch checks that the resources' variables are set; no run executes here (no daemon).
            **{name: "unused" for name in ("DATABASE_URL", "KINGUIN_API_KEY", "NOWPAYMENTS_API_KEY",
                                           "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "RESEND_API_KEY")},
        }
        for name in ("DAGSTER_HOME", "DAGSTER_PG_URL"):
            monkeypatch.setenv(name, env[name])
        # Dagster's tables from this process first: two processes initialising one database race.
        instance = stack.enter_context(dg.DagsterInstance.from_config(str(home)))

        procs = Processes(tmp_path)
        stack.callback(procs.stop)
        procs.start("code server", [str(BIN / "dagster"), "api", "grpc", "-m", "bitloot_reconcile.definitions",
                                    "-h", "127.0.0.1", "-p", str(code_port)], env)
        workspace = ["-w", str(REPO / "workspace.yaml")]
        procs.start("admin webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(admin_port),
                                        *workspace], env)
        procs.start("support webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p",
                                          str(support_port), "--read-only", "--path-prefix", "/support",
                                          *workspace], env)
        nginx_root = tmp_path / "nginx"
        nginx_root.mkdir()
        door = f"http://127.0.0.1:{start_nginx(procs, nginx_root, admin_port, support_port)}"
        wait_until("the admin webserver", lambda: location_loaded(door, ADMIN), procs)
        wait_until("the support webserver", lambda: location_loaded(f"{door}/support", SUPPORT), procs)
        # What "Skip" on Dagster's one-time community dialog does, so no page opens behind it.
        httpx.post(f"{door}/graphql", json={"query": "mutation { setNuxSeen }"}, auth=ADMIN, timeout=30)

        # -- without credentials, or with the wrong ones: 401 at the door --------------------------------------
        for path in ("/", "/runs", "/graphql", "/support/", "/support/runs", "/support/graphql"):
            assert httpx.get(door + path, timeout=10).status_code == 401, path
            assert httpx.get(door + path, auth=(ADMIN[0], "wrong"), timeout=10).status_code == 401, path
        # Support's name opens only support's door.
        assert httpx.get(door + "/runs", auth=SUPPORT, timeout=10).status_code == 401
        assert httpx.get(door + "/support/runs", auth=SUPPORT, timeout=10).status_code == 200

        shots = tmp_path / "screenshots"
        shots.mkdir()

        def page_as(user: tuple[str, str], name: str):
            context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                          http_credentials={"username": user[0], "password": user[1]})
            stack.callback(context.close)
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            page = context.new_page()
            # Kept for a person to look at: where each page ended, also when the test failed.
            stack.callback(lambda: page.screenshot(path=str(shots / f"{name}.png")))
            return page

        anonymous = page_as(("", ""), "anonymous")
        assert anonymous.goto(door + "/runs").status == 401

        # -- an admin launches from the launchpad ------------------------------------------------------------
        admin = page_as(ADMIN, "admin")
        order_id = str(uuid.uuid4())
        # Typed in the launchpad: who asked (on the admin's behalf), not who is logged in at the door.
        typed = "cs-lead@bitloot.io"
        launch_from_launchpad(admin, door, f"order_id: {order_id}\nreason: ticket 31\nrequested_by: {typed}\n")
        admin.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
        run_id = admin.url.rsplit("/", 1)[1]
        for button in ("Re-execute all", "Terminate"):
            assert admin.get_by_role("button", name=re.compile(button)).first.is_enabled(), button
        run = instance.get_run_by_id(run_id)
        assert run.status == dg.DagsterRunStatus.QUEUED
        assert run.run_config == {"order_id": order_id, "reason": "ticket 31", "requested_by": typed}
        # The proxy's login does not reach the run: Dagster passes no request header on.
        assert ADMIN[0] not in repr(run)

        # -- support sees that run, but cannot launch -------------------------------------------------------
        support = page_as(SUPPORT, "support")
        support.goto(f"{door}/support/runs")
        support.locator(f"a[href='/support/runs/{run_id}']").first.wait_for()
        support.goto(f"{door}/support/runs/{run_id}")
        support.get_by_text(run_id[:8], exact=True).first.wait_for()
        # The run's own buttons are there, switched off.
        for button in ("Re-execute all", "Terminate"):
            assert support.get_by_role("button", name=re.compile(button)).first.is_disabled(), button
        support.screenshot(path=str(shots / "support_run.png"))

        open_launchpad(support, f"{door}/support")
        # The read-only UI sends the launchpad back to the job's overview: no editor, no launch button.
        support.wait_for_url(lambda url: "/jobs/fulfill_order" in url and not url.endswith("/playground"))
        support.get_by_text("Launchpad", exact=True).first.wait_for()
        support.screenshot(path=str(shots / "support_launchpad.png"))
        assert support.get_by_role("button", name=re.compile("Launch Run")).count() == 0
        runs_before = instance.get_runs_count()
        refused = httpx.post(f"{door}/support/graphql", json={"query": LAUNCH, "variables": {"order": order_id}},
                             auth=SUPPORT, timeout=30).json()
        assert refused["data"]["launchRun"]["__typename"] == "UnauthorizedError", refused
        assert instance.get_runs_count() == runs_before
        access_log = (nginx_root / "access.log").read_text()
        assert f"{SUPPORT[0]} " in access_log and f"{ADMIN[0]} " in access_log  # who did what, at the door
