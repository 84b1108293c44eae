"""Kinguin eCommerce API (ESA) simulator, faithful to the API as the adapter (bitloot_reconcile/adapters/kinguin.py)
describes it.

Serves under `/esa/api` (`sim.base_url`), authenticates `X-Api-Key`, and implements:

| route name        | endpoint                                   |
|-------------------|--------------------------------------------|
| `place_order_v2`  | POST /v2/order            (productId)      |
| `get_order`       | GET  /v1/order/{orderId}                   |
| `search_orders`   | GET  /v1/order  (orderExternalId, createdAtFrom/To, paging) |
| `get_keys`        | GET  /v2/order/{orderId}/keys (paging)     |
| `get_product`     | GET  /v2/products/{productId} (404 when out of stock) |

Faults: `sim.inject("<route name>", Fault(...))` (latency, canned status, lost response). Canned bodies are
Kinguin-shaped: 5xx -> kind `Error`, 429 -> kind `Http` / "Too Many Requests", 409 -> `ResourceLock`,
422 -> `OrderFailed`; any other body can be given with `Fault(body=sim.error_body(...))`.

Behaviour worth knowing (choices where Kinguin's docs are silent are marked ASSUMPTION):
- Placement validates like the API (1..10 lines, qty 1..9, price > 0, keyType only "text", unique offerId),
  then the unique orderExternalId (duplicate -> `duplicate_status`, 422 by default, kind ConstraintViolation,
  propertyPath orderExternalId, detail "... already used"), then pre-order rules, then offers (price ceiling,
  stock, offerId: else ProductUnavailable 422), then the balance (InsufficientBalance 400). A refused placement
  creates and charges nothing. Units are sold at the product price when it is <= the requested price.
- The 201 answer is the new order in `processing` without keys; delivery happens right after it.
- Delivery modes, global (`sim.delivery_mode`) or per product (`add_product(..., delivery_mode=)`):
  `"instant"` delivers every key at once; `"manual"` waits for `sim.deliver(order_id, n)`;
  `"after_polls=N"` answers the first N `GET /v1/order/{id}` calls with `processing` and delivers after the
  N-th. Pre-order products whose release date is in the future always wait for `deliver()`.
- `cancel()` cancels undelivered keys (no credit); `refund()` marks keys REFUNDED and credits the payment back.
  `GET .../keys` only ever lists DELIVERED keys.

Only what the project calls is served: no v1 placement, key returns or webhooks.
"""

from __future__ import annotations

import base64
import hmac
import random
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from http import HTTPStatus
from typing import Any

from bitloot_standins.httpserver import Fault, JsonServer, Response

__all__ = ["Fault", "KinguinSimulator", "SimKey", "SimLine", "SimOrder", "SimProduct", "image_key_bytes"]

PREFIX = "/esa/api"
KEY_TYPES = ("text/plain", "image/jpeg", "image/png", "image/gif")
ORDER_STATUSES = ("processing", "completed", "canceled", "refunded")
_REASONS = {422: "Unprocessable Content"}
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _reason(status: int) -> str:
    try:
        return _REASONS.get(status) or HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def _parse_time(value: str, *, end: bool = False) -> datetime:
    """Accepts Y-m-d, Y-m-d H:i:s, Y-m-dTH:i:s, with .uZ or an offset. A bare date as `end` covers the day."""
    moment = datetime.fromisoformat(value.strip().replace(" ", "T", 1) if len(value.strip()) > 10 else value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if end and len(value.strip()) == 10:
        moment += timedelta(days=1) - timedelta(microseconds=1)
    return moment


# -- image keys ------------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def image_key_bytes(mime: str, label: str) -> bytes:
    """A tiny valid 1x1 image of type `mime` carrying `label` in a comment, so every key's bytes differ."""
    text = label.encode()[:200]
    if mime == "image/png":
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
                + _png_chunk(b"tEXt", b"Comment\x00" + text)
                + _png_chunk(b"IDAT", zlib.compress(b"\x00\x00")) + _png_chunk(b"IEND", b""))
    if mime == "image/gif":
        return (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
                + b"!\xfe" + bytes([len(text)]) + text + b"\x00"
                + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
    if mime == "image/jpeg":
        def segment(marker: int, data: bytes) -> bytes:
            return bytes([0xFF, marker]) + struct.pack(">H", len(data) + 2) + data
        huffman = bytes([1] + [0] * 15) + b"\x00"  # one code of length 1 for symbol 0
        return (b"\xff\xd8" + segment(0xFE, text) + segment(0xDB, b"\x00" + b"\x01" * 64)
                + segment(0xC0, b"\x08\x00\x01\x00\x01\x01\x01\x11\x00")
                + segment(0xC4, b"\x00" + huffman) + segment(0xC4, b"\x10" + huffman)
                + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x3f" + b"\xff\xd9")
    raise ValueError(f"not an image key type: {mime}")


# -- state -----------------------------------------------------------------------------------------------
@dataclass
class SimProduct:
    product_id: str
    kinguin_id: int
    name: str
    price: float
    stock: int
    key_type: str
    offer_id: str
    is_preorder: bool = False
    release_date: str | None = None
    delivery_mode: str | None = None  # None: follow the simulator's global mode


@dataclass
class SimKey:
    id: str
    serial: str
    type: str
    status: str
    delivered_at: datetime | None = None


@dataclass
class SimLine:
    product: SimProduct
    qty: int
    price: float
    request_price: float
    key_type: str
    keys: list[SimKey]
    mode: str = "instant"
    polls_left: int = 0


@dataclass
class SimOrder:
    order_id: str
    order_external_id: str | None
    status: str
    created_at: datetime
    lines: list[SimLine]
    payment_price: float
    is_preorder: bool = False
    preorder_release_date: str | None = None
    seq: int = 0

    @property
    def keys(self) -> list[SimKey]:
        return [k for line in self.lines for k in line.keys]

    @property
    def total_qty(self) -> int:
        return sum(line.qty for line in self.lines)

    @property
    def serials(self) -> list[str]:
        return [k.serial for k in self.keys]


def _parse_mode(mode: str) -> tuple[str, int]:
    name, _, arg = str(mode).replace(":", "=").partition("=")
    if name in ("instant", "manual") and not arg:
        return name, 0
    if name == "after_polls" and arg.isdigit():
        return ("after_polls", int(arg)) if int(arg) > 0 else ("instant", 0)
    raise ValueError(f"delivery mode must be 'instant', 'manual' or 'after_polls=N', not {mode!r}")


class _Refusal(Exception):
    def __init__(self, status: int, kind: str, detail: str, **extra: Any):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.extra = status, kind, detail, extra


class KinguinSimulator(JsonServer):
    name = "kinguin"

    def __init__(self, api_key: str = "sim-kinguin-key", *, host: str = "127.0.0.1", port: int = 0,
                 balance: float = 1000.0, delivery_mode: str = "instant", duplicate_status: int = 422,
                 seed: int = 0):
        super().__init__(host, port)
        self.api_key = api_key
        self.duplicate_status = duplicate_status
        self.products: dict[str, SimProduct] = {}
        self.orders: dict[str, SimOrder] = {}   # orderId -> order, in creation order
        self.now = lambda: datetime.now(UTC)    # replace to control createdAt / return windows
        self._balance = round(float(balance), 2)
        self._mode = delivery_mode
        _parse_mode(delivery_mode)
        self._rng = random.Random(seed)
        self._seq = 0
        api = PREFIX
        self.route("POST", f"{api}/v2/order", "place_order_v2", self._h_place)
        self.route("GET", f"{api}/v1/order", "search_orders", self._h_search)
        self.route("GET", f"{api}/v1/order/(?P<order_id>[^/]+)", "get_order", self._h_get_order)
        self.route("GET", f"{api}/v2/order/(?P<order_id>[^/]+)/keys", "get_keys", self._h_get_keys)
        self.route("GET", f"{api}/v2/products/(?P<product_id>[^/]+)", "get_product", self._h_get_product)

    @property
    def base_url(self) -> str:
        return f"{self.url}{PREFIX}"

    # ===================================================================================== control API
    def add_product(self, product_id: str, *, price: float, stock: int = 100, key_type: str = "text/plain",
                    name: str | None = None, kinguin_id: int | None = None, offer_id: str | None = None,
                    is_preorder: bool = False, release_date: str | None = None,
                    delivery_mode: str | None = None) -> SimProduct:
        if key_type not in KEY_TYPES:
            raise ValueError(f"key_type must be one of {KEY_TYPES}")
        if delivery_mode is not None:
            _parse_mode(delivery_mode)
        with self._lock:
            if kinguin_id is None:
                kinguin_id = max([p.kinguin_id for p in self.products.values()] + [1000]) + 1
            product = SimProduct(product_id, kinguin_id, name or f"Product {kinguin_id}", round(price, 2), stock,
                                 key_type, offer_id or self._hex24(), is_preorder, release_date, delivery_mode)
            self.products[product_id] = product
            return product

    @property
    def balance(self) -> float:
        return self._balance

    def set_balance(self, amount: float) -> None:
        with self._lock:
            self._balance = round(float(amount), 2)

    @property
    def delivery_mode(self) -> str:
        return self._mode

    @delivery_mode.setter
    def delivery_mode(self, mode: str) -> None:
        _parse_mode(mode)
        self._mode = mode

    def set_delivery_mode(self, mode: str | None, product_id: str | None = None) -> None:
        """Global mode, or one product's (`None` there resets it to follow the global mode)."""
        if product_id is None:
            self.delivery_mode = mode
            return
        if mode is not None:
            _parse_mode(mode)
        with self._lock:
            self.products[product_id].delivery_mode = mode

    def deliver(self, order_id: str, n: int | None = None) -> int:
        """Deliver up to `n` (default all) waiting keys of a processing order; returns how many."""
        with self._lock:
            order = self.orders[order_id]
            if order.status != "processing":
                raise ValueError(f"order {order_id} is {order.status}, not processing")
            waiting = [k for k in order.keys if k.status in ("PENDING", "PROCESSING")]
            batch = waiting if n is None else waiting[:n]
            for key in batch:
                self._deliver_key(key)
            self._settle(order)
            return len(batch)

    def cancel(self, order_id: str) -> None:
        """Cancel: undelivered keys become CANCELED; no balance credit (ASSUMPTION)."""
        with self._lock:
            order = self.orders[order_id]
            for key in order.keys:
                if key.status in ("PENDING", "PROCESSING"):
                    key.status = "CANCELED"
            order.status = "canceled"

    def refund(self, order_id: str) -> None:
        """Refund: keys become REFUNDED and the payment goes back to the balance (once)."""
        with self._lock:
            order = self.orders[order_id]
            for key in order.keys:
                if key.status != "RETURNED":
                    key.status = "REFUNDED"
            self._balance = round(self._balance + order.payment_price, 2)
            order.status = "refunded"

    def plant_order(self, order_external_id: str | None, lines: list[Any], *, status: str = "completed",
                    created_at: datetime | str | None = None, key_type: str | None = None) -> SimOrder:
        """Insert an order directly: no limits, no uniqueness check, no stock or balance change.

        `lines` are API-shaped dicts (`{"productId", "qty", "price"?}`) or `(product_id, qty[, price])` tuples.
        `status` sets the keys too: completed -> DELIVERED, processing -> PROCESSING, canceled / refunded.
        """
        if status not in ORDER_STATUSES:
            raise ValueError(f"status must be one of {ORDER_STATUSES}")
        if isinstance(created_at, str):
            created_at = _parse_time(created_at)
        with self._lock:
            sim_lines = []
            for raw in lines:
                if isinstance(raw, dict):
                    product_id, qty, price = raw["productId"], raw["qty"], raw.get("price")
                else:
                    product_id, qty, price = (tuple(raw) + (None,))[:3]
                product = self.products[product_id]
                sim_lines.append((product, int(qty), float(price if price is not None else product.price),
                                  key_type or product.key_type))
            order = self._new_order(order_external_id, sim_lines, created_at or self.now())
            key_status = {"completed": "DELIVERED", "processing": "PROCESSING", "canceled": "CANCELED",
                          "refunded": "REFUNDED"}[status]
            for line in order.lines:
                line.mode = "manual"
                for key in line.keys:
                    key.status = key_status
                    key.delivered_at = order.created_at if status == "completed" else None
            order.status = status
            return order

    def orders_for_external_id(self, order_external_id: str) -> list[SimOrder]:
        with self._lock:
            return [o for o in self.orders.values() if o.order_external_id == order_external_id]

    def error_body(self, status: int, kind: str, detail: str, *, method: str = "POST",
                   path: str = "/api/v2/order", **extra: Any) -> dict[str, Any]:
        """A Kinguin error body; use with `Fault(status=..., body=...)` for kinds the model does not produce."""
        reason = _reason(status)
        return {"kind": kind, "status": status, "detail": detail, "type": reason, "title": reason,
                "path": path.removeprefix("/esa"), "method": method, "timestamp": _iso(self.now()),
                "trace": f"{self._rng.getrandbits(40):010x}", **extra}

    def _make_handler(self) -> type:
        handler = super()._make_handler()
        handler.disable_nagle_algorithm = True  # headers and body go out in two writes: avoid the 40 ms stall
        return handler

    # ===================================================================================== base hooks
    def authorize(self, headers: dict[str, str]) -> Response | None:
        given = headers.get("x-api-key", "")
        if given and hmac.compare_digest(given.encode(), self.api_key.encode()):
            return None
        return Response(401, {"kind": "Authorization", "status": 401, "detail": "Invalid authentication data.",
                              "type": "Unauthorized"})

    def not_found(self, method: str, path: str) -> Response:
        shown = path.removeprefix("/esa")
        return Response(404, self.error_body(404, "Http", f'No route found for "{method} {shown}"',
                                             method=method, path=path))

    def canned_error(self, status: int, method: str, path: str) -> Any:
        kind, detail = {
            429: ("Http", "Too Many Requests."),
            409: ("ResourceLock", "Resource is locked. Please try again."),
            422: ("OrderFailed", "There was a problem with placing order."),
            401: ("Authorization", "Invalid authentication data."),
            404: ("Http", "Not Found."),
        }.get(status, ("Error", f"{_reason(status)}.") if status >= 500 else ("Http", f"{_reason(status)}."))
        return self.error_body(status, kind, detail, method=method, path=path)

    # ===================================================================================== handlers
    def _h_place(self, body: Any, **_: Any) -> Response:
        return self._place(body, "/api/v2/order")

    def _h_get_product(self, product_id: str, **_: Any) -> Response:
        """The product with its one offer; out of stock or unknown answers 404, as Kinguin does."""
        product = self.products.get(product_id)
        if product is None or product.stock <= 0:
            path = f"/api/v2/products/{product_id}"
            return Response(404, self.error_body(404, "HttpClient", "Not Found", method="GET", path=path))
        offer = {"offerId": product.offer_id, "name": product.name, "price": product.price, "qty": product.stock,
                 "availableQty": product.stock, "isPreorder": product.is_preorder}
        return Response(200, {"kinguinId": product.kinguin_id, "productId": product.product_id,
                              "name": product.name, "price": product.price, "qty": product.stock,
                              "isPreorder": product.is_preorder, "offers": [offer]})

    def _h_get_order(self, order_id: str, **_: Any) -> Response:
        order = self.orders.get(order_id)
        if order is None:
            return self._not_found_order("GET", f"/api/v1/order/{order_id}", order_id)
        answer = self._order_json(order)
        for line in order.lines:  # slow delivery: counts the polls answered so far
            if line.mode == "after_polls" and line.polls_left > 0 and order.status == "processing":
                line.polls_left -= 1
                if line.polls_left == 0:
                    for key in line.keys:
                        if key.status in ("PENDING", "PROCESSING"):
                            self._deliver_key(key)
        self._settle(order)
        return Response(200, answer)

    def _h_search(self, query: dict[str, str], **_: Any) -> Response:
        path = "/api/v1/order"
        try:
            page, limit = self._paging(query)
            orders = sorted(self.orders.values(), key=lambda o: (o.created_at, o.seq), reverse=True)
            if "createdAtFrom" in query:
                start = self._query_time(query, "createdAtFrom")
                orders = [o for o in orders if o.created_at >= start]
            if "createdAtTo" in query:
                end = self._query_time(query, "createdAtTo", end=True)
                orders = [o for o in orders if o.created_at <= end]
        except _Refusal as refusal:
            return self._refuse(refusal, "GET", path)
        if query.get("orderExternalId"):
            orders = [o for o in orders if o.order_external_id == query["orderExternalId"]]
        chunk = orders[(page - 1) * limit: page * limit]
        return Response(200, {"results": [self._order_json(o) for o in chunk], "item_count": len(orders)})

    def _h_get_keys(self, order_id: str, query: dict[str, str], **_: Any) -> Response:
        path = f"/api/v2/order/{order_id}/keys"
        order = self.orders.get(order_id)
        if order is None:
            return self._not_found_order("GET", path, order_id)
        try:
            page, limit = self._paging(query)
        except _Refusal as refusal:
            return self._refuse(refusal, "GET", path)
        delivered = [(line, key) for line in order.lines for key in line.keys if key.status == "DELIVERED"]
        return Response(200, [
            {"id": key.id, "serial": key.serial, "type": key.type, "name": line.product.name,
             "kinguinId": line.product.kinguin_id, "offerId": line.product.offer_id,
             "productId": line.product.product_id}
            for line, key in delivered[(page - 1) * limit: page * limit]
        ])

    # ===================================================================================== placement
    def _place(self, body: Any, path: str) -> Response:
        try:
            request = self._validate(body)
            external_id = body.get("orderExternalId")
            if external_id is not None and any(o.order_external_id == external_id for o in self.orders.values()):
                raise _Refusal(self.duplicate_status, "ConstraintViolation",
                               "orderExternalId: This value is already used.",
                               propertyPath="orderExternalId", invalidValue=external_id)
            lines = self._match_offers(request)
            total = round(sum(product.price * qty for product, qty, _, _ in lines), 2)
            if total > self._balance + 1e-9:
                raise _Refusal(400, "InsufficientBalance", "Insufficient balance to place the order.")
        except _Refusal as refusal:
            return self._refuse(refusal, "POST", path)
        for product, qty, _, _ in lines:
            product.stock -= qty
        self._balance = round(self._balance - total, 2)
        order = self._new_order(external_id, lines, self.now())
        answer = self._order_json(order, with_keys=False)
        for line in order.lines:
            if line.mode == "instant":
                for key in line.keys:
                    self._deliver_key(key)
        self._settle(order)
        return Response(201, answer)

    def _validate(self, body: Any) -> list[dict[str, Any]]:
        def bad(prop: str, value: Any, detail: str) -> _Refusal:
            return _Refusal(400, "ConstraintViolation", f"{prop}: {detail}", propertyPath=prop, invalidValue=value)

        if not isinstance(body, dict):
            raise bad("", body, "The request body must be a JSON object.")
        products = body.get("products")
        if not isinstance(products, list) or not products:
            raise bad("products", products, "This value should not be blank.")
        if len(products) > 10:
            raise bad("products", len(products), "This collection should contain 10 elements or less.")
        if "orderExternalId" in body and not isinstance(body["orderExternalId"], str | None):
            raise bad("orderExternalId", body["orderExternalId"], "This value should be of type string.")
        offers = set()
        for i, item in enumerate(products):
            at = f"products[{i}]"
            if not isinstance(item, dict):
                raise bad(at, item, "This value should be of type object.")
            ident = item.get("productId")
            if not isinstance(ident, str):
                raise bad(f"{at}.productId", ident, "This value should be of type string.")
            qty = item.get("qty")
            if not isinstance(qty, int) or isinstance(qty, bool):
                raise bad(f"{at}.qty", qty, "This value should be of type int.")
            if not 1 <= qty <= 9:
                raise bad(f"{at}.qty", qty, "This value should be between 1 and 9.")
            price = item.get("price")
            if price is None:
                raise bad(f"{at}.price", price, "This value should not be blank.")
            if not isinstance(price, int | float) or isinstance(price, bool):
                raise bad(f"{at}.price", price, "This value should be of type float.")
            if not price > 0:
                raise bad(f"{at}.price", price, "This value should be positive.")
            if item.get("keyType") not in (None, "text"):
                raise bad(f"{at}.keyType", item["keyType"], 'The value you selected is not a valid choice ("text").')
            offer = item.get("offerId")
            if offer is not None:
                if not isinstance(offer, str) or offer in offers:
                    raise bad(f"{at}.offerId", offer, "Offer must be unique within the order.")
                offers.add(offer)
        return products

    def _match_offers(self, items: list[dict[str, Any]]) -> list[tuple[SimProduct, int, float, str]]:
        unavailable = _Refusal(422, "ProductUnavailable", "Unable to find any offer matching order request criteria")
        wanted: dict[str, int] = {}
        lines = []
        for item in items:
            product = self.products.get(item["productId"])
            if product is None or product.price > item["price"] + 1e-9:
                raise unavailable
            if item.get("offerId") is not None and item["offerId"] != product.offer_id:
                raise unavailable
            wanted[product.product_id] = wanted.get(product.product_id, 0) + item["qty"]
            if wanted[product.product_id] > product.stock:
                raise unavailable
            key_type = "text/plain" if item.get("keyType") == "text" else product.key_type
            lines.append((product, item["qty"], float(item["price"]), key_type))
        pre = [product for product, *_ in lines if product.is_preorder]
        if pre and len(lines) > 1:
            raise _Refusal(400, "Preorder", "A pre-order must be the only product of the order.")
        if pre and any(item.get("keyType") for item in items):
            raise _Refusal(400, "Preorder", "keyType is not allowed for pre-orders.")
        return lines

    def _new_order(self, external_id: str | None, lines: list[tuple[SimProduct, int, float, str]],
                   created_at: datetime) -> SimOrder:
        order_id = self._order_id()
        self._seq += 1
        sim_lines, number = [], 0
        for product, qty, request_price, key_type in lines:
            keys = []
            for _ in range(qty):
                number += 1
                key_id = self._hex24()
                serial = (f"KEY-{order_id}-{number}" if key_type == "text/plain"
                          else base64.b64encode(image_key_bytes(key_type, f"{order_id}-{number}")).decode())
                keys.append(SimKey(key_id, serial, key_type, "PENDING" if product.is_preorder else "PROCESSING"))
            mode, polls = _parse_mode(product.delivery_mode or self._mode)
            if product.is_preorder and (not product.release_date
                                        or date.fromisoformat(product.release_date) > self.now().date()):
                mode, polls = "manual", 0
            sim_lines.append(SimLine(product, qty, min(product.price, request_price), request_price, key_type,
                                     keys, mode, polls))
        preorder = next((ln.product for ln in sim_lines if ln.product.is_preorder), None)
        order = SimOrder(order_id, external_id, "processing", created_at, sim_lines,
                         round(sum(ln.price * ln.qty for ln in sim_lines), 2), is_preorder=preorder is not None,
                         preorder_release_date=preorder.release_date if preorder else None, seq=self._seq)
        self.orders[order_id] = order
        return order

    # ===================================================================================== helpers
    def _order_json(self, order: SimOrder, *, with_keys: bool = True) -> dict[str, Any]:
        products = []
        for line in order.lines:
            item: dict[str, Any] = {
                "kinguinId": line.product.kinguin_id, "offerId": line.product.offer_id,
                "productId": line.product.product_id, "qty": line.qty, "name": line.product.name,
                "price": line.price, "totalPrice": round(line.price * line.qty, 2),
                "requestPrice": line.request_price, "isPreorder": line.product.is_preorder,
                "keyType": "text" if line.key_type == "text/plain" else "image",
            }
            if line.product.release_date:
                item["releaseDate"] = line.product.release_date
            if with_keys:
                item["keys"] = [{"id": k.id, "status": k.status} for k in line.keys]
            products.append(item)
        answer: dict[str, Any] = {
            "orderId": order.order_id, "status": order.status,
            "totalPrice": round(sum(ln.price * ln.qty for ln in order.lines), 2),
            "requestTotalPrice": round(sum(ln.request_price * ln.qty for ln in order.lines), 2),
            "paymentPrice": order.payment_price, "totalQty": order.total_qty,
            "userEmail": "merchant@example.com", "storeId": 1, "createdAt": _iso(order.created_at),
            "isPreorder": order.is_preorder, "products": products,
        }
        if order.order_external_id is not None:
            answer["orderExternalId"] = order.order_external_id
        if order.is_preorder:
            answer["preorderReleaseDate"] = order.preorder_release_date
        return answer

    def _deliver_key(self, key: SimKey) -> None:
        key.status, key.delivered_at = "DELIVERED", self.now()

    def _settle(self, order: SimOrder) -> None:
        if order.status == "processing" and all(k.status == "DELIVERED" for k in order.keys):
            order.status = "completed"


    def _paging(self, query: dict[str, str]) -> tuple[int, int]:
        values = {}
        for name, default, top in (("page", 1, None), ("limit", 25, 100)):
            raw = query.get(name) or str(default)
            if not raw.isdigit() or int(raw) < 1 or (top and int(raw) > top):
                raise _Refusal(400, "ConstraintViolation", f"{name}: This value is not valid.",
                               propertyPath=name, invalidValue=raw)
            values[name] = int(raw)
        return values["page"], values["limit"]

    @staticmethod
    def _query_time(query: dict[str, str], name: str, *, end: bool = False) -> datetime:
        try:
            return _parse_time(query[name], end=end)
        except ValueError:
            raise _Refusal(400, "ConstraintViolation", f"{name}: This value is not a valid datetime.",
                           propertyPath=name, invalidValue=query[name]) from None

    def _refuse(self, refusal: _Refusal, method: str, path: str) -> Response:
        return Response(refusal.status, self.error_body(refusal.status, refusal.kind, refusal.detail,
                                                        method=method, path=path, **refusal.extra))

    def _not_found_order(self, method: str, path: str, order_id: str) -> Response:
        return self._refuse(_Refusal(404, "OrderNotFound", f'Order "{order_id}" not found.', orderId=order_id),
                            method, path)

    def _order_id(self) -> str:
        while True:
            candidate = "".join(self._rng.choice(_ALNUM) for _ in range(12))
            if candidate not in self.orders:
                return candidate

    def _hex24(self) -> str:
        return f"{self._rng.getrandbits(96):024x}"
