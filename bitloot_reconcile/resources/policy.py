"""Behaviour settings of the recovery and the sweep, in one resource so operators tune them in one place.

The fields and their defaults are `settings.RecoveryPolicy`; the code location fills them from the
`RECONCILE_<NAME>` variables (`RecoveryPolicyResource.from_settings`).
"""

from __future__ import annotations

import datetime as dt

import dagster as dg
from pydantic import model_validator

from bitloot_reconcile.domain.schedule import RetrySchedule
from bitloot_reconcile.settings import DEFAULT_FRONTEND_URL, RecoveryPolicy, Settings


class RecoveryPolicyResource(dg.ConfigurableResource, RecoveryPolicy):
    frontend_url: str = DEFAULT_FRONTEND_URL

    @model_validator(mode="after")
    def _waits_fit_in_the_lease(self) -> RecoveryPolicyResource:
        longest = max(self.max_retry_wait_seconds, self.supplier_poll_seconds)
        if longest * 2 > self.lease_seconds:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}) must be at least twice the longest in-run wait "
                f"(max_retry_wait_seconds {self.max_retry_wait_seconds}, supplier_poll_seconds "
                f"{self.supplier_poll_seconds})"
            )
        return self

    @classmethod
    def from_settings(cls, settings: Settings) -> RecoveryPolicyResource:
        return cls(frontend_url=settings.frontend_url, **settings.reconcile.model_dump(include=set(cls.model_fields)))

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
