"""Resend adapter: send the order-completed email once (`POST /emails` with an `Idempotency-Key`).

A retry with the same key and body replays Resend's first answer instead of mailing twice (Resend keeps keys
for 24 h); the key of a completion email is `domain.delivery.completion_idempotency_key`. Plain httpx, no
Dagster import.

Error taxonomy (adapters/errors.py), from the status and Resend's body `{"statusCode", "name", "message"}`:
- 408, 429 (Retry-After honoured), 5xx, timeouts, connection errors, lost responses -> TransientError
- 409 `concurrent_idempotent_requests` (the first request with this key is still in flight) -> TransientError
- 409 `invalid_idempotent_request` (key reused with a different body) -> PermanentError, kind of that name
- 400, 401, 403, 404, 422 and any other 4xx -> PermanentError (kind = Resend's `name`)

The API key travels only in the `Authorization` header; it is never logged and never put in exception text.
"""

from __future__ import annotations

import logging

import httpx

from bitloot_reconcile.adapters.errors import ExternalServiceError, PermanentError, TransientError
from bitloot_reconcile.adapters.http import HttpAdapter, json_error_fields, parse_retry_after

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.resend.com"
MAX_IDEMPOTENCY_KEY_LENGTH = 256  # Resend: 1 to 256 characters


class ResendClient(HttpAdapter):
    """Synchronous Resend API client (only what fulfilment needs: sending one email)."""

    service = "resend"
    unsure_note = "the email may have been sent, retry with the same idempotency key"
    objects_can_be_missing = False  # POST /emails looks nothing up: a 404 is a wrong base URL

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str = "", *, timeout: float = 15.0,
                 transport: httpx.BaseTransport | None = None):
        if not api_key:
            raise ValueError("ResendClient needs an api_key (RESEND_API_KEY)")
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        super().__init__(self.base_url, {"Authorization": f"Bearer {api_key}"}, timeout=timeout,
                         transport=transport, secret=api_key)

    def __repr__(self) -> str:  # never show the key
        return f"ResendClient(base_url={self.base_url!r}, timeout={self.timeout})"

    def send_email(self, *, sender: str, to: list[str], subject: str, html: str, idempotency_key: str) -> str:
        """POST /emails; returns Resend's email id. Retrying with the same key and body is safe."""
        if isinstance(to, str):
            to = [to]
        recipients = [addr for addr in (a.strip() for a in to) if addr]
        if not recipients:
            raise ValueError("send_email needs at least one recipient")
        if not sender:
            raise ValueError("send_email needs a sender (EMAIL_FROM)")
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            raise ValueError(f"idempotency_key must have 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
        payload = {"from": sender, "to": recipients, "subject": subject, "html": html}
        where = "POST /emails"
        response = self._send("POST", "/emails", where=where, json=payload,
                              headers={"Idempotency-Key": idempotency_key})
        body = self._json(response, where)
        email_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(email_id, str) or not email_id:
            raise PermanentError(self.service, f"{where}: {response.status_code} answer has no email id",
                                 status=response.status_code, kind="malformed_response")
        log.debug("resend email %s accepted (key=%s)", email_id, idempotency_key)
        return email_id

    # -- what Resend's errors mean -----------------------------------------------------------------------
    def _error_fields(self, response: httpx.Response) -> tuple[str | None, str | None]:
        """Resend errors look like {"statusCode": 422, "name": "validation_error", "message": "..."}."""
        return json_error_fields(response, ("name", "code"), ("message", "error"))

    def _error_class(self, response: httpx.Response, kind: str | None,
                     detail: str | None) -> type[ExternalServiceError]:
        if kind == "concurrent_idempotent_requests":  # the first request with this key is still in flight
            return TransientError
        return super()._error_class(response, kind, detail)

    def _error_kind(self, status: int, kind: str | None, error_class: type[ExternalServiceError]) -> str | None:
        if status == 409 and kind is None:
            return "invalid_idempotent_request"
        return super()._error_kind(status, kind, error_class)

    def _retry_after(self, response: httpx.Response) -> float | None:
        retry_after = super()._retry_after(response)
        if retry_after is None and response.status_code == 429:
            return parse_retry_after(response.headers.get("ratelimit-reset"))
        return retry_after
