"""The chaos run of `benchmarks/chaos.py`: its invariant checker on hand-made states, and a small real run.

The small run (14 orders, every kind, faults, kills, concurrent and stalled runs) asserts that every violation
count is zero; its table is printed when it fails.
"""

from __future__ import annotations

import dataclasses
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import chaos  # noqa: E402  (benchmarks/ is not a package; its scripts import each other by name)

from bitloot_reconcile.domain.delivery import key_object_path  # noqa: E402

API_KEY = "kinguin-api-key-SECRET"
SERIAL = "KEY-ABCDEF123456-1"


def clean_state() -> chaos.Observed:
    """One paid order fulfilled and emailed, one unpaid order recorded as not paid: no violation."""
    paid, unpaid, item, unpaid_item = (str(uuid.uuid4()) for _ in range(4))
    return chaos.Observed(
        kinds={paid: "single", unpaid: "unpaid"},
        states={
            paid: chaos.OrderState("fulfilled", True, "fulfilled", None),
            unpaid: chaos.OrderState("waiting", False, "payment_not_confirmed", None),
        },
        items={paid: [item], unpaid: [unpaid_item]},
        signed_items={item},
        key_rows=[item],
        bucket={key_object_path(paid, item, "text/plain")},
        kinguin_orders=[(paid, "completed", 1)],
        emails=["a@example.com"],
        email_of={paid: "a@example.com", unpaid: "b@example.com"},
        documents={place: ["a clean line"] for place in chaos.SECRET_PLACES},
        secrets={"API key": [API_KEY], "key serial": [SERIAL]},
    )


def ids(observed: chaos.Observed) -> tuple[str, str, str]:
    paid, unpaid = list(observed.kinds)
    return paid, unpaid, observed.items[paid][0]


def test_clean_state_has_no_violation():
    assert not any(chaos.check(clean_state()).values())


def with_duplicate_key_row(o: chaos.Observed) -> None:
    o.key_rows.append(ids(o)[2])


def with_duplicate_kinguin_order(o: chaos.Observed) -> None:
    o.kinguin_orders.append((ids(o)[0], "canceled", 1))  # canceled: nothing charged twice


def with_duplicate_email(o: chaos.Observed) -> None:
    o.emails.append("a@example.com")


def with_keys_for_unpaid(o: chaos.Observed) -> None:
    o.key_rows.append(o.items[ids(o)[1]][0])


def with_missing_object(o: chaos.Observed) -> None:
    o.bucket.clear()


def with_undelivered_purchase(o: chaos.Observed) -> None:
    o.kinguin_orders[0] = (ids(o)[0], "completed", 3)


def with_unconverged_order(o: chaos.Observed) -> None:
    o.states[ids(o)[0]] = dataclasses.replace(o.states[ids(o)[0]], email_sent=False)


def with_order_never_repicked(o: chaos.Observed) -> None:
    o.never_repicked = 1


def with_secret(place: str, text: str):
    def change(o: chaos.Observed) -> None:
        o.documents[place].append(text)

    return change


CASES = [
    (with_duplicate_key_row, "duplicate key rows", 1),
    (with_duplicate_kinguin_order, "duplicate Kinguin orders", 1),
    (with_duplicate_email, "duplicate emails", 1),
    (with_keys_for_unpaid, "keys for unpaid orders", 1),
    (with_missing_object, "fulfilled orders missing a key", 1),
    (with_undelivered_purchase, "keys bought but not delivered", 2),
    (with_unconverged_order, "orders not converged", 1),
    (with_order_never_repicked, "killed orders never picked up", 1),
    (with_secret("event log", f"RetryRequested: kinguin said no (X-Api-Key {API_KEY})"), "secrets in event log", 1),
    (with_secret("compute logs", f"serial {SERIAL}"), "secrets in compute logs", 1),
    (with_secret("run storage", "https://r2/k?X-Amz-Signature=" + "ab" * 32), "secrets in run storage", 1),
    (with_secret("op outputs", SERIAL), "secrets in op outputs", 1),
    (with_secret("run output", API_KEY), "secrets in run output", 1),
]


@pytest.mark.parametrize(("change", "name", "count"), CASES, ids=[c[1] for c in CASES])
def test_each_violation_is_counted(change, name, count):
    observed = clean_state()
    change(observed)
    violations = chaos.check(observed)
    assert violations[name] == count
    assert sum(violations.values()) == count, violations


def test_every_check_has_a_case():
    assert {name for _, name, _ in CASES} == set(chaos.check(clean_state()))


def test_secrets_are_reported_by_kind():
    observed = clean_state()
    observed.documents["event log"].append(f"{SERIAL} and again {SERIAL}, X-Amz-Signature={'0' * 64}")
    assert chaos.secrets_found(observed)["event log"] == Counter({"key serial": 1, "URL signature": 1})


def test_small_chaos_run_has_no_violation(capsys):
    report = chaos.chaos_run(chaos.Settings(orders=14, seed=5, deadline=150))
    with capsys.disabled():
        chaos.print_report(report)
    assert report.kinds.keys() == chaos.KINDS.keys()
    assert sum(report.faults.values()) > 0 and sum(report.kills.values()) > 0 and report.concurrent_runs == 4
    assert {k: v for k, v in report.violations.items() if v} == {}
