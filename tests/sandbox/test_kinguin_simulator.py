"""The Kinguin simulator speaks the documented protocol (raw HTTP checks, no client in between)."""

from __future__ import annotations

import base64
import re
import struct
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from bitloot_standins.httpserver import Fault
from bitloot_standins.kinguin import KinguinSimulator, image_key_bytes
from tests.fixtures.kinguin import CHEAP_PRODUCT, GIF_PRODUCT, KINGUIN_TEST_KEY, PNG_PRODUCT, TEXT_PRODUCT

ERROR_FIELDS = {"kind", "status", "detail", "type", "title", "path", "method", "timestamp", "trace"}


@pytest.fixture
def api(kinguin_sim):
    with httpx.Client(base_url=kinguin_sim.base_url + "/", headers={"X-Api-Key": KINGUIN_TEST_KEY},
                      timeout=2, verify=False) as client:  # plain http: skip loading CA certificates
        yield client


def order_body(*lines: dict[str, Any], eid: str | None = "ext-1") -> dict[str, Any]:
    body: dict[str, Any] = {"products": list(lines)}
    if eid is not None:
        body["orderExternalId"] = eid
    return body


def item(product: str = TEXT_PRODUCT, qty: int = 1, price: float = 5.0, **extra: Any) -> dict[str, Any]:
    return {"productId": product, "qty": qty, "price": price, **extra}


def assert_error(response: httpx.Response, status: int, kind: str, path: str | None = None) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body.keys() >= ERROR_FIELDS and body["kind"] == kind and body["status"] == status
    assert body["title"] == body["type"] and re.fullmatch(r"[0-9a-f]{10}", body["trace"])
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    assert body["path"].startswith("/api/") and "/esa" not in body["path"]
    if path:
        assert body["path"] == path
    return body


# -- transport -------------------------------------------------------------------------------------------
def test_base_url_and_auth(kinguin_sim):
    assert kinguin_sim.base_url == f"{kinguin_sim.url}/esa/api"
    for headers in ({}, {"X-Api-Key": "wrong"}, {"Api-Ecommerce-Auth": KINGUIN_TEST_KEY}):
        response = httpx.get(f"{kinguin_sim.base_url}/v1/order", headers=headers, verify=False)
        assert response.status_code == 401
        assert response.json() == {"kind": "Authorization", "status": 401, "detail": "Invalid authentication data.",
                                   "type": "Unauthorized"}


def test_unknown_route(api):
    body = assert_error(api.get("v1/nothing"), 404, "Http", "/api/v1/nothing")
    assert body["method"] == "GET"


@pytest.mark.parametrize("status, kind, reason", [(500, "Error", "Internal Server Error"),
                                                  (503, "Error", "Service Unavailable"),
                                                  (429, "Http", "Too Many Requests"),
                                                  (409, "ResourceLock", "Conflict"),
                                                  (422, "OrderFailed", "Unprocessable Content")])
def test_canned_errors_are_kinguin_shaped(kinguin_sim, api, status, kind, reason):
    kinguin_sim.inject("place_order_v2", Fault(status=status, retry_after=3 if status == 429 else None))
    response = api.post("v2/order", json=order_body(item()))
    body = assert_error(response, status, kind, "/api/v2/order")
    assert body["type"] == reason and body["method"] == "POST"
    assert response.headers.get("Retry-After") == ("3" if status == 429 else None)
    assert kinguin_sim.orders == {}


# -- placement -------------------------------------------------------------------------------------------
def test_place_an_order(kinguin_sim, api):
    response = api.post("v2/order", json=order_body(item(qty=2, price=9.99), eid=None))
    assert response.status_code == 201
    order = response.json()
    assert re.fullmatch(r"[A-Z0-9]{12}", order["orderId"]) and "orderExternalId" not in order
    assert order["status"] == "processing" and order["totalQty"] == 2 and order["isPreorder"] is False
    assert (order["totalPrice"], order["requestTotalPrice"], order["paymentPrice"]) == (10.0, 19.98, 10.0)
    [line] = order["products"]
    assert "keys" not in line
    assert (line["kinguinId"], line["productId"], line["price"], line["requestPrice"], line["totalPrice"]) == (
        1949, TEXT_PRODUCT, 5.0, 9.99, 10.0)
    assert datetime.fromisoformat(order["createdAt"]).utcoffset() == timedelta(0)
    assert kinguin_sim.requests_to("place_order_v2")[0].status == 201
    # GET shows the keys, in upper case, once delivered
    got = api.get(f"v1/order/{order['orderId']}").json()
    assert got["status"] == "completed"
    assert [k["status"] for k in got["products"][0]["keys"]] == ["DELIVERED", "DELIVERED"]
    assert kinguin_sim.balance == 9_990.0 and kinguin_sim.products[TEXT_PRODUCT].stock == 98


@pytest.mark.parametrize("body, prop", [
    (order_body(), "products"),
    ({"orderExternalId": "x"}, "products"),
    (order_body(*[item()] * 11), "products"),
    (order_body(item(qty=10)), "products[0].qty"),
    (order_body(item(), item(qty=0)), "products[1].qty"),
    (order_body(item(qty="2")), "products[0].qty"),
    (order_body({"productId": TEXT_PRODUCT, "qty": 1}), "products[0].price"),
    (order_body(item(price=0)), "products[0].price"),
    (order_body(item(price=-3)), "products[0].price"),
    (order_body({"qty": 1, "price": 5.0}), "products[0].productId"),
    (order_body(item(keyType="image")), "products[0].keyType"),
    (order_body(item(offerId="o1"), item(CHEAP_PRODUCT, price=1.0, offerId="o1")), "products[1].offerId"),
])
def test_place_validation(kinguin_sim, api, body, prop):
    error = assert_error(api.post("v2/order", json=body), 400, "ConstraintViolation", "/api/v2/order")
    assert error["propertyPath"] == prop and "invalidValue" in error
    assert kinguin_sim.orders == {} and kinguin_sim.balance == 10_000.0


@pytest.mark.parametrize("status", [422, 400])
def test_duplicate_external_id(kinguin_sim, api, status):
    kinguin_sim.duplicate_status = status
    assert api.post("v2/order", json=order_body(item(), eid="dup")).status_code == 201
    error = assert_error(api.post("v2/order", json=order_body(item(CHEAP_PRODUCT, price=1.0), eid="dup")), status,
                         "ConstraintViolation")
    assert error["propertyPath"] == "orderExternalId" and error["invalidValue"] == "dup"
    assert "already used" in error["detail"]
    assert len(kinguin_sim.orders) == 1 and kinguin_sim.balance == 9_995.0
    assert len(kinguin_sim.orders_for_external_id("dup")) == 1


def test_external_id_is_optional_and_not_unique_when_absent(kinguin_sim, api):
    for _ in range(2):
        assert api.post("v2/order", json=order_body(item(), eid=None)).status_code == 201
    assert len(kinguin_sim.orders) == 2


def test_unavailable_offers(kinguin_sim, api):
    cases = [order_body(item(price=4.99)),                      # offer price above the ceiling
             order_body(item(GIF_PRODUCT, 3, 5.0), item(GIF_PRODUCT, 3, 5.0)),  # 6 > stock 5 in total
             order_body(item(offerId="ffffffffffffffffffffffff")),  # no such offer
             order_body(item("000000000000000000000000"))]
    for body in cases:
        error = assert_error(api.post("v2/order", json=body), 422, "ProductUnavailable")
        assert error["detail"] == "Unable to find any offer matching order request criteria"
    assert kinguin_sim.orders == {} and kinguin_sim.products[GIF_PRODUCT].stock == 5


def test_insufficient_balance_creates_nothing(kinguin_sim, api):
    kinguin_sim.set_balance(9.99)
    assert_error(api.post("v2/order", json=order_body(item(qty=2))), 400, "InsufficientBalance")
    assert kinguin_sim.orders == {} and kinguin_sim.balance == 9.99
    assert kinguin_sim.products[TEXT_PRODUCT].stock == 100


def test_key_type_text_forces_text_keys(kinguin_sim, api):
    order_id = api.post("v2/order", json=order_body(item(PNG_PRODUCT, 1, 7.5, keyType="text"))).json()["orderId"]
    [key] = api.get(f"v2/order/{order_id}/keys").json()
    assert key["type"] == "text/plain" and key["serial"] == f"KEY-{order_id}-1"


def test_preorders(kinguin_sim, api):
    kinguin_sim.add_product("70a1b2c3d4e5f60718293a4b", price=50.0, is_preorder=True, release_date="2099-01-01")
    pre = item("70a1b2c3d4e5f60718293a4b", 1, 50.0)
    assert_error(api.post("v2/order", json=order_body(pre, item())), 400, "Preorder")
    assert_error(api.post("v2/order", json=order_body(dict(pre, keyType="text"))), 400, "Preorder")
    order = api.post("v2/order", json=order_body(pre)).json()
    assert order["isPreorder"] is True and order["preorderReleaseDate"] == "2099-01-01"
    got = api.get(f"v1/order/{order['orderId']}").json()
    assert got["status"] == "processing" and got["products"][0]["keys"][0]["status"] == "PENDING"


# -- orders ----------------------------------------------------------------------------------------------
def test_get_unknown_order(api):
    error = assert_error(api.get("v1/order/NOPE12345678"), 404, "OrderNotFound", "/api/v1/order/NOPE12345678")
    assert error["orderId"] == "NOPE12345678"
    assert_error(api.get("v2/order/NOPE12345678/keys"), 404, "OrderNotFound")


def test_search_filters_and_paging(kinguin_sim, api):
    t0 = datetime(2025, 3, 1, tzinfo=UTC)
    planted = [kinguin_sim.plant_order(f"e{i}", [(TEXT_PRODUCT if i % 2 else CHEAP_PRODUCT, 1)],
                                       created_at=t0 + timedelta(hours=i)) for i in range(30)]
    page1 = api.get("v1/order").json()
    assert page1["item_count"] == 30 and len(page1["results"]) == 25
    assert page1["results"][0]["orderExternalId"] == "e29"  # newest first
    assert [o["orderExternalId"] for o in api.get("v1/order", params={"page": 2}).json()["results"]] == [
        "e4", "e3", "e2", "e1", "e0"]
    assert api.get("v1/order", params={"page": 3}).json() == {"results": [], "item_count": 30}
    assert api.get("v1/order", params={"orderExternalId": "e3"}).json()["results"][0]["orderId"] == planted[3].order_id
    window = {"createdAtFrom": "2025-03-01 02:00:00", "createdAtTo": "2025-03-01T04:00:00+00:00"}
    assert api.get("v1/order", params=window).json()["item_count"] == 3
    assert api.get("v1/order", params={"createdAtFrom": "2025-03-02"}).json()["item_count"] == 6
    assert api.get("v1/order", params={"createdAtTo": "2025-03-01"}).json()["item_count"] == 24
    assert api.get("v1/order", params={"orderExternalId": "missing"}).json() == {"results": [], "item_count": 0}
    assert_error(api.get("v1/order", params={"limit": 101}), 400, "ConstraintViolation")
    assert_error(api.get("v1/order", params={"createdAtFrom": "yesterday"}), 400, "ConstraintViolation")


def test_keys_default_page_of_25(kinguin_sim, api):
    planted = kinguin_sim.plant_order("many", [(CHEAP_PRODUCT, 30)])
    path = f"v2/order/{planted.order_id}/keys"
    first, second = api.get(path).json(), api.get(path, params={"page": 2}).json()
    assert (len(first), len(second)) == (25, 5)
    assert api.get(path, params={"page": 3}).json() == []
    assert len(api.get(path, params={"limit": 100}).json()) == 30
    assert set(first[0]) == {"id", "serial", "type", "name", "kinguinId", "offerId", "productId"}
    assert [k["serial"] for k in first + second] == planted.serials
    assert_error(api.get(path, params={"limit": 101}), 400, "ConstraintViolation")


def test_manual_delivery_lists_only_delivered_keys(kinguin_sim, api):
    kinguin_sim.set_delivery_mode("manual", product_id=TEXT_PRODUCT)
    order = api.post("v2/order", json=order_body(item(qty=3), item(CHEAP_PRODUCT, 1, 1.0))).json()
    got = api.get(f"v1/order/{order['orderId']}").json()
    assert got["status"] == "processing"  # the cheap line delivered instantly, the text line waits
    assert [k["status"] for p in got["products"] for k in p["keys"]] == ["PROCESSING"] * 3 + ["DELIVERED"]
    assert len(api.get(f"v2/order/{order['orderId']}/keys").json()) == 1
    kinguin_sim.deliver(order["orderId"], n=2)
    assert len(api.get(f"v2/order/{order['orderId']}/keys").json()) == 3
    kinguin_sim.deliver(order["orderId"])
    assert api.get(f"v1/order/{order['orderId']}").json()["status"] == "completed"
    with pytest.raises(ValueError):
        kinguin_sim.deliver(order["orderId"])


def test_delivery_mode_is_validated(kinguin_sim):
    for bad in ("slow", "after_polls=x", "manual=3"):
        with pytest.raises(ValueError):
            kinguin_sim.delivery_mode = bad
    kinguin_sim.delivery_mode = "after_polls:2"
    assert kinguin_sim.delivery_mode == "after_polls:2"


def test_image_keys_are_valid_images(kinguin_sim, api):
    order_id = api.post("v2/order", json=order_body(item(PNG_PRODUCT, 1, 7.5), item(GIF_PRODUCT, 1, 3.25))).json()[
        "orderId"]
    png, gif = (base64.b64decode(k["serial"]) for k in api.get(f"v2/order/{order_id}/keys").json())
    assert png == image_key_bytes("image/png", f"{order_id}-1") and gif.startswith(b"GIF89a") and gif.endswith(b";")
    # every PNG chunk has a correct CRC and IDAT inflates
    pos = 8
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data, crc = png[pos + 8:pos + 8 + length], png[pos + 8 + length:pos + 12 + length]
        assert struct.unpack(">I", crc)[0] == zlib.crc32(kind + data)
        if kind == b"IDAT":
            assert zlib.decompress(data) == b"\x00\x00"
        pos += 12 + length
    jpeg = image_key_bytes("image/jpeg", "x")
    assert jpeg.startswith(b"\xff\xd8\xff\xfe") and jpeg.endswith(b"\xff\xd9")


# -- cancel, refund ------------------------------------------------------------------------------------
def test_cancel_and_refund(kinguin_sim, api):
    kinguin_sim.delivery_mode = "manual"
    first = api.post("v2/order", json=order_body(item(qty=2), eid="a")).json()["orderId"]
    second = api.post("v2/order", json=order_body(item(qty=2), eid="b")).json()["orderId"]
    kinguin_sim.deliver(second, n=1)
    kinguin_sim.cancel(first)
    kinguin_sim.refund(second)
    one, two = (api.get(f"v1/order/{oid}").json() for oid in (first, second))
    assert one["status"] == "canceled" and [k["status"] for k in one["products"][0]["keys"]] == ["CANCELED"] * 2
    assert two["status"] == "refunded" and [k["status"] for k in two["products"][0]["keys"]] == ["REFUNDED"] * 2
    assert api.get(f"v2/order/{second}/keys").json() == []
    assert kinguin_sim.balance == 10_000.0 - 10.0  # only the refund came back


# -- faults ---------------------------------------------------------------------------------------------
def test_lost_response_still_creates_the_order(kinguin_sim, api):
    kinguin_sim.inject("place_order_v2", Fault(lose_response=True))
    with pytest.raises(httpx.RemoteProtocolError):
        api.post("v2/order", json=order_body(item(), eid="lost"))
    assert len(kinguin_sim.orders_for_external_id("lost")) == 1 and kinguin_sim.balance == 9_995.0


def test_seeded_ids_are_deterministic():
    ids = []
    for _ in range(2):
        with KinguinSimulator(seed=7) as sim:
            sim.add_product("p", price=1.0)
            ids.append(sim.plant_order("x", [("p", 2)]).order_id)
    assert ids[0] == ids[1]
