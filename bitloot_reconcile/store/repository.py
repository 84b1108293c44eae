"""Every read and write the project makes to the store database, as SQLAlchemy Core statements.

Each method runs in its own short transaction, so a step's result is committed before the next step starts
(a crash between steps loses nothing that was already done). Writes to BitLoot's tables are guarded by
their WHERE clauses: a status is only moved from the states it may come from.
"""

from __future__ import annotations

import datetime as dt
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from bitloot_reconcile.store.schema import (
    SWEEP_EXCLUDED_OUTCOMES,
    email_bounces,
    feature_flags,
    order_items,
    orders,
    payments,
    products,
    reconcile_audit,
    reconcile_key_assignment,
    reconcile_state,
)
from bitloot_reconcile.store.schema import keys as keys_table
from bitloot_reconcile.store.statuses import RECOVERABLE, UNPAID, OrderStatus

# Rendered into the SQL text, not bound: a generic plan (plan_cache_mode) can then still match the partial
# indexes whose predicates name these values.
FULFILLED = sa.literal(OrderStatus.FULFILLED.value, literal_execute=True)
LEFT_TO_A_PERSON = tuple(sa.literal(outcome, literal_execute=True) for outcome in SWEEP_EXCLUDED_OUTCOMES)
NEEDS_ATTENTION = sa.literal("needs_attention", literal_execute=True)
CANONICAL_UUID = sa.literal("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", literal_execute=True)


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


def _state(row: sa.RowMapping) -> ReconcileState:
    return ReconcileState(**{f.name: row[f.name] for f in fields(ReconcileState)})


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


def _insert_ignore(engine: sa.Engine, table: sa.Table, values: dict, index: list[str]) -> sa.Insert:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).values(**values).on_conflict_do_nothing(index_elements=index)


# The lease's two most frequent statements (every step renews, every write is fenced), built once.
_HELD_BY = sa.and_(
    reconcile_state.c.order_id == sa.bindparam("held_order", type_=reconcile_state.c.order_id.type),
    reconcile_state.c.lease_owner == sa.bindparam("holder", type_=reconcile_state.c.lease_owner.type),
)
_RENEW = sa.update(reconcile_state).where(_HELD_BY).values(
    lease_expires_at=sa.bindparam("until", type_=reconcile_state.c.lease_expires_at.type),
    updated_at=sa.bindparam("now", type_=reconcile_state.c.updated_at.type),
)
_FENCE = sa.update(reconcile_state).where(_HELD_BY).values(
    updated_at=sa.bindparam("now", type_=reconcile_state.c.updated_at.type))


# A lease the attempt's view took or renewed itself, with at least this share of its period still ahead, is not
# renewed again: nobody else can take an order before its lease lapses, and the step ahead still has most of the
# period (the policy keeps every in-run wait under half of it).
LEASE_STILL_FRESH = 0.9


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


@functools.cache
def _claim_statement(dialect: str) -> sa.Insert:
    """The claim, built once per dialect: a first claim inserts the state row; a later one updates it only
    where the lease is free, lapsed or already the claimer's."""
    insert = (postgresql if dialect == "postgresql" else sqlite).insert
    owner = sa.bindparam("claimer", type_=reconcile_state.c.lease_owner.type)
    now = sa.bindparam("now", type_=reconcile_state.c.updated_at.type)
    until = sa.bindparam("until", type_=reconcile_state.c.lease_expires_at.type)
    lease = {"lease_owner": owner, "lease_expires_at": until, "updated_at": now}
    return insert(reconcile_state).values(
        order_id=sa.bindparam("claimed_order", type_=reconcile_state.c.order_id.type), attempts=1, **lease,
    ).on_conflict_do_update(
        index_elements=["order_id"],
        set_={**lease, "attempts": reconcile_state.c.attempts + 1},
        where=sa.or_(
            reconcile_state.c.lease_owner.is_(None),
            reconcile_state.c.lease_expires_at < now,
            reconcile_state.c.lease_owner == owner,
        ),
    ).returning(*reconcile_state.c)


@functools.cache
def _order_queries(dialect: str) -> tuple[sa.Select, sa.Select]:
    """The two reads of an order, built once per dialect: building a statement costs about as much CPU as
    running it."""
    order_id = sa.bindparam("order_id", type_=orders.c.id.type)
    # order_items.productId holds products.id as dashed uuid text (no FK); sa.Uuid stores uuids on SQLite as 32
    # hex digits without dashes.
    if dialect == "sqlite":
        product_match = products.c.id == sa.func.replace(sa.func.lower(order_items.c.productId), "-", "")
    else:
        # Matched as BitLoot's text matches (`products.id::varchar = "productId"`: lowercase dashed uuid text) but
        # with the cast on the item's side, so the product is one probe of its primary key; text that is not a
        # lowercase dashed uuid matches no product, as before, and is never cast (the cast would fail on it).
        as_uuid = sa.case((order_items.c.productId.regexp_match(CANONICAL_UUID), sa.cast(order_items.c.productId,
                                                                                          products.c.id.type)))
        product_match = products.c.id == as_uuid
    # One row per payment (or one without), payments oldest first.
    with_payments = (
        sa.select(orders, payments.c.externalId.label("payment_id"), payments.c.status.label("payment_status"))
        .select_from(orders.outerjoin(payments, payments.c.orderId == orders.c.id))
        .where(orders.c.id == order_id)
        .order_by(payments.c.createdAt)
    )
    # One row per item and keys row (BitLoot's `keys` may hold several for an item), items in id order.
    items_with_keys = (
        sa.select(
            order_items,
            products.c.title,
            products.c.sourceType.label("product_source"),
            products.c.kinguinProductId,
            products.c.kinguinOfferId,
            products.c.cost,
            products.c.isPreorder,
            keys_table.c.storageRef.label("key_ref"),
            keys_table.c.id.label("key_id"),
        )
        .select_from(
            order_items.outerjoin(products, product_match)
            .outerjoin(keys_table, keys_table.c.orderItemId == order_items.c.id)
        )
        .where(order_items.c.orderId == order_id)
        .order_by(order_items.c.id)
    )
    return with_payments, items_with_keys


class Store:
    def __init__(self, engine: sa.Engine, *, attempt_view: bool = False, flags: SharedFlags | None = None):
        self.engine = engine
        self._flags = flags
        # An attempt's view: the orders it read and the state rows its claims returned, its own writes applied.
        self._kept: dict[str, Order] | None = {} if attempt_view else None
        self._states: dict[str, ReconcileState] = {}

    def _autocommit(self) -> sa.Connection:
        """A connection on which each statement is its own transaction, without BEGIN and COMMIT/ROLLBACK round
        trips: for reads (under READ COMMITTED a transaction would not make two reads see one snapshot either)
        and for writes whose statements each stand alone."""
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def for_attempt(self) -> Store:
        """A view for one attempt (or one step of a run) on one thread. It reads an order once and applies its
        own writes to what it read; a change by someone else is caught where it matters: every write is
        guarded by its WHERE clause and the lease, a guarded write that changed nothing reads the order again,
        and the email step reads it fresh (`load_order(fresh=True)`). It renews a lease it took or renewed
        itself only once a tenth of the lease's period has passed."""
        return Store(self.engine, attempt_view=True, flags=self._flags)

    def sharing_flags(self, max_age_seconds: float) -> Store:
        """This store, with its attempt views sharing one read of BitLoot's flags (`SharedFlags`)."""
        return Store(self.engine, flags=SharedFlags(max_age_seconds))

    def _forget(self, order_id: str) -> None:
        if self._kept is not None:
            self._kept.pop(order_id, None)
        self._states.pop(order_id, None)

    def _state_changed(self, order_id: str, **values) -> None:
        """After a view's own write to the order's state row: apply `values`, or (none given) forget the row."""
        kept = self._states.pop(order_id, None)
        if kept is not None and values:
            self._states[order_id] = replace(kept, **values)

    def _wrote(self, order_id: str, change: Callable[[Order], Order] | None) -> None:
        """After a view's own write: apply what it changed to the order it keeps; None (the guarded write
        changed nothing: someone else moved the order) makes the next read see the order as it is now."""
        if self._kept is None:
            return
        kept = self._kept.pop(order_id, None)
        if kept is not None and change is not None:
            self._kept[order_id] = change(kept)

    # -- reads ---------------------------------------------------------------------------------------
    def load_order(self, order_id: str, *, fresh: bool = False) -> Order | None:
        """The order with its items and payments; an attempt's view returns the order it read unless `fresh`."""
        if self._kept is not None and order_id in self._kept and not fresh:
            return self._kept[order_id]
        order = self._read_order(order_id)
        if self._kept is not None and order is not None:
            self._kept[order_id] = order
        return order

    def _read_order(self, order_id: str) -> Order | None:
        with_payments, items_with_keys = _order_queries(self.engine.dialect.name)
        with self._autocommit() as conn:
            order_rows = conn.execute(with_payments, {"order_id": order_id}).mappings().all()
            if not order_rows:
                return None
            row = order_rows[0]
            item_rows = conn.execute(items_with_keys, {"order_id": order_id}).mappings().all()
            firsts: dict[str, sa.RowMapping] = {}
            refs: dict[str, list[str]] = {}
            for r in item_rows:
                firsts.setdefault(r["id"], r)
                refs.setdefault(r["id"], [])
                if r["key_id"] is not None:
                    refs[r["id"]].append(r["key_ref"] or "")
            items = tuple(
                Item(
                    id=r["id"],
                    product_id=r["productId"],
                    quantity=r["quantity"],
                    unit_price=r["unitPrice"],
                    source_type=r["productSourceType"],
                    signed_url=r["signedUrl"],
                    product_title=r["title"],
                    product_source_type=r["product_source"],
                    kinguin_product_id=r["kinguinProductId"],
                    kinguin_offer_id=r["kinguinOfferId"],
                    product_cost=r["cost"],
                    is_preorder=bool(r["isPreorder"]),
                    key_refs=tuple(refs[item_id]),
                )
                for item_id, r in firsts.items()
            )
            pays = tuple(Payment(external_id=r["payment_id"], status=r["payment_status"])
                         for r in order_rows if r["payment_id"] is not None)
        return Order(
            id=row["id"],
            email=row["email"],
            status=row["status"],
            source_type=row["sourceType"],
            total=row["totalCrypto"],
            kinguin_reservation_id=row["kinguinReservationId"],
            completion_email_sent=bool(row["completionEmailSent"]),
            created_at=row["createdAt"],
            updated_at=row["updatedAt"],
            items=items,
            payments=pays,
        )

    @needs_project_tables
    def get_state(self, order_id: str) -> ReconcileState:
        """The order's reconcile state; an attempt's view returns the row its claim returned, with its own
        writes applied."""
        if order_id in self._states:
            return self._states[order_id]
        with self._autocommit() as conn:
            row = conn.execute(
                sa.select(reconcile_state).where(reconcile_state.c.order_id == order_id)
            ).mappings().first()
        if row is None:
            return ReconcileState(order_id=order_id)
        return _state(row)

    def states_of(self, order_ids: set[str]) -> dict[str, ReconcileState]:
        """The reconcile state of each order that has one."""
        if not order_ids:
            return {}
        with self._autocommit() as conn:
            rows = conn.execute(
                sa.select(reconcile_state).where(reconcile_state.c.order_id.in_(sorted(order_ids)))
            ).mappings()
            return {row["order_id"]: _state(row) for row in rows}

    def attempted_by(self, run_id: str, order_ids: set[str]) -> set[str]:
        """Which of these orders have an audit row written by this run (a batch's orders it got to)."""
        if not order_ids:
            return set()
        with self._autocommit() as conn:
            rows = conn.execute(
                sa.select(reconcile_audit.c.order_id).distinct()
                .where(reconcile_audit.c.order_id.in_(sorted(order_ids)), reconcile_audit.c.run_id == run_id)
            )
            return {str(row.order_id) for row in rows}

    def audit_trail(self, order_id: str) -> list[dict]:
        with self._autocommit() as conn:
            rows = conn.execute(
                sa.select(reconcile_audit)
                .where(reconcile_audit.c.order_id == order_id)
                .order_by(reconcile_audit.c.id)
            ).mappings()
            return [dict(r) for r in rows]

    def key_assignments(self, order_id: str) -> dict[str, str]:
        with self._autocommit() as conn:
            rows = conn.execute(
                sa.select(reconcile_key_assignment.c.order_item_id, reconcile_key_assignment.c.kinguin_key_id)
                .where(reconcile_key_assignment.c.order_id == order_id)
            )
            return {r.order_item_id: r.kinguin_key_id for r in rows}

    @needs_project_tables
    def find_stuck_orders(
        self, *, now: dt.datetime, grace: dt.timedelta, max_age: dt.timedelta, limit: int
    ) -> list[StuckOrder]:
        """Oldest first: paid-but-undelivered orders past the grace period, and fulfilled orders whose email
        never went out, minus those leased, backing off or waiting for a person.

        Both branches are served by the project's indexes on `orders` (status, "updatedAt") and the partial
        email-pending index, so the cost follows the number of stuck orders, not the size of the table.
        """
        cutoff, oldest = naive_utc(now - grace), naive_utc(now - max_age)
        recent = orders.c.updatedAt.between(oldest, cutoff)
        blocker = reconcile_state.alias("blocker")
        held_back = sa.exists().where(
            blocker.c.order_id == orders.c.id,
            sa.or_(
                sa.and_(
                    blocker.c.lease_owner.is_not(None),
                    sa.or_(blocker.c.lease_expires_at.is_(None), blocker.c.lease_expires_at >= now),
                ),
                blocker.c.next_attempt_at > now,
                *(blocker.c.last_outcome == outcome for outcome in LEFT_TO_A_PERSON),
            ),
        )
        # Order and limit on `orders` alone, then fetch the attempt counts of just those rows.
        due = (
            sa.select(orders.c.id, orders.c.status, orders.c.updatedAt, orders.c.completionEmailSent)
            .where(
                sa.or_(
                    sa.and_(orders.c.status.in_([s.value for s in RECOVERABLE]), recent),
                    sa.and_(orders.c.status == FULFILLED, orders.c.completionEmailSent.is_(False), recent),
                ),
                ~held_back,
            )
            .order_by(orders.c.updatedAt)
            .limit(limit)
            .subquery()
        )
        query = (
            sa.select(
                due, sa.func.coalesce(reconcile_state.c.attempts, 0).label("attempts"), reconcile_state.c.last_run_id
            )
            .select_from(due.outerjoin(reconcile_state, reconcile_state.c.order_id == due.c.id))
            .order_by(due.c.updatedAt)
        )
        with self._autocommit() as conn:
            return [
                StuckOrder(r.id, r.status, r.updatedAt, bool(r.completionEmailSent), r.attempts, r.last_run_id)
                for r in conn.execute(query)
            ]

    @needs_project_tables
    def backlog_orders(self, *, now: dt.datetime, max_age: dt.timedelta, limit: int) -> list[BacklogOrder]:
        """Every order that is not done, oldest first (by creation), with its reconcile state: orders in a
        recoverable status or fulfilled without the email, updated inside the age window (the sweep's two
        index branches, grace period included), plus those the project holds back at any age (the partial
        blocking index: leased, backing off or needing a person), so a quarantined order never drops off.

        The cost follows the number of such orders, not the size of `orders` or of the project's history."""
        oldest = naive_utc(now - max_age)
        open_status = orders.c.status.in_([s.value for s in RECOVERABLE])
        email_pending = sa.and_(orders.c.status == FULFILLED, orders.c.completionEmailSent.is_(False))
        columns = (orders.c.id, orders.c.status, orders.c.completionEmailSent, orders.c.createdAt, orders.c.updatedAt,
                   orders.c.kinguinReservationId)
        recent = sa.select(*columns).where(
            sa.or_(sa.and_(open_status, orders.c.updatedAt >= oldest),
                   sa.and_(email_pending, orders.c.updatedAt >= oldest))
        )
        # Each branch reads whole order rows, so the union is never joined back to `orders` by status (which
        # would read every open order of the history, inside the window or not).
        held = (
            sa.select(*columns)
            .select_from(reconcile_state.join(orders, orders.c.id == reconcile_state.c.order_id))
            .where(
                sa.or_(
                    reconcile_state.c.lease_owner.is_not(None),
                    reconcile_state.c.next_attempt_at.is_not(None),
                    reconcile_state.c.last_outcome == NEEDS_ATTENTION,
                ),
                sa.or_(open_status, email_pending),
            )
        )
        wanted = sa.union(recent, held).subquery("wanted")
        joined, state = self._with_state(wanted)
        query = (
            sa.select(wanted, *[state.c[f.name].label(f"state_{f.name}") for f in fields(ReconcileState)])
            .select_from(joined)
            .order_by(wanted.c.createdAt, wanted.c.id)
            .limit(limit)
        )
        with self._autocommit() as conn:
            return [
                BacklogOrder(
                    r["id"], r["status"], bool(r["completionEmailSent"]), r["createdAt"], r["updatedAt"],
                    r["kinguinReservationId"],
                    ReconcileState(**{f.name: r[f"state_{f.name}"] for f in fields(ReconcileState)})
                    if r["state_order_id"] else ReconcileState(order_id=r["id"]),
                )
                for r in conn.execute(query).mappings()
            ]

    def fulfilled_since(self, since: dt.datetime) -> list[FulfilledOrder]:
        """Orders whose last change, as fulfilled, is at or after `since`; served by the sweep's (status,
        "updatedAt") index, so the cost follows the orders fulfilled in the window."""
        fulfilled = (
            sa.select(orders.c.id, orders.c.createdAt, orders.c.updatedAt, orders.c.kinguinReservationId)
            .where(orders.c.status == FULFILLED, orders.c.updatedAt >= naive_utc(since))
            .subquery("fulfilled")
        )
        joined, state = self._with_state(fulfilled)
        query = sa.select(fulfilled, state.c.last_outcome, state.c.placement_intent_at).select_from(joined)
        with self._autocommit() as conn:
            return [
                FulfilledOrder(r.id, r.createdAt, r.updatedAt, r.kinguinReservationId,
                               r.last_outcome, r.placement_intent_at)
                for r in conn.execute(query)
            ]

    def _with_state(self, rows: sa.Subquery) -> tuple[sa.FromClause, sa.FromClause]:
        """`rows` (with an `id` column) left-joined to their reconcile state. On PostgreSQL one primary-key
        probe per row: with a plain join the planner may hash all of reconcile_state, which grows with every
        order the project ever recovered."""
        if self.engine.dialect.name == "postgresql":
            state = (sa.select(reconcile_state).where(reconcile_state.c.order_id == rows.c.id)
                     .limit(1).lateral("state"))
            return rows.outerjoin(state, sa.true()), state
        return rows.outerjoin(reconcile_state, reconcile_state.c.order_id == rows.c.id), reconcile_state

    # -- the per-order lease -------------------------------------------------------------------------
    def claim(self, order_id: str, owner: str, ttl: dt.timedelta) -> bool:
        """Take the order's lease if it is free, expired or already ours; one upsert decides and returns the row."""
        now = utcnow()
        with self._autocommit() as conn:
            row = conn.execute(_claim_statement(self.engine.dialect.name), {
                "claimed_order": order_id, "claimer": owner, "until": now + ttl, "now": now}).mappings().first()
        if row is not None and self._kept is not None:
            self._states[order_id] = _state(row)
        return row is not None

    def release(self, order_id: str, owner: str) -> None:
        self._state_changed(order_id)
        with self._autocommit() as conn:
            conn.execute(
                sa.update(reconcile_state)
                .where(reconcile_state.c.order_id == order_id, reconcile_state.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None, updated_at=utcnow())
            )

    def renew_lease(self, order_id: str, owner: str, ttl: dt.timedelta) -> bool:
        """Extend the lease from now, only while `owner` still holds it (even if it lapsed: nobody took it).
        An attempt's view skips it while the lease it took or renewed itself is still fresh (`LEASE_STILL_FRESH`)."""
        now = utcnow()
        held = self._states.get(order_id)
        if held is not None and held.lease_owner == owner and held.lease_expires_at is not None \
                and held.lease_expires_at - now >= ttl * LEASE_STILL_FRESH:
            return True
        with self._autocommit() as conn:
            renewed = conn.execute(_RENEW, {"held_order": order_id, "holder": owner, "until": now + ttl,
                                            "now": now}).rowcount == 1
        if renewed:
            self._state_changed(order_id, lease_owner=owner, lease_expires_at=now + ttl)
        else:
            self._state_changed(order_id)
        return renewed

    @staticmethod
    def _fence(conn: sa.Connection, order_id: str, owner: str | None) -> None:
        """First statement of every write transaction of a run: it checks that `owner` holds the lease and
        keeps the state row locked until commit, so no other run can claim the order in between.
        `owner=None` is for writes made outside a run (seeding, fixtures)."""
        if owner is None:
            return
        held = conn.execute(_FENCE, {"held_order": order_id, "holder": owner, "now": utcnow()}).rowcount
        if held != 1:
            raise LeaseLost(order_id, owner)

    @contextmanager
    def _write(self, order_id: str, owner: str | None) -> Iterator[sa.Connection]:
        """A run's write transaction, fenced by its lease. A write to `orders` or its items then says what it
        changed (`_wrote`); one that failed leaves an attempt's view to read the order (and renew) anew."""
        try:
            with self.engine.begin() as conn:
                self._fence(conn, order_id, owner)
                yield conn
        except BaseException:
            self._forget(order_id)
            raise

    # -- writes to BitLoot's tables (each fenced by the writing run's lease) ----------------------------
    def mark_paid(self, order_id: str, *, owner: str | None = None) -> bool:
        """waiting/confirming/failed -> paid, only after the payment was confirmed."""
        return self._set_order_status(order_id, OrderStatus.PAID, UNPAID, owner)

    def mark_fulfilled(self, order_id: str, *, owner: str | None = None) -> bool:
        """paid -> fulfilled; never touches an order an admin moved to refunded or cancelled meanwhile."""
        return self._set_order_status(order_id, OrderStatus.FULFILLED, (OrderStatus.PAID,), owner)

    def mark_refunded(self, order_id: str, *, owner: str | None = None) -> bool:
        """An admin's `refunded_to_customer` resolution: the status BitLoot's admin panel would set."""
        return self._set_order_status(
            order_id, OrderStatus.REFUNDED, (*RECOVERABLE, OrderStatus.FULFILLED), owner
        )

    def _set_order_status(
        self, order_id: str, status: OrderStatus, allowed_from: tuple[OrderStatus, ...], owner: str | None
    ) -> bool:
        now = naive_utc(utcnow())
        with self._write(order_id, owner) as conn:
            moved = conn.execute(
                sa.update(orders)
                .where(orders.c.id == order_id, orders.c.status.in_([s.value for s in allowed_from]))
                .values(status=status.value, updatedAt=now)
            ).rowcount == 1
        self._wrote(order_id, (lambda o: replace(o, status=status.value, updated_at=now)) if moved else None)
        return moved

    def save_reservation_id(self, order_id: str, kinguin_order_id: str, *, owner: str | None = None) -> None:
        """Saved at once, in its own transaction, and never overwritten once set."""
        now = naive_utc(utcnow())
        with self._write(order_id, owner) as conn:
            saved = conn.execute(
                sa.update(orders)
                .where(orders.c.id == order_id, orders.c.kinguinReservationId.is_(None))
                .values(kinguinReservationId=kinguin_order_id, updatedAt=now)
            ).rowcount == 1
        self._wrote(order_id, (lambda o: replace(o, kinguin_reservation_id=kinguin_order_id, updated_at=now))
                    if saved else None)

    def replace_reservation_id(self, order_id: str, replaced: str, replacement: str, *, owner: str | None = None
                               ) -> bool:
        """A replacement Kinguin order takes the place of the canceled one, only while the canceled one is the
        order's saved reservation (so a second attempt changes nothing)."""
        now = naive_utc(utcnow())
        with self._write(order_id, owner) as conn:
            moved = conn.execute(
                sa.update(orders)
                .where(orders.c.id == order_id, orders.c.kinguinReservationId == replaced)
                .values(kinguinReservationId=replacement, updatedAt=now)
            ).rowcount == 1
        self._wrote(order_id, (lambda o: replace(o, kinguin_reservation_id=replacement, updated_at=now))
                    if moved else None)
        return moved

    def record_stored_key(
        self,
        order_id: str,
        order_item_id: str,
        storage_ref: str,
        content_type: str,
        signed_url: str,
        *,
        owner: str | None = None,
    ) -> None:
        """One `keys` row per item (inserted only if the item has none) and the item's signed URL.

        The item row is locked before the check, so two writers of one item take turns and the second sees
        the first one's row (BitLoot's `keys` has no unique rule on the item and may hold old duplicates)."""
        now = naive_utc(utcnow())
        with self._write(order_id, owner) as conn:
            conn.execute(sa.select(order_items.c.id).where(order_items.c.id == order_item_id).with_for_update())
            has_row = conn.execute(
                sa.select(keys_table.c.id).where(keys_table.c.orderItemId == order_item_id).limit(1)
            ).first()
            if has_row is None:
                conn.execute(
                    sa.insert(keys_table).values(
                        id=str(uuid.uuid4()),
                        orderItemId=order_item_id,
                        storageRef=storage_ref,
                        contentType=content_type,
                        encryptionKey=f"raw:{content_type}",
                        createdAt=now,
                        updatedAt=now,
                    )
                )
            conn.execute(
                sa.update(order_items)
                .where(order_items.c.id == order_item_id)
                .values(signedUrl=signed_url, updatedAt=now)
            )

        def stored(order: Order) -> Order:
            return replace(order, items=tuple(
                replace(item, signed_url=signed_url, key_refs=(storage_ref,)) if item.id == order_item_id else item
                for item in order.items))

        # Another writer's `keys` row (its storage ref) is only known by reading the order again.
        self._wrote(order_id, stored if has_row is None else None)

    def mark_email_sent(self, order_id: str, *, owner: str | None = None) -> None:
        now = naive_utc(utcnow())
        with self._write(order_id, owner) as conn:
            marked = conn.execute(
                sa.update(orders)
                .where(orders.c.id == order_id, orders.c.completionEmailSent.is_(False))
                .values(completionEmailSent=True, updatedAt=now)
            ).rowcount == 1
        self._wrote(order_id, (lambda o: replace(o, completion_email_sent=True, updated_at=now)) if marked else None)

    # -- the project's own tables ----------------------------------------------------------------------
    def record_placement_intent(self, order_id: str, *, owner: str | None = None) -> None:
        """Kept from the first placement on; one statement under the lease, fenced by its own WHERE clause."""
        now = utcnow()
        intent = (
            sa.update(reconcile_state)
            .where(reconcile_state.c.order_id == order_id)
            .values(placement_intent_at=sa.func.coalesce(reconcile_state.c.placement_intent_at, now), updated_at=now)
        )
        if owner is None:  # outside a run (fixtures): the state row may not exist yet
            with self.engine.begin() as conn:
                conn.execute(_insert_ignore(self.engine, reconcile_state, {"order_id": order_id}, ["order_id"]))
                conn.execute(intent)
            return
        with self._autocommit() as conn:
            if conn.execute(intent.where(reconcile_state.c.lease_owner == owner)).rowcount != 1:
                self._forget(order_id)
                raise LeaseLost(order_id, owner)
        if (kept := self._states.get(order_id)) is not None:
            self._state_changed(order_id, placement_intent_at=kept.placement_intent_at or now)

    def record_replacement_intent(self, order_id: str, replaced: str, number: int, *, owner: str | None = None
                                  ) -> None:
        """Before placing replacement `number` of the canceled Kinguin order `replaced`: a run that finds
        this intent with the canceled order still saved searches Kinguin for the replacement first."""
        self._state_changed(order_id)
        with self._write(order_id, owner) as conn:
            conn.execute(
                sa.update(reconcile_state)
                .where(reconcile_state.c.order_id == order_id, reconcile_state.c.replacements == number - 1)
                .values(replacements=number, replaced_kinguin_order_id=replaced, updated_at=utcnow())
            )

    def assign_key(self, order_id: str, order_item_id: str, kinguin_key_id: str, *, owner: str | None = None) -> None:
        with self._write(order_id, owner) as conn:
            conn.execute(
                sa.insert(reconcile_key_assignment).values(
                    order_id=order_id, order_item_id=order_item_id, kinguin_key_id=kinguin_key_id
                )
            )

    def finish_run(self, order_id: str, owner: str, **values) -> bool:
        """The run's last write: its outcome into the state row and the lease handed back, in one statement
        that only applies while `owner` still holds the lease. False when another run took the order over."""
        self._state_changed(order_id)
        with self._autocommit() as conn:
            return conn.execute(
                sa.update(reconcile_state)
                .where(reconcile_state.c.order_id == order_id, reconcile_state.c.lease_owner == owner)
                .values(**values, lease_owner=None, lease_expires_at=None, updated_at=utcnow())
            ).rowcount == 1

    def update_state(self, order_id: str, **values) -> None:
        self._state_changed(order_id)
        with self.engine.begin() as conn:
            conn.execute(_insert_ignore(self.engine, reconcile_state, {"order_id": order_id}, ["order_id"]))
            conn.execute(
                sa.update(reconcile_state)
                .where(reconcile_state.c.order_id == order_id)
                .values(**values, updated_at=utcnow())
            )

    def append_audit(
        self,
        *,
        order_id: str,
        action: str,
        trigger: str,
        actor: str | None,
        reason: str | None,
        run_id: str | None,
        outcome: str | None,
        detail: str | None = None,
    ) -> None:
        with self._autocommit() as conn:
            conn.execute(
                sa.insert(reconcile_audit).values(
                    order_id=order_id,
                    action=action,
                    trigger=trigger,
                    actor=actor,
                    reason=reason,
                    run_id=run_id,
                    outcome=outcome,
                    detail=detail,
                    created_at=utcnow(),
                )
            )

    # -- alert bookkeeping (alerts.py): one alert per order per state change ------------------------------
    def clear_resolved_alerts(self, outcomes: frozenset[str]) -> int:
        """Forget the alert mark of orders that left the alerting outcomes, so a return to one alerts again."""
        state = reconcile_state
        with self.engine.begin() as conn:
            return conn.execute(
                sa.update(state)
                .where(
                    state.c.alerted_outcome.is_not(None),
                    sa.or_(state.c.last_outcome.is_(None), state.c.last_outcome.not_in([str(o) for o in outcomes])),
                )
                .values(alerted_outcome=None)
            ).rowcount

    def pending_alerts(self, outcomes: frozenset[str], limit: int) -> list[ReconcileState]:
        """Orders in an alerting outcome not alerted on yet, oldest change first."""
        state = reconcile_state
        query = (
            sa.select(state)
            .where(
                state.c.last_outcome.in_([str(o) for o in outcomes]),
                state.c.alerted_outcome.is_distinct_from(state.c.last_outcome),
            )
            .order_by(state.c.updated_at)
            .limit(limit)
        )
        with self._autocommit() as conn:
            return [_state(row) for row in conn.execute(query).mappings()]

    def mark_alerted(self, seen: ReconcileState) -> bool:
        """Record the alert only if the state is still the one alerted on: a newer outcome gets its own alert."""
        state = reconcile_state
        with self.engine.begin() as conn:
            return conn.execute(
                sa.update(state)
                .where(
                    state.c.order_id == seen.order_id,
                    state.c.last_outcome == seen.last_outcome,
                    state.c.last_run_id.is_not_distinct_from(seen.last_run_id),
                )
                .values(alerted_outcome=seen.last_outcome)
            ).rowcount == 1

    # -- the reconciliation report (reads only) ------------------------------------------------------------
    def order_ids_created_between(self, start: dt.datetime, end: dt.datetime) -> list[str]:
        """Orders created in [start, end), oldest first. BitLoot indexes "createdAt" only behind status, so
        this scans; it runs once a day per window, never on the sweep's path."""
        with self._autocommit() as conn:
            return list(
                conn.execute(
                    sa.select(orders.c.id)
                    .where(orders.c.createdAt >= naive_utc(start), orders.c.createdAt < naive_utc(end))
                    .order_by(orders.c.createdAt, orders.c.id)
                ).scalars()
            )

    def existing_order_ids(self, order_ids: set[str]) -> set[str]:
        """Which of these order uuids are orders of the store (any day)."""
        if not order_ids:
            return set()
        with self._autocommit() as conn:
            return set(conn.execute(sa.select(orders.c.id).where(orders.c.id.in_(sorted(order_ids)))).scalars())

    def settled_before(self, order_ids: list[str], cutoff: dt.datetime) -> set[str]:
        """Which of these orders are settled and untouched since `cutoff`: fulfilled with the email sent,
        refunded or cancelled (BitLoot's word), or resolved by an admin; no lease held, and neither the order nor
        its reconcile state changed since. One primary-key probe per id on each table."""
        if not order_ids:
            return set()
        state = reconcile_state
        done = sa.or_(
            sa.and_(orders.c.status == FULFILLED, orders.c.completionEmailSent.is_(True)),
            orders.c.status.in_([OrderStatus.REFUNDED.value, OrderStatus.CANCELLED.value]),
            state.c.last_outcome == sa.literal("resolved", literal_execute=True),
        )
        query = (
            sa.select(orders.c.id)
            .select_from(orders.outerjoin(state, state.c.order_id == orders.c.id))
            .where(orders.c.id.in_(sorted(order_ids)), orders.c.updatedAt < naive_utc(cutoff), done,
                   state.c.lease_owner.is_(None), sa.or_(state.c.updated_at.is_(None), state.c.updated_at < cutoff))
        )
        with self._autocommit() as conn:
            return {str(order_id) for order_id in conn.execute(query).scalars()}

    # -- BitLoot's switches: its feature flags and its email suppression list (reads only) -------------------
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

    def give_back_attempt(self, order_id: str, owner: str) -> None:
        """Undo the attempt `claim` counted, for a run a BitLoot switch held: holds never use up attempts."""
        self._state_changed(order_id)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(reconcile_state)
                .where(reconcile_state.c.order_id == order_id, reconcile_state.c.lease_owner == owner,
                       reconcile_state.c.attempts > 0)
                .values(attempts=reconcile_state.c.attempts - 1, updated_at=utcnow())
            )

    def _has_table(self, table: sa.Table) -> bool:
        return sa.inspect(self.engine).has_table(table.name)
