"""Dagster resource wrapping the Resend adapter.

Wire the key as `EnvVar("RESEND_API_KEY")`, the sender from `EMAIL_FROM` and the base from
`RESEND_BASE_URL` in the definitions; never as run config.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from bitloot_reconcile.adapters.resend import DEFAULT_BASE_URL, ResendClient

DEFAULT_SENDER = "orders@bitloot.io"  # BitLoot's EMAIL_FROM default


class ResendResource(dg.ConfigurableResource):
    """Gives ops a Resend client and the sender address. Use the client as a context manager."""

    base_url: str = Field(default=DEFAULT_BASE_URL, description="Resend API base (RESEND_BASE_URL).")
    api_key: str = Field(repr=False, description="Resend API key (RESEND_API_KEY); supply it as an EnvVar.")
    sender: str = Field(default=DEFAULT_SENDER, description="From address of customer emails (EMAIL_FROM).")
    timeout_seconds: float = Field(default=15.0, gt=0, description="Timeout of every HTTP call, in seconds.")

    def get_client(self) -> ResendClient:
        return ResendClient(self.base_url or DEFAULT_BASE_URL, self.api_key, timeout=self.timeout_seconds)
