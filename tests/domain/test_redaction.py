"""What a recorded error says (pure functions)."""

from __future__ import annotations

from bitloot_reconcile.adapters.errors import PermanentError, TransientError
from bitloot_reconcile.domain.redaction import describe_error, redact


class Wrapper(Exception):
    """Stands in for a step failure or retry request raised `from` the service's error."""


def raised_from(wrapper: Exception, cause: Exception) -> Exception:
    try:
        raise wrapper from cause
    except Exception as exc:
        return exc


def test_a_wrapped_service_error_is_described_by_the_service_error():
    outage = TransientError("r2", "put_object orders/o/key-1.txt: 503 ServiceUnavailable", status=503)
    assert describe_error(raised_from(Wrapper(), outage)) == (
        "TransientError: r2: put_object orders/o/key-1.txt: 503 ServiceUnavailable"
    )
    refusal = PermanentError("r2", "put_object orders/o/key-1.txt: 403 AccessDenied", status=403)
    assert describe_error(raised_from(Wrapper(str(refusal)), refusal)) == (
        "PermanentError: r2: put_object orders/o/key-1.txt: 403 AccessDenied"
    )


def test_other_errors_keep_their_own_words_and_are_redacted():
    assert describe_error(raised_from(Wrapper("order not found"), KeyError("x"))) == "Wrapper: order not found"
    assert describe_error(raised_from(Wrapper(), KeyError("x"))) == "KeyError: 'x'"
    leaked = "GET https://acct.r2.example/k.txt?X-Amz-Signature=abc&X-Amz-Expires=10 [parameters: ('s3cr3t',)]"
    described = describe_error(ValueError(leaked))
    assert "abc" not in described and "s3cr3t" not in described and described == redact(f"ValueError: {leaked}")
