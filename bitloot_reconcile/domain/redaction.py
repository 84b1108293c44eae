"""Scrub text that leaves a run (error messages, recorded reasons) of what must never be written down:
presigned URL query strings (their signature is a bearer credential for the key) and SQL parameters."""

from __future__ import annotations

import re

from bitloot_reconcile.adapters.errors import ExternalServiceError

_URL_QUERY = re.compile(r"(https?://[^\s?'\"<>]+)\?[^\s'\"<>]*")
_SIGNATURE = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token))=[^&\s'\"<>]+", re.IGNORECASE)
# SQLAlchemy appends "[parameters: (...)]" to error text unless the engine hides them.
_SQL_PARAMETERS = re.compile(r"\[parameters: .*?\](?=\s*(?:\(Background|$))", re.DOTALL)


def redact(text: str) -> str:
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    text = _SIGNATURE.sub(r"\1=<redacted>", text)
    return _SQL_PARAMETERS.sub("[parameters: redacted]", text)


def describe_error(error: BaseException) -> str:
    """`Type: message`, redacted, following a wrapper (a retry request, a step failure) to the error that
    caused it: an outside service's error says best what failed (`TransientError: r2: put_object ...: 503
    ServiceUnavailable`)."""
    while error.__cause__ is not None and (
        not str(error).strip() or isinstance(error.__cause__, ExternalServiceError)
    ):
        error = error.__cause__
    message = str(error).strip()
    return redact(f"{type(error).__name__}: {message}" if message else type(error).__name__)
