"""Client for the Kinguin eCommerce API (ESA): place or recover an order, poll it, download its keys.

Plain httpx, no Dagster. Every call goes through `HttpAdapter._send` (adapters/http.py), which maps failures
onto the shared taxonomy in `adapters.errors`; what differs for Kinguin is below (its `kind`s, the duplicate):

- `TransientError`: 5xx, 408, 429 (numeric or HTTP-date `Retry-After` -> `retry_after` seconds), timeouts,
  connection / read / protocol errors (including a connection dropped with no answer), kind `ResourceLock`.
- `DuplicateExternalIdError`: the orderExternalId is already used, whatever the HTTP status
  (`ConstraintViolation` on `propertyPath` orderExternalId, or a detail saying "already used").
- `NotFoundError`: 404 or kind `OrderNotFound`.
- `PermanentError`: everything else (ConstraintViolation, InsufficientBalance, ProductUnavailable, OrderFailed,
  Preorder, 401/403 ...), and client-side validation failures before any call.

The API key travels only in the `X-Api-Key` header; it is never logged and never put in an exception. Key
serials are `SecretStr`, so they stay out of reprs and logs; the log records method, path, status and elapsed
time only.
"""

from __future__ import annotations

import base64
import logging
import math
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic.alias_generators import to_camel

from bitloot_reconcile.adapters.errors import (
    DuplicateExternalIdError,
    ExternalServiceError,
    NotFoundError,
    PermanentError,
    TransientError,
)
from bitloot_reconcile.adapters.http import HttpAdapter, json_error_fields

log = logging.getLogger(__name__)

SERVICE = "kinguin"
DEFAULT_BASE_URL = "https://gateway.kinguin.net/esa/api"
MAX_LINES = 10
MAX_QTY = 9
MAX_PAGE_SIZE = 100
_MAX_PAGES = 1000  # guards against a server that never returns a short page


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields ignored."""

    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, validate_by_alias=True,
                              extra="ignore")


_M = TypeVar("_M", bound=_Model)


class OrderLine(_Model):
    """One line of an order request. Checked by `place_order`, not here, so bad values raise PermanentError."""

    product_id: str
    qty: int
    price: float  # the most we pay per unit (Kinguin may sell cheaper)
    offer_id: str | None = None


class KinguinKeyStatus(_Model):
    id: str
    status: str  # PENDING / PROCESSING / DELIVERED / RETURNED / REFUNDED / CANCELED


class KinguinOrderProduct(_Model):
    product_id: str | None = None
    kinguin_id: int | None = None
    offer_id: str | None = None
    qty: int = 0
    name: str | None = None
    price: float | None = None
    total_price: float | None = None
    request_price: float | None = None
    keys: list[KinguinKeyStatus] = Field(default_factory=list)


class KinguinOrder(_Model):
    order_id: str
    order_external_id: str | None = None
    status: str
    total_price: float | None = None
    request_total_price: float | None = None
    payment_price: float | None = None
    total_qty: int = 0
    created_at: str | None = None
    is_preorder: bool = False
    preorder_release_date: str | None = None
    products: list[KinguinOrderProduct] = Field(default_factory=list)

    @property
    def delivered_count(self) -> int:
        """Keys marked DELIVERED in `products[].keys[]` (present on GET, absent on the POST answer)."""
        return sum(1 for p in self.products for k in p.keys if k.status == "DELIVERED")


class KinguinOffer(_Model):
    offer_id: str | None = None
    price: float
    qty: int = 0


class KinguinProduct(_Model):
    product_id: str
    price: float | None = None  # the cheapest offer, EUR
    qty: int = 0
    offers: list[KinguinOffer] = Field(default_factory=list)


class KinguinKey(_Model):
    id: str
    serial: SecretStr
    type: str = "text/plain"
    product_id: str | None = None
    name: str | None = None
    kinguin_id: int | None = None
    offer_id: str | None = None

    def content(self) -> bytes:
        """The key as bytes: base64-decoded for image/* types, utf-8 text otherwise."""
        raw = self.serial.get_secret_value()
        if self.type.startswith("image/"):
            return base64.b64decode(raw, validate=False)
        return raw.encode("utf-8")


def _fmt_time(value: datetime | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat(timespec="seconds")


class KinguinClient(HttpAdapter):
    """Synchronous Kinguin client. Use as a context manager or call `close()`."""

    service = SERVICE

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 20.0,
                 transport: httpx.BaseTransport | None = None):
        if not api_key:
            raise ValueError("Kinguin API key is empty")
        super().__init__(base_url.rstrip("/") + "/", {"X-Api-Key": api_key}, timeout=timeout, transport=transport,
                         secret=api_key)

    def __repr__(self) -> str:
        return f"KinguinClient(base_url={str(self._http.base_url)!r})"

    # -- orders ------------------------------------------------------------------------------------------
    def place_order(self, order_external_id: str, lines: list[OrderLine]) -> KinguinOrder:
        """POST /v2/order. The answer is the new order (status usually `processing`, no keys yet)."""
        problem = _check_lines(order_external_id, lines)
        if problem:
            raise PermanentError(SERVICE, f"order request rejected before sending: {problem}",
                                 kind="ClientValidation")
        products = []
        for line in lines:
            item: dict[str, Any] = {"productId": line.product_id, "qty": line.qty, "price": line.price}
            if line.offer_id:
                item["offerId"] = line.offer_id
            products.append(item)
        body = self._request("POST", "v2/order", json={"products": products,
                                                       "orderExternalId": order_external_id})
        return _parse(KinguinOrder, body)

    def get_order(self, order_id: str) -> KinguinOrder:
        """GET /v1/order/{orderId} (the Kinguin orderId, not the BitLoot order uuid)."""
        return _parse(KinguinOrder, self._request("GET", f"v1/order/{_segment(order_id)}"))

    def search_orders(self, *, order_external_id: str | None = None,
                      created_at_from: datetime | str | None = None,
                      created_at_to: datetime | str | None = None, page_size: int = 100) -> list[KinguinOrder]:
        """GET /v1/order with filters, following every page. Newest first, as Kinguin sorts them."""
        limit = min(max(int(page_size), 1), MAX_PAGE_SIZE)
        params: dict[str, Any] = {k: v for k, v in {
            "orderExternalId": order_external_id,
            "createdAtFrom": _fmt_time(created_at_from),
            "createdAtTo": _fmt_time(created_at_to),
        }.items() if v is not None}
        found: dict[str, KinguinOrder] = {}
        for page in range(1, _MAX_PAGES + 1):
            body = self._request("GET", "v1/order", params={**params, "page": page, "limit": limit})
            if not isinstance(body, dict):
                raise PermanentError(SERVICE, "GET /v1/order: answer is not a result list", kind="BadResponse")
            results = body.get("results") or []
            for raw in results:
                order = _parse(KinguinOrder, raw)
                found.setdefault(order.order_id, order)
            total = body.get("item_count")
            if len(results) < limit or (isinstance(total, int) and page * limit >= total):
                break
        else:
            log.warning("kinguin search stopped after %d pages", _MAX_PAGES)
        return list(found.values())

    # -- products ----------------------------------------------------------------------------------------
    def get_product(self, product_id: str) -> KinguinProduct | None:
        """GET /v2/products/{productId}; None when Kinguin has no offer (it answers 404 when out of stock)."""
        try:
            return _parse(KinguinProduct, self._request("GET", f"v2/products/{_segment(product_id)}"))
        except NotFoundError:
            return None

    # -- keys --------------------------------------------------------------------------------------------
    def get_keys(self, order_id: str, *, expected: int | None = None) -> list[KinguinKey]:
        """GET /v2/order/{orderId}/keys, 100 per page: only the keys delivered so far.

        Stops at a short or empty page, or as soon as `expected` keys are in hand.
        """
        path = f"v2/order/{_segment(order_id)}/keys"
        keys: dict[str, KinguinKey] = {}
        for page in range(1, _MAX_PAGES + 1):
            body = self._request("GET", path, params={"page": page, "limit": MAX_PAGE_SIZE})
            if not isinstance(body, list):
                raise PermanentError(SERVICE, f"GET /{path}: answer is not a key list", kind="BadResponse")
            for raw in body:
                key = _parse(KinguinKey, raw)
                keys.setdefault(key.id, key)
            if len(body) < MAX_PAGE_SIZE or (expected is not None and len(keys) >= expected):
                break
        return list(keys.values())

    # -- plumbing ----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                 json: Any = None) -> Any:
        where = f"{method} /{path}"
        return self._json(self._send(method, path, where=where, params=params, json=json), where)

    # -- what Kinguin's errors mean ----------------------------------------------------------------------
    def _kind(self, kind: str) -> str:
        return "BadResponse" if kind == "malformed_response" else kind.capitalize()

    def _error_fields(self, response: httpx.Response) -> tuple[str | None, str | None]:
        kind, detail = json_error_fields(response, ("kind",), ("detail", "title", "type"))
        return kind, detail or response.reason_phrase or "error"

    def _error_message(self, where: str, status: int, kind: str | None, detail: str | None) -> str:
        return f"{where} -> {status} {kind or 'error'}: {detail}"

    def _error_class(self, response: httpx.Response, kind: str | None,
                     detail: str | None) -> type[ExternalServiceError]:
        # A used orderExternalId is a duplicate whatever the status: the caller searches and adopts the order.
        if (kind == "ConstraintViolation" and _property_path(response) == "orderExternalId") \
                or "already used" in (detail or "").lower():
            return DuplicateExternalIdError
        if kind == "ResourceLock":
            return TransientError
        if kind == "OrderNotFound":
            return NotFoundError
        return super()._error_class(response, kind, detail)

    def _error_kind(self, status: int, kind: str | None, error_class: type[ExternalServiceError]) -> str | None:
        return kind


def _parse(model: type[_M], raw: Any) -> _M:
    """Validate an answer; the error names fields only, never values (a bad key object holds a serial)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in err["loc"]) or "<root>" for err in exc.errors()})
        raise PermanentError(SERVICE, f"unexpected {model.__name__} shape (fields: {', '.join(fields)})",
                             kind="BadResponse") from None


def _segment(value: str) -> str:
    if not value:
        raise PermanentError(SERVICE, "empty Kinguin order id", kind="ClientValidation")
    return quote(str(value), safe="")


def _check_lines(order_external_id: str, lines: list[OrderLine]) -> str | None:
    if not order_external_id or not isinstance(order_external_id, str):
        return "orderExternalId must be a non-empty string"
    if not 1 <= len(lines) <= MAX_LINES:
        return f"an order needs 1 to {MAX_LINES} lines, got {len(lines)}"
    offers = [line.offer_id for line in lines if line.offer_id]
    if len(offers) != len(set(offers)):
        return "an offerId may appear only once per order"
    for i, line in enumerate(lines):
        if not line.product_id:
            return f"line {i}: productId is empty"
        if not 1 <= line.qty <= MAX_QTY:
            return f"line {i}: qty must be 1 to {MAX_QTY}, got {line.qty}"
        if not (math.isfinite(line.price) and line.price > 0):
            return f"line {i}: price must be > 0, got {line.price}"
    return None


def _property_path(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("propertyPath") if isinstance(body, dict) else None
