"""Kinguin calls per order (docs/design.md section 10: 3 on the happy path, recovery adds one search).

Each order is a one-item paid order run through `fulfill_order` against the Kinguin simulator, SeaweedFS, the
NOWPayments and Resend simulators and a fresh PostgreSQL store. Calls are counted from the simulator's request
log, per order (runs go one at a time, so the log slice of a run belongs to its order).

- happy: Kinguin answers everything;
- recovery: the answer to POST /v2/order is lost after Kinguin created the order (the connection drops), the
  step is retried, finds the placement intent, searches by orderExternalId and adopts the order.

Usage: uv run python benchmarks/kinguin_calls.py [--orders 20]
"""

from __future__ import annotations

import argparse
from collections import Counter

from _harness import console, print_machine, print_table, stand_ins, stderr_to_file

from bitloot_reconcile.jobs import fulfill_order
from bitloot_standins.httpserver import Fault

ROUTES = ("place_order_v2", "search_orders", "get_order", "get_keys")


def run_orders(stack, order_ids: list[str], *, lose_placement_answer: bool) -> tuple[list[Counter], Counter]:
    resources = stack.resources()
    per_order, outcomes = [], Counter()
    for order_id in order_ids:
        if lose_placement_answer:
            stack.kinguin.inject("place_order_v2", Fault(lose_response=True))
        before = len(stack.kinguin.requests)
        result = fulfill_order.execute_in_process(
            run_config={"order_id": order_id, "reason": "benchmark", "requested_by": "bench@bitloot.io"},
            resources=resources, raise_on_error=False)
        outcomes[result.output_for_node("record_outcome") if result.success else "run failed"] += 1
        per_order.append(Counter(r.route for r in stack.kinguin.requests[before:] if r.route))
    return per_order, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=20, help="orders per scenario")
    args = parser.parse_args()
    print_machine()
    rows, notes = [], []
    with stand_ins() as stack, stderr_to_file("kinguin_calls"):
        product = stack.product()
        for scenario, lose in (("happy", False), ("recovery (lost placement answer)", True)):
            per_order, outcomes = run_orders(stack, stack.paid_orders(args.orders, product), lose_placement_answer=lose)
            means = {route: sum(c[route] for c in per_order) / len(per_order) for route in ROUTES}
            totals = [sum(c.values()) for c in per_order]
            rows.append([scenario, len(per_order), *(f"{means[r]:.2f}" for r in ROUTES),
                         f"{sum(totals) / len(totals):.2f}", f"{min(totals)}-{max(totals)}"])
            notes.append(f"{scenario}: outcomes {dict(outcomes)}")
        placed = Counter(o.order_external_id for o in stack.kinguin.orders.values())
        notes.append(f"Kinguin orders created: {sum(placed.values())} for {len(placed)} BitLoot orders "
                     f"(most for one order: {max(placed.values())})")
    print_table("Kinguin calls per order (mean over the orders of each scenario)",
                ["scenario", "orders", *ROUTES, "total", "range"], rows)
    for note in notes:
        console.print(note, highlight=False)
    console.print("targets: happy 3 (place, status, keys page); recovery 4 (+1 search)", highlight=False)


if __name__ == "__main__":
    main()
