"""What the HTTP adapters share: one TLS context, the client settings, reading Retry-After, and `HttpAdapter`,
the base of the Kinguin, NOWPayments, Resend and webhook clients."""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import math
import ssl
import time
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

import httpx

from bitloot_reconcile.adapters.errors import ExternalServiceError, NotFoundError, PermanentError, TransientError

log = logging.getLogger(__name__)

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


def status_error_class(status: int, *, objects_can_be_missing: bool = True) -> type[ExternalServiceError]:
    """What an HTTP error status usually means: 408, 429 and 5xx are worth retrying, 404 is a missing object
    (where the service has objects to look up; elsewhere a wrong URL), and any other status will not change."""
    if status >= 500 or status in (408, 429):
        return TransientError
    if status == 404 and objects_can_be_missing:
        return NotFoundError
    return PermanentError


class HttpAdapter:
    """One HTTP service: the client's lifecycle, failures with no answer, and error answers, mapped onto
    `adapters.errors` the same way for every service. Subclasses say how their error bodies read
    (`_error_fields`) and, where the service differs, what a status or kind means (`_error_class`, ...).

    Exception text never carries the credential: a transport failure shows only the exception's type (its
    text can hold the URL), and remote text is scrubbed of `secret` in case the service echoes it.
    """

    service: ClassVar[str]
    # Said after a failure that may have happened after the service acted (Resend: the email may be sent).
    unsure_note: ClassVar[str] = ""
    # False where a 404 means a wrong URL rather than a missing object.
    objects_can_be_missing: ClassVar[bool] = True

    def __init__(self, base_url: str, headers: dict[str, str], *, timeout: float,
                 transport: httpx.BaseTransport | None, secret: str):
        self.timeout = timeout
        self._secret = secret
        self._http = build_client(base_url, headers, timeout=timeout, transport=transport)

    # The same lifecycle as KeyVault's (adapters/r2.py) over a botocore client: deliberately written twice, too
    # small to share across two client libraries.
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one call ----------------------------------------------------------------------------------------
    def _send(self, method: str, url: str, *, where: str, **kwargs: Any) -> httpx.Response:
        """Send one request and return its answer, or raise for an error status or when no answer came.

        `where` names the call in messages and logs (method and path, never a URL with a credential).
        """
        started = time.monotonic()
        try:
            response = self._http.request(method, url, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            log.warning("%s %s failed after %.0f ms: %s", self.service, where, _ms(started), type(exc).__name__)
            raise self._transport_error(where, exc) from None
        log.info("%s %s -> %d in %.0f ms", self.service, where, response.status_code, _ms(started))
        if not response.is_success:
            raise self._error(where, response)
        return response

    def _json(self, response: httpx.Response, where: str, **loads: Any) -> Any:
        """The answer's JSON. A success with a garbled body is most likely a proxy or a cut-off answer: worth
        another try."""
        try:
            return json.loads(response.content, **loads)
        except ValueError:
            raise TransientError(self.service, self._unsure(f"{where}: {response.status_code} answer is not JSON"),
                                 status=response.status_code, kind=self._kind("malformed_response")) from None

    def _transport_error(self, where: str, exc: Exception) -> ExternalServiceError:
        name = type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            return TransientError(self.service, self._unsure(f"{where}: timed out after {self.timeout:g}s ({name})"),
                                  kind=self._kind("timeout"))
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return PermanentError(self.service, f"{where}: the URL is not a valid http(s) URL",
                                  kind=self._kind("configuration"))
        if isinstance(exc, httpx.TransportError):
            # Connection refused or reset, or dropped before any answer (a lost response).
            return TransientError(self.service, self._unsure(f"{where}: connection error ({name})"),
                                  kind=self._kind("connection"))
        return PermanentError(self.service, f"{where}: {name}", kind=self._kind("client"))

    def _kind(self, kind: str) -> str:
        """The kind of a failure this side noticed, in the service's spelling (Kinguin's are CamelCase)."""
        return kind

    def _unsure(self, message: str) -> str:
        return f"{message}; {self.unsure_note}" if self.unsure_note else message

    # -- error answers -----------------------------------------------------------------------------------
    def _error(self, where: str, response: httpx.Response) -> ExternalServiceError:
        status = response.status_code
        kind, detail = self._error_fields(response)
        message = self._scrub(self._error_message(where, status, kind, detail))
        error_class = self._error_class(response, kind, detail)
        kind = self._error_kind(status, kind, error_class)
        if issubclass(error_class, TransientError):
            return error_class(self.service, message, status=status, kind=kind,
                               retry_after=self._retry_after(response))
        return error_class(self.service, message, status=status, kind=kind)

    def _error_fields(self, response: httpx.Response) -> tuple[str | None, str | None]:
        """(kind, detail) of an error answer, as the service words them; None where it says nothing."""
        raise NotImplementedError

    def _error_message(self, where: str, status: int, kind: str | None, detail: str | None) -> str:
        return f"{where}: {status} {kind or f'http_{status}'}" + (f": {detail}" if detail else "")

    def _error_class(self, response: httpx.Response, kind: str | None,
                     detail: str | None) -> type[ExternalServiceError]:
        return status_error_class(response.status_code, objects_can_be_missing=self.objects_can_be_missing)

    def _error_kind(self, status: int, kind: str | None, error_class: type[ExternalServiceError]) -> str | None:
        return kind or f"http_{status}"

    def _retry_after(self, response: httpx.Response) -> float | None:
        return parse_retry_after(response.headers.get("Retry-After"))

    def _scrub(self, text: str) -> str:
        """Drop the secret from remote text, in case the remote side ever echoes it (real keys are long)."""
        if len(self._secret) >= 8 and text:
            return text.replace(self._secret, "***")
        return text


def json_error_fields(response: httpx.Response, kind_fields: tuple[str, ...],
                      detail_fields: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(kind, detail) from the first non-empty of the named fields of a JSON error body; detail cut at 300."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    kind = next((body[f] for f in kind_fields if body.get(f)), None)
    detail = next((body[f] for f in detail_fields if body.get(f)), None)
    return (str(kind) if kind else None), (str(detail)[:300] if detail else None)


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
