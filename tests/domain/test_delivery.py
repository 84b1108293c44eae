"""BitLoot's delivery rules: where a key object lives, its download name, the completion email's idempotency key."""

from __future__ import annotations

import pytest

from bitloot_reconcile.domain.delivery import (
    attachment_filename,
    completion_idempotency_key,
    key_extension,
    key_object_path,
)

ORDER_ID = "5c91f65c-4b12-463c-9277-8cfc139ceda4"
ITEM_ID = "a1b2c3d4-0000-4000-8000-000000000001"


def test_key_object_path_follows_bitloot_layout():
    assert key_object_path(ORDER_ID, ITEM_ID, "text/plain") == f"orders/{ORDER_ID}/key-a1b2c3d4.txt"
    assert key_object_path(ORDER_ID, ITEM_ID, "image/jpeg") == f"orders/{ORDER_ID}/key-a1b2c3d4.jpg"
    assert key_object_path(ORDER_ID, ITEM_ID, "image/png") == f"orders/{ORDER_ID}/key-a1b2c3d4.png"
    assert key_object_path(ORDER_ID, ITEM_ID, "image/gif") == f"orders/{ORDER_ID}/key-a1b2c3d4.gif"
    assert key_object_path(ORDER_ID, ITEM_ID, "application/octet-stream").endswith("/key-a1b2c3d4.bin")
    # parameters and case do not change the extension; unknown types fall back to bin
    assert key_extension("Text/Plain; charset=utf-8") == "txt"
    assert key_extension("application/x-unknown") == "bin"
    assert key_object_path(ORDER_ID, "short", "text/plain") == f"orders/{ORDER_ID}/key-short.txt"


def test_attachment_filename():
    assert attachment_filename(ORDER_ID, ITEM_ID, "text/plain") == f"bitloot-key-{ORDER_ID}-a1b2c3d4.txt"
    assert attachment_filename(ORDER_ID, ITEM_ID, "image/png") == f"bitloot-key-{ORDER_ID}-a1b2c3d4.png"


@pytest.mark.parametrize("order_id,item_id", [("", ITEM_ID), (ORDER_ID, ""), ("../x", ITEM_ID), (ORDER_ID, "a/b")])
def test_path_helpers_reject_bad_ids(order_id, item_id):
    with pytest.raises(ValueError):
        key_object_path(order_id, item_id, "text/plain")
    with pytest.raises(ValueError):
        attachment_filename(order_id, item_id, "text/plain")


def test_completion_idempotency_key_is_deterministic():
    assert completion_idempotency_key(ORDER_ID) == f"order-completed/{ORDER_ID}"
    assert completion_idempotency_key(ORDER_ID) == completion_idempotency_key(f" {ORDER_ID} ")
    assert completion_idempotency_key("a") != completion_idempotency_key("b")


@pytest.mark.parametrize("bad", ["", "   ", None, "x" * 250])
def test_completion_idempotency_key_refuses_bad_ids(bad):
    with pytest.raises(ValueError):
        completion_idempotency_key(bad)
