"""Which outside call ended an attempt, read from the attempt's recorded reason (plain Python).

A run records why it stopped in words (`recording.record_failure`: "store_keys failed: TransientError: r2:
put_object ...: 503 ..."; a refusal: "Kinguin refused: ...", "insufficient Kinguin balance", "completion email
undeliverable, Resend refused it (...)"). This sorts such a reason into the service that failed and the kind of
failure, for the failure counters of the metrics.

Kinds: `transient` (an outage, timeout, 5xx or 429 that outlasted the retries), `permanent` (a request the service
will never accept: credentials, a malformed answer), `refused` (the service said no for this order), `not_found`,
`conflict`, `duplicate`.
"""

from __future__ import annotations

import re

from bitloot_reconcile.domain.fulfilment import KINGUIN_REFUSALS

SERVICES = ("kinguin", "nowpayments", "r2", "resend")
KINDS = ("transient", "permanent", "refused", "not_found", "conflict", "duplicate")
_ERROR_KINDS = {"TransientError": "transient", "PermanentError": "permanent", "NotFoundError": "not_found",
                "KeyConflictError": "conflict", "DuplicateExternalIdError": "duplicate"}
# `describe_error` writes "<ErrorClass>: <service>: <message>".
_DESCRIBED = re.compile(rf"\b({'|'.join(_ERROR_KINDS)}): ({'|'.join(SERVICES)}):")
_REFUSALS = (
    (re.compile("^Kinguin refused: |^(" + "|".join(map(re.escape, KINGUIN_REFUSALS.values())) + ")"), "kinguin"),
    (re.compile(r"completion email undeliverable, Resend refused it"), "resend"),
)


def failed_call(outcome: str | None, reason: str | None) -> tuple[str, str] | None:
    """(service, kind) of the outside call that ended an attempt with this outcome and reason; None when the
    attempt did not end on an outside call's failure."""
    if outcome not in ("retry_later", "needs_attention") or not reason:
        return None
    if described := _DESCRIBED.search(reason):
        return described.group(2), _ERROR_KINDS[described.group(1)]
    for pattern, service in _REFUSALS:
        if pattern.search(reason):
            return service, "refused"
    return None
