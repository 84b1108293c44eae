"""What an admin may do about an order that needs a person, beyond "retry the same thing" (plain Python).

Three remedies, each an optional field of an admin's `fulfill_order` run (and of `bitloot-reconcile retry`),
each explicit, bounded and recorded like every other run:

- a price ceiling (`max_unit_price_eur`): for this run only, Kinguin may be paid up to this much per unit for
  the lines whose cost is below it, at most `PriceBound` above each line's cost;
- a replacement (`replace_canceled_supplier_order`): the Kinguin order Kinguin canceled or refunded is
  replaced by a new one under a deterministic orderExternalId (`replacement_external_id`), so a retry of a
  replacement adopts it rather than buying twice;
- a resolution (`resolution`): the order is closed by hand and leaves the sweep for good.

A remedy is a person's act: sensor runs (and re-executions of them) never carry one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum

from bitloot_reconcile.domain.errors import InvalidRequest
from bitloot_reconcile.store.repository import Order

CENT = Decimal("0.01")
# The audit row a run with a remedy writes after its `requested` row (detail: `Remedy.label`); `history` reads it.
REMEDY_ACTION = "remedy"


class Resolution(StrEnum):
    """Member names are the values: Dagster's launchpad offers an enum's names."""

    refunded_to_customer = "refunded_to_customer"  # the shop refunded the customer: orders.status -> refunded
    delivered_elsewhere = "delivered_elsewhere"  # the customer got a key another way: the store is left as is
    written_off = "written_off"  # the shop gives up on it: the store is left as is


@dataclass(frozen=True)
class Remedy:
    max_unit_price_eur: Decimal | None = None
    replace_canceled_supplier_order: bool = False
    resolution: Resolution | None = None

    @classmethod
    def from_fields(cls, max_unit_price_eur: float | str | Decimal | None = None,
                    replace_canceled_supplier_order: bool = False, resolution: str | None = None) -> Remedy:
        """From the launchpad's or the command line's fields; a malformed value is an `InvalidRequest`."""
        ceiling = None
        if max_unit_price_eur is not None:
            try:
                ceiling = Decimal(str(max_unit_price_eur))
            except ArithmeticError:
                raise InvalidRequest(f"max_unit_price_eur {max_unit_price_eur!r} is not a number") from None
            if not ceiling.is_finite() or ceiling <= 0:
                raise InvalidRequest(f"max_unit_price_eur must be a price above 0 EUR, not {max_unit_price_eur}")
            ceiling = ceiling.quantize(CENT, ROUND_HALF_UP)
        chosen = None
        if resolution not in (None, ""):
            try:
                chosen = Resolution(str(resolution).strip())
            except ValueError:
                allowed = " | ".join(r.value for r in Resolution)
                raise InvalidRequest(f"resolution must be one of {allowed}, not {resolution!r}") from None
        remedy = cls(ceiling, bool(replace_canceled_supplier_order), chosen)
        if remedy.resolution and (remedy.max_unit_price_eur is not None or remedy.replace_canceled_supplier_order):
            raise InvalidRequest("resolution closes the order by hand: it cannot be combined with "
                                 "max_unit_price_eur or replace_canceled_supplier_order")
        return remedy

    def __bool__(self) -> bool:
        return self.max_unit_price_eur is not None or self.replace_canceled_supplier_order or bool(self.resolution)

    @property
    def label(self) -> str:
        """The `bitloot/remedy` tag and the audit row's words, e.g. `max_unit_price_eur=7.00`."""
        parts = []
        if self.max_unit_price_eur is not None:
            parts.append(f"max_unit_price_eur={self.max_unit_price_eur}")
        if self.replace_canceled_supplier_order:
            parts.append("replace_canceled_supplier_order")
        if self.resolution:
            parts.append(f"resolution={self.resolution}")
        return ",".join(parts)

    def as_config(self) -> dict:
        """The launchpad fields of this remedy (only those given)."""
        config: dict = {}
        if self.max_unit_price_eur is not None:
            config["max_unit_price_eur"] = float(self.max_unit_price_eur)
        if self.replace_canceled_supplier_order:
            config["replace_canceled_supplier_order"] = True
        if self.resolution:
            config["resolution"] = self.resolution.value
        return config


NO_REMEDY = Remedy()


def validate_remedy_request(remedy: Remedy, reason: str, requested_by: str) -> None:
    """A remedy is a person's decision: it says why and who, or it does not run."""
    if remedy and (not reason.strip() or not requested_by.strip()):
        raise InvalidRequest(f"a remedy ({remedy.label}) needs a reason and requested_by: say why and who decides")


def refuse_remedy_on_sweep_run(remedy: Remedy, *, admin: bool) -> None:
    if remedy and not admin:
        raise InvalidRequest(f"a remedy ({remedy.label}) is an admin's act: a sweep run or a re-execution of one "
                             "cannot carry it; launch fulfill_order with a reason and requested_by")


@dataclass(frozen=True)
class PriceBound:
    """How far above a product's cost an admin may raise the ceiling: both limits hold, the lower one wins
    (`RECONCILE_MAX_PRICE_OVER_COST_PERCENT`, `RECONCILE_MAX_PRICE_OVER_COST_EUR`)."""

    percent: float = 20.0
    eur: float = 5.0

    def limit(self, cost: Decimal) -> Decimal:
        by_percent = cost * (1 + Decimal(str(self.percent)) / 100)
        by_eur = cost + Decimal(str(self.eur))
        return min(by_percent, by_eur).quantize(CENT, ROUND_HALF_UP)

    @property
    def words(self) -> str:
        return f"+{self.percent:g}% or +{self.eur:.2f} EUR over cost, whichever is lower"


def ceiling_refusal(order: Order, ceiling: Decimal, bound: PriceBound) -> str | None:
    """Why this ceiling is refused for this order (above the bound for a line, or changing nothing), or None."""
    costs = sorted({(item.kinguin_product_id or item.product_id, item.product_cost or Decimal(0))
                    for item in order.items})
    for product, cost in costs:
        if ceiling > cost and ceiling > bound.limit(cost):
            return (f"max_unit_price_eur {ceiling} is above the bound for product {product}: cost {cost:.2f}, "
                    f"at most {bound.limit(cost)} ({bound.words})")
    if all(ceiling <= cost for _, cost in costs):
        return f"max_unit_price_eur {ceiling} is not above any line's cost: it would change nothing"
    return None


def unit_price(cost: Decimal, ceiling: Decimal | None) -> Decimal:
    """The most a line may be paid per unit: its cost, raised to the ceiling when one is given above it."""
    return max(cost, ceiling) if ceiling is not None else cost


def remedy_refusal(order: Order, remedy: Remedy, bound: PriceBound) -> str | None:
    """What the store says against this remedy (an input error, nothing changed), or None."""
    if remedy.max_unit_price_eur is not None and (refused := ceiling_refusal(order, remedy.max_unit_price_eur, bound)):
        return refused
    if remedy.replace_canceled_supplier_order and not order.kinguin_reservation_id:
        return f"replace_canceled_supplier_order: order {order.id} has no Kinguin order to replace"
    return None


# -- replacement Kinguin orders ----------------------------------------------------------------------------
_REPLACEMENT = re.compile(r"^(?P<order>[0-9a-fA-F-]{36}):r(?P<number>[1-9][0-9]*)$")


def replacement_external_id(order_id: str, number: int) -> str:
    """The orderExternalId of the order's `number`-th replacement: the same for every attempt at it, so
    Kinguin answers a second placement as a duplicate and the run adopts the first."""
    if number < 1:
        raise ValueError("replacements are numbered from 1")
    return f"{order_id}:r{number}"


def external_id_order(external_id: str | None) -> tuple[str, int] | None:
    """(order id, replacement number; 0 for the original) of an orderExternalId this project sends, else None."""
    if not external_id:
        return None
    match = _REPLACEMENT.match(external_id)
    if match:
        return match["order"].lower(), int(match["number"])
    if re.fullmatch(r"[0-9a-fA-F-]{36}", external_id):
        return external_id.lower(), 0
    return None


def price_against_cost(order: Order, lines: list[tuple[str, float | None]]) -> str | None:
    """`paid 6.20 per unit for <product> against cost 5.00 (+1.20)` for Kinguin's sold lines priced above
    the product's cost (`lines`: productId, price), or None when every line was bought at or below cost."""
    cost = {item.kinguin_product_id: item.product_cost for item in order.items if item.kinguin_product_id}
    above = []
    for product, price in lines:
        known = cost.get(product)
        if price is None or known is None or not math.isfinite(price):
            continue
        paid = Decimal(str(price)).quantize(CENT, ROUND_HALF_UP)
        if paid > known:
            above.append(f"paid {paid} per unit for {product} against cost {known:.2f} (+{paid - known:.2f})")
    return "; ".join(dict.fromkeys(above)) or None
