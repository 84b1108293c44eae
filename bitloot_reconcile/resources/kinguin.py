"""Dagster resource for the Kinguin eCommerce API."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from bitloot_reconcile.adapters.kinguin import DEFAULT_BASE_URL, KinguinClient


class KinguinResource(dg.ConfigurableResource):
    """Kinguin API access for ops and assets.

    Call `get_client()` to get a fresh `KinguinClient`; it holds an HTTP connection pool, so close it, most
    simply by using it as a context manager::

        with kinguin.get_client() as client:
            order = client.get_order(kinguin_order_id)

    `api_key` is a secret: give it as `dagster.EnvVar("KINGUIN_API_KEY")`, never as run config.
    """

    base_url: str = Field(default=DEFAULT_BASE_URL, description="API root; the client appends /v1/... and /v2/...")
    api_key: str = Field(description="Kinguin store API key (X-Api-Key). Pass as EnvVar('KINGUIN_API_KEY').")
    timeout_seconds: float = Field(default=20.0, gt=0, description="Timeout of each HTTP call.")

    def get_client(self) -> KinguinClient:
        return KinguinClient(self.base_url, self.api_key, timeout=self.timeout_seconds)
