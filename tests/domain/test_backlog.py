"""`domain.backlog.drain`: a bounded pool that never lets one item (or one worker) stop the others."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from bitloot_reconcile.domain.backlog import drain


def test_every_item_is_worked_once_on_at_most_the_given_workers():
    opened, busy, peak, lock = [], [0], [0], threading.Lock()

    @contextmanager
    def services():
        opened.append(threading.get_ident())
        yield "clients"

    def work(clients: str, item: int) -> int:
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.02)
        with lock:
            busy[0] -= 1
        return item * 10

    results = list(drain(list(range(20)), workers=3, open_services=services, work=work))

    assert sorted(results) == [n * 10 for n in range(20)]
    assert len(opened) == 3 and peak[0] <= 3  # one set of services per worker, reused for its items


def test_a_failing_item_and_a_slow_one_do_not_stop_the_rest(caplog):
    @contextmanager
    def services():
        yield None

    def work(_, item: str) -> str:
        if item == "bad":
            raise RuntimeError("boom at https://r2.example/key?X-Amz-Signature=abc")
        if item == "slow":
            time.sleep(0.3)
        return item

    results = list(drain(["slow", "bad", "a", "b", "c"], workers=2, open_services=services, work=work))

    assert sorted(results) == ["a", "b", "c", "slow"]
    assert "abc" not in caplog.text and "failed outside its attempt" in caplog.text


def test_a_worker_that_cannot_start_leaves_its_items_to_the_others():
    attempts = []

    @contextmanager
    def services():
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("no pool")
        yield None

    assert sorted(drain([1, 2, 3], workers=2, open_services=services, work=lambda _, item: item)) == [1, 2, 3]


def test_nothing_to_do_yields_nothing():
    @contextmanager
    def services():
        yield None

    assert list(drain([], workers=8, open_services=services, work=lambda _, item: item)) == []
