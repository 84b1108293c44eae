"""The store's read models (what a read hands back) and its errors: plain frozen dataclasses, no statements."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, fields
from decimal import Decimal

import sqlalchemy as sa


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def naive_utc(moment: dt.datetime) -> dt.datetime:
    """BitLoot's columns are TIMESTAMP WITHOUT TIME ZONE holding UTC."""
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class Item:
    id: str
    product_id: str
    quantity: int
    unit_price: Decimal
    source_type: str
    signed_url: str | None
    product_title: str | None
    product_source_type: str | None
    kinguin_product_id: str | None
    kinguin_offer_id: str | None
    product_cost: Decimal | None
    is_preorder: bool
    key_refs: tuple[str, ...] = ()

    @property
    def delivered(self) -> bool:
        """BitLoot treats an item as delivered when it has a signed URL; we also need its keys row."""
        return bool(self.signed_url) and bool(self.key_refs)


@dataclass(frozen=True)
class Payment:
    external_id: str
    status: str


@dataclass(frozen=True)
class Order:
    id: str
    email: str
    status: str
    source_type: str
    total: Decimal
    kinguin_reservation_id: str | None
    completion_email_sent: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    items: tuple[Item, ...] = ()
    payments: tuple[Payment, ...] = ()


@dataclass(frozen=True)
class StuckOrder:
    id: str
    status: str
    updated_at: dt.datetime
    completion_email_sent: bool
    attempts: int
    last_run_id: str | None = None  # the last run that recorded an outcome


@dataclass(frozen=True)
class BacklogOrder:
    """An order that is not done (paid or perhaps paid and undelivered, or fulfilled without the email), with
    its reconcile state (a default one when the project never touched it)."""

    id: str
    status: str
    completion_email_sent: bool
    created_at: dt.datetime  # naive UTC, as BitLoot stores it
    updated_at: dt.datetime
    kinguin_reservation_id: str | None
    state: ReconcileState


@dataclass(frozen=True)
class FulfilledOrder:
    """An order fulfilled lately, for the board's trend figures."""

    id: str
    created_at: dt.datetime  # naive UTC
    updated_at: dt.datetime
    kinguin_reservation_id: str | None
    last_outcome: str | None  # the project's last outcome on it; None when BitLoot fulfilled it alone
    placement_intent_at: dt.datetime | None


@dataclass(frozen=True)
class EmailBounce:
    type: str  # hard | complaint (soft bounces never suppress)
    reason: str | None
    bounced_at: dt.datetime


@dataclass(frozen=True)
class ReconcileState:
    order_id: str
    attempts: int = 0
    next_attempt_at: dt.datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    placement_intent_at: dt.datetime | None = None
    waiting_since: dt.datetime | None = None
    last_outcome: str | None = None
    last_reason: str | None = None
    last_run_id: str | None = None
    alerted_outcome: str | None = None
    replacements: int = 0
    replaced_kinguin_order_id: str | None = None


def state_from_row(row: sa.RowMapping, prefix: str = "") -> ReconcileState:
    """The state row's columns, named `{prefix}{column}` in `row`."""
    return ReconcileState(**{f.name: row[f"{prefix}{f.name}"] for f in fields(ReconcileState)})


class LeaseLost(Exception):
    """The run no longer holds the order's lease: it expired and another run took the order over."""

    def __init__(self, order_id: str, owner: str):
        self.order_id = order_id
        self.owner = owner
        super().__init__(f"run {owner} no longer holds the lease of order {order_id}")


class ProjectTablesMissing(RuntimeError):
    """The store database lacks the project's tables: the migrations were never run against it."""


UNDEFINED_TABLE = "42P01"  # PostgreSQL's SQLSTATE


def needs_project_tables(read):
    """The first reads of the sweep and the dry run: a database without the project's tables gets a
    sentence that says what to do, not a driver traceback."""

    @functools.wraps(read)
    def checked(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        except (sa.exc.ProgrammingError, sa.exc.OperationalError) as exc:
            if getattr(exc.orig, "sqlstate", None) != UNDEFINED_TABLE and "no such table" not in str(exc.orig):
                raise
            raise ProjectTablesMissing(
                "the store database has no reconcile tables: run `bitloot-reconcile db upgrade` first"
            ) from None

    return checked

