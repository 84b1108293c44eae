"""Slack-compatible incoming webhook: POST one JSON message (plain httpx, no Dagster import).

The webhook URL is itself the credential (Slack's holds a token), so it never appears in errors or logs.
Error taxonomy (adapters/errors.py): timeouts, connection errors, 408, 429 and 5xx -> TransientError; any other
non-2xx -> PermanentError. Either way the caller keeps the alert and tries again on its next tick.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from bitloot_reconcile.adapters.http import HttpAdapter

# Slack answers errors with short codes (`invalid_payload`, `no_service`); anything longer is not quoted.
_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


class WebhookClient(HttpAdapter):
    """Posts JSON messages to one webhook URL. Use as a context manager to reuse the connection."""

    service = "webhook"
    objects_can_be_missing = False  # a 404 is a wrong or revoked URL

    def __init__(self, url: str, *, timeout: float = 10.0, transport: httpx.BaseTransport | None = None):
        if not url:
            raise ValueError("WebhookClient needs a URL")
        # No base URL: httpx would add a trailing slash to the webhook's path.
        super().__init__("", {}, timeout=timeout, transport=transport, secret=url)
        self._url = url

    def __repr__(self) -> str:  # never show the URL
        return "WebhookClient(url=***)"

    def post(self, message: dict[str, Any]) -> None:
        self._send("POST", self._url, where="POST", json=message)

    def _error_fields(self, response: httpx.Response) -> tuple[str | None, str | None]:
        code = response.text.strip()
        return None, (code if _ERROR_CODE.match(code) else None)

    def _error_message(self, where: str, status: int, kind: str | None, detail: str | None) -> str:
        return f"{where} answered {status}" + (f" {detail}" if detail else "")
