"""Behaviour settings of the recovery and the sweep, in one resource so operators tune them in one place."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping

import dagster as dg
from pydantic import model_validator

from bitloot_reconcile.domain.schedule import RetrySchedule


class ReconcilePolicy(dg.ConfigurableResource):
    frontend_url: str = "https://bitloot.io"
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

    @model_validator(mode="after")
    def _waits_fit_in_the_lease(self) -> ReconcilePolicy:
        longest = max(self.max_retry_wait_seconds, self.supplier_poll_seconds)
        if longest * 2 > self.lease_seconds:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}) must be at least twice the longest in-run wait "
                f"(max_retry_wait_seconds {self.max_retry_wait_seconds}, supplier_poll_seconds "
                f"{self.supplier_poll_seconds})"
            )
        return self

    @classmethod
    def overrides_from_env(cls, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """Tunables from `RECONCILE_<FIELD>` variables (e.g. RECONCILE_GRACE_MINUTES), for the demo and ops."""
        environ = os.environ if environ is None else environ
        names = (name for name in cls.model_fields if name != "frontend_url")
        return {name: environ[f"RECONCILE_{name.upper()}"] for name in names if f"RECONCILE_{name.upper()}" in environ}

    @property
    def lease_ttl(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.lease_seconds)

    def retry_schedule(self) -> RetrySchedule:
        return RetrySchedule(
            backoff_base_seconds=self.backoff_base_seconds,
            backoff_cap_seconds=self.backoff_cap_seconds,
            max_attempts=self.max_attempts,
            supplier_deadline_hours=self.supplier_deadline_hours,
            hold_recheck_seconds=self.hold_recheck_seconds,
        )
