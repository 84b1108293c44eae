"""The dry-run planner: what the next run would do, from what the store rows and the read calls say.

The readers here are in-memory stand-ins that have only the read methods, so a write would fail loudly.
"""

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import pytest

from bitloot_reconcile.adapters.errors import NotFoundError, TransientError
from bitloot_reconcile.adapters.kinguin import KinguinKey, KinguinOffer, KinguinOrder, KinguinProduct
from bitloot_reconcile.adapters.nowpayments import PaymentInfo
from bitloot_reconcile.domain.delivery import key_object_path
from bitloot_reconcile.domain.planning import LEFT_ALONE, UNKNOWN, plan_order
from bitloot_reconcile.domain.switches import Switches
from bitloot_reconcile.store.repository import EmailBounce, Item, Order, Payment, ReconcileState

NOW = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.UTC)


class Kinguin:
    def __init__(self, *orders: KinguinOrder, keys: dict[str, list[KinguinKey]] | None = None, down: bool = False,
                 offers: dict[str, tuple[float, int]] | None = None):
        self.orders, self.keys, self.down, self.calls = list(orders), keys or {}, down, []
        self.offers = {"kp": (5.0, 100)} if offers is None else offers

    def get_order(self, order_id):
        self.calls.append(("get_order", order_id))
        if self.down:
            raise TransientError("kinguin", "GET /v1/order -> 503")
        return next(o for o in self.orders if o.order_id == order_id)

    def search_orders(self, *, order_external_id=None):
        self.calls.append(("search_orders", order_external_id))
        return [o for o in self.orders if o.order_external_id == order_external_id]

    def get_keys(self, order_id, *, expected=None):
        self.calls.append(("get_keys", order_id))
        return self.keys.get(order_id, [])

    def get_product(self, product_id):
        self.calls.append(("get_product", product_id))
        price, qty = self.offers.get(product_id, (None, 0))
        if not qty:
            return None  # Kinguin answers 404 for a product without stock
        return KinguinProduct(product_id=product_id, price=price, qty=qty,
                              offers=[KinguinOffer(offer_id="o1", price=price, qty=qty)])


class Payments:
    def __init__(self, **statuses: str):
        self.statuses = statuses

    def get_payment(self, payment_id):
        if payment_id not in self.statuses:
            raise NotFoundError("nowpayments", "404")
        return PaymentInfo(payment_id=payment_id, payment_status=self.statuses[payment_id])


class Vault:
    def __init__(self, *paths: str):
        self.paths = set(paths)

    def exists(self, path):
        return path in self.paths


def order(status="paid", *, items=2, delivered=0, reservation=None, payments=("finished",), emailed=False,
          source="kinguin", cost="5.00") -> Order:
    return Order(
        id=str(uuid.uuid4()), email="c@example.com", status=status, source_type=source, total=Decimal("10"),
        kinguin_reservation_id=reservation, completion_email_sent=emailed, created_at=NOW, updated_at=NOW,
        items=tuple(
            Item(id=f"{n:08d}-0000-0000-0000-000000000000", product_id="p", quantity=1, unit_price=Decimal("5"),
                 source_type=source, signed_url="u" if n < delivered else None, product_title="Game",
                 product_source_type=source, kinguin_product_id="kp" if source == "kinguin" else None,
                 kinguin_offer_id=None, product_cost=Decimal(cost), is_preorder=False,
                 key_refs=("ref",) if n < delivered else ())
            for n in range(items)
        ),
        payments=tuple(Payment(external_id=f"pay{n}", status=s) for n, s in enumerate(payments)),
    )


def supplier(external_id, status="completed", *, kid="K1", delivered=0, created="2026-03-10T11:00:00+00:00"):
    keys = [{"id": f"k{n}", "status": "DELIVERED" if n < delivered else "PROCESSING"} for n in range(2)]
    return KinguinOrder.model_validate({"orderId": kid, "orderExternalId": external_id, "status": status,
                                        "createdAt": created,
                                        "products": [{"productId": "kp", "qty": 2, "keys": keys}]})


def keys(n, kid_prefix="k"):
    return [KinguinKey.model_validate({"id": f"{kid_prefix}{i}", "serial": f"S{i}", "productId": "kp"})
            for i in range(n)]


def plan(o, *, state=None, assignments=None, kinguin=None, payments=None, vault=None, admin=False,
         flags=None, bounce=None):
    return plan_order(o, state or ReconcileState(order_id=o.id), assignments or {}, kinguin=kinguin or Kinguin(),
                      payments=payments or Payments(), vault=vault or Vault(), now=NOW, admin=admin,
                      switches=Switches.from_rows(flags or {}), bounce=bounce)


def test_paid_order_without_supplier_order_would_be_placed_without_any_call():
    o = order()
    kinguin = Kinguin()
    p = plan(o, kinguin=kinguin)
    assert p.steps == ("place Kinguin order (2 x kp at <= 5.00)",
                       "poll it (waiting for supplier if Kinguin has not delivered yet)", "collect and store keys",
                       "mark fulfilled", "send completion email")
    assert p.outcome == "fulfilled"
    assert kinguin.calls == [("get_product", "kp")]  # only the offer check: the run's happy path does not search


def test_unpaid_orders_pass_only_on_a_confirmed_payment():
    assert plan(order("waiting", payments=())).why == "no payment recorded for this order"
    pending = plan(order("waiting", payments=("waiting",)), payments=Payments(pay0="confirming"))
    assert (pending.outcome, pending.why) == ("payment_not_confirmed",
                                              "payment not confirmed (NOWPayments says confirming)")
    assert plan(order("failed", payments=("waiting",))).why == (
        "payment not confirmed (NOWPayments does not know payment pay0)")
    paid = plan(order("confirming", payments=("waiting",)), payments=Payments(pay0="finished"))
    assert paid.steps[0] == "verify payment (NOWPayments says finished) and mark paid"
    assert paid.steps[1].startswith("place Kinguin order")


def test_after_a_placement_intent_the_existing_supplier_order_is_adopted_live_one_first():
    o = order()
    kinguin = Kinguin(supplier(o.id, "canceled", kid="KOLD", created="2026-03-10T10:00:00+00:00"),
                      supplier(o.id, "completed", kid="KLIVE"), keys={"KLIVE": keys(2)})
    p = plan(o, state=ReconcileState(order_id=o.id, placement_intent_at=NOW), kinguin=kinguin)
    assert p.steps == ("adopt Kinguin order KLIVE (found by orderExternalId after an earlier attempt)",
                       "poll Kinguin order KLIVE (completed)", "collect 2 delivered key(s)", "store 2 key(s) in R2",
                       "mark fulfilled", "send completion email")
    assert p.outcome == "fulfilled"


def test_keys_stored_by_an_earlier_attempt_are_found_in_r2():
    o = order(reservation="K1")
    first = o.items[0]
    delivered = keys(2)
    vault = Vault(key_object_path(o.id, first.id, "text/plain"))
    p = plan(o, assignments={first.id: "k0"}, kinguin=Kinguin(supplier(o.id), keys={"K1": delivered}), vault=vault)
    assert "store 2 key(s) in R2, 1 already in R2 from an earlier attempt" in p.steps


@pytest.mark.parametrize(
    ("status", "delivered", "stored", "outcome", "why"),
    [
        ("processing", 0, 0, "waiting_for_supplier", "Kinguin order K1 is processing"),
        ("processing", 1, 0, "waiting_for_supplier", "1 of 2 keys delivered by Kinguin so far"),
        ("processing", 1, 1, "waiting_for_supplier", "Kinguin order K1 is processing"),
        ("canceled", 0, 0, "needs_attention", "supplier canceled Kinguin order K1"),
        ("refunded", 2, 0, "needs_attention", "supplier refunded Kinguin order K1"),
    ],
)
def test_supplier_states(status, delivered, stored, outcome, why):
    o = order(reservation="K1", delivered=stored)
    p = plan(o, kinguin=Kinguin(supplier(o.id, status, delivered=delivered), keys={"K1": keys(delivered)}))
    assert (p.outcome, p.why) == (outcome, why)
    assert p.steps[0] == f"poll Kinguin order K1 ({status})"


def test_refusals_and_the_sweeps_holds():
    assert plan(order(source="custom")).why == "custom-inventory items are not handled here"
    assert plan(order(cost="0")).outcome == "needs_attention"
    done = order("fulfilled", delivered=2, emailed=True)
    assert (plan(done, admin=True).outcome, plan(done, admin=True).why) == (LEFT_ALONE, "Order is already fulfilled")
    assert (plan(done).outcome, plan(done).why) == ("already_fulfilled", "fulfilled and emailed before this run")
    assert "'expired'; only paid" in plan(order("expired")).why
    assert plan(order(items=0)).why.endswith("has no items")

    o = order()
    leased = ReconcileState(order_id=o.id, lease_owner="run-1", lease_expires_at=NOW + dt.timedelta(minutes=5))
    assert plan(o, state=leased, admin=True).outcome == "busy"
    expired_lease = dataclasses.replace(leased, lease_expires_at=NOW - dt.timedelta(minutes=1))
    assert plan(o, state=expired_lease).outcome == "fulfilled"
    # A lease without an expiry never lapses: the claim would refuse the run, as the sweep skips the order.
    forever = dataclasses.replace(leased, lease_expires_at=None)
    assert (plan(o, state=forever).outcome, plan(o, state=forever).why) == (
        "busy", "run run-1 holds the lease (no expiry)")
    parked = ReconcileState(order_id=o.id, last_outcome="needs_attention", last_reason="insufficient balance")
    assert plan(o, state=parked).why == "needs attention: insufficient balance; only an admin retry runs it"
    assert plan(o, state=parked, admin=True).outcome == "fulfilled"
    backing_off = ReconcileState(order_id=o.id, next_attempt_at=NOW + dt.timedelta(hours=1))
    assert plan(o, state=backing_off).why == "backing off until 2026-03-10 13:00 UTC"


def test_fulfilled_without_email_only_sends_it_and_an_outage_is_reported_not_raised():
    assert plan(order("fulfilled", delivered=2)).steps == ("send completion email",)
    down = plan(order(reservation="K1"), kinguin=Kinguin(down=True))
    assert down.outcome == UNKNOWN
    assert down.why == "could not check: kinguin: GET /v1/order -> 503"


def test_an_item_row_of_more_than_one_unit_would_need_a_person_before_any_call():
    o = order(items=1)
    o = dataclasses.replace(o, items=(dataclasses.replace(o.items[0], quantity=3),))
    kinguin = Kinguin()
    p = plan(o, kinguin=kinguin)
    assert (p.outcome, p.steps) == ("needs_attention", ())
    assert "one unit each (quantity 1)" in p.why
    assert kinguin.calls == []


@pytest.mark.parametrize(("offers", "bought"), [({}, False), ({"kp": (6.0, 100)}, False), ({"kp": (5.0, 1)}, False),
                                                ({"kp": (4.5, 2)}, True)],
                         ids=["out-of-stock", "price-above-cost", "too-few", "cheaper-offer"])
def test_a_placement_is_checked_against_kinguins_offers_first(offers, bought):
    p = plan(order(), kinguin=Kinguin(offers=offers))
    if bought:
        assert (p.outcome, p.why) == ("fulfilled", "keys stored and email sent")
    else:
        assert (p.outcome, p.why) == ("needs_attention",
                                      "product unavailable at Kinguin (out of stock or price above cost)")
        assert p.steps == ("place Kinguin order (2 x kp at <= 5.00)",)


def test_bitloots_switches_hold_the_plan_where_they_hold_the_run():
    o = order()
    assert (plan(o, flags={"auto_fulfill_enabled": False}).outcome, plan(o, admin=True,
            flags={"auto_fulfill_enabled": False}).outcome) == ("paused", "fulfilled")
    assert plan(o, admin=True, flags={"maintenance_mode": True}).why == "BitLoot is in maintenance mode"
    kinguin = Kinguin()
    held = plan(order("waiting", payments=("finished",)), kinguin=kinguin, flags={"kinguin_enabled": False})
    assert (held.outcome, held.why) == ("paused", "Kinguin is switched off in BitLoot")
    assert held.steps == ("verify payment (payment row confirmed) and mark paid",) and kinguin.calls == []
    email_off = plan(order("fulfilled", delivered=2), flags={"email_notifications_enabled": False})
    assert (email_off.outcome, email_off.why) == (
        "paused", "keys delivered; completion email waits: email notifications are switched off in BitLoot")
    bounce = EmailBounce(type="hard", reason="550 no such user", bounced_at=NOW)
    suppressed = plan(o, bounce=bounce)
    assert (suppressed.outcome, suppressed.steps[-1]) == ("fulfilled", "mark fulfilled")
    assert suppressed.why.startswith("keys delivered; completion email suppressed: the address has a hard bounce")
