import datetime as dt
import random

from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.domain.schedule import RetrySchedule, plan_next_step

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    schedule = RetrySchedule(backoff_base_seconds=60, backoff_cap_seconds=600, jitter=0.2)
    rng = random.Random(1)
    delays = [schedule.backoff(n, rng).total_seconds() for n in range(1, 8)]
    for attempt, delay in enumerate(delays, start=1):
        nominal = min(600, 60 * 2 ** (attempt - 1))
        assert 0.8 * nominal <= delay <= 1.2 * nominal
    assert max(delays) <= 720


def test_jitter_spreads_a_burst():
    schedule = RetrySchedule()
    rng = random.Random(7)
    assert len({round(schedule.backoff(3, rng).total_seconds(), 3) for _ in range(20)}) > 10


def test_attempts_exhausted_quarantines():
    schedule = RetrySchedule(max_attempts=3)
    kept = plan_next_step(schedule, outcome=Outcome.RETRY_LATER, reason="kinguin 503", attempts=2,
                          waiting_since=None, preorder=False, now=NOW)
    assert kept.outcome is Outcome.RETRY_LATER and kept.next_attempt_at > NOW
    done = plan_next_step(schedule, outcome=Outcome.RETRY_LATER, reason="kinguin 503", attempts=3,
                          waiting_since=None, preorder=False, now=NOW)
    assert done.outcome is Outcome.NEEDS_ATTENTION
    assert done.reason.startswith("attempts exhausted after 3 attempts") and done.next_attempt_at is None


def test_supplier_polling_slows_down_then_gives_up_at_the_deadline():
    schedule = RetrySchedule(supplier_deadline_hours=72)

    def step(waited_hours: float, preorder: bool = False):
        return plan_next_step(schedule, outcome=Outcome.WAITING_FOR_SUPPLIER, reason="processing", attempts=1,
                              waiting_since=NOW - dt.timedelta(hours=waited_hours), preorder=preorder, now=NOW)

    assert step(0).next_attempt_at - NOW == dt.timedelta(minutes=2)
    assert step(1).next_attempt_at - NOW == dt.timedelta(minutes=10)
    assert step(5).next_attempt_at - NOW == dt.timedelta(hours=1)
    assert step(30).next_attempt_at - NOW == dt.timedelta(hours=3)
    assert step(0, preorder=True).next_attempt_at - NOW == dt.timedelta(hours=6)
    late = step(73)
    assert late.outcome is Outcome.NEEDS_ATTENTION and "did not deliver within 72 h" in late.reason
    assert step(500, preorder=True).outcome is Outcome.WAITING_FOR_SUPPLIER
    assert step(0).waiting_since == NOW


def test_final_outcomes_schedule_nothing():
    for outcome in (Outcome.FULFILLED, Outcome.ALREADY_FULFILLED, Outcome.NEEDS_ATTENTION):
        step = plan_next_step(RetrySchedule(), outcome=outcome, reason=None, attempts=1, waiting_since=None,
                              preorder=False, now=NOW)
        assert step.next_attempt_at is None and step.outcome is outcome


def test_a_held_order_is_looked_at_again_soon_and_never_quarantined():
    schedule = RetrySchedule(max_attempts=3, hold_recheck_seconds=300)
    since = NOW - dt.timedelta(hours=1)
    held = plan_next_step(schedule, outcome=Outcome.PAUSED, reason="Kinguin is switched off in BitLoot",
                          attempts=50, waiting_since=since, preorder=False, now=NOW)
    assert held.outcome is Outcome.PAUSED
    assert held.next_attempt_at == NOW + dt.timedelta(seconds=300)
    assert held.waiting_since == since  # a supplier wait keeps its start
