"""Fault hooks the chaos run uses: committed errors, request-wide matching and observers on the simulators, and
the S3 proxy's lost / committed-500 answers and outage windows."""

from __future__ import annotations

import time

import httpx
import pytest

from bitloot_reconcile.adapters.errors import TransientError
from bitloot_reconcile.adapters.r2 import KeyVault
from bitloot_standins.httpserver import Fault
from bitloot_standins.s3_proxy import FaultyS3Proxy
from tests.fixtures.payments_mail import RESEND_TEST_KEY
from tests.fixtures.s3 import unique_bucket

AUTH = {"Authorization": f"Bearer {RESEND_TEST_KEY}"}
BODY = {"from": "orders@bitloot.io", "to": ["buyer@example.com"], "subject": "Hi", "html": "<p>Hi</p>"}


def test_committed_error_sends_the_email_but_answers_500(resend_sim):
    resend_sim.inject("send_email", Fault(status=500, commit=True))
    answer = httpx.post(f"{resend_sim.url}/emails", json=BODY, headers=AUTH)
    assert answer.status_code == 500
    assert len(resend_sim.sent) == 1


def test_where_matches_on_the_whole_request_and_observers_see_both_phases(nowpayments_sim):
    nowpayments_sim.set_payment("111", "finished")
    nowpayments_sim.set_payment("222", "finished")
    nowpayments_sim.inject("get_payment", Fault(status=503, where=lambda r: r.path.endswith("/222")))
    seen = []
    nowpayments_sim.observe(lambda record, phase: seen.append((record.path, phase, record.status)))
    headers = {"x-api-key": nowpayments_sim.api_key}
    assert httpx.get(f"{nowpayments_sim.url}/v1/payment/111", headers=headers).status_code == 200
    assert httpx.get(f"{nowpayments_sim.url}/v1/payment/222", headers=headers).status_code == 503
    assert seen == [("/v1/payment/111", "received", None), ("/v1/payment/111", "answered", 200),
                    ("/v1/payment/222", "received", None), ("/v1/payment/222", "answered", 503)]


@pytest.fixture
def proxy(seaweed):
    proxy = FaultyS3Proxy(seaweed.endpoint_url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def vault(seaweed, proxy):
    vault = KeyVault(proxy.url, seaweed.access_key_id, seaweed.secret_access_key, unique_bucket(),
                     region=seaweed.region, connect_timeout=2, read_timeout=5)
    vault.ensure_bucket()
    yield vault
    vault.close()


@pytest.mark.parametrize("mode", ["lost", "commit_500"])
def test_proxy_stores_the_object_but_the_client_does_not_hear_it(proxy, vault, mode):
    seen = []
    proxy.observe(lambda method, path, status: seen.append((method, status)))
    proxy.fail("orders/", 1, mode=mode, method="PUT")
    # boto3 retries; the retry finds the bytes the first attempt stored ("already there": False).
    assert vault.put_key("orders/o1/key-1.txt", b"KEY-1", "text/plain") is False
    assert vault.read("orders/o1/key-1.txt").data == b"KEY-1"
    assert ("PUT", None if mode == "lost" else 500) in seen


def test_outage_window_fails_everything_until_it_ends(proxy, vault):
    proxy.outage_window(0.5)
    with pytest.raises(TransientError):
        vault.exists("orders/o1/key-1.txt")
    time.sleep(0.6)
    assert vault.exists("orders/o1/key-1.txt") is False
    assert proxy.failed >= 1
