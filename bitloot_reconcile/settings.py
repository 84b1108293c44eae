"""Environment variables, under BitLoot's own names so one `.env` serves both systems (DESIGN section 3)."""

from __future__ import annotations

import os

DEFAULTS = {
    "KINGUIN_BASE_URL": "https://gateway.kinguin.net/esa/api",
    "NOWPAYMENTS_BASE": "https://api.nowpayments.io",
    "RESEND_BASE_URL": "https://api.resend.com",
    "R2_BUCKET": "bitloot-keys",
    "EMAIL_FROM": "orders@bitloot.io",
    "FRONTEND_URL": "https://bitloot.io",
}


def env(name: str) -> str:
    """The variable's value, BitLoot's default where it has one, else a clear error naming the variable."""
    value = os.environ.get(name) or DEFAULTS.get(name)
    if not value:
        raise RuntimeError(f"environment variable {name} is not set")
    return value
