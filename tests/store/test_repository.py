"""Store reads and guarded writes, on PostgreSQL and on SQLite, and against a BitLoot-shaped database."""

from __future__ import annotations

import datetime as dt
import shutil
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from bitloot_reconcile.store import schema
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import upgrade
from bitloot_reconcile.store.repository import LeaseLost, Store, utcnow
from bitloot_standins.seed import SeedProduct, insert_email_bounce, insert_product, set_feature_flag
from bitloot_standins.seed import insert_order as insert_seeded_order
from tests.store import bitloot_ddl as ddl

OLD = dt.datetime(2026, 1, 2, 3, 4, 5)  # BitLoot timestamps are naive UTC


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated SQLite store file, copied for each test (quicker than migrating each time)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "store.db"
    engine = create_store_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request, tmp_path) -> Iterator[sa.Engine]:
    if request.param == "postgresql":
        yield request.getfixturevalue("store_engine")
        return
    path = tmp_path / "store.db"
    shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
    engine = create_store_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine) -> Store:
    return Store(engine)


def insert_order(engine: sa.Engine, *, status: str = "paid", items: int = 1, **values) -> tuple[str, list[str]]:
    order_id = new_id()
    item_ids = [new_id() for _ in range(items)]
    with engine.begin() as conn:
        conn.execute(
            sa.insert(schema.orders).values(
                id=order_id,
                email="gamer@example.com",
                status=status,
                sourceType="kinguin",
                totalCrypto=Decimal("29.99"),
                createdAt=OLD,
                updatedAt=OLD,
                **values,
            )
        )
        for item_id in item_ids:
            conn.execute(
                sa.insert(schema.order_items).values(
                    id=item_id, orderId=order_id, productId=new_id(), createdAt=OLD, updatedAt=OLD
                )
            )
    return order_id, item_ids


def order_row(engine: sa.Engine, order_id: str):
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.orders).where(schema.orders.c.id == order_id)).mappings().one()


def key_rows(engine: sa.Engine, item_id: str) -> list:
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.keys).where(schema.keys.c.orderItemId == item_id)).mappings().all()


# --- load_order ---------------------------------------------------------------------------------------------
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


# --- guarded status writes ------------------------------------------------------------------------------------
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


# --- one attempt's view ---------------------------------------------------------------------------------------
def count_statements(engine: sa.Engine) -> list[str]:
    seen: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    return seen


def test_an_attempts_view_applies_its_own_writes_and_reads_again_when_a_guarded_write_changed_nothing(engine, store):
    order_id, (item_id,) = insert_order(engine)
    store.claim(order_id, "run-1", dt.timedelta(minutes=5))
    view = store.for_attempt()
    statements = count_statements(engine)

    first = view.load_order(order_id)
    assert view.load_order(order_id) is first
    assert len(statements) == 2  # the order with its payments, the items with their keys

    # Its own writes are applied to what it read, without reading the order again.
    view.save_reservation_id(order_id, "MINE0000001", owner="run-1")
    view.record_stored_key(order_id, item_id, "keys/a.txt", "text/plain", "https://signed", owner="run-1")
    assert view.mark_fulfilled(order_id, owner="run-1")
    writes = len(statements)
    kept = view.load_order(order_id)
    assert len(statements) == writes
    assert (kept.status, kept.kinguin_reservation_id) == ("fulfilled", "MINE0000001")
    assert (kept.items[0].key_refs, kept.items[0].signed_url, kept.items[0].delivered) == (
        ("keys/a.txt",), "https://signed", True)
    assert kept == Store(engine).load_order(order_id)  # what the database holds

    # Someone else's change is not seen until a guarded write of the view changes nothing, or a fresh read.
    Store(engine).mark_email_sent(order_id)
    assert view.load_order(order_id).completion_email_sent is False
    assert view.load_order(order_id, fresh=True).completion_email_sent is True
    Store(engine).replace_reservation_id(order_id, "MINE0000001", "THEIRS00001")
    assert view.load_order(order_id).kinguin_reservation_id == "MINE0000001"
    assert not view.replace_reservation_id(order_id, "MINE0000001", "MINE0000002", owner="run-1")
    assert view.load_order(order_id).kinguin_reservation_id == "THEIRS00001"


def test_an_attempts_view_keeps_the_state_its_claim_returned_and_renews_a_fresh_lease_without_a_statement(
        engine, store):
    order_id, _ = insert_order(engine)
    view = store.for_attempt()
    statements = count_statements(engine)
    ttl = dt.timedelta(minutes=5)
    assert view.claim(order_id, "run-1", ttl)
    assert len(statements) == 1  # one upsert, returning the row
    state = view.get_state(order_id)
    assert (state.lease_owner, state.attempts) == ("run-1", 1)
    assert view.renew_lease(order_id, "run-1", ttl)
    view.record_placement_intent(order_id, owner="run-1")
    assert len(statements) == 2
    assert view.get_state(order_id).placement_intent_at is not None

    # A longer lease than the one it holds is renewed in the database; so is one that has lapsed.
    assert view.renew_lease(order_id, "run-1", ttl * 10)
    assert len(statements) == 3
    assert view.get_state(order_id) == Store(engine).get_state(order_id)  # what the database holds
    assert view.finish_run(order_id, "run-1", last_outcome="fulfilled")
    assert view.get_state(order_id).lease_owner is None  # read again after the outcome


def test_an_attempts_view_renews_a_lapsed_lease_in_the_database_and_loses_it_to_a_run_that_took_it(engine, store):
    order_id, _ = insert_order(engine)
    view = store.for_attempt()
    assert view.claim(order_id, "run-1", dt.timedelta(seconds=-1))  # lapsed at once
    assert Store(engine).claim(order_id, "run-2", dt.timedelta(minutes=5))
    assert not view.renew_lease(order_id, "run-1", dt.timedelta(minutes=5))
    with pytest.raises(LeaseLost):
        view.record_placement_intent(order_id, owner="run-1")
    assert Store(engine).get_state(order_id).lease_owner == "run-2"


def test_the_views_of_a_sharing_store_read_the_flags_once_per_max_age(engine, store):
    set_feature_flag(engine, "kinguin_enabled", True)
    sharing = store.sharing_flags(max_age_seconds=0.5)
    statements = count_statements(engine)
    first, second = sharing.for_attempt(), sharing.for_attempt()
    assert first.feature_flags()["kinguin_enabled"] is True
    set_feature_flag(engine, "kinguin_enabled", False)
    statements.clear()
    assert second.feature_flags()["kinguin_enabled"] is True  # the shared read, not yet half a second old
    assert statements == []
    time.sleep(0.5)
    assert first.feature_flags()["kinguin_enabled"] is False
    assert len(statements) == 1
    assert store.feature_flags()["kinguin_enabled"] is False  # a plain store reads every time
    assert len(statements) == 2


def test_a_plain_store_reads_the_order_every_time(engine, store):
    order_id, _ = insert_order(engine)
    statements = count_statements(engine)
    store.load_order(order_id)
    store.load_order(order_id)
    assert len(statements) == 4
    Store(engine).save_reservation_id(order_id, "THEIRS00001")
    assert store.load_order(order_id).kinguin_reservation_id == "THEIRS00001"


def test_a_failed_write_of_the_view_still_drops_what_it_kept(engine, store):
    order_id, _ = insert_order(engine)
    store.claim(order_id, "run-1", dt.timedelta(minutes=5))
    view = store.for_attempt()
    view.load_order(order_id)
    Store(engine).mark_fulfilled(order_id)
    with pytest.raises(LeaseLost):
        view.mark_email_sent(order_id, owner="run-2")
    assert view.load_order(order_id).status == "fulfilled"


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


# --- the project's own tables -------------------------------------------------------------------------------------
def test_record_placement_intent_is_idempotent(store):
    order_id = new_id()
    assert store.get_state(order_id).placement_intent_at is None
    store.record_placement_intent(order_id)
    first = store.get_state(order_id).placement_intent_at
    assert first is not None and first.tzinfo is not None
    assert abs(first - utcnow()) < dt.timedelta(seconds=30)
    store.record_placement_intent(order_id)
    assert store.get_state(order_id).placement_intent_at == first


def test_record_placement_intent_keeps_the_lease(store):
    order_id = new_id()
    assert store.claim(order_id, "run-a", dt.timedelta(minutes=5))
    store.record_placement_intent(order_id)
    state = store.get_state(order_id)
    assert (state.lease_owner, state.attempts) == ("run-a", 1)
    assert state.placement_intent_at is not None


def test_assign_key_is_unique_per_kinguin_key(store):
    order_id, items = new_id(), [new_id() for _ in range(3)]
    store.assign_key(order_id, items[0], "kinguin-key-1")
    store.assign_key(order_id, items[1], "kinguin-key-2")
    assert store.key_assignments(order_id) == {items[0]: "kinguin-key-1", items[1]: "kinguin-key-2"}

    with pytest.raises(sa.exc.IntegrityError):  # one Kinguin key never goes to two items
        store.assign_key(order_id, items[2], "kinguin-key-1")
    with pytest.raises(sa.exc.IntegrityError):  # and an item never gets a second key
        store.assign_key(order_id, items[0], "kinguin-key-3")
    assert store.key_assignments(order_id) == {items[0]: "kinguin-key-1", items[1]: "kinguin-key-2"}
    assert store.key_assignments(new_id()) == {}


def test_update_state_and_get_state(store):
    order_id = new_id()
    assert store.get_state(order_id).attempts == 0  # no row yet: defaults
    later = utcnow() + dt.timedelta(minutes=3)
    store.update_state(order_id, next_attempt_at=later, last_outcome="waiting_for_supplier", last_run_id="r1")
    state = store.get_state(order_id)
    assert state.next_attempt_at == later
    assert (state.last_outcome, state.last_run_id, state.attempts) == ("waiting_for_supplier", "r1", 0)


def test_append_audit_and_trail_order(store):
    order_id, other_id = new_id(), new_id()
    actions = ["claimed", "payment_verified", "supplier_order_placed", "keys_stored", "fulfilled"]
    for n, action in enumerate(actions):
        store.append_audit(
            order_id=order_id,
            action=action,
            trigger="admin" if n == 0 else "sensor",
            actor="admin@bitloot.io" if n == 0 else None,
            reason="webhook missed" if n == 0 else None,
            run_id=f"run-{n}",
            outcome="ok",
            detail=None if n else "first",
        )
        store.append_audit(
            order_id=other_id, action=action, trigger="sensor", actor=None, reason=None, run_id=None, outcome=None
        )

    trail = store.audit_trail(order_id)
    assert [entry["action"] for entry in trail] == actions
    assert [entry["run_id"] for entry in trail] == [f"run-{n}" for n in range(5)]
    ids = [entry["id"] for entry in trail]
    assert ids == sorted(ids)
    first = trail[0]
    assert (first["order_id"], first["trigger"], first["actor"], first["reason"], first["detail"]) == (
        order_id,
        "admin",
        "admin@bitloot.io",
        "webhook missed",
        "first",
    )
    stamps = [entry["created_at"] for entry in trail]
    assert all(stamp.tzinfo is not None for stamp in stamps)
    assert stamps == sorted(stamps)
    assert abs(stamps[-1] - utcnow()) < dt.timedelta(seconds=30)
    assert store.audit_trail(new_id()) == []


# --- against a BitLoot-shaped database (its DDL, its extra columns, its rows) -----------------------------------
@pytest.fixture
def bitloot_store(empty_pg_url) -> Iterator[tuple[Store, dict[str, str], str]]:
    ids = ddl.populate_bitloot_database(empty_pg_url)
    engine = create_store_engine(empty_pg_url)
    upgrade(engine)
    yield Store(engine), ids, empty_pg_url
    engine.dispose()


def test_store_on_a_bitloot_database_touches_only_what_it_owns(bitloot_store):
    store, ids, url = bitloot_store
    raw = sa.create_engine(url)
    try:
        with raw.connect() as conn:
            products_before = ddl.row_snapshot(conn, ["products", "users", "promocodes", "webhook_logs"])
            columns_before = ddl.column_snapshot(conn)

        order = store.load_order(ids["order_paid"])
        assert order.status == "paid" and order.total == Decimal("26.991")
        [item] = order.items
        assert item.kinguin_product_id == "5c9b5f6b2539a4e8f172916a"
        assert item.product_cost == Decimal("23.45")
        assert [(p.external_id, p.status) for p in order.payments] == [("5077125051", "finished")]
        fulfilled = store.load_order(ids["order_fulfilled"])
        assert fulfilled.items[0].key_refs == ("orders/x/key-abc.txt",)
        assert fulfilled.items[0].delivered

        assert store.claim(ids["order_paid"], "run-a", dt.timedelta(minutes=5))
        store.save_reservation_id(ids["order_paid"], "PHS84FJAG5V")
        store.save_reservation_id(ids["order_fulfilled"], "SHOULDNOTSET")
        store.record_stored_key(order.id, item.id, f"orders/{order.id}/key-{item.id[:8]}.txt", "text/plain", "https://x")
        assert store.mark_fulfilled(ids["order_paid"])
        store.mark_email_sent(ids["order_paid"])
        assert not store.mark_paid(ids["order_fulfilled"])
        assert store.mark_paid(ids["order_waiting"])

        with raw.connect() as conn:
            assert ddl.row_snapshot(conn, ["products", "users", "promocodes", "webhook_logs"]) == products_before
            assert ddl.column_snapshot(conn) == columns_before
            key = conn.execute(
                sa.text('SELECT "downloadCount", "contentType", "encryptionKey" FROM keys WHERE "orderItemId" = :i'),
                {"i": item.id},
            ).one()
            assert tuple(key) == (0, "text/plain", "raw:text/plain")
            orders = {
                str(r.id): r
                for r in conn.execute(
                    sa.text('SELECT id, status, "kinguinReservationId", "completionEmailSent", "userId" FROM orders')
                )
            }
        assert orders[ids["order_paid"]].status == "fulfilled"
        assert orders[ids["order_paid"]].kinguinReservationId == "PHS84FJAG5V"
        assert orders[ids["order_paid"]].completionEmailSent is True
        assert str(orders[ids["order_paid"]].userId) == ids["user"]
        assert orders[ids["order_fulfilled"]].kinguinReservationId == "PHS84FJAG5U"
        assert orders[ids["order_waiting"]].status == "paid"
    finally:
        raw.dispose()


def test_seeding_fills_bitloots_required_product_columns(bitloot_store):
    """BitLoot's `products.slug` is NOT NULL without a default: the sandbox seeding must set it."""
    store, _, url = bitloot_store
    game = insert_product(store.engine, SeedProduct("5c9b68662539a4e8f17ae2fe", "Hollow Knight: Silksong"))
    order_id = insert_seeded_order(store.engine, [game, game])

    [item, _] = store.load_order(order_id).items
    assert item.kinguin_product_id == "5c9b68662539a4e8f17ae2fe" and item.product_title == "Hollow Knight: Silksong"
    raw = sa.create_engine(url)
    try:
        with raw.connect() as conn:
            row = conn.execute(
                sa.text('SELECT slug, "businessCategory" FROM products WHERE id = :id'), {"id": game.id}
            ).one()
    finally:
        raw.dispose()
    assert row.slug == f"hollow-knight-silksong-{game.id[:8]}" and row.businessCategory == "games"


# --- BitLoot's switches ---------------------------------------------------------------------------------------
def test_feature_flags_as_bitloot_seeds_them(bitloot_store):
    store, _, _ = bitloot_store
    assert store.feature_flags() == {
        "auto_fulfill_enabled": True, "captcha_enabled": True, "custom_products_enabled": True,
        "email_notifications_enabled": True, "fulfillment_enabled": True, "kinguin_enabled": True,
        "maintenance_mode": False, "payment_processing_enabled": True,
    }
    set_feature_flag(store.engine, "kinguin_enabled", False)
    assert store.feature_flags()["kinguin_enabled"] is False


def test_email_suppression_on_a_bitloot_database(bitloot_store):
    store, _, _ = bitloot_store
    bounce = store.email_suppression("Gone@Example.com")
    assert (bounce.type, bounce.reason) == ("hard", "550 5.1.1 mailbox does not exist")
    insert_email_bounce(store.engine, "soft@example.com", bounce_type="soft")
    insert_email_bounce(store.engine, "angry@example.com", bounce_type="complaint", reason="marked as spam")
    assert store.email_suppression("soft@example.com") is None  # soft bounces never suppress
    assert store.email_suppression("angry@example.com").type == "complaint"
    assert store.email_suppression("gamer@example.com") is None


def test_an_older_bitloot_without_the_switch_tables(empty_pg_url):
    ddl.populate_bitloot_database(empty_pg_url, with_switches=False)
    engine = create_store_engine(empty_pg_url)
    try:
        upgrade(engine)
        store = Store(engine)
        assert store.feature_flags() is None
        assert store.email_suppression("gone@example.com") is None
    finally:
        engine.dispose()


def test_give_back_attempt_only_for_the_lease_holder(store):
    order_id, _ = insert_order(store.engine)
    assert store.claim(order_id, "run-a", dt.timedelta(minutes=5))
    store.give_back_attempt(order_id, "run-b")
    assert store.get_state(order_id).attempts == 1
    store.give_back_attempt(order_id, "run-a")
    assert store.get_state(order_id).attempts == 0
