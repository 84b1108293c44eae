"""NOWPayments adapter: read one payment's status (`GET /v1/payment/{id}`) and classify it.

Used to re-check orders stuck in `waiting`/`confirming`/`failed`: an order only counts as paid when
NOWPayments now says `finished` or `confirmed` (`docs/design.md`, section 4 step 2). Plain httpx, no Dagster import.

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
import logging
from decimal import Decimal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from bitloot_reconcile.adapters.errors import ExternalServiceError, NotFoundError, PermanentError
from bitloot_reconcile.adapters.http import HttpAdapter, json_error_fields

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


class NowPaymentsClient(HttpAdapter):
    """Synchronous NOWPayments API client. `base_url` is the API root; the client appends `/v1/...`.

    A base that already ends in `/v1` (BitLoot's own `.env` uses `https://api.nowpayments.io/v1`) is accepted
    and not doubled.
    """

    service = SERVICE

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str = "", *, timeout: float = 15.0,
                 transport: httpx.BaseTransport | None = None):
        if not api_key:
            raise ValueError("NowPaymentsClient needs an api_key (NOWPAYMENTS_API_KEY)")
        root = (base_url or DEFAULT_BASE_URL).rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        self.base_url = root
        super().__init__(root, {"x-api-key": api_key}, timeout=timeout, transport=transport, secret=api_key)

    def __repr__(self) -> str:  # never show the key
        return f"NowPaymentsClient(base_url={self.base_url!r}, timeout={self.timeout})"

    def get_payment(self, payment_id: str | int) -> PaymentInfo:
        """GET /v1/payment/{payment_id}: the payment's current status and amounts."""
        pid = str(payment_id).strip()
        if not pid:
            raise ValueError("payment_id must not be empty")
        path = f"/v1/payment/{quote(pid, safe='')}"
        where = f"GET {path}"
        response = self._send("GET", path, where=where)
        # Decimal for floats: amounts keep the digits NOWPayments sent.
        body = self._json(response, where, parse_float=Decimal)
        if not isinstance(body, dict):
            raise PermanentError(SERVICE, f"{where}: expected a payment object, got {type(body).__name__}",
                                 status=response.status_code, kind="malformed_response")
        try:
            info = PaymentInfo.model_validate(body)
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors())
            raise PermanentError(SERVICE, f"{where}: payment object lacks or mistypes: {fields}",
                                 status=response.status_code, kind="malformed_response") from None
        log.debug("nowpayments payment %s status=%s order_id=%s", info.payment_id, info.payment_status,
                  info.order_id)
        return info

    # -- what NOWPayments' errors mean -------------------------------------------------------------------
    def _error_fields(self, response: httpx.Response) -> tuple[str | None, str | None]:
        """The body looks like {"status": false, "statusCode": 404, "code": "PAYMENT_NOT_FOUND", "message": "..."}."""
        return json_error_fields(response, ("code", "name"), ("message", "error_message", "error"))

    def _error_kind(self, status: int, kind: str | None, error_class: type[ExternalServiceError]) -> str | None:
        if kind is None and error_class is NotFoundError:
            return "not_found"
        return super()._error_kind(status, kind, error_class)
