"""Dagster resource for the R2 key vault."""

from __future__ import annotations

import dagster as dg
from pydantic import Field, PrivateAttr

from bitloot_reconcile.adapters.r2 import (
    DEFAULT_BUCKET,
    DEFAULT_PRESIGN_SECONDS,
    KeyVault,
    resolve_endpoint,
)


class R2Resource(dg.ConfigurableResource):
    """R2 (S3-compatible) storage of delivered keys, for ops and assets.

    `get_vault()` returns a `KeyVault` (built once per resource instance, thread-safe, reused)::

        vault = r2.get_vault()
        created = vault.put_key(path, data, content_type)
        url = vault.presign_get(path, filename=name, content_type=content_type)

    `access_key_id` and `secret_access_key` are secrets: give them as `dagster.EnvVar("R2_ACCESS_KEY_ID")` and
    `dagster.EnvVar("R2_SECRET_ACCESS_KEY")`, never as run config. The presigned URLs the vault returns are
    bearer credentials too: store them, never log them or put them in op outputs or event metadata.
    """

    account_id: str = Field(default="", description="Cloudflare account id (R2_ACCOUNT_ID); used to derive "
                            "the endpoint when `endpoint` is empty.")
    endpoint: str = Field(default="", description="S3 endpoint (R2_ENDPOINT). Empty: "
                          "https://{account_id}.r2.cloudflarestorage.com")
    access_key_id: str = Field(description="R2 access key id. Pass as EnvVar('R2_ACCESS_KEY_ID').")
    secret_access_key: str = Field(repr=False, description="R2 secret access key. "
                                   "Pass as EnvVar('R2_SECRET_ACCESS_KEY').")
    bucket: str = Field(default=DEFAULT_BUCKET, description="Bucket holding the keys (R2_BUCKET).")
    presign_expiry_seconds: int = Field(default=DEFAULT_PRESIGN_SECONDS,
                                        description="Lifetime of presigned download URLs (3 h, at most 7 days).")

    _vault: KeyVault | None = PrivateAttr(default=None)

    @property
    def endpoint_url(self) -> str:
        return resolve_endpoint(self.endpoint, self.account_id)

    def get_vault(self) -> KeyVault:
        if self._vault is None:
            self._vault = KeyVault(
                self.endpoint_url,
                self.access_key_id,
                self.secret_access_key,
                self.bucket,
                presign_expiry_seconds=self.presign_expiry_seconds,
            )
        return self._vault

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._vault is not None:
            self._vault.close()
            self._vault = None
