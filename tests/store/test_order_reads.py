"""One order's reads: the order with its items, products, keys and payments, on PostgreSQL and on SQLite."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import sqlalchemy as sa

from bitloot_reconcile.store import schema
from bitloot_reconcile.store.repository import Store
from bitloot_standins.seed import SeedProduct, insert_product
from tests.store.rows import OLD, insert_order, new_id


def test_load_order_with_items_products_payments_and_keys(engine, store):
    order_id = new_id()
    kinguin_product, custom_product = new_id(), new_id()
    item_ids = sorted(new_id() for _ in range(3))
    with engine.begin() as conn:
        for values in [
            dict(
                id=kinguin_product,
                slug="elden-ring-pc",
                title="Elden Ring (PC)",
                sourceType="kinguin",
                kinguinId=12345,
                kinguinProductId="5c9b5f6b2539a4e8f172916a",
                kinguinOfferId="offer-77",
                cost=Decimal("23.45"),
                price=Decimal("29.99"),
                isPreorder=True,
            ),
            dict(id=custom_product, slug="gift-card", title="Gift card", price=Decimal("10")),
        ]:
            conn.execute(sa.insert(schema.products).values(**values))
        conn.execute(
            sa.insert(schema.orders).values(
                id=order_id,
                email="gamer@example.com",
                status="paid",
                sourceType="kinguin",
                totalCrypto=Decimal("26.99100000"),
                kinguinReservationId="PHS84FJAG5U",
                completionEmailSent=False,
                createdAt=OLD,
                updatedAt=OLD + dt.timedelta(minutes=1),
            )
        )
        for values in [
            dict(
                id=item_ids[0],
                orderId=order_id,
                productId=kinguin_product,
                unitPrice=Decimal("29.99"),
                productSourceType="kinguin",
                signedUrl="https://r2.example/a",
            ),
            dict(id=item_ids[1], orderId=order_id, productId=kinguin_product, productSourceType="kinguin"),
            dict(id=item_ids[2], orderId=order_id, productId=custom_product),
        ]:
            conn.execute(sa.insert(schema.order_items).values(**values))
        conn.execute(
            sa.insert(schema.keys).values(
                id=new_id(), orderItemId=item_ids[0], storageRef=f"orders/{order_id}/key-{item_ids[0][:8]}.txt"
            )
        )
        for values in [
            dict(id=new_id(), orderId=order_id, externalId="4000000001", status="failed", createdAt=OLD),
            dict(
                id=new_id(),
                orderId=order_id,
                externalId="4000000002",
                status="finished",
                createdAt=OLD + dt.timedelta(seconds=5),
            ),
        ]:
            conn.execute(sa.insert(schema.payments).values(**values))
        # another order's rows must not leak in
        other_id = new_id()
        conn.execute(sa.insert(schema.orders).values(id=other_id, email="x@example.com"))
        conn.execute(sa.insert(schema.order_items).values(id=new_id(), orderId=other_id, productId=custom_product))
        conn.execute(sa.insert(schema.payments).values(id=new_id(), orderId=other_id, externalId="4000000003"))

    order = store.load_order(order_id)

    assert order is not None
    assert (order.id, order.email, order.status, order.source_type) == (
        order_id,
        "gamer@example.com",
        "paid",
        "kinguin",
    )
    assert order.total == Decimal("26.991")
    assert order.kinguin_reservation_id == "PHS84FJAG5U"
    assert order.completion_email_sent is False
    assert (order.created_at, order.updated_at) == (OLD, OLD + dt.timedelta(minutes=1))
    assert [p.external_id for p in order.payments] == ["4000000001", "4000000002"]
    assert [p.status for p in order.payments] == ["failed", "finished"]

    assert [item.id for item in order.items] == item_ids
    first, second, third = order.items
    assert first.product_id == kinguin_product
    assert first.product_title == "Elden Ring (PC)"
    assert first.product_source_type == "kinguin"
    assert first.kinguin_product_id == "5c9b5f6b2539a4e8f172916a"
    assert first.kinguin_offer_id == "offer-77"
    assert first.product_cost == Decimal("23.45")
    assert first.is_preorder is True
    assert (first.quantity, first.unit_price, first.source_type) == (1, Decimal("29.99"), "kinguin")
    assert first.signed_url == "https://r2.example/a"
    assert first.key_refs == (f"orders/{order_id}/key-{item_ids[0][:8]}.txt",)
    assert first.delivered
    assert second.kinguin_product_id == "5c9b5f6b2539a4e8f172916a"
    assert (second.signed_url, second.key_refs, second.delivered) == (None, (), False)
    assert third.product_title == "Gift card"
    assert (third.product_source_type, third.kinguin_product_id, third.is_preorder) == ("custom", None, False)


def test_load_order_item_whose_product_is_gone(engine, store):
    order_id, [item_id] = insert_order(engine)  # productId points at no products row (no FK in BitLoot)
    [item] = store.load_order(order_id).items
    assert item.id == item_id
    assert (item.product_title, item.kinguin_product_id, item.product_cost, item.is_preorder) == (
        None,
        None,
        None,
        False,
    )


def test_load_order_matches_a_product_only_by_its_uuid_text_as_bitloot_writes_it(store_engine):
    """The product is found through its primary key, yet only `productId` text equal to `products.id::varchar`
    (lowercase, dashed) matches, as before: other spellings of the uuid and text that is no uuid match no product
    and fail nothing."""
    store = Store(store_engine)
    product = insert_product(store_engine, SeedProduct("5c9b68662539a4e8f17ae2fe", "Hades (PC)"))
    spellings = [product.id, product.id.upper(), product.id.replace("-", ""), f"{{{product.id}}}", "not-a-uuid", ""]
    order_id, item_ids = insert_order(store_engine, items=len(spellings))
    with store_engine.begin() as conn:
        for item_id, text in zip(item_ids, spellings, strict=True):
            conn.execute(sa.update(schema.order_items).where(schema.order_items.c.id == item_id)
                         .values(productId=text))
    titles = {item.product_id: item.product_title for item in store.load_order(order_id).items}
    assert titles == {product.id: "Hades (PC)", **{text: None for text in spellings[1:]}}


def test_load_order_without_items_or_payments(engine, store):
    order_id, _ = insert_order(engine, items=0)
    order = store.load_order(order_id)
    assert (order.items, order.payments) == ((), ())


def test_load_order_unknown_returns_none(engine, store):
    insert_order(engine)
    assert store.load_order(new_id()) is None


def test_load_order_item_with_two_key_rows_and_an_order_with_two_payments(engine, store):
    # BitLoot's `keys` may hold old duplicates for an item; the item is still listed once, with both refs.
    order_id, [first, second] = insert_order(engine, items=2)
    with engine.begin() as conn:
        for ref in ("a.txt", "b.txt"):
            conn.execute(sa.insert(schema.keys).values(id=new_id(), orderItemId=first, storageRef=ref))
        for number, status in enumerate(["waiting", "finished"]):
            conn.execute(sa.insert(schema.payments).values(
                id=new_id(), orderId=order_id, externalId=f"50000000{number}", status=status,
                createdAt=OLD + dt.timedelta(seconds=number)))

    order = store.load_order(order_id)

    assert [item.id for item in order.items] == sorted([first, second])
    by_id = {item.id: item for item in order.items}
    assert sorted(by_id[first].key_refs) == ["a.txt", "b.txt"]
    assert by_id[second].key_refs == ()
    assert [(p.external_id, p.status) for p in order.payments] == [("500000000", "waiting"), ("500000001", "finished")]
