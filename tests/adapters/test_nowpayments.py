"""NOWPayments adapter against the NOWPayments simulator over real sockets (no mocks)."""

from __future__ import annotations

import logging
import socket
from decimal import Decimal

import pytest

from bitloot_reconcile.adapters.errors import (
    ExternalServiceError,
    NotFoundError,
    PermanentError,
    TransientError,
)
from bitloot_reconcile.adapters.nowpayments import (
    PAYMENT_STATUSES,
    NowPaymentsClient,
    PaymentInfo,
    PaymentVerdict,
    classify_payment_status,
)
from bitloot_reconcile.resources.nowpayments import NowPaymentsResource
from bitloot_standins.httpserver import Fault
from bitloot_standins.nowpayments import NowPaymentsSimulator
from tests.fixtures.payments_mail import NOWPAYMENTS_TEST_KEY

ORDER_ID = "5c91f65c-4b12-463c-9277-8cfc139ceda4"
PAYMENT_ID = "5524759814"

EXPECTED_VERDICTS = {
    "finished": PaymentVerdict.PAID,
    "confirmed": PaymentVerdict.PAID,
    "waiting": PaymentVerdict.PENDING,
    "confirming": PaymentVerdict.PENDING,
    "sending": PaymentVerdict.PENDING,
    "partially_paid": PaymentVerdict.FAILED,
    "failed": PaymentVerdict.FAILED,
    "refunded": PaymentVerdict.FAILED,
    "expired": PaymentVerdict.FAILED,
}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- classification (pure) ---------------------------------------------------------------------------------
def test_all_nine_statuses_are_covered():
    assert set(EXPECTED_VERDICTS) == PAYMENT_STATUSES
    assert len(PAYMENT_STATUSES) == 9


@pytest.mark.parametrize(("status", "verdict"), sorted(EXPECTED_VERDICTS.items()))
def test_classify_payment_status(status, verdict):
    assert classify_payment_status(status) is verdict
    assert classify_payment_status(f" {status.upper()} ") is verdict


def test_verdict_is_a_str_enum():
    assert PaymentVerdict.PAID == "paid"
    assert {v.value for v in PaymentVerdict} == {"paid", "pending", "failed"}


@pytest.mark.parametrize("status", ["", "paid", "finised", "underpaid", "wrong_asset_confirmed"])
def test_classify_unknown_status_raises(status):
    with pytest.raises(ValueError, match=r"unknown NOWPayments payment_status") as info:
        classify_payment_status(status)
    assert "finished" in str(info.value)  # lists the known ones


def test_classify_non_string_raises_value_error():
    with pytest.raises(ValueError):
        classify_payment_status(None)  # type: ignore[arg-type]


# -- happy path ----------------------------------------------------------------------------------------------
def test_get_payment_returns_payment_info(nowpayments_sim, nowpayments_client):
    nowpayments_sim.set_payment(PAYMENT_ID, "finished", order_id=ORDER_ID, price_amount=Decimal("49.99"),
                                pay_amount=Decimal("0.00123456"), pay_currency="btc")
    info = nowpayments_client.get_payment(PAYMENT_ID)
    assert isinstance(info, PaymentInfo)
    assert info.payment_id == PAYMENT_ID  # sent as a JSON number, kept as a string
    assert info.payment_status == "finished"
    assert info.order_id == ORDER_ID
    assert info.price_amount == Decimal("49.99")
    assert info.price_currency == "eur"
    assert info.pay_amount == Decimal("0.00123456")
    assert info.actually_paid == Decimal("0.00123456")
    assert info.pay_currency == "btc"
    assert classify_payment_status(info.payment_status) is PaymentVerdict.PAID
    assert info.model_extra["type"] == "crypto2crypto"  # unknown fields are kept


def test_request_shape_path_and_api_key_header(nowpayments_sim, nowpayments_client):
    nowpayments_sim.set_payment(PAYMENT_ID, "waiting", order_id=ORDER_ID)
    nowpayments_client.get_payment(int(PAYMENT_ID))
    (req,) = nowpayments_sim.requests_to("get_payment")
    assert req.method == "GET"
    assert req.path == f"/v1/payment/{PAYMENT_ID}"
    assert req.headers["x-api-key"] == NOWPAYMENTS_TEST_KEY
    assert req.status == 200


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_base_url_is_the_api_root_and_a_v1_suffix_is_not_doubled(nowpayments_sim, suffix):
    nowpayments_sim.set_payment(PAYMENT_ID, "confirming")
    with NowPaymentsClient(nowpayments_sim.url + suffix, NOWPAYMENTS_TEST_KEY, timeout=2) as client:
        assert client.get_payment(PAYMENT_ID).payment_status == "confirming"
    assert nowpayments_sim.requests_to("get_payment")[0].path == f"/v1/payment/{PAYMENT_ID}"


@pytest.mark.parametrize(("status", "verdict"), sorted(EXPECTED_VERDICTS.items()))
def test_every_status_read_over_http_and_classified(nowpayments_sim, nowpayments_client, status, verdict):
    nowpayments_sim.set_payment(PAYMENT_ID, status, order_id=ORDER_ID)
    info = nowpayments_client.get_payment(PAYMENT_ID)
    assert info.payment_status == status
    assert classify_payment_status(info.payment_status) is verdict


def test_status_change_is_seen_on_the_next_read(nowpayments_sim, nowpayments_client):
    nowpayments_sim.set_payment(PAYMENT_ID, "confirming", order_id=ORDER_ID)
    assert classify_payment_status(nowpayments_client.get_payment(PAYMENT_ID).payment_status) is PaymentVerdict.PENDING
    nowpayments_sim.set_status(PAYMENT_ID, "finished")
    assert classify_payment_status(nowpayments_client.get_payment(PAYMENT_ID).payment_status) is PaymentVerdict.PAID


def test_unknown_status_is_returned_and_refused_by_classification(nowpayments_sim, nowpayments_client):
    nowpayments_sim.set_payment(PAYMENT_ID, "wrong_asset_confirmed", allow_unknown_status=True)
    info = nowpayments_client.get_payment(PAYMENT_ID)
    assert info.payment_status == "wrong_asset_confirmed"
    with pytest.raises(ValueError, match="wrong_asset_confirmed"):
        _ = classify_payment_status(info.payment_status)


def test_lenient_on_missing_fields(nowpayments_sim, nowpayments_client):
    body = {"payment_id": 42, "payment_status": "waiting"}
    nowpayments_sim.inject("get_payment", Fault(status=200, body=body))
    info = nowpayments_client.get_payment("42")
    assert info.payment_id == "42"
    assert info.order_id is None and info.price_amount is None and info.actually_paid is None


@pytest.mark.parametrize("body", [[1, 2], {"payment_status": "finished"}, {"payment_id": 1}, "finished"])
def test_body_that_is_not_a_payment_is_permanent(nowpayments_sim, nowpayments_client, body):
    nowpayments_sim.inject("get_payment", Fault(status=200, body=body))
    with pytest.raises(PermanentError) as info:
        nowpayments_client.get_payment(PAYMENT_ID)
    assert info.value.kind == "malformed_response"


# -- errors --------------------------------------------------------------------------------------------------
def test_unknown_payment_is_not_found(nowpayments_client):
    with pytest.raises(NotFoundError) as info:
        nowpayments_client.get_payment("999")
    assert info.value.status == 404
    assert info.value.kind == "PAYMENT_NOT_FOUND"
    assert info.value.service == "nowpayments"


def test_wrong_api_key_is_permanent(nowpayments_sim):
    nowpayments_sim.set_payment(PAYMENT_ID, "finished")
    with NowPaymentsClient(nowpayments_sim.url, "wrong-key-0123456789", timeout=2) as client, \
            pytest.raises(PermanentError) as info:
        client.get_payment(PAYMENT_ID)
    assert info.value.status == 401
    assert info.value.kind == "INVALID_API_KEY"


@pytest.mark.parametrize("status", [400, 403, 405, 422])
def test_other_4xx_are_permanent(nowpayments_sim, nowpayments_client, status):
    nowpayments_sim.inject("get_payment", Fault(status=status))
    with pytest.raises(PermanentError) as info:
        nowpayments_client.get_payment(PAYMENT_ID)
    assert info.value.status == status


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_5xx_are_transient(nowpayments_sim, nowpayments_client, status):
    nowpayments_sim.set_payment(PAYMENT_ID, "finished")
    nowpayments_sim.inject("get_payment", Fault(status=status))
    with pytest.raises(TransientError) as info:
        nowpayments_client.get_payment(PAYMENT_ID)
    assert info.value.status == status
    assert info.value.retry_after is None
    assert nowpayments_client.get_payment(PAYMENT_ID).payment_status == "finished"  # fault was one-shot


def test_429_honours_retry_after(nowpayments_sim, nowpayments_client):
    nowpayments_sim.inject("get_payment", Fault(status=429, retry_after=7))
    with pytest.raises(TransientError) as info:
        nowpayments_client.get_payment(PAYMENT_ID)
    assert info.value.status == 429
    assert info.value.retry_after == 7.0
    assert info.value.kind == "TOO_MANY_REQUESTS"


def test_429_without_retry_after(nowpayments_sim, nowpayments_client):
    nowpayments_sim.inject("get_payment", Fault(status=429))
    with pytest.raises(TransientError) as info:
        nowpayments_client.get_payment(PAYMENT_ID)
    assert info.value.retry_after is None


def test_timeout_is_transient(nowpayments_sim):
    nowpayments_sim.set_payment(PAYMENT_ID, "finished")
    nowpayments_sim.inject("get_payment", Fault(latency=0.5))
    with NowPaymentsClient(nowpayments_sim.url, NOWPAYMENTS_TEST_KEY, timeout=0.2) as client:
        with pytest.raises(TransientError) as info:
            client.get_payment(PAYMENT_ID)
        assert info.value.kind == "timeout"
        assert client.get_payment(PAYMENT_ID).payment_status == "finished"


def test_lost_response_is_transient_and_a_retry_works(nowpayments_sim, nowpayments_client):
    nowpayments_sim.set_payment(PAYMENT_ID, "confirmed")
    nowpayments_sim.inject("get_payment", Fault(lose_response=True))
    with pytest.raises(TransientError) as info:
        nowpayments_client.get_payment(PAYMENT_ID)
    assert info.value.kind == "connection"
    assert classify_payment_status(nowpayments_client.get_payment(PAYMENT_ID).payment_status) is PaymentVerdict.PAID
    assert len(nowpayments_sim.requests_to("get_payment")) == 2


def test_connection_refused_is_transient():
    with NowPaymentsClient(f"http://127.0.0.1:{_closed_port()}", NOWPAYMENTS_TEST_KEY, timeout=1) as client, \
            pytest.raises(TransientError) as info:
        client.get_payment(PAYMENT_ID)
    assert info.value.kind == "connection"


# -- secrets -------------------------------------------------------------------------------------------------
def _error_paths(sim: NowPaymentsSimulator):
    """(name, setup, key used by the client) for every error path."""
    return [
        ("not_found", lambda: None, NOWPAYMENTS_TEST_KEY),
        ("unauthorised", lambda: None, NOWPAYMENTS_TEST_KEY + "-but-wrong"),
        ("server_error", lambda: sim.inject("get_payment", Fault(status=500)), NOWPAYMENTS_TEST_KEY),
        ("rate_limited", lambda: sim.inject("get_payment", Fault(status=429, retry_after=3)),
         NOWPAYMENTS_TEST_KEY),
        ("lost", lambda: sim.inject("get_payment", Fault(lose_response=True)), NOWPAYMENTS_TEST_KEY),
        ("timeout", lambda: sim.inject("get_payment", Fault(latency=0.6)), NOWPAYMENTS_TEST_KEY),
        ("malformed", lambda: sim.inject("get_payment", Fault(status=200, body=[])), NOWPAYMENTS_TEST_KEY),
        ("echoes_key", lambda: sim.inject("get_payment", Fault(status=400, body={
            "status": False, "statusCode": 400, "code": "BAD_REQUEST",
            "message": f"key {NOWPAYMENTS_TEST_KEY} is not allowed here"})), NOWPAYMENTS_TEST_KEY),
    ]


def test_api_key_never_in_logs_or_exceptions(nowpayments_sim, caplog):
    caplog.set_level(logging.DEBUG)
    for name, setup, key in _error_paths(nowpayments_sim):
        nowpayments_sim.clear_faults()
        setup()
        with NowPaymentsClient(nowpayments_sim.url, key, timeout=0.3) as client:
            with pytest.raises(ExternalServiceError) as info:
                client.get_payment("999" if name == "not_found" else PAYMENT_ID)
            assert NOWPAYMENTS_TEST_KEY not in repr(client)
        exc = info.value
        for text in (str(exc), repr(exc), repr(exc.args), repr(exc.__cause__), repr(exc.__context__)):
            assert NOWPAYMENTS_TEST_KEY not in text, name
    # happy path too
    nowpayments_sim.clear_faults()
    nowpayments_sim.set_payment(PAYMENT_ID, "finished")
    with NowPaymentsClient(nowpayments_sim.url, NOWPAYMENTS_TEST_KEY, timeout=1) as client:
        client.get_payment(PAYMENT_ID)
    assert caplog.records, "expected DEBUG records (adapter and httpx) to be captured"
    assert NOWPAYMENTS_TEST_KEY not in caplog.text


def test_constructor_checks():
    with pytest.raises(ValueError, match="api_key"):
        NowPaymentsClient("http://127.0.0.1:1", "")
    with pytest.raises(ValueError, match="timeout"):
        NowPaymentsClient("http://127.0.0.1:1", "k", timeout=0)
    client = NowPaymentsClient(api_key=NOWPAYMENTS_TEST_KEY)
    assert client.base_url == "https://api.nowpayments.io"
    assert client.timeout == 15.0
    assert NOWPAYMENTS_TEST_KEY not in repr(client)
    client.close()


def test_empty_payment_id_is_refused_before_any_call(nowpayments_sim, nowpayments_client):
    with pytest.raises(ValueError):
        nowpayments_client.get_payment("  ")
    assert nowpayments_sim.requests == []


# -- resource ------------------------------------------------------------------------------------------------
def test_resource_builds_a_working_client(nowpayments_sim):
    nowpayments_sim.set_payment(PAYMENT_ID, "finished", order_id=ORDER_ID)
    resource = NowPaymentsResource(base_url=nowpayments_sim.url, api_key=NOWPAYMENTS_TEST_KEY,
                                   timeout_seconds=2)
    with resource.get_client() as client:
        assert client.timeout == 2
        assert client.get_payment(PAYMENT_ID).order_id == ORDER_ID
    assert NOWPAYMENTS_TEST_KEY not in repr(resource)


def test_resource_defaults():
    resource = NowPaymentsResource(api_key="k")
    assert resource.base_url == "https://api.nowpayments.io"
    assert resource.timeout_seconds == 15.0
