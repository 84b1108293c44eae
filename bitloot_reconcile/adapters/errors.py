"""Error taxonomy shared by the HTTP adapters (Kinguin, Resend, NOWPayments).

Callers decide what to do from the class alone: retry a transient error later, stop on a permanent one,
adopt the existing supplier order on a duplicate. Messages never carry secrets: adapters build them from
the remote error kind and detail only, never from request headers or URLs with credentials.
"""

from __future__ import annotations


class ExternalServiceError(Exception):
    """Base class: a call to an outside system did not give the answer we needed."""

    def __init__(self, service: str, message: str, *, status: int | None = None, kind: str | None = None):
        self.service = service
        self.status = status
        self.kind = kind
        super().__init__(f"{service}: {message}")


class TransientError(ExternalServiceError):
    """Worth retrying later: 5xx, 429, timeouts, connection errors, resource locks."""

    def __init__(self, service: str, message: str, *, status: int | None = None, kind: str | None = None,
                 retry_after: float | None = None):
        super().__init__(service, message, status=status, kind=kind)
        self.retry_after = retry_after


class PermanentError(ExternalServiceError):
    """Retrying the same request will not help (validation, balance, product unavailable, auth)."""


class NotFoundError(ExternalServiceError):
    """The remote object does not exist."""


class DuplicateExternalIdError(ExternalServiceError):
    """Kinguin refused an order because its orderExternalId was already used: search and adopt."""
