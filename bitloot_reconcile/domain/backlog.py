"""Work a bounded list of orders on a bounded pool of threads inside one process. No Dagster here.

Each worker opens its own services (HTTP connection pools) once and takes orders from a shared queue until it
is empty, so a slow order holds one worker, never the others. Results come back to the calling thread, in the
order they finish, so the caller (an op) may write to its run's event log, which is not thread-safe.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TypeVar

from bitloot_reconcile.domain.redaction import describe_error

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


def drain(items: list[T], *, workers: int, open_services: Callable[[], AbstractContextManager[S]],
          work: Callable[[S, T], R]) -> Iterator[R]:
    """Yield `work(services, item)` for every item a worker got to. `work` is expected not to raise; if it
    does, or a worker cannot open its services, that item (or that worker) is dropped and logged and the rest
    go on: an item never worked was never claimed, and the next sweep takes it up."""
    todo: queue.SimpleQueue[T] = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    done: queue.SimpleQueue[R] = queue.SimpleQueue()

    def worker() -> None:
        try:
            with open_services() as services:
                while True:
                    try:
                        item = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        done.put(work(services, item))
                    except Exception as exc:
                        log.warning("an item of the batch failed outside its attempt: %s", describe_error(exc))
        except Exception as exc:
            log.warning("a batch worker could not start: %s", describe_error(exc))

    threads = [threading.Thread(target=worker, name=f"backlog-{n}", daemon=True)
               for n in range(max(1, min(workers, len(items))))]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads) or not done.empty():
        try:
            yield done.get(timeout=0.2)
        except queue.Empty:
            continue
    for thread in threads:
        thread.join()
