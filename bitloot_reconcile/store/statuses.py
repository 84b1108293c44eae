"""BitLoot's order statuses (`orders.status`, varchar) and the sets the project reasons with, defined once."""

from __future__ import annotations

from enum import StrEnum


class OrderStatus(StrEnum):
    CREATED = "created"
    WAITING = "waiting"
    CONFIRMING = "confirming"
    PAID = "paid"
    UNDERPAID = "underpaid"
    FAILED = "failed"
    EXPIRED = "expired"
    FULFILLED = "fulfilled"
    REFUNDED = "refunded"
    CANCELLED = "cancelled"


# The payment may have arrived although BitLoot's webhook never said so: NOWPayments decides.
UNPAID = (OrderStatus.WAITING, OrderStatus.CONFIRMING, OrderStatus.FAILED)
# Paid, or perhaps paid, and not delivered: what the sweep recovers.
RECOVERABLE = (OrderStatus.PAID, *UNPAID)
# Statuses a customer may have paid in without BitLoot knowing (the reconciliation report asks NOWPayments).
LOOKS_UNPAID = (*UNPAID, OrderStatus.CREATED)
