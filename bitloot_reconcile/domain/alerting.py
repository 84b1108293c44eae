"""Which orders need a person told, and the Slack-compatible message that tells them (plain Python).

An order is alerted once per state change: `reconcile_state.alerted_outcome` remembers the outcome last
alerted on, so the same outcome recorded again by a later run stays quiet, while a change to another state
and back alerts again (the store clears the mark when the order leaves the alerting states).

Messages carry the order id, the outcome, a short reason and one link: the Dagster run. Reasons come from the
domain and hold no secrets, but they may quote remote error text, so any URL in them is cut out anyway (a
presigned URL or a webhook URL is a bearer credential) and Slack's control characters are escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bitloot_reconcile.domain.outcomes import Outcome

# Outcomes a person has to act on. The others resolve themselves: retry_later and payment_not_confirmed back
# off and turn into needs_attention once attempts run out, waiting_for_supplier once its deadline passes.
ALERT_OUTCOMES = frozenset({Outcome.NEEDS_ATTENTION})
RUN_FAILED = "run failed"
MAX_REASON_CHARS = 300
MAX_ID_CHARS = 64  # an order id from a failed admin run may be any text the admin typed

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


def needs_alert(last_outcome: str | None, alerted_outcome: str | None) -> bool:
    """The rule the store's `pending_alerts` query implements, spelled out for tests and readers."""
    return last_outcome in ALERT_OUTCOMES and alerted_outcome != last_outcome


@dataclass(frozen=True)
class Alert:
    order_id: str
    outcome: str
    reason: str | None
    run_id: str | None


def clean(text: str | None, limit: int = MAX_REASON_CHARS) -> str:
    """One line, no URLs, bounded length."""
    line = " ".join(_URL.sub("<link removed>", text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions; escaping keeps remote text from forging either.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def run_url(dagster_base_url: str, run_id: str | None) -> str | None:
    return f"{dagster_base_url.rstrip('/')}/runs/{run_id}" if run_id else None


def first_line(message: str | None) -> str:
    """Dagster failure messages can carry whole tracebacks; the first non-empty line says what happened."""
    return next((line for line in (message or "").splitlines() if line.strip()), "")


def build_message(alert: Alert, dagster_base_url: str) -> dict:
    """A Slack-compatible incoming-webhook payload: plain `text` for notifications plus one mrkdwn block."""
    order_id = clean(alert.order_id, MAX_ID_CHARS) or "unknown order"
    outcome = clean(alert.outcome, 40)
    reason = clean(alert.reason) or "no reason recorded"
    link = run_url(dagster_base_url, alert.run_id)
    headline = f"BitLoot order {order_id}: {outcome}"
    text = f"{headline}. {reason}" + (f" Run: {link}" if link else "")
    lines = [f"*{_slack_escape(headline)}*", f"Reason: {_slack_escape(reason)}"]
    if link:
        lines.append(f"<{link}|Open the Dagster run>")
    return {
        "text": _slack_escape(text),
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}}],
    }
