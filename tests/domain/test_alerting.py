"""Alert selection and message building (pure functions)."""

from __future__ import annotations

import json

import pytest

from bitloot_reconcile.domain.alerting import Alert, build_message, clean, first_line, needs_alert

RUN = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
ORDER = "5c91f65c-4b12-463c-9277-8cfc139ceda4"


@pytest.mark.parametrize(
    ("last", "alerted", "expected"),
    [
        ("needs_attention", None, True),
        ("needs_attention", "needs_attention", False),  # already alerted for this state
        ("needs_attention", "retry_later", True),
        ("fulfilled", None, False),
        ("retry_later", None, False),  # resolves itself with backoff
        ("payment_not_confirmed", None, False),
        (None, None, False),
    ],
)
def test_which_states_alert(last, alerted, expected):
    assert needs_alert(last, alerted) is expected


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
