"""KinguinClient against the Kinguin simulator over real sockets."""

from __future__ import annotations

import ast
import base64
import logging
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bitloot_reconcile.adapters import kinguin as kinguin_adapter
from bitloot_reconcile.adapters.errors import (
    DuplicateExternalIdError,
    NotFoundError,
    PermanentError,
    TransientError,
)
from bitloot_reconcile.adapters.kinguin import KinguinClient, KinguinOrder, OrderLine
from bitloot_standins.httpserver import Fault
from bitloot_standins.kinguin import image_key_bytes
from tests.fixtures.kinguin import (
    CHEAP_PRODUCT,
    GIF_PRODUCT,
    JPEG_PRODUCT,
    KINGUIN_TEST_KEY,
    PNG_PRODUCT,
    TEXT_PRODUCT,
)

EID = "5c91f65c-4b12-463c-9277-8cfc139ceda4"


def line(product_id: str = TEXT_PRODUCT, qty: int = 1, price: float = 5.0, **kw) -> OrderLine:
    return OrderLine(product_id=product_id, qty=qty, price=price, **kw)


# -- happy path ------------------------------------------------------------------------------------------
def test_place_poll_and_collect_keys(kinguin_sim, kinguin_client):
    placed = kinguin_client.place_order(EID, [line(qty=2, price=6.0), line(PNG_PRODUCT, 1, 7.5)])
    assert placed.order_external_id == EID and placed.status == "processing"
    assert len(placed.order_id) == 12 and placed.order_id.isalnum() and placed.order_id.isupper()
    assert placed.total_qty == 3 and placed.delivered_count == 0
    # price is a ceiling: sold at the offer price, the request price is kept
    text = placed.products[0]
    assert (text.price, text.request_price, text.total_price) == (5.0, 6.0, 10.0)
    assert (placed.total_price, placed.request_total_price, placed.payment_price) == (17.5, 19.5, 17.5)
    assert kinguin_sim.balance == 10_000 - 17.5

    order = kinguin_client.get_order(placed.order_id)
    assert order.status == "completed" and order.delivered_count == 3
    keys = kinguin_client.get_keys(order.order_id, expected=order.total_qty)
    assert [k.product_id for k in keys] == [TEXT_PRODUCT, TEXT_PRODUCT, PNG_PRODUCT]
    assert keys[0].serial.get_secret_value() == f"KEY-{order.order_id}-1"
    assert keys[0].content() == f"KEY-{order.order_id}-1".encode()
    assert keys[0].kinguin_id == 1949 and keys[0].name == "Text Game" and keys[0].offer_id
    # three calls on the happy path: place, status, one keys page
    routes = [r.route for r in kinguin_sim.requests]
    assert routes == ["place_order_v2", "get_order", "get_keys"]
    assert kinguin_sim.requests_to("get_keys")[0].query == {"page": "1", "limit": "100"}
    assert kinguin_sim.requests[0].headers["x-api-key"] == KINGUIN_TEST_KEY
    assert kinguin_sim.requests[0].body["products"][0] == {"productId": TEXT_PRODUCT, "qty": 2, "price": 6.0}


def test_offer_id_is_sent(kinguin_sim, kinguin_client):
    offer = kinguin_sim.products[TEXT_PRODUCT].offer_id
    order = kinguin_client.place_order(EID, [line(offer_id=offer)])
    assert order.products[0].offer_id == offer
    assert kinguin_sim.requests[0].body["products"][0]["offerId"] == offer


@pytest.mark.parametrize("lines, eid", [
    ([], EID),
    ([line()] * 11, EID),
    ([line(qty=0)], EID),
    ([line(qty=10)], EID),
    ([line(price=0)], EID),
    ([line(price=-1.0)], EID),
    ([line(price=float("nan"))], EID),
    ([line(product_id="")], EID),
    ([line(offer_id="a"), line(offer_id="a")], EID),
    ([line()], ""),
])
def test_place_order_validates_before_calling(kinguin_sim, kinguin_client, lines, eid):
    with pytest.raises(PermanentError):
        kinguin_client.place_order(eid, lines)
    assert kinguin_sim.requests == []


def test_model_parsing_is_lenient():
    order = KinguinOrder.model_validate({"orderId": "ABC", "status": "processing", "paymentPrice": "5.29",
                                         "products": [{"productId": "p", "qty": 1}], "unknownField": 1})
    assert order.payment_price == 5.29 and order.products[0].keys == [] and order.order_external_id is None


# -- search ----------------------------------------------------------------------------------------------
def test_search_filters(kinguin_sim, kinguin_client):
    t0 = datetime(2025, 1, 10, 12, 0, tzinfo=UTC)
    kinguin_sim.plant_order("old", [(TEXT_PRODUCT, 1)], created_at=t0 - timedelta(days=5))
    kinguin_sim.plant_order("mid", [(TEXT_PRODUCT, 1)], created_at=t0, status="processing")
    kinguin_sim.plant_order("new", [(TEXT_PRODUCT, 1)], created_at=t0 + timedelta(days=5), status="canceled")

    assert [o.order_external_id for o in kinguin_client.search_orders()] == ["new", "mid", "old"]
    assert [o.order_external_id for o in kinguin_client.search_orders(order_external_id="mid")] == ["mid"]
    assert kinguin_client.search_orders(order_external_id="nope") == []
    got = kinguin_client.search_orders(created_at_from=t0 - timedelta(days=1), created_at_to="2025-01-11")
    assert [o.order_external_id for o in got] == ["mid"]


def test_search_follows_every_page(kinguin_sim, kinguin_client):
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(230):
        kinguin_sim.plant_order(f"bulk-{i}", [(CHEAP_PRODUCT, 1)], created_at=t0 + timedelta(minutes=i))
    orders = kinguin_client.search_orders(created_at_from=t0)
    assert len(orders) == 230 == len({o.order_id for o in orders})
    assert orders[0].order_external_id == "bulk-229" and orders[-1].order_external_id == "bulk-0"
    assert [r.query["page"] for r in kinguin_sim.requests_to("search_orders")] == ["1", "2", "3"]

    kinguin_sim.requests.clear()
    assert len(kinguin_client.search_orders(page_size=25)) == 230
    assert len(kinguin_sim.requests_to("search_orders")) == 10  # 9 full pages + 1 short


# -- keys ------------------------------------------------------------------------------------------------
def test_ninety_keys_in_one_page(kinguin_sim, kinguin_client):
    order = kinguin_client.place_order(EID, [line(CHEAP_PRODUCT, 9, 1.0)] * 10)
    keys = kinguin_client.get_keys(order.order_id)
    assert len(keys) == 90 == len({k.id for k in keys})
    assert len(kinguin_sim.requests_to("get_keys")) == 1


@pytest.mark.parametrize("count, expected, calls", [(130, None, 2), (200, 200, 2), (200, None, 3), (100, 100, 1)])
def test_keys_paginate_past_100(kinguin_sim, kinguin_client, count, expected, calls):
    planted = kinguin_sim.plant_order("wholesale", [(CHEAP_PRODUCT, count)])
    keys = kinguin_client.get_keys(planted.order_id, expected=expected)
    assert [k.serial.get_secret_value() for k in keys] == planted.serials
    assert len(kinguin_sim.requests_to("get_keys")) == calls


def test_partial_delivery_while_processing(kinguin_sim, kinguin_client):
    kinguin_sim.delivery_mode = "manual"
    order_id = kinguin_client.place_order(EID, [line(qty=3)]).order_id
    order = kinguin_client.get_order(order_id)
    assert order.status == "processing" and {k.status for k in order.products[0].keys} == {"PROCESSING"}
    assert kinguin_client.get_keys(order_id) == []

    assert kinguin_sim.deliver(order_id, n=1) == 1
    order = kinguin_client.get_order(order_id)
    assert order.status == "processing" and order.delivered_count == 1
    assert len(kinguin_client.get_keys(order_id, expected=3)) == 1

    kinguin_sim.deliver(order_id)
    assert kinguin_client.get_order(order_id).status == "completed"
    assert len(kinguin_client.get_keys(order_id, expected=3)) == 3


def test_slow_delivery_after_polls(kinguin_sim, kinguin_client):
    kinguin_sim.set_delivery_mode("after_polls=2", product_id=TEXT_PRODUCT)
    order_id = kinguin_client.place_order(EID, [line(qty=2)]).order_id
    assert [kinguin_client.get_order(order_id).status for _ in range(3)] == ["processing", "processing",
                                                                             "completed"]


def test_image_keys_decode_to_exact_bytes(kinguin_sim, kinguin_client):
    order = kinguin_client.place_order(EID, [line(PNG_PRODUCT, 2, 7.5), line(JPEG_PRODUCT, 1, 8.0),
                                             line(GIF_PRODUCT, 1, 3.25), line(TEXT_PRODUCT, 1, 5.0)])
    keys = kinguin_client.get_keys(order.order_id, expected=5)
    magic = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8", "image/gif": b"GIF89a",
             "text/plain": b"KEY-"}
    assert [k.type for k in keys] == ["image/png", "image/png", "image/jpeg", "image/gif", "text/plain"]
    for n, key in enumerate(keys, start=1):
        data = key.content()
        assert data.startswith(magic[key.type])
        if key.type != "text/plain":
            assert data == image_key_bytes(key.type, f"{order.order_id}-{n}")
            assert base64.b64encode(data).decode() == key.serial.get_secret_value()
    assert keys[0].content() != keys[1].content()


# -- terminal statuses -----------------------------------------------------------------------------------
def test_canceled_order(kinguin_sim, kinguin_client):
    kinguin_sim.delivery_mode = "manual"
    order_id = kinguin_client.place_order(EID, [line(qty=2)]).order_id
    kinguin_sim.cancel(order_id)
    order = kinguin_client.get_order(order_id)
    assert order.status == "canceled" and {k.status for k in order.products[0].keys} == {"CANCELED"}
    assert kinguin_client.get_keys(order_id) == []
    assert kinguin_sim.balance == 10_000 - 10.0


def test_refunded_order_credits_the_balance(kinguin_sim, kinguin_client):
    order_id = kinguin_client.place_order(EID, [line(qty=2)]).order_id
    assert kinguin_sim.balance == 10_000 - 10.0
    kinguin_sim.refund(order_id)
    order = kinguin_client.get_order(order_id)
    assert order.status == "refunded" and {k.status for k in order.products[0].keys} == {"REFUNDED"}
    assert kinguin_client.get_keys(order_id) == []
    assert kinguin_sim.balance == 10_000.0


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_transient(kinguin_sim, kinguin_client, status):
    kinguin_sim.inject("place_order_v2", Fault(status=status))
    with pytest.raises(TransientError) as info:
        kinguin_client.place_order(EID, [line()])
    assert info.value.status == status and info.value.kind == "Error"
    assert kinguin_sim.orders == {}


def test_non_json_5xx_is_transient(kinguin_sim, kinguin_client):
    kinguin_sim.inject("get_order", Fault(status=502, body="<html>Bad gateway</html>"))
    with pytest.raises(TransientError) as info:
        kinguin_client.get_order("ABCDEFGHIJKL")
    assert info.value.status == 502 and info.value.kind is None


def test_429_honours_retry_after(kinguin_sim, kinguin_client):
    kinguin_sim.inject("search_orders", Fault(status=429, retry_after=7))
    with pytest.raises(TransientError) as info:
        kinguin_client.search_orders(order_external_id=EID)
    assert (info.value.status, info.value.kind, info.value.retry_after) == (429, "Http", 7.0)


def test_timeout_is_transient(kinguin_sim):
    kinguin_sim.inject("search_orders", Fault(latency=1.0))
    with KinguinClient(kinguin_sim.base_url, KINGUIN_TEST_KEY, timeout=0.2) as client, \
            pytest.raises(TransientError) as info:
        client.search_orders(order_external_id=EID)
    assert info.value.kind == "Timeout"


def test_connection_refused_is_transient():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with KinguinClient(f"http://127.0.0.1:{port}/esa/api", KINGUIN_TEST_KEY, timeout=1) as client, \
            pytest.raises(TransientError) as info:
        client.search_orders(order_external_id=EID)
    assert info.value.kind == "Connection"


def test_lost_response_then_duplicate_then_adopt(kinguin_sim, kinguin_client):
    kinguin_sim.inject("place_order_v2", Fault(lose_response=True))
    with pytest.raises(TransientError):
        kinguin_client.place_order(EID, [line()])
    [created] = kinguin_sim.orders_for_external_id(EID)  # the order exists although we never saw the answer
    with pytest.raises(DuplicateExternalIdError):
        kinguin_client.place_order(EID, [line()])
    [found] = kinguin_client.search_orders(order_external_id=EID)
    assert found.order_id == created.order_id
    assert kinguin_sim.balance == 10_000 - 5.0


@pytest.mark.parametrize("status", [422, 400])
def test_duplicate_external_id(kinguin_sim, kinguin_client, status):
    kinguin_sim.duplicate_status = status
    kinguin_client.place_order(EID, [line()])
    with pytest.raises(DuplicateExternalIdError) as info:
        kinguin_client.place_order(EID, [line(qty=2)])
    assert (info.value.status, info.value.kind) == (status, "ConstraintViolation")
    assert len(kinguin_sim.orders_for_external_id(EID)) == 1 == len(kinguin_sim.orders)
    assert kinguin_sim.balance == 10_000 - 5.0


def test_duplicate_recognised_by_detail_at_any_status(kinguin_sim, kinguin_client):
    body = kinguin_sim.error_body(409, "OrderFailed", f"Order with orderExternalId {EID} already used")
    kinguin_sim.inject("place_order_v2", Fault(status=409, body=body))
    with pytest.raises(DuplicateExternalIdError):
        kinguin_client.place_order(EID, [line()])


def test_constraint_violation_on_qty_is_not_a_duplicate(kinguin_sim, kinguin_client):
    body = kinguin_sim.error_body(400, "ConstraintViolation", "products[0].qty: This value should be between 1 and 9.",
                                  propertyPath="products[0].qty", invalidValue=12)
    kinguin_sim.inject("place_order_v2", Fault(status=400, body=body))
    with pytest.raises(PermanentError) as info:
        kinguin_client.place_order(EID, [line()])
    assert not isinstance(info.value, DuplicateExternalIdError)
    assert (info.value.status, info.value.kind) == (400, "ConstraintViolation")


def test_resource_lock_is_transient(kinguin_sim, kinguin_client):
    kinguin_sim.inject("get_order", Fault(status=409))
    with pytest.raises(TransientError) as info:
        kinguin_client.get_order("ABCDEFGHIJKL")
    assert (info.value.status, info.value.kind) == (409, "ResourceLock")


def test_insufficient_balance(kinguin_sim, kinguin_client):
    kinguin_sim.set_balance(4.99)
    with pytest.raises(PermanentError) as info:
        kinguin_client.place_order(EID, [line()])
    assert (info.value.status, info.value.kind) == (400, "InsufficientBalance")
    assert kinguin_sim.orders == {} and kinguin_sim.balance == 4.99


@pytest.mark.parametrize("product, qty, price", [(TEXT_PRODUCT, 1, 4.99), (GIF_PRODUCT, 6, 5.0),
                                                 ("000000000000000000000000", 1, 5.0)])
def test_product_unavailable(kinguin_sim, kinguin_client, product, qty, price):
    with pytest.raises(PermanentError) as info:
        kinguin_client.place_order(EID, [line(product, qty, price)])
    assert (info.value.status, info.value.kind) == (422, "ProductUnavailable")
    assert "Unable to find any offer" in str(info.value)
    assert kinguin_sim.orders == {} and kinguin_sim.balance == 10_000 and kinguin_sim.products[GIF_PRODUCT].stock == 5


def test_order_failed(kinguin_sim, kinguin_client):
    kinguin_sim.inject("place_order_v2", Fault(status=422))
    with pytest.raises(PermanentError) as info:
        kinguin_client.place_order(EID, [line()])
    assert (info.value.status, info.value.kind) == (422, "OrderFailed")
    assert kinguin_client.search_orders(order_external_id=EID) == []


def test_bad_api_key(kinguin_sim):
    with KinguinClient(kinguin_sim.base_url, "wrong-key-XYZ", timeout=2) as client, \
            pytest.raises(PermanentError) as info:
        client.search_orders(order_external_id=EID)
    assert (info.value.status, info.value.kind) == (401, "Authorization")
    assert "Invalid authentication data." in str(info.value) and "wrong-key-XYZ" not in str(info.value)


def test_order_not_found(kinguin_client):
    with pytest.raises(NotFoundError) as info:
        kinguin_client.get_order("5c91f65c-4b12-463c-9277-8cfc139ceda4")
    assert (info.value.status, info.value.kind) == (404, "OrderNotFound")
    with pytest.raises(NotFoundError):
        kinguin_client.get_keys("NOSUCHORDER1")


def test_error_body_with_type_only(kinguin_sim, kinguin_client):
    kinguin_sim.inject("get_order", Fault(status=404, body={"kind": "HttpClient", "status": 404, "type": "Not Found"}))
    with pytest.raises(NotFoundError, match="HttpClient: Not Found"):
        kinguin_client.get_order("ABCDEFGHIJKL")


# -- secrets ---------------------------------------------------------------------------------------------
def test_no_secret_in_logs_or_errors(kinguin_sim, kinguin_client, caplog):
    caplog.set_level(logging.DEBUG)
    errors = []
    order = kinguin_client.place_order(EID, [line(qty=2), line(PNG_PRODUCT, 1, 7.5)])
    kinguin_client.get_order(order.order_id)
    keys = kinguin_client.get_keys(order.order_id, expected=3)
    kinguin_client.search_orders(order_external_id=EID)
    for fault_route, fault, call in [
        ("place_order_v2", None, lambda: kinguin_client.place_order(EID, [line()])),
        ("get_keys", Fault(status=503), lambda: kinguin_client.get_keys(order.order_id)),
        ("get_order", Fault(lose_response=True), lambda: kinguin_client.get_order(order.order_id)),
    ]:
        if fault:
            kinguin_sim.inject(fault_route, fault)
        with pytest.raises(Exception) as info:
            call()
        errors.append(f"{info.value!s} {info.value!r}")
    with KinguinClient(kinguin_sim.base_url, KINGUIN_TEST_KEY + "x", timeout=2) as bad, \
            pytest.raises(PermanentError) as info:
        bad.get_keys(order.order_id)
    errors.append(str(info.value))

    secrets = [KINGUIN_TEST_KEY] + [k.serial.get_secret_value() for k in keys]
    assert len(secrets) == 4 and any(k.type == "image/png" for k in keys)
    text = caplog.text + "\n".join(errors) + repr(keys) + repr(kinguin_client)
    assert "kinguin POST /v2/order -> 201" in caplog.text and "/keys -> 200" in caplog.text
    for secret in secrets:
        assert secret not in text
    assert "**********" in repr(keys)


# -- packaging -------------------------------------------------------------------------------------------
def test_resource_builds_a_client(kinguin_sim):
    from bitloot_reconcile.resources.kinguin import KinguinResource

    resource = KinguinResource(base_url=kinguin_sim.base_url, api_key=KINGUIN_TEST_KEY, timeout_seconds=2)
    with resource.get_client() as client:
        assert client.search_orders(order_external_id=EID) == []
    assert KinguinResource(api_key="k").base_url == "https://gateway.kinguin.net/esa/api"


def test_adapter_does_not_import_dagster():
    tree = ast.parse(Path(kinguin_adapter.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "dagster" for name in imported)


def test_product_read_gives_the_offers_and_none_when_out_of_stock(kinguin_sim, kinguin_client):
    gif = kinguin_client.get_product(GIF_PRODUCT)
    assert (gif.product_id, gif.price, gif.qty) == (GIF_PRODUCT, 3.25, 5)
    assert [(o.price, o.qty) for o in gif.offers] == [(3.25, 5)]
    kinguin_client.place_order(EID, [line(GIF_PRODUCT, 5, 3.25)])  # buys the whole stock
    assert kinguin_client.get_product(GIF_PRODUCT) is None  # Kinguin answers 404 for a product out of stock
    assert kinguin_client.get_product("000000000000000000000000") is None
    assert [r.route for r in kinguin_sim.requests].count("get_product") == 3
