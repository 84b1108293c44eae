"""Which orders need a person told, and the Slack-compatible message that tells them (plain Python).

An order is alerted once per state change: `reconcile_state.alerted_outcome` remembers the outcome last
alerted on, so the same outcome recorded again by a later run stays quiet, while a change to another state
and back alerts again (the store clears the mark when the order leaves the alerting states).

Every message says which order, what failed in words (the recorded reason: service, operation, status), what
happens next (the next attempt's time, or quarantined: needs a person) and one link: the Dagster run. Reasons
come from the domain and hold no secrets, but they may quote remote error text, so they are redacted, any URL
in them is cut out anyway (a presigned URL or a webhook URL is a bearer credential) and Slack's control
characters are escaped.

A failed run of another job pages too, once: a `fulfill_backlog` batch (how many orders it held; the sweep takes
them up again), the report and the board. A run refused for an operator's input error (tagged
`bitloot/outcome=refused`: unknown order, malformed id, empty reason, a hand-made batch with a bad id) changed
nothing and pages nobody: it is logged, never alerted.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass

from bitloot_reconcile.domain.outcomes import Outcome
from bitloot_reconcile.domain.redaction import redact
from bitloot_reconcile.store.repository import ReconcileState
from bitloot_reconcile.tags import OUTCOME_REFUSED, TAG_BATCH_SIZE, TAG_OUTCOME, TAG_TRIGGER, TRIGGER_SENSOR

# Outcomes a person has to act on. The others resolve themselves: retry_later and payment_not_confirmed back
# off and turn into needs_attention once attempts run out, waiting_for_supplier once its deadline passes.
ALERT_OUTCOMES = frozenset({Outcome.NEEDS_ATTENTION})
RUN_FAILED = "run failed"
QUARANTINED = "quarantined: needs a person"
MAX_REASON_CHARS = 300
MAX_ID_CHARS = 64  # an order id from a failed admin run may be any text the admin typed

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


@dataclass(frozen=True)
class Alert:
    order_id: str
    outcome: str
    reason: str | None  # the cause, in words
    run_id: str | None
    next_step: str | None = None  # what happens next, in words; None: said from the outcome where it can be
    subject: str | None = None  # what failed when it is not one order: a batch or a report run


def clean(text: str | None, limit: int = MAX_REASON_CHARS) -> str:
    """One line, redacted, no URLs, bounded length."""
    line = " ".join(_URL.sub("<link removed>", redact(text or "")).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def is_input_error(run_tags: Mapping[str, str]) -> bool:
    """A run refused for an operator's input error: nothing changed, so nobody is paged (logged instead)."""
    return run_tags.get(TAG_OUTCOME) == OUTCOME_REFUSED


def what_happens_next(state: ReconcileState | None, *, trigger: str | None, now: dt.datetime) -> str:
    """What happens to the order next, in words, from its reconcile state (None: the store has no row)."""
    if state is not None and state.last_outcome == Outcome.NEEDS_ATTENTION:
        return QUARANTINED
    if state is not None and state.last_outcome == Outcome.RESOLVED:
        return "nothing: an admin resolved the order by hand"
    if state is not None and state.next_attempt_at is not None:
        when = state.next_attempt_at.astimezone(dt.UTC)
        if when > now:
            return f"next attempt at {when:%Y-%m-%d %H:%M} UTC"
        return "due again now: the sweep picks it up on its next tick"
    if state is not None and state.last_outcome in (Outcome.FULFILLED, Outcome.ALREADY_FULFILLED):
        return "nothing: the order is fulfilled"
    if trigger == TRIGGER_SENSOR:
        return "the sweep requests a new run on a later tick"
    return "nothing scheduled: fix the cause, then retry the order"


def needs_attention_alert(state: ReconcileState) -> Alert:
    """The alert for an order that entered an alerting outcome (`pending_alerts`)."""
    return Alert(state.order_id, state.last_outcome or "", state.last_reason, state.last_run_id, QUARANTINED)


def failed_run_alert(*, order_id: str, run_id: str, run_tags: Mapping[str, str], step_failure: str,
                     state: ReconcileState | None, now: dt.datetime) -> Alert:
    """The alert for a failed run. When the run recorded the order's state (its failure hook did: the order
    was claimed), the state holds the cause in words and the schedule's verdict; else the step failure's own
    description says what failed. `state` is the order's current reconcile state (None: unknown or unread)."""
    recorded_here = state is not None and state.last_run_id == run_id and bool(state.last_reason)
    cause = state.last_reason if recorded_here and state is not None else step_failure
    return Alert(order_id, RUN_FAILED, cause, run_id,
                 what_happens_next(state, trigger=run_tags.get(TAG_TRIGGER), now=now))


BATCH_TAKEN_UP_AGAIN = "the sweep takes its orders up again as their leases lapse"
NEXT_SCHEDULED_RUN = "its next scheduled run tries again (or materialize it from the UI now)"


def failed_job_alert(*, job_name: str, batch: bool, run_id: str, run_tags: Mapping[str, str],
                     step_failure: str) -> Alert:
    """The alert for a failed run that is not one order's: a batch (how many orders it held, and that the
    sweep takes them up again) or a report or board run (its schedule runs it again)."""
    if batch:
        held = run_tags.get(TAG_BATCH_SIZE)
        subject = f"BitLoot batch run {job_name}" + (f" holding {held} order(s)" if held else "")
        return Alert("", RUN_FAILED, step_failure, run_id, BATCH_TAKEN_UP_AGAIN, subject=subject)
    return Alert("", RUN_FAILED, step_failure, run_id, NEXT_SCHEDULED_RUN, subject=f"BitLoot job {job_name}")


def error_words(class_name: str | None, message: str | None) -> str:
    """`Type: message` of a recorded error whose text starts with its dotted class path, first line only."""
    line = first_line(message)
    head, sep, rest = line.partition(": ")
    if sep and class_name and head.rsplit(".", 1)[-1] == class_name:
        return f"{class_name}: {rest}"
    return line


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions; escaping keeps remote text from forging either.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def run_url(dagster_base_url: str, run_id: str | None) -> str | None:
    return f"{dagster_base_url.rstrip('/')}/runs/{run_id}" if run_id else None


def order_runs_url(dagster_base_url: str, order_id: str) -> str:
    """The Runs page filtered by the order's tag: every run of the order, whoever started it."""
    return f"{dagster_base_url.rstrip('/')}/runs?q%5B0%5D=tag%3Abitloot%2Forder_id%3D{order_id}"


def first_line(message: str | None) -> str:
    """Dagster failure messages can carry whole tracebacks; the first non-empty line says what happened."""
    return next((line for line in (message or "").splitlines() if line.strip()), "")


def build_message(alert: Alert, dagster_base_url: str) -> dict:
    """A Slack-compatible incoming-webhook payload: plain `text` for notifications plus one mrkdwn block."""
    order_id = clean(alert.order_id, MAX_ID_CHARS) or "unknown order"
    outcome = clean(alert.outcome, 40)
    cause = clean(alert.reason).rstrip(".") or "no reason recorded"
    next_step = clean(alert.next_step, 120) or (QUARANTINED if outcome in ALERT_OUTCOMES else "")
    link = run_url(dagster_base_url, alert.run_id)
    headline = f"{clean(alert.subject, 120)}: {outcome}" if alert.subject else f"BitLoot order {order_id}: {outcome}"
    text = f"{headline}. Cause: {cause}." + (f" Next: {next_step}." if next_step else "")
    text += f" Run: {link}" if link else ""
    lines = [f"*{_slack_escape(headline)}*", f"Cause: {_slack_escape(cause)}"]
    if next_step:
        lines.append(f"Next: {_slack_escape(next_step)}")
    if link:
        lines.append(f"<{link}|Open the Dagster run>")
    return {
        "text": _slack_escape(text),
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}}],
    }
