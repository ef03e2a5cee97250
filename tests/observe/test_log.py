"""Wait logging: INFO from one second up, with a human duration and the UTC end time."""

from __future__ import annotations

import logging
import math
import re
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

import resilient
from resilient._clock import wall_after
from resilient.observe import _events
from resilient.observe._log import human_duration, log_wait


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


# --- any delay, even one no clock can represent -----------------------------------------


@pytest.mark.timeout(60)
@settings(max_examples=300)
@given(delay=st.floats(allow_nan=True, allow_infinity=True))
def test_log_formatting_never_raises_for_any_float_delay(delay):
    """inf, nan, huge and negative delays: the duration and the end time always format."""
    assert isinstance(human_duration(delay), str)
    assert wall_after(delay).tzinfo is not None
    log = logging.getLogger("resilient")
    level = log.level
    log.setLevel(logging.DEBUG)
    try:
        with _silenced():
            log_wait("rate_limit_backoff", "429 Retry-After", "k", delay)
            log_wait("throttle", "rate limit", "k", delay, wall_after(delay))
            _events.emit("rate_limited", "rate_limit_backoff", "k", delay=delay)
            events: list[_events.Event] = []
            remove = _events.add_hook(events.append)  # the Event (and its until) is built too
            try:
                _events.emit("rate_limited", "rate_limit_backoff", "k", delay=delay)
            finally:
                remove()
            assert isinstance(_events.describe(events[0]), str)
    finally:
        log.setLevel(level)


def test_unrepresentable_durations_read_plainly():
    assert human_duration(math.inf) == "forever"
    assert human_duration(math.nan) == "an unknown time"
    assert human_duration(-3.0) == "0ms"
    assert wall_after(math.inf) == datetime.max.replace(tzinfo=UTC)
    assert wall_after(-math.inf) == datetime.min.replace(tzinfo=UTC)
    assert abs(wall_after(math.nan) - datetime.now(UTC)) < timedelta(seconds=5)


@pytest.mark.timeout(10)
@pytest.mark.looptime
@pytest.mark.parametrize("value", ["9" * 400, "99999999999999999999", "1" + "0" * 308])
async def test_a_retry_after_too_large_to_represent_returns_the_429_with_info_logging(
    server, caplog, value
):
    caplog.set_level(logging.INFO, logger="resilient")
    server.script("/x", _too_many(value))
    async with (
        resilient.session(resilient.RateLimitBackoff()) as session,
        session.get(server.url + "/x") as resp,
    ):
        assert resp.status == 429
        assert await resp.text() == "slow down"
    assert server.count() == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert "429 Retry-After" in line
    assert "its 429 is returned" in line


def _too_many(retry_after: str):
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=429, text="slow down", headers={"Retry-After": retry_after})

    return reply


class _silenced:
    """Drop the ``resilient`` logger's records for a moment (the property test logs many)."""

    def __enter__(self) -> None:
        self._filter = logging.Filter("nothing")
        logging.getLogger("resilient").addFilter(self._filter)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("resilient").removeFilter(self._filter)
