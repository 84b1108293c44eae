"""Resend adapter against the Resend simulator over real sockets (no mocks)."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from bitloot_reconcile.adapters.errors import ExternalServiceError, PermanentError, TransientError
from bitloot_reconcile.adapters.resend import ResendClient
from bitloot_reconcile.domain.delivery import completion_idempotency_key
from bitloot_reconcile.resources.resend import ResendResource
from bitloot_standins.httpserver import Fault
from bitloot_standins.resend import ResendSimulator
from tests.fixtures.payments_mail import RESEND_TEST_KEY

ORDER_ID = "5c91f65c-4b12-463c-9277-8cfc139ceda4"
CUSTOMER = "buyer@example.com"


def _email(**overrides):
    fields = {
        "sender": "BitLoot <orders@bitloot.io>",
        "to": [CUSTOMER],
        "subject": "Your BitLoot Purchase is Ready — Order #5C91F65C",
        "html": f'<a href="https://bitloot.io/orders/{ORDER_ID}/success">View order</a>',
        "idempotency_key": completion_idempotency_key(ORDER_ID),
    }
    fields.update(overrides)
    return fields


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answered(sim: ResendSimulator, route: str, count: int, timeout: float = 3.0) -> None:
    """Wait until `count` requests to `route` have been handled (a delayed handler may still be sleeping)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r for r in sim.requests_to(route) if r.status is not None]
        if len(done) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{route}: fewer than {count} requests answered in {timeout}s")


# -- happy path ----------------------------------------------------------------------------------------------
def test_send_email_returns_id_and_stores_it(resend_sim, resend_client):
    email_id = resend_client.send_email(**_email())
    assert isinstance(email_id, str) and email_id
    (stored,) = resend_sim.sent
    assert stored["id"] == email_id
    assert stored["from"] == "BitLoot <orders@bitloot.io>"
    assert stored["to"] == [CUSTOMER]
    assert stored["subject"].startswith("Your BitLoot Purchase is Ready")
    assert f"/orders/{ORDER_ID}/success" in stored["html"]
    assert stored["idempotency_key"] == f"order-completed/{ORDER_ID}"
    assert resend_sim.emails_to(CUSTOMER.upper())[0]["id"] == email_id


def test_request_shape_headers_and_body(resend_sim, resend_client):
    resend_client.send_email(**_email())
    (req,) = resend_sim.requests_to("send_email")
    assert req.method == "POST" and req.path == "/emails"
    assert req.headers["idempotency-key"] == f"order-completed/{ORDER_ID}"
    assert req.headers["authorization"] == f"Bearer {RESEND_TEST_KEY}"
    assert req.headers["content-type"] == "application/json"
    assert set(req.body) == {"from", "to", "subject", "html"}


def test_same_key_same_body_replays_the_first_answer(resend_sim, resend_client):
    first = resend_client.send_email(**_email())
    second = resend_client.send_email(**_email())
    assert first == second
    assert len(resend_sim.sent) == 1
    assert resend_sim.idempotent_replays == 1


def test_different_keys_send_separately(resend_sim, resend_client):
    a = resend_client.send_email(**_email(idempotency_key=completion_idempotency_key("order-a")))
    b = resend_client.send_email(**_email(idempotency_key=completion_idempotency_key("order-b")))
    assert a != b and len(resend_sim.sent) == 2


# -- idempotency under faults --------------------------------------------------------------------------------
def test_same_key_different_body_is_a_permanent_conflict(resend_sim, resend_client):
    resend_client.send_email(**_email())
    with pytest.raises(PermanentError) as info:
        resend_client.send_email(**_email(subject="Something else"))
    assert info.value.status == 409
    assert info.value.kind == "invalid_idempotent_request"
    assert len(resend_sim.sent) == 1


def test_concurrent_idempotent_request_is_transient(resend_sim, resend_client):
    resend_sim.inject("send_email", Fault(status=409))  # canned: concurrent_idempotent_requests
    with pytest.raises(TransientError) as info:
        resend_client.send_email(**_email())
    assert info.value.status == 409
    assert info.value.kind == "concurrent_idempotent_requests"


def test_lost_response_then_retry_with_same_key_sends_exactly_once(resend_sim, resend_client):
    resend_sim.inject("send_email", Fault(lose_response=True))
    with pytest.raises(TransientError) as info:
        resend_client.send_email(**_email())
    assert info.value.kind == "connection"
    assert len(resend_sim.sent) == 1  # Resend did send it; only the answer was lost
    email_id = resend_client.send_email(**_email())
    assert len(resend_sim.sent) == 1
    assert email_id == resend_sim.sent[0]["id"]
    assert len(resend_sim.emails_to(CUSTOMER)) == 1


def test_timeout_then_retry_with_same_key_sends_exactly_once(resend_sim):
    resend_sim.inject("send_email", Fault(latency=0.5))
    with ResendClient(resend_sim.url, RESEND_TEST_KEY, timeout=0.2) as client:
        with pytest.raises(TransientError) as info:
            client.send_email(**_email())
        assert info.value.kind == "timeout"
        email_id = client.send_email(**_email())
    _wait_until_answered(resend_sim, "send_email", 2)  # the slow first request has now run its handler too
    assert [e["id"] for e in resend_sim.sent] == [email_id]


# -- errors --------------------------------------------------------------------------------------------------
def test_wrong_api_key_is_permanent(resend_sim):
    with ResendClient(resend_sim.url, "re_wrong_key_0123456789", timeout=2) as client, \
            pytest.raises(PermanentError) as info:
        client.send_email(**_email())
    assert info.value.status == 401
    assert info.value.kind == "invalid_api_key"
    assert resend_sim.sent == []


@pytest.mark.parametrize(("overrides", "kind"), [
    ({"subject": ""}, "missing_required_field"),
    ({"sender": "not an address"}, "validation_error"),
    ({"to": ["nobody"]}, "validation_error"),
])
def test_validation_errors_are_permanent(resend_sim, resend_client, overrides, kind):
    with pytest.raises(PermanentError) as info:
        resend_client.send_email(**_email(**overrides))
    assert info.value.status == 422
    assert info.value.kind == kind
    assert resend_sim.sent == []


@pytest.mark.parametrize("status", [400, 403, 404])
def test_other_4xx_are_permanent(resend_sim, resend_client, status):
    resend_sim.inject("send_email", Fault(status=status))
    with pytest.raises(PermanentError) as info:
        resend_client.send_email(**_email())
    assert info.value.status == status


@pytest.mark.parametrize("status", [500, 502, 503, 408])
def test_5xx_are_transient(resend_sim, resend_client, status):
    resend_sim.inject("send_email", Fault(status=status))
    with pytest.raises(TransientError) as info:
        resend_client.send_email(**_email())
    assert info.value.status == status
    if status == 500:
        assert info.value.kind == "application_error"
    assert resend_client.send_email(**_email())  # fault was one-shot
    assert len(resend_sim.sent) == 1


def test_429_honours_retry_after(resend_sim, resend_client):
    resend_sim.inject("send_email", Fault(status=429, retry_after=2.5))
    with pytest.raises(TransientError) as info:
        resend_client.send_email(**_email())
    assert info.value.status == 429
    assert info.value.kind == "rate_limit_exceeded"
    assert info.value.retry_after == 2.5
    assert resend_sim.sent == []


def test_connection_refused_is_transient():
    with ResendClient(f"http://127.0.0.1:{_closed_port()}", RESEND_TEST_KEY, timeout=1) as client, \
            pytest.raises(TransientError) as info:
        client.send_email(**_email())
    assert info.value.kind == "connection"


def test_answer_without_id_is_permanent(resend_sim, resend_client):
    resend_sim.inject("send_email", Fault(status=200, body={"object": "email"}))
    with pytest.raises(PermanentError) as info:
        resend_client.send_email(**_email())
    assert info.value.kind == "malformed_response"


@pytest.mark.parametrize("overrides", [
    {"to": []}, {"to": ["  "]}, {"sender": ""}, {"idempotency_key": ""}, {"idempotency_key": "k" * 257},
])
def test_bad_arguments_are_refused_before_any_call(resend_sim, resend_client, overrides):
    with pytest.raises(ValueError):
        resend_client.send_email(**_email(**overrides))
    assert resend_sim.requests == []


def test_single_recipient_string_is_accepted(resend_sim, resend_client):
    resend_client.send_email(**_email(to=CUSTOMER))
    assert resend_sim.sent[0]["to"] == [CUSTOMER]


# -- secrets -------------------------------------------------------------------------------------------------
def test_api_key_never_in_logs_or_exceptions(resend_sim, caplog):
    caplog.set_level(logging.DEBUG)
    cases = [
        ("unauthorised", lambda: None, RESEND_TEST_KEY + "_wrong", {}),
        ("validation", lambda: None, RESEND_TEST_KEY, {"subject": ""}),
        ("server_error", lambda: resend_sim.inject("send_email", Fault(status=500)), RESEND_TEST_KEY, {}),
        ("rate_limited", lambda: resend_sim.inject("send_email", Fault(status=429, retry_after=1)),
         RESEND_TEST_KEY, {}),
        ("lost", lambda: resend_sim.inject("send_email", Fault(lose_response=True)), RESEND_TEST_KEY, {}),
        ("timeout", lambda: resend_sim.inject("send_email", Fault(latency=0.6)), RESEND_TEST_KEY, {}),
        ("conflict", lambda: None, RESEND_TEST_KEY, {"html": "<p>changed</p>"}),
        ("echoes_key", lambda: resend_sim.inject("send_email", Fault(status=403, body={
            "statusCode": 403, "name": "invalid_access",
            "message": f"Bearer {RESEND_TEST_KEY} not allowed"})),
         RESEND_TEST_KEY, {}),
    ]
    for name, setup, key, overrides in cases:
        resend_sim.clear_faults()
        setup()
        with ResendClient(resend_sim.url, key, timeout=0.3) as client:
            with pytest.raises(ExternalServiceError) as info:
                client.send_email(**_email(**overrides))
            assert RESEND_TEST_KEY not in repr(client)
        exc = info.value
        for text in (str(exc), repr(exc), repr(exc.args), repr(exc.__cause__), repr(exc.__context__)):
            assert RESEND_TEST_KEY not in text, name
    resend_sim.clear_faults()
    with ResendClient(resend_sim.url, RESEND_TEST_KEY, timeout=1) as client:
        client.send_email(**_email(idempotency_key="happy-path"))
    assert caplog.records, "expected DEBUG records (adapter and httpx) to be captured"
    assert RESEND_TEST_KEY not in caplog.text


def test_constructor_checks():
    with pytest.raises(ValueError, match="api_key"):
        ResendClient("http://127.0.0.1:1", "")
    client = ResendClient(api_key=RESEND_TEST_KEY)
    assert client.base_url == "https://api.resend.com"
    assert client.timeout == 15.0
    assert RESEND_TEST_KEY not in repr(client)
    client.close()


# -- resource ------------------------------------------------------------------------------------------------
def test_resource_builds_a_working_client(resend_sim):
    resource = ResendResource(base_url=resend_sim.url, api_key=RESEND_TEST_KEY, timeout_seconds=2)
    assert resource.sender == "orders@bitloot.io"
    with resource.get_client() as client:
        assert client.timeout == 2
        client.send_email(**_email(sender=resource.sender))
    assert resend_sim.sent[0]["from"] == "orders@bitloot.io"
    assert RESEND_TEST_KEY not in repr(resource)
    assert RESEND_TEST_KEY not in json.dumps(resend_sim.sent)


def test_resource_defaults():
    resource = ResendResource(api_key="k")
    assert resource.base_url == "https://api.resend.com"
    assert resource.timeout_seconds == 15.0
