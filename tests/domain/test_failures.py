"""`domain.failures`: an attempt's recorded reason sorted into the outside service that failed and how."""

from __future__ import annotations

import pytest

from bitloot_reconcile.adapters.errors import PermanentError, TransientError
from bitloot_reconcile.adapters.r2 import KeyConflictError
from bitloot_reconcile.domain.failures import failed_call
from bitloot_reconcile.domain.fulfilment import KINGUIN_REFUSALS
from bitloot_reconcile.domain.redaction import describe_error


@pytest.mark.parametrize(("error", "expected"), [
    (TransientError("r2", "put_object orders/x/key-1.txt: 503 ServiceUnavailable", status=503), ("r2", "transient")),
    (TransientError("kinguin", "POST /v2/order: no answer (ReadTimeout)"), ("kinguin", "transient")),
    (PermanentError("nowpayments", "GET /v1/payment/1: 401 INVALID_API_KEY", status=401),
     ("nowpayments", "permanent")),
    (PermanentError("resend", "POST /emails: 401 missing_api_key", status=401), ("resend", "permanent")),
    (KeyConflictError("r2", "put_object orders/x/key-1.txt: a different object is already stored"),
     ("r2", "conflict")),
])
def test_a_failed_step_names_its_service_and_kind(error, expected):
    reason = f"store_keys failed: {describe_error(error)}"  # as record_failure writes it
    assert failed_call("retry_later", reason) == expected


@pytest.mark.parametrize("reason", [*KINGUIN_REFUSALS.values(), "Kinguin refused: kinguin: 400 BadRequest"])
def test_kinguin_refusals_are_kinguin_refused(reason):
    assert failed_call("needs_attention", reason) == ("kinguin", "refused")


def test_an_undeliverable_email_is_resend_refused():
    reason = "keys delivered; completion email undeliverable, Resend refused it (resend: 422 validation_error)"
    assert failed_call("needs_attention", reason) == ("resend", "refused")


@pytest.mark.parametrize(("outcome", "reason"), [
    ("needs_attention", "supplier canceled Kinguin order K-1"),  # Kinguin answered; the order is what failed
    ("needs_attention", "custom-inventory items are BitLoot's to deliver"),
    ("retry_later", "load_and_claim failed: OperationalError: connection refused"),
    ("fulfilled", "TransientError: kinguin: 503"),  # an outcome that is no failure
    ("retry_later", None),
])
def test_anything_else_is_no_outside_call_failure(outcome, reason):
    assert failed_call(outcome, reason) is None
