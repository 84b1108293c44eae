"""The guarded writes to BitLoot's tables: statuses, the supplier order id, keys and the email flag."""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa

from bitloot_reconcile.store import schema
from bitloot_reconcile.store.repository import utcnow
from tests.store.rows import OLD, insert_order, key_rows, new_id, order_row


def test_mark_paid_from_unconfirmed_states(engine, store):
    for status in ("waiting", "confirming", "failed"):
        order_id, _ = insert_order(engine, status=status)
        before = utcnow().replace(tzinfo=None) - dt.timedelta(seconds=1)
        assert store.mark_paid(order_id) is True, status
        row = order_row(engine, order_id)
        assert row["status"] == "paid"
        assert row["updatedAt"].tzinfo is None and row["updatedAt"] >= before  # naive UTC, like BitLoot's
        assert row["createdAt"] == OLD


def test_mark_paid_refused_from_other_states(engine, store):
    for status in ("created", "paid", "underpaid", "expired", "fulfilled", "refunded", "cancelled"):
        order_id, _ = insert_order(engine, status=status)
        assert store.mark_paid(order_id) is False, status
        row = order_row(engine, order_id)
        assert (row["status"], row["updatedAt"]) == (status, OLD)


def test_mark_fulfilled_only_from_paid(engine, store):
    order_id, _ = insert_order(engine, status="paid")
    assert store.mark_fulfilled(order_id) is True
    assert order_row(engine, order_id)["status"] == "fulfilled"
    assert store.mark_fulfilled(order_id) is False  # already fulfilled: not rewritten
    assert order_row(engine, order_id)["status"] == "fulfilled"


def test_mark_fulfilled_never_overwrites(engine, store):
    """Above all never over an admin's refunded/cancelled, and never over an order that is not paid."""
    statuses = ("refunded", "cancelled", "fulfilled", "created", "waiting", "confirming", "failed", "underpaid")
    for status in (*statuses, "expired"):
        order_id, _ = insert_order(engine, status=status)
        assert store.mark_fulfilled(order_id) is False, status
        row = order_row(engine, order_id)
        assert (row["status"], row["updatedAt"]) == (status, OLD)


def test_mark_fulfilled_after_admin_refund_meanwhile(engine, store):
    """The run loaded a paid order; an admin refunded it before the run got to mark it fulfilled."""
    order_id, _ = insert_order(engine, status="paid")
    assert store.load_order(order_id).status == "paid"
    with engine.begin() as conn:
        conn.execute(sa.update(schema.orders).where(schema.orders.c.id == order_id).values(status="refunded"))
    assert store.mark_fulfilled(order_id) is False
    assert order_row(engine, order_id)["status"] == "refunded"


def test_status_writes_on_unknown_order(engine, store):
    assert store.mark_paid(new_id()) is False
    assert store.mark_fulfilled(new_id()) is False


def test_status_writes_touch_only_their_order(engine, store):
    order_id, _ = insert_order(engine, status="paid")
    other_id, _ = insert_order(engine, status="paid")
    assert store.mark_fulfilled(order_id)
    assert order_row(engine, other_id)["status"] == "paid"


# --- supplier order id ------------------------------------------------------------------------------------------
def test_save_reservation_id_never_overwrites(engine, store):
    order_id, _ = insert_order(engine)
    store.save_reservation_id(order_id, "PHS84FJAG5U")
    assert order_row(engine, order_id)["kinguinReservationId"] == "PHS84FJAG5U"
    store.save_reservation_id(order_id, "OTHER000001")
    assert order_row(engine, order_id)["kinguinReservationId"] == "PHS84FJAG5U"
    assert order_row(engine, order_id)["status"] == "paid"


def test_save_reservation_id_keeps_one_bitloot_saved(engine, store):
    order_id, _ = insert_order(engine, kinguinReservationId="BITLOOT0001")
    store.save_reservation_id(order_id, "OURS0000001")
    row = order_row(engine, order_id)
    assert (row["kinguinReservationId"], row["updatedAt"]) == ("BITLOOT0001", OLD)


# --- keys --------------------------------------------------------------------------------------------------------
def test_record_stored_key_one_row_per_item_even_when_called_twice(engine, store):
    order_id, [text_item, image_item] = insert_order(engine, items=2)
    text_ref = f"orders/{order_id}/key-{text_item[:8]}.txt"
    image_ref = f"orders/{order_id}/key-{image_item[:8]}.png"

    store.record_stored_key(order_id, text_item, text_ref, "text/plain", "https://r2.example/text?sig=1")
    store.record_stored_key(order_id, image_item, image_ref, "image/png", "https://r2.example/image?sig=1")
    store.record_stored_key(order_id, text_item, text_ref, "text/plain", "https://r2.example/text?sig=2")  # a re-run

    [text_key] = key_rows(engine, text_item)
    assert (text_key["storageRef"], text_key["contentType"], text_key["encryptionKey"]) == (
        text_ref,
        "text/plain",
        "raw:text/plain",
    )
    assert text_key["downloadCount"] == 0 and text_key["viewedAt"] is None
    uuid.UUID(text_key["id"])
    [image_key] = key_rows(engine, image_item)
    assert (image_key["storageRef"], image_key["contentType"], image_key["encryptionKey"]) == (
        image_ref,
        "image/png",
        "raw:image/png",
    )

    items = {item.id: item for item in store.load_order(order_id).items}
    assert items[text_item].signed_url == "https://r2.example/text?sig=2"  # a fresh link replaces the old one
    assert items[image_item].signed_url == "https://r2.example/image?sig=1"
    assert items[text_item].key_refs == (text_ref,)
    assert items[text_item].delivered and items[image_item].delivered
    assert order_row(engine, order_id)["status"] == "paid"  # recording a key does not touch the order


def test_record_stored_key_leaves_an_existing_key_row_alone(engine, store):
    """An item BitLoot already delivered keeps its keys row; only the link is refreshed."""
    order_id, [item_id] = insert_order(engine)
    key_id = new_id()
    with engine.begin() as conn:
        conn.execute(
            sa.insert(schema.keys).values(
                id=key_id,
                orderItemId=item_id,
                storageRef="orders/x/key-old.txt",
                encryptionKey="raw:text/plain",
                downloadCount=3,
                createdAt=OLD,
                updatedAt=OLD,
            )
        )
    store.record_stored_key(order_id, item_id, f"orders/{order_id}/key-{item_id[:8]}.txt", "text/plain", "https://new")
    [row] = key_rows(engine, item_id)
    assert (row["id"], row["storageRef"], row["downloadCount"], row["updatedAt"]) == (
        key_id,
        "orders/x/key-old.txt",
        3,
        OLD,
    )


# --- email flag -------------------------------------------------------------------------------------------------
def test_mark_email_sent(engine, store):
    order_id, _ = insert_order(engine, status="fulfilled")
    other_id, _ = insert_order(engine, status="fulfilled")
    assert store.load_order(order_id).completion_email_sent is False
    store.mark_email_sent(order_id)
    row = order_row(engine, order_id)
    assert row["completionEmailSent"] is True
    assert row["status"] == "fulfilled"
    first_update = row["updatedAt"]
    assert first_update > OLD
    store.mark_email_sent(order_id)  # again: nothing changes
    assert order_row(engine, order_id)["updatedAt"] == first_update
    assert store.load_order(order_id).completion_email_sent is True
    assert order_row(engine, other_id)["completionEmailSent"] is False
