"""Dagster resource wrapping the NOWPayments adapter.

Wire the key as `EnvVar("NOWPAYMENTS_API_KEY")` in the definitions, never as run config; the base comes from
the settings (`NOWPAYMENTS_BASE`), it is no secret. The base is the API root (`https://api.nowpayments.io`); a
base ending in `/v1`, as BitLoot's own `.env` has it, also works.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from bitloot_reconcile.adapters.nowpayments import DEFAULT_BASE_URL, NowPaymentsClient


class NowPaymentsResource(dg.ConfigurableResource):
    """Gives ops a NOWPayments client; use it as a context manager: `with res.get_client() as np: ...`."""

    base_url: str = Field(default=DEFAULT_BASE_URL, description="NOWPayments API root (NOWPAYMENTS_BASE).")
    api_key: str = Field(repr=False,
                         description="NOWPayments API key (NOWPAYMENTS_API_KEY); supply it as an EnvVar.")
    timeout_seconds: float = Field(default=15.0, gt=0, description="Timeout of every HTTP call, in seconds.")

    def get_client(self) -> NowPaymentsClient:
        return NowPaymentsClient(self.base_url or DEFAULT_BASE_URL, self.api_key,
                                 timeout=self.timeout_seconds)
