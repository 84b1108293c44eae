"""Run tags (docs/design.md section 3) and the one function that builds them for every launcher."""

from __future__ import annotations

TAG_ORDER_ID = "bitloot/order_id"  # always the canonical lower-case uuid
TAG_TRIGGER = "bitloot/trigger"
TAG_REASON = "bitloot/reason"
TAG_REQUESTED_BY = "bitloot/requested_by"
TAG_ATTEMPT = "bitloot/attempt"
# How the run ended for its order: an `Outcome` value, or `refused` for an operator's input error (nothing
# was changed, nobody is paged). Filter the Runs page by it: `bitloot/outcome=needs_attention`.
TAG_OUTCOME = "bitloot/outcome"
# An admin's remedy for this run (`domain.remedies`), e.g. `max_unit_price_eur=7.00`,
# `replace_canceled_supplier_order`, `resolution=written_off`; absent on plain runs.
TAG_REMEDY = "bitloot/remedy"
# A re-executed run's parent (Dagster's "Re-execute"): the run it repeats.
TAG_PARENT_RUN = "bitloot/parent_run_id"
# Whether the run's failure was alerted (`sensors.alerts`). Dagster copies it into a re-execution, and its run
# tags can be overwritten but not removed: a re-execution sets it to ALERT_NONE until its own failure is alerted.
TAG_ALERT = "bitloot/alert"
ALERT_NONE = "none"
# A `fulfill_backlog` run: how many orders the sweep gave it (its order ids are in its run config).
TAG_BATCH_SIZE = "bitloot/batch_size"
TRIGGER_SENSOR = "sensor"
TRIGGER_ADMIN = "admin"
TRIGGER_REEXECUTION = "reexecution"
OUTCOME_REFUSED = "refused"
# A re-execution starts with its parent's tags: its outcome reads this until its own is recorded.
OUTCOME_IN_PROGRESS = "in_progress"
MAX_TAG_CHARS = 200  # tags are indexed and listed; the full reason lives in the audit table


def request_tags(order_id: str | None, *, trigger: str, reason: str, requested_by: str, remedy: str | None = None,
                 attempt: int | None = None, parent_run_id: str | None = None,
                 batch_size: int | None = None) -> dict[str, str]:
    """The tags of a run, whoever launches it: a `fulfill_order` run of the launchpad (its first step tags it),
    of the command line's `retry` or of the sweep, and the sweep's `fulfill_backlog` runs (no `order_id`: a
    batch is not limited per order, its orders' leases are). `order_id` must already be canonical
    (`fulfilment.parse_order_id`); `remedy` is `Remedy.label`."""
    tags = {
        TAG_TRIGGER: trigger,
        TAG_REASON: reason.strip()[:MAX_TAG_CHARS],
        TAG_REQUESTED_BY: requested_by.strip()[:MAX_TAG_CHARS],
    }
    if order_id is not None:
        tags[TAG_ORDER_ID] = order_id
    if remedy:
        tags[TAG_REMEDY] = remedy
    if attempt is not None:
        tags[TAG_ATTEMPT] = str(attempt)
    if parent_run_id:
        tags[TAG_PARENT_RUN] = parent_run_id
        tags[TAG_OUTCOME] = OUTCOME_IN_PROGRESS  # not the parent's, copied by Dagster
        tags[TAG_ALERT] = ALERT_NONE  # nor the parent's alert
    if batch_size is not None:
        tags[TAG_BATCH_SIZE] = str(batch_size)
    return tags
