"""The "order completed" email, as BitLoot's `keyDelivery` template words it: a link to the order, never a key."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from html import escape

from bitloot_reconcile.store.repository import Order


def completion_subject(order: Order) -> str:
    return f"Your BitLoot Purchase is Ready — Order #{order.id[:8].upper()}"


def completion_html(order: Order, frontend_url: str) -> str:
    lines: Counter[tuple[str, Decimal]] = Counter()
    for item in order.items:
        lines[(item.product_title or item.product_id, item.unit_price)] += item.quantity
    rows = "".join(
        f"<tr><td>{escape(title)}</td><td>{qty}</td><td>€{price:.2f}</td></tr>"
        for (title, price), qty in sorted(lines.items())
    )
    link = f"{frontend_url.rstrip('/')}/orders/{order.id}/success"
    return (
        f"<h1>Your order is complete</h1>"
        f"<p>Order #{order.id[:8].upper()} ({escape(order.id)}) — <strong>Completed</strong></p>"
        f"<table><tr><th>Product</th><th>Qty</th><th>Price</th></tr>{rows}</table>"
        f"<p>Total Paid: €{order.total:.2f}</p>"
        f'<p><a href="{escape(link)}">View your keys</a></p>'
        f"<p style=\"font-size:12px\">You received this email because you placed an order at BitLoot.</p>"
    )
