"""The NOWPayments simulator speaks NOWPayments' wire format (checked with a plain HTTP client)."""

from __future__ import annotations

import httpx
import pytest

from bitloot_standins.httpserver import Fault
from bitloot_standins.nowpayments import STATUSES, NowPaymentsSimulator
from tests.fixtures.payments_mail import NOWPAYMENTS_TEST_KEY

AUTH = {"x-api-key": NOWPAYMENTS_TEST_KEY}


@pytest.fixture
def http(nowpayments_sim):
    with httpx.Client(base_url=nowpayments_sim.url, timeout=2, verify=False) as client:  # plain http
        yield client


def test_payment_body_has_the_nowpayments_shape(nowpayments_sim, http):
    nowpayments_sim.set_payment(5077125051, "finished", order_id="order-1", price_amount=10,
                                pay_amount=0.0002, invoice_id="4522625843")
    r = http.get("/v1/payment/5077125051", headers=AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["payment_id"] == 5077125051  # a JSON number, as NOWPayments sends it
    assert body["invoice_id"] == 4522625843
    assert body["payment_status"] == "finished"
    assert body["order_id"] == "order-1"
    assert body["price_amount"] == 10 and body["price_currency"] == "eur"
    assert body["pay_amount"] == 0.0002 and body["pay_currency"] == "btc"
    assert body["actually_paid"] == 0.0002
    for field in ("pay_address", "created_at", "updated_at", "purchase_id", "outcome_currency"):
        assert body[field]


def test_non_numeric_payment_ids_stay_strings(nowpayments_sim, http):
    nowpayments_sim.set_payment("iid_abc", "waiting")
    assert http.get("/v1/payment/iid_abc", headers=AUTH).json()["payment_id"] == "iid_abc"


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "nope"},
                                     {"authorization": f"Bearer {NOWPAYMENTS_TEST_KEY}"}])
def test_missing_or_wrong_key_is_401(nowpayments_sim, http, headers):
    nowpayments_sim.set_payment(1, "finished")
    r = http.get("/v1/payment/1", headers=headers)
    assert r.status_code == 401
    assert r.json() == {"status": False, "statusCode": 401, "code": "INVALID_API_KEY",
                        "message": "Invalid api key"}


def test_unknown_payment_is_404(http):
    r = http.get("/v1/payment/123", headers=AUTH)
    assert r.status_code == 404
    body = r.json()
    assert body["status"] is False and body["statusCode"] == 404 and body["code"] == "PAYMENT_NOT_FOUND"
    assert body["message"]


def test_unknown_route_is_404(http):
    r = http.get("/v1/nothing-here", headers=AUTH)
    assert r.status_code == 404
    assert r.json()["statusCode"] == 404


def test_actually_paid_follows_status(nowpayments_sim):
    p = nowpayments_sim.set_payment(7, "waiting", pay_amount=0.5)
    assert p["actually_paid"] == 0
    nowpayments_sim.set_status(7, "partially_paid")
    assert nowpayments_sim.payment(7)["actually_paid"] == 0.25
    nowpayments_sim.set_status(7, "finished")
    assert nowpayments_sim.payment(7)["actually_paid"] == 0.5
    assert nowpayments_sim.payment(8) is None


def test_status_validation(nowpayments_sim):
    assert len(STATUSES) == 9
    with pytest.raises(ValueError):
        nowpayments_sim.set_payment(1, "paid")
    nowpayments_sim.set_payment(1, "new_status", allow_unknown_status=True)
    with pytest.raises(ValueError):
        nowpayments_sim.set_status(1, "bogus")


def test_set_payment_keeps_created_at_and_extra_fields(nowpayments_sim):
    first = nowpayments_sim.set_payment(1, "waiting")
    second = nowpayments_sim.set_payment(1, "finished", outcome_amount=0.1)
    assert second["created_at"] == first["created_at"]
    assert second["outcome_amount"] == 0.1


def test_canned_faults_and_recording(nowpayments_sim, http):
    nowpayments_sim.set_payment(1, "finished")
    nowpayments_sim.inject("get_payment", Fault(status=503))
    nowpayments_sim.inject("get_payment", Fault(status=429, retry_after=4))
    r1 = http.get("/v1/payment/1", headers=AUTH)
    r2 = http.get("/v1/payment/1", headers=AUTH)
    r3 = http.get("/v1/payment/1", headers=AUTH)
    assert r1.status_code == 503 and r1.json()["statusCode"] == 503 and r1.json()["status"] is False
    assert r2.status_code == 429 and r2.headers["retry-after"] == "4"
    assert r2.json()["code"] == "TOO_MANY_REQUESTS"
    assert r3.status_code == 200
    assert [r.status for r in nowpayments_sim.requests_to("get_payment")] == [503, 429, 200]


def test_fault_applies_only_to_its_route(nowpayments_sim, http):
    nowpayments_sim.set_payment(1, "finished")
    nowpayments_sim.inject("other_route", Fault(status=500))
    assert http.get("/v1/payment/1", headers=AUTH).status_code == 200


def test_standalone_lifecycle():
    with NowPaymentsSimulator(api_key="abc") as sim:
        sim.set_payment(1, "confirmed")
        r = httpx.get(f"{sim.url}/v1/payment/1", headers={"x-api-key": "abc"}, timeout=2)
        assert r.json()["payment_status"] == "confirmed"
