"""Reads of the audit table for the metrics process: totals once at start, then the rows added since.

The audit table grows with every attempt the project ever made, so nothing here reads it whole on a scrape:
`totals` groups it once when the process starts, and `rows_after` reads by primary key from the highest id already
counted (plus the few ids below it not seen yet: an insert that took its id earlier may commit later).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from bitloot_reconcile.store.models import needs_project_tables
from bitloot_reconcile.store.schema import reconcile_audit

# The audit rows that end an attempt (`record_outcome`) or refuse a request (`record_refusal`); the `requested`
# and `remedy` rows of the same runs say who asked and what for.
OUTCOME_ACTIONS = ("fulfill_order", "refused")
# The outcomes whose reason may name an outside call that failed (`domain.failures`).
FAILURE_OUTCOMES = ("retry_later", "needs_attention")


@dataclass(frozen=True)
class AuditRow:
    id: int
    action: str
    trigger: str
    outcome: str | None
    detail: str | None


def _autocommit(engine: sa.Engine) -> sa.Connection:
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


@needs_project_tables
def highest_id(engine: sa.Engine) -> int:
    with _autocommit(engine) as conn:
        return conn.execute(sa.select(sa.func.max(reconcile_audit.c.id))).scalar() or 0


def totals(engine: sa.Engine, upto_id: int) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """Up to `upto_id`: attempts ended, by (outcome, trigger); and failed attempts by (outcome, reason), for the
    caller to sort by outside service. Two grouped reads of the whole table: once per process start."""
    audit = reconcile_audit
    upto = audit.c.id <= upto_id
    outcome = sa.func.coalesce(audit.c.outcome, audit.c.action)
    with _autocommit(engine) as conn:
        ended = conn.execute(
            sa.select(outcome.label("outcome"), audit.c.trigger, sa.func.count())
            .where(upto, audit.c.action.in_(OUTCOME_ACTIONS))
            .group_by(outcome, audit.c.trigger)
        ).all()
        failed = conn.execute(
            sa.select(audit.c.outcome, audit.c.detail, sa.func.count())
            .where(upto, audit.c.action.in_(OUTCOME_ACTIONS), audit.c.outcome.in_(FAILURE_OUTCOMES))
            .group_by(audit.c.outcome, audit.c.detail)
        ).all()
    return ({(o, t): n for o, t, n in ended}, {(o, d or ""): n for o, d, n in failed})


def rows_after(engine: sa.Engine, after_id: int, also: Iterable[int] = (), limit: int = 5000) -> list[AuditRow]:
    """The rows with an id above `after_id` (at most `limit`, by id) and those of the ids `also` that exist now;
    one primary-key range read."""
    audit = reconcile_audit
    also = sorted(also)
    wanted = audit.c.id > after_id
    if also:
        wanted = sa.or_(wanted, audit.c.id.in_(also))
    query = (sa.select(audit.c.id, audit.c.action, audit.c.trigger, audit.c.outcome, audit.c.detail)
             .where(wanted).order_by(audit.c.id).limit(limit + len(also)))
    with _autocommit(engine) as conn:
        return [AuditRow(r.id, r.action, r.trigger, r.outcome, r.detail) for r in conn.execute(query)]
