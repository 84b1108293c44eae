"""All stand-ins at once (Kinguin, NOWPayments, Resend, S3 behind an outage proxy), for the demo and
`bitloot-reconcile sandbox`. The keys are sandbox values, not secrets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bitloot_reconcile.adapters.r2 import KeyVault
from bitloot_standins.kinguin import KinguinSimulator
from bitloot_standins.nowpayments import NowPaymentsSimulator
from bitloot_standins.resend import ResendSimulator
from bitloot_standins.s3 import SeaweedS3
from bitloot_standins.s3_proxy import FaultyS3Proxy

KINGUIN_KEY = "sandbox-kinguin-key"
NOWPAYMENTS_KEY = "sandbox-nowpayments-key"
RESEND_KEY = "re_sandbox_key"
BUCKET = "bitloot-keys"


@dataclass
class StandIns:
    data_dir: Path | None = None
    # Seconds SeaweedFS gets to shut down cleanly before SIGKILL (None: its own default, see `SeaweedS3.stop`).
    s3_stop_grace: float | None = None
    kinguin: KinguinSimulator = field(init=False)
    nowpayments: NowPaymentsSimulator = field(init=False)
    resend: ResendSimulator = field(init=False)
    s3: SeaweedS3 = field(init=False)
    r2_proxy: FaultyS3Proxy = field(init=False)

    def start(self) -> StandIns:
        self.s3 = SeaweedS3(data_dir=self.data_dir).start()
        self.r2_proxy = FaultyS3Proxy(self.s3.endpoint_url).start()
        self.kinguin = KinguinSimulator(api_key=KINGUIN_KEY, balance=5000.0)
        self.kinguin.start()
        self.nowpayments = NowPaymentsSimulator(api_key=NOWPAYMENTS_KEY)
        self.nowpayments.start()
        self.resend = ResendSimulator(api_key=RESEND_KEY)
        self.resend.start()
        self.vault().ensure_bucket()
        return self

    def stop(self) -> None:
        for server in (self.kinguin, self.nowpayments, self.resend, self.r2_proxy):
            server.stop()
        self.s3.stop(self.s3_stop_grace)

    def __enter__(self) -> StandIns:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_sample_products(self) -> dict[str, str]:
        """A small catalogue at the Kinguin simulator, for trying the API by hand: productId -> name."""
        catalogue = {
            "5c9b68662539a4e8f17ae2fe": ("Minecraft Java Edition", 19.90, "text/plain"),
            "5f7efd272f3a650001f42722": ("Hollow Knight", 9.50, "image/png"),
        }
        for product_id, (name, price, key_type) in catalogue.items():
            self.kinguin.add_product(product_id, price=price, name=name, key_type=key_type)
        return {product_id: name for product_id, (name, _, _) in catalogue.items()}

    def vault(self) -> KeyVault:
        return KeyVault(self.r2_proxy.url, self.s3.access_key_id, self.s3.secret_access_key, BUCKET)

    def env(self) -> dict[str, str]:
        """The environment under BitLoot's names that points the code location at these stand-ins."""
        return {
            "KINGUIN_BASE_URL": self.kinguin.base_url,
            "KINGUIN_API_KEY": KINGUIN_KEY,
            "NOWPAYMENTS_BASE": self.nowpayments.url,
            "NOWPAYMENTS_API_KEY": NOWPAYMENTS_KEY,
            "RESEND_BASE_URL": self.resend.url,
            "RESEND_API_KEY": RESEND_KEY,
            "R2_ENDPOINT": self.r2_proxy.url,
            "R2_ACCESS_KEY_ID": self.s3.access_key_id,
            "R2_SECRET_ACCESS_KEY": self.s3.secret_access_key,
            "R2_BUCKET": BUCKET,
        }
