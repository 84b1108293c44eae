"""The Resend simulator speaks Resend's wire format (checked with a plain HTTP client)."""

from __future__ import annotations

import httpx
import pytest

from bitloot_standins.httpserver import Fault
from tests.fixtures.payments_mail import RESEND_TEST_KEY

AUTH = {"Authorization": f"Bearer {RESEND_TEST_KEY}"}
BODY = {"from": "BitLoot <orders@bitloot.io>", "to": ["buyer@example.com"], "subject": "Hi",
        "html": "<p>Hi</p>"}


@pytest.fixture
def http(resend_sim):
    with httpx.Client(base_url=resend_sim.url, timeout=2, verify=False) as client:  # plain http
        yield client


def post(http, body=None, key=None, headers=None):
    h = dict(AUTH if headers is None else headers)
    if key is not None:
        h["Idempotency-Key"] = key
    return http.post("/emails", json=BODY if body is None else body, headers=h)


def test_send_returns_id_and_stores_the_email(resend_sim, http):
    r = post(http, key="k1")
    assert r.status_code == 200
    email_id = r.json()["id"]
    assert list(r.json()) == ["id"]
    (stored,) = resend_sim.sent
    assert stored["id"] == email_id
    assert stored["from"] == BODY["from"] and stored["to"] == BODY["to"]
    assert stored["subject"] == "Hi" and stored["html"] == "<p>Hi</p>"
    assert stored["idempotency_key"] == "k1"
    assert resend_sim.email(email_id)["id"] == email_id
    assert resend_sim.email("missing") is None


def test_missing_authorization_is_401_missing_api_key(http):
    r = post(http, headers={})
    assert r.status_code == 401
    assert r.json()["statusCode"] == 401 and r.json()["name"] == "missing_api_key" and r.json()["message"]


@pytest.mark.parametrize("auth", ["Bearer wrong", RESEND_TEST_KEY, f"Basic {RESEND_TEST_KEY}"])
def test_wrong_key_is_401_invalid_api_key(resend_sim, http, auth):
    r = post(http, headers={"Authorization": auth})
    assert r.status_code == 401
    assert r.json()["name"] == "invalid_api_key"
    assert resend_sim.sent == []


@pytest.mark.parametrize("field", ["from", "to", "subject"])
def test_missing_required_field_is_422(resend_sim, http, field):
    body = {k: v for k, v in BODY.items() if k != field}
    r = post(http, body=body)
    assert r.status_code == 422
    assert r.json() == {"statusCode": 422, "name": "missing_required_field",
                        "message": f"Missing `{field}` field."}
    assert resend_sim.sent == []


@pytest.mark.parametrize("override", [{"from": "orders"}, {"to": ["a@b.io", "not-an-address"]},
                                      {"to": [f"u{i}@example.com" for i in range(51)]}, {"subject": 5}])
def test_invalid_fields_are_422_validation_error(resend_sim, http, override):
    r = post(http, body={**BODY, **override})
    assert r.status_code == 422 and r.json()["name"] == "validation_error"
    assert resend_sim.sent == []


def test_to_may_be_a_single_string(resend_sim, http):
    assert post(http, body={**BODY, "to": "Buyer <Buyer@Example.com>"}).status_code == 200
    assert resend_sim.sent[0]["to"] == ["Buyer <Buyer@Example.com>"]
    assert len(resend_sim.emails_to("buyer@example.com")) == 1
    assert resend_sim.emails_to("other@example.com") == []


def test_same_key_same_body_replays(resend_sim, http):
    a = post(http, key="order-completed/1")
    reordered = dict(reversed(list(BODY.items())))  # JSON key order does not matter
    b = post(http, key="order-completed/1", body=reordered)
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()
    assert len(resend_sim.sent) == 1
    assert resend_sim.idempotent_replays == 1


def test_same_key_different_body_is_409(resend_sim, http):
    post(http, key="k")
    r = post(http, key="k", body={**BODY, "subject": "Other"})
    assert r.status_code == 409
    assert r.json()["statusCode"] == 409 and r.json()["name"] == "invalid_idempotent_request"
    assert len(resend_sim.sent) == 1


def test_without_key_every_post_sends(resend_sim, http):
    post(http)
    post(http)
    assert len(resend_sim.sent) == 2
    assert resend_sim.sent[0]["idempotency_key"] is None


@pytest.mark.parametrize("key", ["", "x" * 257])
def test_invalid_idempotency_key_is_400(resend_sim, http, key):
    r = post(http, key=key)
    assert r.status_code == 400 and r.json()["name"] == "invalid_idempotency_key"
    assert resend_sim.sent == []


def test_key_of_a_refused_request_is_not_remembered(resend_sim, http):
    assert post(http, key="k", body={**BODY, "to": []}).status_code == 422
    assert post(http, key="k").status_code == 200
    assert len(resend_sim.sent) == 1


def test_lost_response_still_sends(resend_sim, http):
    resend_sim.inject("send_email", Fault(lose_response=True))
    with pytest.raises(httpx.TransportError):
        post(http, key="k")
    assert len(resend_sim.sent) == 1
    assert post(http, key="k").json()["id"] == resend_sim.sent[0]["id"]
    assert len(resend_sim.sent) == 1


@pytest.mark.parametrize(("status", "name"), [
    (500, "application_error"), (503, "application_error"),
    (429, "rate_limit_exceeded"), (409, "concurrent_idempotent_requests"),
])
def test_canned_faults_use_resend_error_shape(resend_sim, http, status, name):
    resend_sim.inject("send_email", Fault(status=status, retry_after=1 if status == 429 else None))
    r = post(http, key="k")
    assert r.status_code == status
    assert r.json()["statusCode"] == status and r.json()["name"] == name and r.json()["message"]
    if status == 429:
        assert r.headers["retry-after"] == "1"
    assert resend_sim.sent == []
    assert [q.route for q in resend_sim.requests] == ["send_email"]


def test_unknown_route_is_404(http):
    r = http.get("/domains", headers=AUTH)
    assert r.status_code == 404 and r.json()["name"] == "not_found"
