from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from bitloot_reconcile.adapters.http import build_client, parse_retry_after


def test_parse_retry_after_forms():
    assert parse_retry_after(None) is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("inf") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(later) <= 31


def test_client_refuses_a_missing_timeout():
    with pytest.raises(ValueError, match="timeout"):
        build_client("http://127.0.0.1:9", {}, timeout=0, transport=None)
