"""BitLoot's switches, read only: its feature flags and its email suppression list. A BitLoot older than its
switches has neither table; that reads as every flag on and no address suppressed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import sqlalchemy as sa

from bitloot_reconcile.store.base import StoreBase
from bitloot_reconcile.store.models import EmailBounce
from bitloot_reconcile.store.schema import email_bounces, feature_flags


class SharedFlags:
    """BitLoot's flags as last read, shared by the attempt views of one batch: read again once `max_age_seconds`
    old, so a batch's workers read them about once a second instead of before every step of every order."""

    def __init__(self, max_age_seconds: float):
        self.max_age_seconds = max_age_seconds
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._rows: dict[str, bool] | None = None

    def get(self, read: Callable[[], dict[str, bool] | None]) -> dict[str, bool] | None:
        with self._lock:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= self.max_age_seconds:
                self._rows, self._read_at = read(), now
            return self._rows


class BitLootSwitches(StoreBase):
    _flags: SharedFlags | None = None

    def feature_flags(self) -> dict[str, bool] | None:
        """Every flag row in one query (or the batch's shared read, `sharing_flags`); None when BitLoot has no
        `feature_flags` table (older than its flags)."""
        return self._flags.get(self._read_flags) if self._flags is not None else self._read_flags()

    def _read_flags(self) -> dict[str, bool] | None:
        try:
            with self._autocommit() as conn:
                rows = conn.execute(sa.select(feature_flags.c.name, feature_flags.c.enabled))
                return {row.name: bool(row.enabled) for row in rows}
        except sa.exc.DBAPIError:
            if self._has_table(feature_flags):
                raise
            return None

    def email_suppression(self, email: str) -> EmailBounce | None:
        """The latest hard bounce or complaint for this address, as BitLoot checks before sending; None when
        there is none or BitLoot has no `email_bounces` table."""
        query = (
            sa.select(email_bounces.c.type, email_bounces.c.reason, email_bounces.c.bouncedAt)
            # Addresses may differ in case between checkout and the bounce report; read once per email.
            .where(sa.func.lower(email_bounces.c.email) == email.strip().lower(),
                   email_bounces.c.type.in_(("hard", "complaint")))
            .order_by(email_bounces.c.bouncedAt.desc())
            .limit(1)
        )
        try:
            with self._autocommit() as conn:
                row = conn.execute(query).first()
        except sa.exc.DBAPIError:
            if self._has_table(email_bounces):
                raise
            return None
        return EmailBounce(row.type, row.reason, row.bouncedAt) if row else None
