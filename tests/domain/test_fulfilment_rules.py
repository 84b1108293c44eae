"""Pure rules of the recovery: order lines for Kinguin, request validation, the email's wording."""

import dataclasses
import datetime as dt
from decimal import Decimal

import pytest

from bitloot_reconcile.domain.completion_email import completion_html, completion_subject
from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.fulfilment import check_launch, kinguin_lines, parse_order_id
from bitloot_reconcile.store.repository import Item, Order

ORDER_ID = "5c91f65c-4b12-463c-9277-8cfc139ceda4"


def item(n: int, product: str = "p1", cost: str = "4.5", source: str = "kinguin", offer: str | None = None) -> Item:
    return Item(id=f"00000000-0000-0000-0000-{n:012d}", product_id=f"bitloot-{product}", quantity=1,
                unit_price=Decimal("7.99"), source_type=source, signed_url=None, product_title=f"<Game {product}>",
                product_source_type=source, kinguin_product_id=product if source == "kinguin" else None,
                kinguin_offer_id=offer, product_cost=Decimal(cost), is_preorder=False)


def order(items: list[Item]) -> Order:
    now = dt.datetime(2026, 11, 27)
    return Order(id=ORDER_ID, email="c@example.com", status="paid", source_type="kinguin", total=Decimal("23.97"),
                 kinguin_reservation_id=None, completion_email_sent=False, created_at=now, updated_at=now,
                 items=tuple(items))


def test_units_are_aggregated_per_product_and_offer():
    lines = kinguin_lines(order([item(1), item(2), item(3, "p2", "3"), item(4, "p2", "3", offer="o1")]))
    assert [(line.product_id, line.qty, line.price, line.offer_id) for line in lines] == [
        ("p1", 2, 4.5, None), ("p2", 1, 3.0, None), ("p2", 1, 3.0, "o1")]


def test_lines_refused_for_custom_items_missing_cost_and_kinguin_limits():
    assert kinguin_lines(order([item(1), item(2, source="custom")])) == "custom-inventory items are not handled here"
    assert "has no cost" in kinguin_lines(order([item(1, cost="0")]))
    assert "exceeds Kinguin's limits" in kinguin_lines(order([item(n) for n in range(10)]))
    assert "exceeds Kinguin's limits" in kinguin_lines(order([item(n, f"p{n}") for n in range(11)]))


def test_order_id_and_the_launch_check():
    assert parse_order_id(f"  {ORDER_ID.upper()} ") == ORDER_ID
    for bad in ("", "123", "5c91f65c-not-a-uuid"):
        with pytest.raises(InvalidRequest, match="not a valid order uuid"):
            parse_order_id(bad)
    assert check_launch(f" {ORDER_ID.upper()}", "ticket 42", "ops@bitloot.io") == ORDER_ID
    with pytest.raises(InvalidRequest, match="reason must not be empty"):
        check_launch(ORDER_ID, " ", "ops@bitloot.io")
    with pytest.raises(InvalidRequest, match="requested_by must not be empty"):
        check_launch(ORDER_ID, "ticket", "")
    with pytest.raises(InvalidRequest, match="reason must not contain control characters"):
        check_launch(ORDER_ID, "ticket\x0042", "ops@bitloot.io")


def test_completion_email_links_to_the_order_and_escapes_titles():
    o = order([item(1), item(2), item(3, "p2")])
    html = completion_html(o, "https://bitloot.io/")
    assert completion_subject(o) == "Your BitLoot Purchase is Ready — Order #5C91F65C"
    assert f'href="https://bitloot.io/orders/{ORDER_ID}/success"' in html
    assert "&lt;Game p1&gt;</td><td>2</td>" in html
    assert "Total Paid: €23.97" in html
    assert "<Game" not in html


def test_item_is_delivered_only_with_url_and_key_row():
    base = item(1)
    assert not base.delivered
    assert not dataclasses.replace(base, signed_url="https://x").delivered
    assert dataclasses.replace(base, signed_url="https://x", key_refs=("orders/x",)).delivered
