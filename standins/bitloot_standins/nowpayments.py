"""NOWPayments stand-in: `GET /v1/payment/{id}` over real HTTP, with the provider's auth and error shapes.

Tests and the demo seed payments with `set_payment()` and move them along with `set_status()`. Faults are
injected on the route named "get_payment" (see httpserver.Fault). Every request is recorded (`requests`,
`requests_to("get_payment")`).

Shapes follow NOWPayments: payment ids are JSON numbers when numeric, amounts are JSON numbers, errors are
`{"status": false, "statusCode": ..., "code": "...", "message": "..."}`.
"""

from __future__ import annotations

import copy
import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from bitloot_standins.httpserver import JsonServer, Response

STATUSES = frozenset({"waiting", "confirming", "confirmed", "sending", "partially_paid", "finished", "failed",
                      "refunded", "expired"})
_RECEIVED = frozenset({"confirmed", "sending", "finished"})  # the full pay_amount has arrived

_CANNED = {
    400: ("BAD_REQUEST", "Bad request"),
    401: ("INVALID_API_KEY", "Invalid api key"),
    403: ("INVALID_API_KEY", "Invalid api key"),
    404: ("NOT_FOUND", "Not found"),
    429: ("TOO_MANY_REQUESTS", "Too many requests"),
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _num(value: Any) -> Any:
    """JSON-friendly number: Decimals become floats (NOWPayments sends plain JSON numbers)."""
    return float(value) if isinstance(value, Decimal) else value


def _error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"status": False, "statusCode": status, "code": code, "message": message}


class NowPaymentsSimulator(JsonServer):
    """In-memory NOWPayments. Only the payment-status endpoint the reconciler uses is served."""

    name = "nowpayments"

    def __init__(self, api_key: str = "sim-nowpayments-key", host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.api_key = api_key
        self.payments: dict[str, dict[str, Any]] = {}
        self.route("GET", r"/v1/payment/(?P<payment_id>[^/]+)", "get_payment", self._get_payment)

    # -- control API ---------------------------------------------------------------------------------------
    def set_payment(self, payment_id: str | int, status: str, *, order_id: str | None = None,
                    price_amount: float | Decimal = 19.99, price_currency: str = "eur",
                    pay_amount: float | Decimal | None = None, pay_currency: str = "btc",
                    actually_paid: float | Decimal | None = None, invoice_id: str | int | None = None,
                    order_description: str | None = None, allow_unknown_status: bool = False,
                    **extra: Any) -> dict[str, Any]:
        """Create or replace a payment; returns (a copy of) the body GET will serve.

        `actually_paid` defaults from the status: the full `pay_amount` once received (confirmed, sending,
        finished), half of it for partially_paid, else 0. `extra` fields are served as given (e.g.
        `outcome_amount=...`). Unknown statuses are refused unless `allow_unknown_status=True`, which exists
        to test how clients treat a status NOWPayments might add later.
        """
        if status not in STATUSES and not allow_unknown_status:
            raise ValueError(f"unknown NOWPayments status {status!r}; expected one of {sorted(STATUSES)}")
        pid = str(payment_id)
        if pay_amount is None:
            pay_amount = round(float(price_amount) / 50000.0, 8)  # a made-up but stable BTC/EUR rate
        if actually_paid is None:
            actually_paid = self._default_paid(status, pay_amount)
        with self._lock:
            created = self.payments.get(pid, {}).get("created_at") or _now()
            digest = hashlib.sha256(pid.encode()).hexdigest()
            payment: dict[str, Any] = {
                "payment_id": int(pid) if pid.isdigit() else pid,
                "invoice_id": int(invoice_id) if isinstance(invoice_id, str) and invoice_id.isdigit()
                else invoice_id,
                "payment_status": status,
                "pay_address": f"bc1q{digest[:38]}",
                "payin_extra_id": None,
                "price_amount": _num(price_amount),
                "price_currency": price_currency,
                "pay_amount": _num(pay_amount),
                "actually_paid": _num(actually_paid),
                "actually_paid_at_fiat": 0,
                "pay_currency": pay_currency,
                "order_id": order_id,
                "order_description": order_description,
                "purchase_id": str(int(digest[:12], 16)),
                "outcome_amount": None,
                "outcome_currency": pay_currency,
                "payout_hash": None,
                "payin_hash": None,
                "created_at": created,
                "updated_at": _now(),
                "burning_percent": None,
                "type": "crypto2crypto",
            }
            payment.update({k: _num(v) for k, v in extra.items()})
            self.payments[pid] = payment
            return copy.deepcopy(payment)

    def set_status(self, payment_id: str | int, status: str, *, allow_unknown_status: bool = False) -> None:
        """Move an existing payment to another status (actually_paid follows as in set_payment)."""
        if status not in STATUSES and not allow_unknown_status:
            raise ValueError(f"unknown NOWPayments status {status!r}; expected one of {sorted(STATUSES)}")
        with self._lock:
            payment = self.payments[str(payment_id)]
            payment["payment_status"] = status
            payment["actually_paid"] = _num(self._default_paid(status, payment["pay_amount"]))
            payment["updated_at"] = _now()

    def payment(self, payment_id: str | int) -> dict[str, Any] | None:
        with self._lock:
            found = self.payments.get(str(payment_id))
            return copy.deepcopy(found) if found is not None else None

    @staticmethod
    def _default_paid(status: str, pay_amount: Any) -> Any:
        if status in _RECEIVED:
            return pay_amount
        if status == "partially_paid":
            return round(float(pay_amount) / 2, 8)
        return 0

    # -- protocol ------------------------------------------------------------------------------------------
    def authorize(self, headers: dict[str, str]) -> Response | None:
        if headers.get("x-api-key") != self.api_key:
            return Response(401, _error(401, "INVALID_API_KEY", "Invalid api key"))
        return None

    def not_found(self, method: str, path: str) -> Response:
        return Response(404, _error(404, "NOT_FOUND", f"Cannot {method} {path}"))

    def canned_error(self, status: int, method: str, path: str) -> Any:
        code, message = _CANNED.get(status, ("INTERNAL_ERROR" if status >= 500 else "ERROR",
                                             "Internal server error" if status >= 500 else "Request failed"))
        return _error(status, code, message)

    def _get_payment(self, *, payment_id: str, **_: Any) -> Response:
        payment = self.payments.get(unquote(payment_id))
        if payment is None:
            return Response(404, _error(404, "PAYMENT_NOT_FOUND", f"Payment {unquote(payment_id)} not found"))
        return Response(200, copy.deepcopy(payment))
