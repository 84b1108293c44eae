"""What each of BitLoot's switches holds back, as pure rules (the real-store behaviour is in tests/ops)."""

from __future__ import annotations

import logging

import pytest

from bitloot_reconcile.domain import switches
from bitloot_reconcile.domain.switches import Switches, read_switches


def test_missing_rows_count_as_bitloots_seeded_values():
    everything_on = Switches.from_rows({})
    assert everything_on.sweep_hold is None
    assert everything_on.kinguin_hold is None
    assert everything_on.email_hold is None


@pytest.mark.parametrize(("rows", "sweep", "kinguin", "email"), [
    ({"fulfillment_enabled": False}, "fulfillment", "fulfillment", "fulfillment"),
    ({"maintenance_mode": True}, "maintenance", "maintenance", "maintenance"),
    ({"auto_fulfill_enabled": False}, "automatic", None, None),
    ({"kinguin_enabled": False}, None, "Kinguin", None),
    ({"email_notifications_enabled": False}, None, None, "email notifications"),
    ({"custom_products_enabled": False, "captcha_enabled": False}, None, None, None),
])
def test_each_flag_holds_what_bitloot_holds(rows, sweep, kinguin, email):
    found = Switches.from_rows(rows)
    for hold, word in ((found.sweep_hold, sweep), (found.kinguin_hold, kinguin), (found.email_hold, email)):
        assert (hold is None) if word is None else (word in hold)
    # Fulfilment holds apply to admin runs too; the automatic-fulfilment switch does not.
    assert (found.fulfilment_hold is not None) == (sweep in ("fulfillment", "maintenance"))


class OlderBitLoot:
    """A store whose BitLoot has no feature_flags table yet."""

    def feature_flags(self):
        return None


def test_a_missing_flags_table_means_everything_on_said_once(caplog, monkeypatch):
    monkeypatch.setattr(switches, "_said_flags_missing", False)
    caplog.set_level(logging.WARNING, logger=switches.__name__)
    assert read_switches(OlderBitLoot()) == Switches.from_rows({})
    assert read_switches(OlderBitLoot()).sweep_hold is None
    assert [r.getMessage() for r in caplog.records] == [
        "BitLoot has no feature_flags table (an older BitLoot): every switch counts as on"]
