"""Alert selection and message building (pure functions)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from bitloot_reconcile.domain.alerting import (
    QUARANTINED,
    Alert,
    build_message,
    clean,
    error_words,
    failed_run_alert,
    first_line,
    is_input_error,
    needs_attention_alert,
    what_happens_next,
)
from bitloot_reconcile.store.repository import ReconcileState

RUN = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
ORDER = "5c91f65c-4b12-463c-9277-8cfc139ceda4"
NOW = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
OUTAGE = "store_keys failed: TransientError: r2: put_object orders/x/key-1.txt: 503 ServiceUnavailable"


def test_message_has_order_outcome_reason_and_run_link():
    message = build_message(
        Alert(ORDER, "needs_attention", "supplier canceled Kinguin order PHS84FJAG5U", RUN), "https://dagster.bitloot.io/"
    )
    block_text = message["blocks"][0]["text"]["text"]
    for part in (ORDER, "needs_attention", "supplier canceled Kinguin order PHS84FJAG5U"):
        assert part in message["text"] and part in block_text
    assert f"<https://dagster.bitloot.io/runs/{RUN}|Open the Dagster run>" in block_text
    assert message["blocks"][0]["text"]["type"] == "mrkdwn"
    json.dumps(message)  # a webhook body


def test_urls_in_reasons_are_removed_and_slack_markup_escaped():
    reason = ("r2 failed for https://acct.r2.cloudflarestorage.com/k?X-Amz-Signature=abc123 "
              "<!channel> <https://evil.example|click> & more")
    message = build_message(Alert(ORDER, "run failed", reason, RUN), "http://localhost:3000")
    body = json.dumps(message)
    assert "X-Amz-Signature" not in body and "evil.example" not in body and "cloudflarestorage" not in body
    assert "<!channel>" not in body and "&lt;!channel&gt;" in body and "&amp; more" in body
    # The only URL left is the run link.
    assert body.count("://") == 2 and f"http://localhost:3000/runs/{RUN}" in body


def test_reasons_are_one_short_line_and_missing_parts_are_said():
    assert clean("a\n  b\tc") == "a b c"
    assert len(clean("x" * 5000)) == 300
    assert first_line("\nFailure: order not found\n  File x.py, line 3") == "Failure: order not found"
    message = build_message(Alert("", "run failed", None, None), "http://localhost:3000")
    assert "unknown order" in message["text"] and "no reason recorded" in message["text"]
    assert "/runs/" not in json.dumps(message)


def test_every_message_says_what_happens_next():
    message = build_message(Alert(ORDER, "run failed", OUTAGE, RUN, "next attempt at 2026-05-01 12:10 UTC"),
                            "http://localhost:3000")
    assert message["text"] == (
        f"BitLoot order {ORDER}: run failed. Cause: {OUTAGE}. Next: next attempt at 2026-05-01 12:10 UTC. "
        f"Run: http://localhost:3000/runs/{RUN}"
    )
    assert "\nNext: next attempt at 2026-05-01 12:10 UTC\n" in message["blocks"][0]["text"]["text"]
    # An alert built without a next step (another sensor's) still says it for a quarantined order.
    legacy = build_message(Alert(ORDER, "needs_attention", "supplier canceled", RUN), "http://localhost:3000")
    assert f"Next: {QUARANTINED}." in legacy["text"]


@pytest.mark.parametrize(
    ("state", "trigger", "expected"),
    [
        (ReconcileState(ORDER, last_outcome="needs_attention"), "sensor", QUARANTINED),
        (ReconcileState(ORDER, last_outcome="retry_later", next_attempt_at=NOW + dt.timedelta(minutes=9, seconds=59)),
         "admin", "next attempt at 2026-05-01 12:09 UTC"),
        (ReconcileState(ORDER, last_outcome="payment_not_confirmed",
                        next_attempt_at=(NOW + dt.timedelta(hours=1)).astimezone(dt.timezone(dt.timedelta(hours=2)))),
         "admin", "next attempt at 2026-05-01 13:00 UTC"),  # said in UTC whatever the zone it was read in
        (ReconcileState(ORDER, last_outcome="retry_later", next_attempt_at=NOW - dt.timedelta(minutes=1)),
         "admin", "due again now: the sweep picks it up on its next tick"),
        (ReconcileState(ORDER, last_outcome="fulfilled"), "admin", "nothing: the order is fulfilled"),
        (ReconcileState(ORDER), "sensor", "the sweep requests a new run on a later tick"),
        (None, "admin", "nothing scheduled: fix the cause, then retry the order"),
        (None, None, "nothing scheduled: fix the cause, then retry the order"),
    ],
)
def test_what_happens_next(state, trigger, expected):
    assert what_happens_next(state, trigger=trigger, now=NOW) == expected


def test_a_failed_run_takes_the_cause_from_the_state_it_recorded_else_from_its_step_failure():
    recorded = ReconcileState(ORDER, last_outcome="retry_later", last_reason=OUTAGE, last_run_id=RUN,
                              next_attempt_at=NOW + dt.timedelta(minutes=5))
    alert = failed_run_alert(order_id=ORDER, run_id=RUN, run_tags={"bitloot/trigger": "sensor"},
                             step_failure="store_keys failed: Exceeded max_retries of 3", state=recorded, now=NOW)
    assert alert == Alert(ORDER, "run failed", OUTAGE, RUN, "next attempt at 2026-05-01 12:05 UTC")

    # The state was written by an earlier run (this one failed before its claim): the step failure is the cause.
    earlier = ReconcileState(ORDER, last_outcome="needs_attention", last_reason="supplier canceled",
                             last_run_id="another-run")
    alert = failed_run_alert(order_id=ORDER, run_id=RUN, run_tags={}, step_failure="load_and_claim failed: x",
                             state=earlier, now=NOW)
    assert (alert.reason, alert.next_step) == ("load_and_claim failed: x", QUARANTINED)


def test_a_needs_attention_alert_says_quarantined():
    state = ReconcileState(ORDER, last_outcome="needs_attention", last_reason="supplier canceled", last_run_id=RUN)
    assert needs_attention_alert(state) == Alert(ORDER, "needs_attention", "supplier canceled", RUN, QUARANTINED)


def test_input_errors_are_told_by_the_refused_outcome_tag():
    assert is_input_error({"bitloot/outcome": "refused"})
    assert not is_input_error({"bitloot/outcome": "retry_later"}) and not is_input_error({})


def test_recorded_errors_read_as_type_and_message():
    assert error_words("TransientError", "bitloot_reconcile.adapters.errors.TransientError: r2: put_object x: 503\n"
                       "  File ...") == "TransientError: r2: put_object x: 503"
    assert error_words("KeyError", "KeyError: 'x'\n") == "KeyError: 'x'"
    assert error_words(None, "Exceeded max_retries of 3\n") == "Exceeded max_retries of 3"
