"""Wait logging: INFO from one second up, with a human duration and the UTC end time."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

from resilient._log import human_duration, log_wait


def test_human_duration_units():
    assert human_duration(0.25) == "250ms"
    assert human_duration(5) == "5.0s"
    assert human_duration(3725) == "1h 2m 5s"
    assert human_duration(86_400) == "1d 0h 0m 0s"


async def test_long_wait_is_logged_at_info_with_utc_end(caplog):
    caplog.set_level(logging.INFO, logger="resilient")
    log_wait("retry", "503 Retry-After", "http://h:80", 3600)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "retry" in message
    assert "503 Retry-After" in message
    assert "http://h:80" in message
    assert "1h 0m 0s" in message
    stamp = re.search(r"until (\S+)$", message)
    assert stamp is not None
    end = datetime.fromisoformat(stamp.group(1))
    assert end.tzinfo is not None
    assert end.utcoffset() == timedelta(0)
    assert abs((end - datetime.now(UTC)) - timedelta(hours=1)) < timedelta(seconds=5)


async def test_short_wait_is_debug_only(caplog):
    caplog.set_level(logging.INFO, logger="resilient")
    log_wait("throttle", "rate limit", "k", 0.2)
    assert caplog.records == []
    caplog.set_level(logging.DEBUG, logger="resilient")
    log_wait("throttle", "rate limit", "k", 0.2)
    assert caplog.records[0].levelno == logging.DEBUG
