"""NOWPayments adapter: read one payment's status (`GET /v1/payment/{id}`) and classify it.

Used to re-check orders stuck in `waiting`/`confirming`/`failed`: an order only counts as paid when
NOWPayments now says `finished` or `confirmed` (see DESIGN §4 step 2). Plain httpx, no Dagster import.

Error taxonomy (adapters/errors.py):
- 404 -> NotFoundError (unknown payment id; BitLoot's invoice flow stores an *invoice* id in
  `payments.externalId`, which gives this too)
- 408, 429 (Retry-After honoured), 5xx, timeouts, connection errors, lost responses -> TransientError
- 401, 403, other 4xx, a 2xx body that does not describe a payment -> PermanentError

The API key travels only in the `x-api-key` header. It never appears in log records or exception text:
messages are built from the status, NOWPayments' error `code`/`message` and the request path, and are scrubbed
of the key in case the remote side ever echoes it.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from bitloot_reconcile.adapters.errors import NotFoundError, PermanentError, TransientError
from bitloot_reconcile.adapters.http import build_client, parse_retry_after

log = logging.getLogger(__name__)

SERVICE = "nowpayments"
DEFAULT_BASE_URL = "https://api.nowpayments.io"


class PaymentVerdict(enum.StrEnum):
    """What a NOWPayments payment status means for fulfilment."""

    PAID = "paid"        # money received: the order may be fulfilled
    PENDING = "pending"  # not yet: look again later
    FAILED = "failed"    # will not become paid on its own: never fulfil automatically


_VERDICTS: dict[str, PaymentVerdict] = {
    "finished": PaymentVerdict.PAID,
    "confirmed": PaymentVerdict.PAID,
    "waiting": PaymentVerdict.PENDING,
    "confirming": PaymentVerdict.PENDING,
    "sending": PaymentVerdict.PENDING,
    # Underpaid: BitLoot maps this to `underpaid` and never fulfils it; a human has to decide.
    "partially_paid": PaymentVerdict.FAILED,
    "failed": PaymentVerdict.FAILED,
    "refunded": PaymentVerdict.FAILED,
    "expired": PaymentVerdict.FAILED,
}

PAYMENT_STATUSES: frozenset[str] = frozenset(_VERDICTS)


def classify_payment_status(status: str) -> PaymentVerdict:
    """Map one of the nine NOWPayments `payment_status` values to paid / pending / failed.

    Matching ignores case and surrounding whitespace. Anything else raises ValueError: an unknown status must
    never be guessed into "paid".
    """
    key = status.strip().lower() if isinstance(status, str) else status
    try:
        return _VERDICTS[key]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_VERDICTS))
        raise ValueError(f"unknown NOWPayments payment_status {status!r}; expected one of: {known}") from None


class PaymentInfo(BaseModel):
    """The fields of NOWPayments' payment object that reconciliation uses. Unknown fields are kept as extras.

    NOWPayments sends `payment_id` as a JSON number; it is kept as a string here, as BitLoot stores it
    (`payments.externalId` is varchar). Amounts are Decimals parsed straight from the JSON text.
    """

    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True, frozen=True)

    payment_id: str
    payment_status: str
    order_id: str | None = None
    invoice_id: str | None = None
    order_description: str | None = None
    price_amount: Decimal | None = None
    price_currency: str | None = None
    pay_amount: Decimal | None = None
    pay_currency: str | None = None
    actually_paid: Decimal | None = None
    actually_paid_at_fiat: Decimal | None = None
    outcome_amount: Decimal | None = None
    outcome_currency: str | None = None
    pay_address: str | None = None
    purchase_id: str | None = None
    created_at: str | None = None
    updated_at: str | None = None

    @property
    def verdict(self) -> PaymentVerdict:
        """classify_payment_status(payment_status); raises ValueError on an unknown status."""
        return classify_payment_status(self.payment_status)


class NowPaymentsClient:
    """Synchronous NOWPayments API client. `base_url` is the API root; the client appends `/v1/...`.

    A base that already ends in `/v1` (BitLoot's own `.env` uses `https://api.nowpayments.io/v1`) is accepted
    and not doubled.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str = "", *, timeout: float = 15.0,
                 transport: httpx.BaseTransport | None = None):
        if not api_key:
            raise ValueError("NowPaymentsClient needs an api_key (NOWPAYMENTS_API_KEY)")
        root = (base_url or DEFAULT_BASE_URL).rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        self.base_url = root
        self.timeout = timeout
        self._api_key = api_key
        self._http = build_client(root, {"x-api-key": api_key}, timeout=timeout, transport=transport)

    def __repr__(self) -> str:  # never show the key
        return f"NowPaymentsClient(base_url={self.base_url!r}, timeout={self.timeout})"

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NowPaymentsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API ---------------------------------------------------------------------------------------------
    def get_payment(self, payment_id: str | int) -> PaymentInfo:
        """GET /v1/payment/{payment_id}: the payment's current status and amounts."""
        pid = str(payment_id).strip()
        if not pid:
            raise ValueError("payment_id must not be empty")
        path = f"/v1/payment/{quote(pid, safe='')}"
        response = self._request("GET", path)
        body = self._json(response, path)
        if not isinstance(body, dict):
            raise PermanentError(SERVICE, f"GET {path}: expected a payment object, got {type(body).__name__}",
                                 status=response.status_code, kind="malformed_response")
        try:
            info = PaymentInfo.model_validate(body)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors())
            raise PermanentError(SERVICE, f"GET {path}: payment object lacks or mistypes: {fields}",
                                 status=response.status_code, kind="malformed_response") from None
        log.debug("nowpayments payment %s status=%s order_id=%s", info.payment_id, info.payment_status,
                  info.order_id)
        return info

    # -- plumbing ----------------------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        """Drop the key from remote text, in case the remote side ever echoes it (real keys are long)."""
        if len(self._api_key) >= 8 and text:
            return text.replace(self._api_key, "***")
        return text

    def _request(self, method: str, path: str) -> httpx.Response:
        started = time.monotonic()
        try:
            response = self._http.request(method, path)
        except httpx.TimeoutException as exc:
            log.debug("nowpayments %s %s timed out after %.2fs", method, path, time.monotonic() - started)
            raise TransientError(SERVICE, f"{method} {path}: timed out after {self.timeout:g}s "
                                          f"({type(exc).__name__})", kind="timeout") from None
        except httpx.UnsupportedProtocol:
            raise PermanentError(SERVICE, f"{method} {path}: base URL {self.base_url!r} is not http(s)",
                                 kind="configuration") from None
        except httpx.TransportError as exc:
            # Connection refused/reset, or the connection died before any answer (a lost response).
            log.debug("nowpayments %s %s transport error %s", method, path, type(exc).__name__)
            raise TransientError(SERVICE, f"{method} {path}: connection error ({type(exc).__name__})",
                                 kind="connection") from None
        elapsed_ms = (time.monotonic() - started) * 1000
        log.debug("nowpayments %s %s -> %s in %.0f ms", method, path, response.status_code, elapsed_ms)
        if response.is_success:
            return response
        raise self._error(method, path, response)

    def _json(self, response: httpx.Response, path: str) -> Any:
        try:
            # Decimal for floats: amounts keep the digits NOWPayments sent.
            return json.loads(response.content, parse_float=Decimal)
        except ValueError:
            # A 2xx with a garbled body is most likely a proxy or truncation problem: worth another try.
            raise TransientError(SERVICE, f"GET {path}: {response.status_code} answer is not JSON",
                                 status=response.status_code, kind="malformed_response") from None

    def _error(self, method: str, path: str, response: httpx.Response) -> Exception:
        status = response.status_code
        code, detail = _error_fields(response)
        kind = code or f"http_{status}"
        message = self._scrub(f"{method} {path}: {status} {kind}" + (f": {detail}" if detail else ""))
        if status == 404:
            return NotFoundError(SERVICE, message, status=status, kind=code or "not_found")
        if status == 429 or status == 408 or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return TransientError(SERVICE, message, status=status, kind=kind, retry_after=retry_after)
        return PermanentError(SERVICE, message, status=status, kind=kind)


def _error_fields(response: httpx.Response) -> tuple[str | None, str | None]:
    """(code, message) of a NOWPayments error body.

    The body looks like {"status": false, "statusCode": 404, "code": "PAYMENT_NOT_FOUND", "message": "..."}.
    """
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    code = body.get("code") or body.get("name")
    detail = body.get("message") or body.get("error_message") or body.get("error")
    return (str(code) if code else None), (str(detail)[:300] if detail else None)
