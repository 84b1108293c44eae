"""Resend stand-in: `POST /emails` over real HTTP, with Bearer auth, validation and idempotency keys.

Idempotency follows Resend: the first successful send under a key is remembered; the same key with the same
body replays that answer (same id, nothing sent again); the same key with a different body is refused with
409 `invalid_idempotent_request`. Requests refused by validation are not remembered, so a corrected retry
under the same key goes through.

Sent emails are in `sent` (dicts with id, from, to, subject, html, idempotency_key, ...); `emails_to(address)`
filters them. Faults are injected on the route named "send_email" (see httpserver.Fault); a canned fault
answers in Resend's error shape `{"statusCode": ..., "name": ..., "message": ...}`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from bitloot_standins.httpserver import JsonServer, Response

MAX_RECIPIENTS = 50
MAX_IDEMPOTENCY_KEY_LENGTH = 256

_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
_NAMED_ADDRESS = re.compile(r"^[^<>]*<\s*([^<>\s]+)\s*>$")

_CANNED = {
    400: ("validation_error", "We found an error with one or more fields in the request."),
    401: ("invalid_api_key", "API key is invalid"),
    403: ("invalid_access", "Access forbidden."),
    404: ("not_found", "The requested endpoint does not exist."),
    409: ("concurrent_idempotent_requests",
          "Same idempotency key used while original request is still in progress."),
    422: ("validation_error", "We found an error with one or more fields in the request."),
    429: ("rate_limit_exceeded", "Too many requests. You can only make 2 requests per second."),
}


def _error(status: int, name: str, message: str) -> dict[str, Any]:
    return {"statusCode": status, "name": name, "message": message}


def _bare_address(value: str) -> str | None:
    """'Name <a@b.c>' or 'a@b.c' -> 'a@b.c' (lower-cased); None if it is neither."""
    value = value.strip()
    named = _NAMED_ADDRESS.match(value)
    if named:
        value = named.group(1)
    return value.lower() if _ADDRESS.match(value) else None


class ResendSimulator(JsonServer):
    """In-memory Resend: accepts emails, stores them, and never delivers anything."""

    name = "resend"

    def __init__(self, api_key: str = "re_sim_resend_key", host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.api_key = api_key
        self.sent: list[dict[str, Any]] = []
        self.idempotent_replays = 0
        self._by_key: dict[str, tuple[str, Response]] = {}  # key -> (body fingerprint, first answer)
        self.route("POST", r"/emails", "send_email", self._send_email)

    # -- control API ---------------------------------------------------------------------------------------
    def emails_to(self, address: str) -> list[dict[str, Any]]:
        """Stored emails sent to `address` (case-insensitive; display names are ignored)."""
        wanted = _bare_address(address) or address.strip().lower()
        with self._lock:
            return [copy.deepcopy(e) for e in self.sent
                    if any((_bare_address(t) or t.lower()) == wanted for t in e["to"])]

    def email(self, email_id: str) -> dict[str, Any] | None:
        with self._lock:
            for e in self.sent:
                if e["id"] == email_id:
                    return copy.deepcopy(e)
        return None

    # -- protocol ------------------------------------------------------------------------------------------
    def authorize(self, headers: dict[str, str]) -> Response | None:
        auth = headers.get("authorization", "").strip()
        if not auth:
            return Response(401, _error(401, "missing_api_key",
                                        "Missing API key in the authorization header."))
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            return Response(401, _error(401, "invalid_api_key", "API key is invalid"))
        return None

    def not_found(self, method: str, path: str) -> Response:
        return Response(404, _error(404, "not_found", "The requested endpoint does not exist."))

    def canned_error(self, status: int, method: str, path: str) -> Any:
        name, message = _CANNED.get(status, ("application_error" if status >= 500 else "validation_error",
                                             "An unexpected error occurred." if status >= 500
                                             else "The request could not be processed."))
        return _error(status, name, message)

    def _send_email(self, *, body: Any, headers: dict[str, str], **_: Any) -> Response:
        key = headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
            return Response(400, _error(400, "invalid_idempotency_key",
                                        "The key must be between 1-256 chars."))
        fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        if key is not None and key in self._by_key:
            first_fingerprint, first_answer = self._by_key[key]
            if first_fingerprint != fingerprint:
                return Response(409, _error(409, "invalid_idempotent_request",
                                            "Same idempotency key used with a different request payload. "
                                            "Change your idempotency key or payload."))
            self.idempotent_replays += 1
            return Response(first_answer.status, copy.deepcopy(first_answer.body), dict(first_answer.headers))

        problem = self._validate(body)
        if problem is not None:
            return problem
        email_id = str(uuid.uuid4())
        to = body["to"] if isinstance(body["to"], list) else [body["to"]]
        stored = {
            "id": email_id,
            "from": body["from"],
            "to": list(to),
            "subject": body["subject"],
            "html": body.get("html"),
            "text": body.get("text"),
            "idempotency_key": key,
            "created_at": datetime.now(UTC).isoformat(),
        }
        for optional in ("cc", "bcc", "reply_to", "headers", "tags", "scheduled_at"):
            if optional in body:
                stored[optional] = copy.deepcopy(body[optional])
        self.sent.append(stored)
        answer = Response(200, {"id": email_id})
        if key is not None:
            self._by_key[key] = (fingerprint, answer)
        return Response(answer.status, dict(answer.body))

    @staticmethod
    def _validate(body: Any) -> Response | None:
        if not isinstance(body, dict):
            return Response(422, _error(422, "validation_error", "The request body must be a JSON object."))
        for field in ("from", "to", "subject"):
            if body.get(field) in (None, "", []):
                return Response(422, _error(422, "missing_required_field", f"Missing `{field}` field."))
        fmt = ("The email address needs to follow the `email@example.com` or `Name <email@example.com>` "
               "format.")
        if not isinstance(body["from"], str) or _bare_address(body["from"]) is None:
            return Response(422, _error(422, "validation_error", f"Invalid `from` field. {fmt}"))
        to = body["to"] if isinstance(body["to"], list) else [body["to"]]
        if len(to) > MAX_RECIPIENTS:
            return Response(422, _error(422, "validation_error",
                                        f"Too many recipients: at most {MAX_RECIPIENTS} in `to`."))
        if any(not isinstance(t, str) or _bare_address(t) is None for t in to):
            return Response(422, _error(422, "validation_error", f"Invalid `to` field. {fmt}"))
        if not isinstance(body["subject"], str):
            return Response(422, _error(422, "validation_error", "Invalid `subject` field."))
        return None
