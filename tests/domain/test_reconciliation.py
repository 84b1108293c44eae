"""Pure classification of the reconciliation report: one class per order, the most serious first."""

import uuid

import pytest

from bitloot_reconcile.adapters.kinguin import KinguinOrder
from bitloot_reconcile.domain import reconciliation as rec
from bitloot_reconcile.domain.reconciliation import Evidence, Mismatch
from tests.fixtures.report import order


def supplier(external_id: str | None, status: str = "completed", *, price: float = 5.0, kid: str | None = None,
             created: str = "2026-03-10T12:05:00+00:00") -> KinguinOrder:
    return KinguinOrder.model_validate({
        "orderId": kid or uuid.uuid4().hex[:12].upper(), "orderExternalId": external_id, "status": status,
        "paymentPrice": price, "createdAt": created,
        "products": [{"productId": "kp", "qty": 1, "price": price}],
    })


def classes(frame) -> dict[str, str]:
    return dict(zip(frame["order_id"], frame["class"], strict=True))


def test_every_class_and_worst_first():
    ok = order("fulfilled", emailed=True)
    unpaid_ok = order("waiting", payments=("waiting",))
    missing_keys = order("fulfilled", items=2, keys=1, emailed=True)
    missing_object = order("fulfilled", emailed=True)
    canceled = order("paid", reservation="KCANCEL")
    unpaid_paid = order("confirming", payments=("waiting",))
    completed = order("paid", reservation="KDONE")
    processing = order("paid")  # found by orderExternalId after a placement intent
    not_placed = order("paid")
    overcharged = order("fulfilled", emailed=True, cost="4.00", reservation="KOVER")
    no_email = order("fulfilled")
    duplicated = order("paid", reservation="KDUP1")
    held = order("paid")  # Kinguin switched off in BitLoot: paid, not placed, and that is why
    orphan_id = str(uuid.uuid4())
    evidence = Evidence(
        orders=[ok, unpaid_ok, missing_keys, missing_object, canceled, unpaid_paid, completed, processing, not_placed,
                overcharged, no_email, duplicated, held],
        placement_intents={processing.id},
        held={held.id: "Kinguin is switched off in BitLoot"},
        supplier_orders=[
            supplier(canceled.id, "canceled", kid="KCANCEL"), supplier(completed.id, kid="KDONE"),
            supplier(processing.id, "processing"), supplier(overcharged.id, price=4.5, kid="KOVER"),
            supplier(duplicated.id, kid="KDUP1"), supplier(duplicated.id, "processing"),
            supplier(orphan_id), supplier(orphan_id), supplier(None, kid="KNOEXT"),
        ],
        payments_seen={unpaid_ok.id: (False, "NOWPayments says waiting"),
                       unpaid_paid.id: (True, "NOWPayments says finished")},
        missing_objects={missing_object.id: 1},
    )

    report = rec.classify(evidence)

    assert classes(report) == {
        orphan_id: "orphan_supplier_order", "(none: KNOEXT)": "orphan_supplier_order",
        duplicated.id: "duplicate_supplier_orders",
        missing_keys.id: "fulfilled_missing_keys", missing_object.id: "fulfilled_missing_keys",
        canceled.id: "supplier_canceled_or_refunded",
        unpaid_paid.id: "store_unpaid_but_payment_finished",
        completed.id: "supplier_completed_store_not_fulfilled",
        processing.id: "placed_not_delivered",
        held.id: "held_by_switch",
        not_placed.id: "paid_not_placed",
        overcharged.id: "price_mismatch",
        no_email.id: "fulfilled_missing_email",
        ok.id: "ok", unpaid_ok.id: "ok",
    }
    assert list(report["class"]) == sorted(report["class"], key=lambda c: rec.RANK[Mismatch(c)])
    rows = report.set_index("order_id")
    # Every finding is kept, the class is only the most serious one.
    assert rows.loc[orphan_id, "flags"] == "orphan_supplier_order,duplicate_supplier_orders"
    assert rows.loc[duplicated.id, "flags"] == "duplicate_supplier_orders,supplier_completed_store_not_fulfilled"
    assert rows.loc[canceled.id, "detail"] == "Kinguin canceled KCANCEL; store says paid"
    assert rows.loc[overcharged.id, "detail"] == "kp charged 4.50 > cost 4.00"
    assert rows.loc[orphan_id, "charged_eur"] == 10.0
    assert rows.loc[missing_keys.id, "severity"] == "error"
    assert rows.loc[no_email.id, "severity"] == "warn"
    assert rows.loc[held.id, "flags"] == "held_by_switch,paid_not_placed"
    assert rows.loc[held.id, "detail"].startswith("held by a BitLoot switch: Kinguin is switched off in BitLoot")

    counts = rec.class_counts(report)
    assert list(counts) == [cls.value for cls in Mismatch]
    assert counts == {"orphan_supplier_order": 2, "duplicate_supplier_orders": 1, "fulfilled_missing_keys": 2,
                      "supplier_canceled_or_refunded": 1, "store_unpaid_but_payment_finished": 1,
                      "supplier_completed_store_not_fulfilled": 1, "placed_not_delivered": 1,
                      "held_by_switch": 1, "paid_not_placed": 1, "price_mismatch": 1, "fulfilled_missing_email": 1,
                      "ok": 2}


@pytest.mark.parametrize(("charged", "mismatch"), [(5.0, False), (4.2, False), (5.004, False), (5.01, True)])
def test_price_mismatch_only_when_kinguin_charged_above_cost(charged, mismatch):
    done = order("fulfilled", emailed=True, reservation="K1")
    report = rec.classify(Evidence(orders=[done], supplier_orders=[supplier(done.id, price=charged, kid="K1")]))
    assert (report["class"][0] == "price_mismatch") is mismatch


def test_reservation_unknown_to_kinguin_is_paid_not_placed_and_a_supplier_order_found_by_id_counts():
    lost = order("paid", reservation="KLOST")
    placed_without_external_id = order("paid", reservation="KBYID")
    report = rec.classify(Evidence(orders=[lost, placed_without_external_id], unknown_reservations={"KLOST"},
                                   supplier_orders=[supplier(None, "processing", kid="KBYID")]))
    rows = report.set_index("order_id")
    assert rows.loc[lost.id, "detail"] == "kinguinReservationId KLOST unknown to Kinguin"
    assert rows.loc[placed_without_external_id.id, "class"] == "placed_not_delivered"
    assert len(report) == 2  # KBYID belongs to its store order: no orphan row


def test_empty_window():
    empty = rec.classify(Evidence(orders=[]))
    assert empty.empty and list(empty.columns) == rec.COLUMNS
    assert set(rec.class_counts(empty).values()) == {0}


def test_one_live_kinguin_order_beside_canceled_ones_is_fine_and_two_live_ones_are_flagged():
    replaced = order("fulfilled", emailed=True, reservation="KLIVE")
    twice = order("paid", reservation="KSECOND")
    report = rec.classify(Evidence(orders=[replaced, twice], supplier_orders=[
        supplier(replaced.id, "canceled", kid="KFIRST", price=0),
        supplier(f"{replaced.id}:r1", "refunded", kid="KREPL1", price=0),
        supplier(f"{replaced.id}:r2", kid="KLIVE"),
        supplier(twice.id, "processing", kid="KFIRST2"),  # never canceled: its replacement doubled the purchase
        supplier(f"{twice.id}:r1", kid="KSECOND"),
    ]))

    rows = report.set_index("order_id")
    assert rows.loc[replaced.id, "class"] == "ok"
    assert set(rows.loc[replaced.id, "kinguin_orders"].split(", ")) == {
        "KFIRST:canceled", "KREPL1:refunded", "KLIVE:completed"}
    assert rows.loc[twice.id, "class"] == "duplicate_supplier_orders"
    assert rows.loc[twice.id, "detail"].startswith("2 live Kinguin orders for one store order")
    assert len(report) == 2  # replacements belong to their store order: no orphan rows
