"""A run's stdout and stderr outlive the host that ran it: with `deploy/dagster/compute-logs-r2.yaml` appended to
the repository's dagster.yaml, a `fulfill_order` run executes on a "worker host" (its own DAGSTER_HOME and temporary
directory), that host's disk is deleted, and a webserver on a "webserver host" (another DAGSTER_HOME and temporary
directory, the same Dagster database and bucket) still serves the run's output, over GraphQL and on the run's page
in headless Chromium.
The bucket is SeaweedFS standing in for R2; credentials reach dagster-aws as R2's, through the environment.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from pathlib import Path

import boto3
import httpx
import pytest
import yaml

from bitloot_standins.postgres import temporary_database
from tests.e2e.test_browser import PAGE_TIMEOUT_MS, browser
from tests.e2e.test_daemon import BIN, REPO, Processes, free_port
from tests.fixtures.db import PG_SERVER_URL
from tests.fixtures.kinguin import KINGUIN_TEST_KEY
from tests.fixtures.payments_mail import NOWPAYMENTS_TEST_KEY, RESEND_TEST_KEY
from tests.fixtures.runs import key_rows
from tests.fixtures.s3 import unique_bucket
from tests.fixtures.world import migrated_world, world_env

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

__all__ = ["browser"]  # the module-scoped Chromium of the browser tests

RUN_LOGS = """query($runId: ID!) {
  logsForRun(runId: $runId) { __typename ... on EventConnection { events { __typename
    ... on LogsCapturedEvent { fileKey } } } }
}"""
CAPTURED = """query($logKey: [String!]!) { capturedLogs(logKey: $logKey) { stdout stderr } }"""


def production_home(path: Path) -> Path:
    """A host's DAGSTER_HOME with the repository's dagster.yaml and the R2 compute-log block appended, as the
    deployment file says (`cat dagster.yaml deploy/dagster/compute-logs-r2.yaml`)."""
    path.mkdir(parents=True)
    text = (REPO / "dagster.yaml").read_text() + (REPO / "deploy/dagster/compute-logs-r2.yaml").read_text()
    (path / "dagster.yaml").write_text(text)
    return path


def host_env(root: Path, base: dict[str, str]) -> dict[str, str]:
    """What separates one host from another here: its own DAGSTER_HOME and its own temporary directory (where
    the S3 compute log manager stages files)."""
    tmp = root / "tmp"
    tmp.mkdir(parents=True)
    return {**base, "DAGSTER_HOME": str(production_home(root / "dagster_home")), "TMPDIR": str(tmp)}


def graphql(port: int, query: str, variables: dict) -> dict:
    body = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query, "variables": variables},
                      timeout=30).json()
    assert "errors" not in body, body
    return body["data"]


@pytest.mark.timeout(300)
def test_a_run_s_output_is_read_from_r2_on_another_host_after_the_worker_host_s_disk_is_gone(
    browser, tmp_path, kinguin_sim, nowpayments_sim, resend_sim, seaweed
):
    with (
        temporary_database(PG_SERVER_URL, "brlogs_store") as store_db,
        temporary_database(PG_SERVER_URL, "brlogs_dagster") as dagster_db,
        contextlib.ExitStack() as stack,
    ):
        store_url = f"{PG_SERVER_URL}/{store_db}"
        world = migrated_world(store_url, kinguin_sim, nowpayments_sim, resend_sim, seaweed)
        stack.callback(world.engine.dispose)
        order_id = world.order([world.product(price=5.0)])

        s3 = boto3.client("s3", endpoint_url=seaweed.endpoint_url, aws_access_key_id=seaweed.access_key_id,
                          aws_secret_access_key=seaweed.secret_access_key, region_name=seaweed.region)
        log_bucket = unique_bucket("logs")
        s3.create_bucket(Bucket=log_bucket)
        env = {
            "PATH": str(BIN) + ":/usr/bin:/bin",
            "DAGSTER_PG_URL": f"postgresql+psycopg2://{PG_SERVER_URL.split('://', 1)[1]}/{dagster_db}",
            **world_env(world),
            # R2's credentials, handed to dagster-aws the way the deployment file says.
            "AWS_ACCESS_KEY_ID": seaweed.access_key_id,
            "AWS_SECRET_ACCESS_KEY": seaweed.secret_access_key,
            "AWS_DEFAULT_REGION": seaweed.region,
            "DAGSTER_COMPUTE_LOG_BUCKET": log_bucket,
        }

        # -- the worker host runs the order, then its disk is gone ----------------------------------------------
        worker = host_env(tmp_path / "worker_host", env)
        config = tmp_path / "worker_host" / "run.yaml"
        config.write_text(yaml.safe_dump({"order_id": order_id, "reason": "ticket 12",
                                          "requested_by": "ops@bitloot.io"}))
        executed = subprocess.run(
            [str(BIN / "dagster"), "job", "execute", "-m", "bitloot_reconcile.definitions", "-j", "fulfill_order",
             "-c", str(config)],
            cwd=tmp_path / "worker_host", env=worker, capture_output=True, text=True, timeout=180,
        )
        assert executed.returncode == 0, executed.stderr[-4000:]
        assert world.store.load_order(order_id).status == "fulfilled"
        shutil.rmtree(tmp_path / "worker_host")
        objects = [o["Key"] for o in s3.list_objects_v2(Bucket=log_bucket).get("Contents", [])]
        assert objects and all(key.startswith("dagster/compute-logs/storage/") for key in objects), objects

        # -- the webserver host, which never saw the run, shows its output --------------------------------------
        port = free_port()
        procs = Processes(tmp_path)
        stack.callback(procs.stop)
        procs.start("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                  "-m", "bitloot_reconcile.definitions"], host_env(tmp_path / "webserver_host", env))
        deadline = time.monotonic() + 120
        while True:
            procs.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, procs.tail("webserver")
            time.sleep(1)

        (run_id,) = {o.split("/")[3] for o in objects}
        events = graphql(port, RUN_LOGS, {"runId": run_id})["logsForRun"]["events"]
        (file_key,) = {e["fileKey"] for e in events if e["__typename"] == "LogsCapturedEvent"}
        captured = graphql(port, CAPTURED, {"logKey": [run_id, "compute_logs", file_key]})["capturedLogs"]
        stderr = captured["stderr"] or ""
        # Dagster's own log lines of every step, as printed on the worker host.
        for step in ("load_and_claim", "store_keys", "send_completion_email", "record_outcome"):
            assert f"{step} - STEP_SUCCESS" in stderr, stderr[-3000:]
        assert order_id in stderr

        # -- and so does the UI: the run's stderr tab in Chromium ------------------------------------------------
        httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": "mutation { setNuxSeen }"}, timeout=30)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        stack.callback(context.close)
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        page = context.new_page()
        stack.callback(lambda: page.screenshot(path=str(tmp_path / "run_stderr.png")))  # for a person to look at
        # Where the run's "View stdout / stderr" link leads: one capture holds every step (in-process executor).
        page.goto(f"http://127.0.0.1:{port}/runs/{run_id}?logType=stderr&logFileKey={file_key}")
        page.get_by_text(re.compile(r"record_outcome - STEP_SUCCESS")).first.wait_for()
        # The viewer's footer (shown on hover) names where the text came from.
        page.get_by_text(f"s3://{log_bucket}/dagster/compute-logs/storage/{run_id}/").first.wait_for(state="attached")

        # -- no secret in what the bucket keeps ----------------------------------------------------------------
        (supplier_order,) = kinguin_sim.orders_for_external_id(order_id)
        signed_urls = [row["signedUrl"] for row in key_rows(world, order_id)]
        signatures = [httpx.URL(u).params["X-Amz-Signature"] for u in signed_urls]
        secrets = [*supplier_order.serials, *signed_urls, *signatures,
                   KINGUIN_TEST_KEY, NOWPAYMENTS_TEST_KEY, RESEND_TEST_KEY, seaweed.secret_access_key]
        stored = "\n".join(s3.get_object(Bucket=log_bucket, Key=key)["Body"].read().decode() for key in objects)
        assert stderr.strip() in stored
        leaked = [secret for secret in secrets if secret in stored or secret in (captured["stdout"] or "")]
        assert not leaked
