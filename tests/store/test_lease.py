"""The per-order lease: one upsert on reconcile_state decides, on PostgreSQL and on SQLite."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bitloot_reconcile.store.engine import create_store_engine, normalize_store_url
from bitloot_reconcile.store.migrate import upgrade
from bitloot_reconcile.store.repository import LeaseLost, Store, utcnow
from bitloot_reconcile.store.schema import reconcile_state

REPO_ROOT = Path(__file__).resolve().parents[2]
TTL = dt.timedelta(minutes=10)
THREADS = 16
ROUNDS = 20


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = create_store_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request) -> Iterator[Store]:
    if request.param == "postgresql":
        yield Store(request.getfixturevalue("store_engine"))
    else:
        engine = create_store_engine(request.getfixturevalue("sqlite_url"))
        yield Store(engine)
        engine.dispose()


def _new_order_id() -> str:
    return str(uuid.uuid4())


def test_claim_and_release_rules(store):
    order = _new_order_id()

    assert store.claim(order, "run-a", TTL)
    state = store.get_state(order)
    assert (state.lease_owner, state.attempts) == ("run-a", 1)
    assert state.lease_expires_at.tzinfo is not None
    assert abs(state.lease_expires_at - (utcnow() + TTL)) < dt.timedelta(seconds=30)

    assert not store.claim(order, "run-b", TTL)  # held by A
    assert (store.get_state(order).lease_owner, store.get_state(order).attempts) == ("run-a", 1)

    assert store.claim(order, "run-a", TTL)  # same owner re-claims
    assert store.get_state(order).attempts == 2

    store.finish_run(order, "run-b")  # not B's lease: nothing happens
    assert store.get_state(order).lease_owner == "run-a"
    assert not store.claim(order, "run-b", TTL)

    store.finish_run(order, "run-a")
    state = store.get_state(order)
    assert (state.lease_owner, state.lease_expires_at, state.attempts) == (None, None, 2)

    assert store.claim(order, "run-b", TTL)  # free again
    state = store.get_state(order)
    assert (state.lease_owner, state.attempts) == ("run-b", 3)


def test_expired_lease_can_be_taken_over(store):
    order = _new_order_id()
    assert store.claim(order, "run-a", TTL)
    assert not store.claim(order, "run-b", TTL)

    store.update_state(order, lease_expires_at=utcnow() - dt.timedelta(seconds=1))  # A crashed long ago
    assert store.claim(order, "run-b", TTL)
    state = store.get_state(order)
    assert (state.lease_owner, state.attempts) == ("run-b", 2)
    assert state.lease_expires_at > utcnow()

    assert not store.claim(order, "run-a", TTL)  # A came back: B holds a live lease now
    store.finish_run(order, "run-a")  # and A's late release does not free B's lease
    assert store.get_state(order).lease_owner == "run-b"


def test_claim_with_a_ttl_already_past_is_immediately_takeable(store):
    order = _new_order_id()
    assert store.claim(order, "run-a", dt.timedelta(seconds=-1))
    assert store.claim(order, "run-b", TTL)
    assert store.get_state(order).lease_owner == "run-b"


def test_leases_are_per_order(store):
    first, second = _new_order_id(), _new_order_id()
    assert store.claim(first, "run-a", TTL)
    assert store.claim(second, "run-b", TTL)
    assert not store.claim(first, "run-b", TTL)
    assert not store.claim(second, "run-a", TTL)
    store.finish_run(first, "run-a")
    assert store.get_state(second).lease_owner == "run-b"


def test_claim_keeps_other_state(store):
    order = _new_order_id()
    store.update_state(order, last_outcome="waiting_for_supplier", last_reason="processing")
    store.record_placement_intent(order)
    intent = store.get_state(order).placement_intent_at
    assert store.claim(order, "run-a", TTL)
    state = store.get_state(order)
    assert (state.last_outcome, state.last_reason, state.placement_intent_at) == (
        "waiting_for_supplier",
        "processing",
        intent,
    )
    assert state.attempts == 1


# --- concurrency --------------------------------------------------------------------------------------------
def _wide_engine(url: str) -> sa.Engine:
    """An engine like create_store_engine's whose pool lets every thread hold its own connection at once."""
    url = normalize_store_url(url)
    if url.startswith("sqlite"):
        # Same busy timeout as create_store_engine; WAL is already set on the file (it persists).
        return sa.create_engine(url, connect_args={"timeout": 30}, pool_size=THREADS, max_overflow=0)
    return sa.create_engine(url, connect_args={"connect_timeout": 10}, pool_size=THREADS, max_overflow=0)


def _race_threads(store: Store) -> None:
    # Open every connection up front so the rounds race on claims, not on connecting.
    connections = [store.engine.connect() for _ in range(THREADS)]
    for conn in connections:
        conn.close()

    barrier = threading.Barrier(THREADS)
    order_ids = [_new_order_id() for _ in range(ROUNDS)]
    wins: dict[str, list[str]] = {order: [] for order in order_ids}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        owner = f"run-{n}"
        try:
            for order in order_ids:
                barrier.wait(timeout=60)
                if store.claim(order, owner, TTL):
                    with lock:
                        wins[order].append(owner)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert all(not thread.is_alive() for thread in threads)

    for order, winners in wins.items():
        assert len(winners) == 1, (order, winners)
        state = store.get_state(order)
        assert state.lease_owner == winners[0]
        assert state.attempts == 1


def test_concurrent_claims_threads_postgres(store_engine, store_url):
    engine = _wide_engine(store_url)
    try:
        _race_threads(Store(engine))
    finally:
        engine.dispose()


def test_concurrent_claims_threads_sqlite(sqlite_url):
    engine = _wide_engine(sqlite_url)
    try:
        _race_threads(Store(engine))
    finally:
        engine.dispose()


def test_concurrent_claims_on_a_lease_that_expired(store_engine, store_url):
    """Many runs see the same expired lease at once: only one of them takes it over."""
    engine = _wide_engine(store_url)
    store = Store(engine)
    try:
        order = _new_order_id()
        assert store.claim(order, "crashed-run", dt.timedelta(seconds=-5))
        barrier = threading.Barrier(THREADS)
        winners: list[str] = []

        def worker(n: int) -> None:
            barrier.wait(timeout=30)
            if store.claim(order, f"run-{n}", TTL):
                winners.append(f"run-{n}")

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(winners) == 1, winners
        assert store.get_state(order).lease_owner == winners[0]
        assert store.get_state(order).attempts == 2
    finally:
        engine.dispose()


_PROCESS_WORKER = """
import json, sys, datetime as dt
from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.repository import Store

url, owner = sys.argv[1], sys.argv[2]
orders = json.loads(sys.stdin.readline())
store = Store(create_store_engine(url))
with store.engine.connect():
    pass
print("ready", flush=True)
sys.stdin.readline()  # "go"
won = [order for order in orders if store.claim(order, owner, dt.timedelta(minutes=10))]
print(json.dumps(won), flush=True)
"""


def test_two_processes_race_for_the_same_orders_postgres(store_engine, store_url):
    order_ids = [_new_order_id() for _ in range(60)]
    # A third of them already have a state row whose lease expired; the rest have none yet.
    store = Store(store_engine)
    for order in order_ids[::3]:
        assert store.claim(order, "crashed-run", dt.timedelta(seconds=-5))

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS_WORKER, store_url, f"process-{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )
        for n in range(2)
    ]
    try:
        for proc in procs:
            proc.stdin.write(json.dumps(order_ids) + "\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = {}
        for n, proc in enumerate(procs):
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            results[f"process-{n}"] = set(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    assert not results["process-0"] & results["process-1"]
    assert results["process-0"] | results["process-1"] == set(order_ids)
    with store_engine.connect() as conn:
        owners = dict(
            conn.execute(
                sa.select(reconcile_state.c.order_id, reconcile_state.c.lease_owner).where(
                    reconcile_state.c.order_id.in_(order_ids)
                )
            ).all()
        )
    for owner, won in results.items():
        assert all(owners[order] == owner for order in won)


# -- fencing: every write of a run names its owner ------------------------------------------------------------
def test_renew_extends_only_the_owners_lease(store: Store):
    order = _new_order_id()
    assert store.claim(order, "run-a", dt.timedelta(seconds=-1))  # already lapsed, nobody took it
    assert store.renew_lease(order, "run-a", TTL)  # the owner may still renew
    assert store.get_state(order).lease_expires_at > utcnow() + TTL - dt.timedelta(minutes=1)
    assert not store.renew_lease(order, "run-b", TTL)
    store.update_state(order, lease_expires_at=utcnow() - dt.timedelta(seconds=1))
    assert store.claim(order, "run-b", TTL)
    assert not store.renew_lease(order, "run-a", TTL)  # taken over: A cannot get it back by renewing
    assert store.get_state(order).lease_owner == "run-b"


def test_a_run_that_lost_its_lease_writes_nothing(store: Store):
    order = _new_order_id()
    assert store.claim(order, "run-a", dt.timedelta(seconds=-1))
    assert store.claim(order, "run-b", TTL)  # A's lease lapsed and B took the order
    with pytest.raises(LeaseLost):
        store.record_placement_intent(order, owner="run-a")
    with pytest.raises(LeaseLost):
        store.assign_key(order, "item-1", "kinguin-key-1", owner="run-a")
    assert store.key_assignments(order) == {}
    assert store.get_state(order).placement_intent_at is None
    assert not store.finish_run(order, "run-a", last_outcome="fulfilled")
    state = store.get_state(order)
    assert (state.lease_owner, state.last_outcome) == ("run-b", None)

    store.record_placement_intent(order, owner="run-b")
    assert store.get_state(order).placement_intent_at is not None
    assert store.finish_run(order, "run-b", last_outcome="fulfilled")
    state = store.get_state(order)
    assert (state.lease_owner, state.lease_expires_at, state.last_outcome) == (None, None, "fulfilled")


def test_give_back_attempt_only_for_the_lease_holder(store):
    order_id = _new_order_id()
    assert store.claim(order_id, "run-a", dt.timedelta(minutes=5))
    store.give_back_attempt(order_id, "run-b")
    assert store.get_state(order_id).attempts == 1
    store.give_back_attempt(order_id, "run-a")
    assert store.get_state(order_id).attempts == 0
