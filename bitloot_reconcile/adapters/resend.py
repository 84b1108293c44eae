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
import time
from typing import Any

import httpx

from bitloot_reconcile.adapters.errors import PermanentError, TransientError
from bitloot_reconcile.adapters.http import build_client, parse_retry_after

log = logging.getLogger(__name__)

SERVICE = "resend"
DEFAULT_BASE_URL = "https://api.resend.com"
MAX_IDEMPOTENCY_KEY_LENGTH = 256  # Resend: 1 to 256 characters


class ResendClient:
    """Synchronous Resend API client (only what fulfilment needs: sending one email)."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str = "", *, timeout: float = 15.0,
                 transport: httpx.BaseTransport | None = None):
        if not api_key:
            raise ValueError("ResendClient needs an api_key (RESEND_API_KEY)")
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.timeout = timeout
        self._api_key = api_key
        self._http = build_client(self.base_url, {"Authorization": f"Bearer {api_key}"}, timeout=timeout,
                                  transport=transport)

    def __repr__(self) -> str:  # never show the key
        return f"ResendClient(base_url={self.base_url!r}, timeout={self.timeout})"

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ResendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API ---------------------------------------------------------------------------------------------
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
        path = "/emails"
        started = time.monotonic()
        try:
            response = self._http.post(path, json=payload, headers={"Idempotency-Key": idempotency_key})
        except httpx.TimeoutException as exc:
            log.debug("resend POST %s key=%s timed out after %.2fs", path, idempotency_key,
                      time.monotonic() - started)
            raise TransientError(SERVICE, f"POST {path}: timed out after {self.timeout:g}s "
                                          f"({type(exc).__name__}); the email may have been sent, retry with "
                                          f"the same idempotency key", kind="timeout") from None
        except httpx.UnsupportedProtocol:
            raise PermanentError(SERVICE, f"POST {path}: base URL {self.base_url!r} is not http(s)",
                                 kind="configuration") from None
        except httpx.TransportError as exc:
            log.debug("resend POST %s key=%s transport error %s", path, idempotency_key, type(exc).__name__)
            raise TransientError(SERVICE, f"POST {path}: connection error ({type(exc).__name__}); the email "
                                          f"may have been sent, retry with the same idempotency key",
                                 kind="connection") from None
        elapsed_ms = (time.monotonic() - started) * 1000
        log.debug("resend POST %s key=%s -> %s in %.0f ms", path, idempotency_key, response.status_code,
                  elapsed_ms)
        if not response.is_success:
            raise self._error("POST", path, response)
        try:
            body = response.json()
        except ValueError:
            raise TransientError(SERVICE, f"POST {path}: {response.status_code} answer is not JSON; retry "
                                          f"with the same idempotency key", status=response.status_code,
                                 kind="malformed_response") from None
        email_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(email_id, str) or not email_id:
            raise PermanentError(SERVICE, f"POST {path}: {response.status_code} answer has no email id",
                                 status=response.status_code, kind="malformed_response")
        log.debug("resend email %s accepted (key=%s)", email_id, idempotency_key)
        return email_id

    # -- plumbing ----------------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        """Drop the key from remote text, in case the remote side ever echoes it (real keys are long)."""
        if len(self._api_key) >= 8 and text:
            return text.replace(self._api_key, "***")
        return text

    def _error(self, method: str, path: str, response: httpx.Response) -> Exception:
        status = response.status_code
        name, detail = _error_fields(response)
        kind = name or f"http_{status}"
        message = self._scrub(f"{method} {path}: {status} {kind}" + (f": {detail}" if detail else ""))
        if status == 429 or status == 408 or status >= 500 or name == "concurrent_idempotent_requests":
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if retry_after is None and status == 429:
                retry_after = parse_retry_after(response.headers.get("ratelimit-reset"))
            return TransientError(SERVICE, message, status=status, kind=kind, retry_after=retry_after)
        if status == 409 and name is None:
            kind = "invalid_idempotent_request"
        return PermanentError(SERVICE, message, status=status, kind=kind)


def _error_fields(response: httpx.Response) -> tuple[str | None, str | None]:
    """Resend errors look like {"statusCode": 422, "name": "validation_error", "message": "..."}."""
    try:
        body: Any = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    name = body.get("name") or body.get("code")
    detail = body.get("message") or body.get("error")
    return (str(name) if name else None), (str(detail)[:300] if detail else None)
