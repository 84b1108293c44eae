"""Run tags every `fulfill_order` run carries (docs/design.md section 3), whoever launched it."""

from __future__ import annotations

TAG_ORDER_ID = "bitloot/order_id"
TAG_TRIGGER = "bitloot/trigger"
TAG_REASON = "bitloot/reason"
TAG_REQUESTED_BY = "bitloot/requested_by"
TAG_ATTEMPT = "bitloot/attempt"
TRIGGER_SENSOR = "sensor"
TRIGGER_ADMIN = "admin"
MAX_TAG_CHARS = 200  # tags are indexed and listed; the full reason lives in the audit table


def request_tags(order_id: str, *, trigger: str, reason: str, requested_by: str) -> dict[str, str]:
    return {
        TAG_ORDER_ID: order_id.strip()[:MAX_TAG_CHARS],
        TAG_TRIGGER: trigger,
        TAG_REASON: reason.strip()[:MAX_TAG_CHARS],
        TAG_REQUESTED_BY: requested_by.strip()[:MAX_TAG_CHARS],
    }
