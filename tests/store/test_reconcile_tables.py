"""The project's own tables: placement intents, key assignments, the state row and the audit trail."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from bitloot_reconcile.store.repository import utcnow
from tests.store.rows import new_id


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
