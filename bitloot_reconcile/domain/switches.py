"""BitLoot's own switches: its feature flags and its email suppression list, obeyed the way BitLoot obeys them.

The flags are read (one query) at the start of every sweep tick and every run, and again just before each
step that would call Kinguin or Resend, so switching a flag off stops a running order at its next such step.
A held order ends the run as `paused`: nothing more is done, no attempt is used up, and the sweep looks again
after a short while. No Dagster here.

  fulfillment_enabled off, maintenance_mode on: nothing is fulfilled; the sweep launches nothing.
  auto_fulfill_enabled off: the sweep launches nothing; admin runs still work.
  kinguin_enabled off: no Kinguin call; payment checks and email-only recoveries still run.
  email_notifications_enabled off: no email; the order stays "email pending" until the flag is back.
  A hard bounce or complaint for the address: no email, ever; the order is fulfilled, the email suppressed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from bitloot_reconcile.domain.fulfilment import Stop, refusal, under_lease
from bitloot_reconcile.domain.outcomes import Outcome, Progress
from bitloot_reconcile.store.repository import EmailBounce, Order, Store
from bitloot_reconcile.store.schema import SEEDED_FEATURE_FLAGS
from bitloot_reconcile.store.statuses import OrderStatus

log = logging.getLogger(__name__)

# A flag without a row counts as the value BitLoot's migration seeds for it.
FLAG_DEFAULTS: Mapping[str, bool] = {name: enabled for name, enabled, _ in SEEDED_FEATURE_FLAGS}
_said_flags_missing = False
MAX_BOUNCE_REASON_CHARS = 200  # the mail server's words, quoted in the recorded reason


@dataclass(frozen=True)
class Switches:
    flags: Mapping[str, bool]

    @classmethod
    def from_rows(cls, rows: Mapping[str, bool]) -> Switches:
        return cls({**FLAG_DEFAULTS, **rows})

    def _on(self, name: str) -> bool:
        return self.flags.get(name, True)

    @property
    def fulfilment_hold(self) -> str | None:
        """Why nothing may be fulfilled at all, or None."""
        if self._on("maintenance_mode"):
            return "BitLoot is in maintenance mode"
        if not self._on("fulfillment_enabled"):
            return "fulfillment is switched off in BitLoot"
        return None

    @property
    def sweep_hold(self) -> str | None:
        """Why the sweep (and a run it launched) may not recover orders by itself, or None."""
        if self.fulfilment_hold:
            return self.fulfilment_hold
        if not self._on("auto_fulfill_enabled"):
            return "automatic fulfillment is switched off in BitLoot (admin runs still work)"
        return None

    @property
    def kinguin_hold(self) -> str | None:
        return self.fulfilment_hold or (None if self._on("kinguin_enabled") else "Kinguin is switched off in BitLoot")

    @property
    def email_hold(self) -> str | None:
        if self.fulfilment_hold:
            return self.fulfilment_hold
        return None if self._on("email_notifications_enabled") else "email notifications are switched off in BitLoot"


def read_switches(store: Store) -> Switches:
    """BitLoot's flags now. A BitLoot older than its flags counts as everything on (said once in the log)."""
    global _said_flags_missing
    rows = store.feature_flags()
    if rows is None:
        if not _said_flags_missing:
            log.warning("BitLoot has no feature_flags table (an older BitLoot): every switch counts as on")
            _said_flags_missing = True
        return Switches.from_rows({})
    return Switches.from_rows(rows)


def claim_hold(switches: Switches, order: Order, *, admin: bool) -> str | None:
    """Why a run is held before it takes the lease. Requests that `load_and_claim` refuses (nothing to
    recover) are left to it, so they still fail as input errors. A sensor-launched run also honours the
    switches that stop the sweep."""
    if refusal(order, admin=True) is not None:
        return None
    return switches.fulfilment_hold if admin else switches.sweep_hold


def email_waits(why: str) -> str:
    return f"keys delivered; completion email waits: {why}"


def email_suppressed(bounce: EmailBounce) -> str:
    said = f": {bounce.reason[:MAX_BOUNCE_REASON_CHARS]}" if bounce.reason else ""
    return (
        f"keys delivered; completion email suppressed: the address has a {bounce.type} bounce "
        f"from {bounce.bounced_at:%Y-%m-%d}{said}"
    )


def hold_before_claim(store: Store, order_id: str, *, owner: str, admin: bool) -> Progress | None:
    """A held run ends here, before it takes the lease: it uses no attempt and changes nothing."""
    order = store.load_order(order_id)
    if order is None:
        return None
    why = claim_hold(read_switches(store), order, admin=admin)
    return Progress(order_id=order.id, lease_owner=owner).stop(Outcome.PAUSED, why) if why else None


def kinguin_held(switches: Switches, order: Order | None) -> Stop | None:
    """Why a step that would call Kinguin is held; a fulfilled order needs no Kinguin call and passes."""
    why = switches.kinguin_hold
    if why is None or order is None or order.status == OrderStatus.FULFILLED:
        return None
    return Stop(Outcome.PAUSED, why)


def hold_before_kinguin(store: Store, progress: Progress) -> Progress:
    """Before a step that would call Kinguin (BitLoot's flags read now)."""
    if progress.finished:
        return progress
    held = kinguin_held(read_switches(store), store.load_order(progress.order_id))
    return progress.stop(held.outcome, held.reason) if held else progress


def email_stop(switches: Switches, bounce: EmailBounce | None) -> Stop | None:
    """Why the completion email is not sent: a switch holds it (`paused`: the order stays email pending), or a
    hard bounce or complaint for the address suppresses it for good (`fulfilled`)."""
    if why := switches.email_hold:
        return Stop(Outcome.PAUSED, email_waits(why))
    if bounce is not None:
        return Stop(Outcome.FULFILLED, email_suppressed(bounce))
    return None


@under_lease
def hold_before_email(store: Store, progress: Progress) -> Progress:
    """Before the completion email: a switch holds it (the order stays email pending); a hard bounce or
    complaint for the address suppresses it for good, recorded once through `completionEmailSent`."""
    # Read fresh: the email cannot be taken back, and BitLoot may have sent it since this attempt read the order.
    order = store.load_order(progress.order_id, fresh=True)
    if order is None or order.status != OrderStatus.FULFILLED or order.completion_email_sent:
        return progress
    held = email_stop(read_switches(store), store.email_suppression(order.email))
    if held is None:
        return progress
    if held.outcome is not Outcome.PAUSED:
        # Suppressed: flag the email as handled, as BitLoot does for a send it skips; the sweep never comes back.
        store.mark_email_sent(order.id, owner=progress.lease_owner)
    return progress.stop(held.outcome, held.reason)
