"""The remedies' pure rules: the bound over cost, the replacement external ids, the request's shape."""

from decimal import Decimal

import pytest

from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.domain.remedies import (
    PriceBound,
    Remedy,
    Resolution,
    ceiling_refusal,
    external_id_order,
    price_against_cost,
    replacement_external_id,
    unit_price,
)
from tests.fixtures.report import order

ORDER_ID = "5c91f65c-4b12-463c-9277-8cfc139ceda4"


@pytest.mark.parametrize(("cost", "percent", "eur", "limit"), [
    ("5.00", 20, 5, "6.00"),    # the percentage is the lower
    ("50.00", 20, 5, "55.00"),  # the amount is the lower
    ("9.99", 20, 5, "11.99"),   # rounded to the cent
    ("5.00", 0, 5, "5.00"),     # a shop that allows nothing over cost
])
def test_the_bound_is_the_lower_of_the_two_limits(cost, percent, eur, limit):
    assert PriceBound(percent, eur).limit(Decimal(cost)) == Decimal(limit)


def test_a_ceiling_is_refused_above_the_bound_of_any_line_it_raises_and_when_it_raises_none():
    two = order("paid", items=2, cost="5.00")
    bound = PriceBound(20, 5)
    assert ceiling_refusal(two, Decimal("6.00"), bound) is None
    assert "at most 6.00" in ceiling_refusal(two, Decimal("6.01"), bound)
    assert "would change nothing" in ceiling_refusal(two, Decimal("5.00"), bound)
    assert unit_price(Decimal("5.00"), Decimal("6.00")) == Decimal("6.00")
    assert unit_price(Decimal("30.00"), Decimal("6.00")) == Decimal("30.00")  # never below a line's cost


def test_replacement_external_ids_are_deterministic_and_read_back():
    assert replacement_external_id(ORDER_ID, 2) == f"{ORDER_ID}:r2"
    assert external_id_order(f"{ORDER_ID}:r2") == (ORDER_ID, 2)
    assert external_id_order(ORDER_ID.upper()) == (ORDER_ID, 0)
    for foreign in (None, "", "demo-1", f"{ORDER_ID}:r0", f"{ORDER_ID}:x1"):
        assert external_id_order(foreign) is None
    with pytest.raises(ValueError):
        replacement_external_id(ORDER_ID, 0)


def test_a_remedy_request_is_checked_and_labelled():
    assert Remedy.from_fields(6).label == "max_unit_price_eur=6.00"
    assert not Remedy.from_fields()
    both = Remedy.from_fields("6.5", True)
    assert both.label == "max_unit_price_eur=6.50,replace_canceled_supplier_order"
    assert both.as_config() == {"max_unit_price_eur": 6.5, "replace_canceled_supplier_order": True}
    assert Remedy.from_fields(resolution="written_off").resolution is Resolution.written_off
    combined = {"resolution": "written_off", "replace_canceled_supplier_order": True}
    for bad, message in [({"max_unit_price_eur": "abc"}, "is not a number"),
                         ({"max_unit_price_eur": float("inf")}, "above 0 EUR"),
                         ({"resolution": "lost"}, "resolution must be one of"),
                         (combined, "cannot be combined")]:
        with pytest.raises(InvalidRequest, match=message):
            Remedy.from_fields(**bad)


def test_the_price_paid_is_said_against_cost_only_above_it():
    one = order("paid", items=1, cost="5.00")
    product = one.items[0].kinguin_product_id
    assert price_against_cost(one, [(product, 5.8)]) == f"paid 5.80 per unit for {product} against cost 5.00 (+0.80)"
    assert price_against_cost(one, [(product, 4.5), ("other", 99.0), (product, None)]) is None
