"""Slack-compatible incoming webhook: POST one JSON message (plain httpx, no Dagster import).

The webhook URL is itself the credential (Slack's holds a token), so it never appears in errors or logs.
Error taxonomy (adapters/errors.py): timeouts, connection errors, 429 and 5xx -> TransientError; any other
non-2xx -> PermanentError. Either way the caller keeps the alert and tries again on its next tick.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from bitloot_reconcile.adapters.errors import PermanentError, TransientError

SERVICE = "webhook"
# Slack answers errors with short codes (`invalid_payload`, `no_service`); anything longer is not quoted.
_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


class WebhookClient:
    """Posts JSON messages to one webhook URL. Use as a context manager to reuse the connection."""

    def __init__(self, url: str, *, timeout: float = 10.0, transport: httpx.BaseTransport | None = None):
        if not url:
            raise ValueError("WebhookClient needs a URL")
        if timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        self._url = url
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout),
            transport=transport,
            follow_redirects=False,
            headers={"User-Agent": "bitloot-reconcile"},
        )

    def __repr__(self) -> str:  # never show the URL
        return "WebhookClient(url=***)"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WebhookClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def post(self, message: dict[str, Any]) -> None:
        try:
            response = self._http.post(self._url, json=message)
        except httpx.TimeoutException as exc:
            raise TransientError(SERVICE, f"POST timed out ({type(exc).__name__})", kind="timeout") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            raise PermanentError(SERVICE, "webhook URL is not a valid http(s) URL", kind="configuration") from None
        except httpx.TransportError as exc:
            raise TransientError(SERVICE, f"connection error ({type(exc).__name__})", kind="connection") from None
        if response.is_success:
            return
        status = response.status_code
        code = response.text.strip()
        detail = f"POST answered {status}" + (f" {code}" if _ERROR_CODE.match(code) else "")
        if status == 429 or status >= 500:
            retry_after = response.headers.get("Retry-After", "")
            raise TransientError(SERVICE, detail, status=status, kind=f"http_{status}",
                                 retry_after=float(retry_after) if retry_after.isdigit() else None)
        raise PermanentError(SERVICE, detail, status=status, kind=f"http_{status}")
