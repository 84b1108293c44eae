"""Scrub text that leaves a run (error messages, recorded reasons) of what must never be written down:
presigned URL query strings (their signature is a bearer credential for the key) and SQL parameters."""

from __future__ import annotations

import re

_URL_QUERY = re.compile(r"(https?://[^\s?'\"<>]+)\?[^\s'\"<>]*")
_SIGNATURE = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token))=[^&\s'\"<>]+", re.IGNORECASE)
# SQLAlchemy appends "[parameters: (...)]" to error text unless the engine hides them.
_SQL_PARAMETERS = re.compile(r"\[parameters: .*?\](?=\s*(?:\(Background|$))", re.DOTALL)


def redact(text: str) -> str:
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    text = _SIGNATURE.sub(r"\1=<redacted>", text)
    return _SQL_PARAMETERS.sub("[parameters: redacted]", text)


def describe_error(error: BaseException) -> str:
    """`Type: message`, redacted, following a wrapper (e.g. a retry request) to the error that caused it."""
    while error.__cause__ is not None and not str(error).strip():
        error = error.__cause__
    message = str(error).strip()
    return redact(f"{type(error).__name__}: {message}" if message else type(error).__name__)
