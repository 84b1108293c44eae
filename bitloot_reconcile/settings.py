"""Every environment variable the project reads, typed and with its default, in one object.

BitLoot's own names, so one `.env` serves both systems (the contract, docs/design.md section 3), plus the
`RECONCILE_<NAME>` tunables. The code location (once, when it loads: `definitions.py` passes the values down),
the command line and the demo read the environment through `load_settings`; a value of the wrong type stops
them with the variable's name.

Secrets are held as `SecretStr` (never printed); Dagster resources get them as `EnvVar` by name instead, so
the UI shows the names only. `DAGSTER_PG_URL` is not here: only Dagster's own `dagster.yaml` reads it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from bitloot_reconcile.domain.remedies import PriceBound

DEFAULT_FRONTEND_URL = "https://bitloot.io"
# What a `fulfill_order` run needs that has no default (the code location passes them on as EnvVar).
RUN_SECRETS = ("database_url", "kinguin_api_key", "nowpayments_api_key", "r2_access_key_id", "r2_secret_access_key",
               "resend_api_key")


class SettingsError(ValueError):
    """A variable is missing or has a value of the wrong type; the message names it."""


class RecoveryPolicy(BaseModel):
    """How the recovery and the sweep behave. The `RecoveryPolicyResource` carries these fields."""

    lease_seconds: int = 900
    supplier_poll_attempts: int = 2
    supplier_poll_seconds: float = 10.0
    # The longest a run parks between two attempts of a step (a service's Retry-After is capped to it). Every
    # attempt renews the lease, so a wait must stay well inside it or another run could take the order.
    max_retry_wait_seconds: float = 60.0
    grace_minutes: float = 10.0
    max_age_days: float = 30.0
    max_runs_per_tick: int = 25
    max_attempts: int = 8
    backoff_base_seconds: float = 60.0
    backoff_cap_seconds: float = 3600.0
    supplier_deadline_hours: float = 72.0
    hold_recheck_seconds: float = 300.0
    # How far above a product's cost an admin's `max_unit_price_eur` may go: both limits hold, the lower wins.
    max_price_over_cost_percent: float = Field(default=20.0, ge=0)
    max_price_over_cost_eur: float = Field(default=5.0, ge=0)
    # The backlog path: above `batch_threshold` due orders, the sweep launches one `fulfill_backlog` run of
    # at most `batch_max_orders` orders, worked `batch_workers` at a time, instead of one run each; while
    # `batch_max_runs` batches are in flight the next one waits.
    batch_threshold: int = Field(default=25, ge=0)
    batch_max_orders: int = Field(default=500, ge=1)
    batch_workers: int = Field(default=8, ge=1)
    batch_max_runs: int = Field(default=2, ge=1)

    @property
    def price_bound(self) -> PriceBound:
        return PriceBound(percent=self.max_price_over_cost_percent, eur=self.max_price_over_cost_eur)


class ReconcileVariables(RecoveryPolicy):
    """The `RECONCILE_<NAME>` variables: the policy, and the sensors' floors between ticks (read when the code
    location loads, as Dagster fixes them then)."""

    # A misspelt RECONCILE_ variable would otherwise be ignored without a word.
    model_config = ConfigDict(extra="forbid")

    sweep_interval_seconds: int = 30
    alert_interval_seconds: int = 60
    # The stuck-orders board's check: the oldest stuck order must be younger than this (ERROR past it).
    board_sla_minutes: float = 60.0

    def as_environment(self) -> dict[str, str]:
        """The values set on this object as variables, for the processes a caller starts (the demo's)."""
        return {f"RECONCILE_{name.upper()}": str(value) for name, value in self.model_dump(exclude_unset=True).items()}


class Settings(BaseSettings):
    # RECONCILE_GRACE_MINUTES -> reconcile.grace_minutes; an empty variable counts as unset, as BitLoot's do.
    model_config = SettingsConfigDict(env_nested_delimiter="_", env_nested_max_split=1, env_ignore_empty=True)

    database_url: SecretStr | None = None
    kinguin_base_url: str = "https://gateway.kinguin.net/esa/api"
    kinguin_api_key: SecretStr | None = None
    nowpayments_base: str = "https://api.nowpayments.io"
    nowpayments_api_key: SecretStr | None = None
    r2_account_id: str = ""
    r2_endpoint: str = ""  # empty: derived from r2_account_id
    r2_access_key_id: SecretStr | None = None
    r2_secret_access_key: SecretStr | None = None
    r2_bucket: str = "bitloot-keys"
    resend_base_url: str = "https://api.resend.com"
    resend_api_key: SecretStr | None = None
    email_from: str = "orders@bitloot.io"
    frontend_url: str = DEFAULT_FRONTEND_URL
    alert_webhook_url: SecretStr | None = None  # unset: alerts are only logged
    dagster_webserver_url: str | None = None  # links in alerts; the command line submits retries there
    dagster_home: str | None = None  # Dagster reads it itself; the command line only asks whether it is set
    reconcile: ReconcileVariables = Field(default_factory=ReconcileVariables)

    def secret(self, name: str) -> str:
        """The value of a secret the caller cannot do without."""
        value: SecretStr | None = getattr(self, name)
        if value is None:
            raise SettingsError(f"environment variable {name.upper()} is not set")
        return value.get_secret_value()


def load_settings() -> Settings:
    """The settings from the environment now; a bad value raises `SettingsError` naming each variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"bad environment: {problems}") from None
