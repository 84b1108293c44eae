"""What the HTTP adapters share: one TLS context, the client settings, reading Retry-After."""

from __future__ import annotations

import email.utils
import functools
import math
import ssl
from datetime import UTC, datetime

import httpx

USER_AGENT = "bitloot-reconcile"


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """One TLS context for every client: loading the CA bundle costs tens of ms, and ops make a client per call."""
    return httpx.create_ssl_context()


def build_client(
    base_url: str, headers: dict[str, str], *, timeout: float, transport: httpx.BaseTransport | None
) -> httpx.Client:
    """An httpx client with a timeout on every phase of every call, and no redirects followed."""
    if not timeout or timeout <= 0:
        raise ValueError("timeout must be a positive number of seconds")
    return httpx.Client(
        base_url=base_url,
        headers={"Accept": "application/json", "User-Agent": USER_AGENT, **headers},
        timeout=httpx.Timeout(timeout),
        transport=transport,
        verify=shared_ssl_context(),
        follow_redirects=False,
    )


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None
