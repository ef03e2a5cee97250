"""stats(): a frozen snapshot per key of each policy's state."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web

import resilient
from resilient import CircuitStats, PauseStats, RetryStats, ThrottleStats
from resilient.ratelimit._learned import SLOW_START_MIN

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


def retry_after(status: int, seconds: int) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Retry-After": str(seconds)})

    return reply


def about(when: datetime | None, seconds: float) -> bool:
    assert when is not None
    assert when.utcoffset() == timedelta(0)
    return abs((when - datetime.now(UTC)) - timedelta(seconds=seconds)) < timedelta(seconds=5)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=resilient.DEFAULT_TIMEOUT) as s:
        yield s


async def fetch(session: aiohttp.ClientSession, url: str, *policies: object) -> int:
    async with session.get(url, middlewares=resilient.chain(*policies)) as resp:
        await resp.read()
        return resp.status


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


# --- Throttle -------------------------------------------------------------------------


async def test_throttle_stats_show_tokens_rate_and_burst(server, session):
    throttle = resilient.Throttle(0.001, burst=3)
    await fetch(session, server.url + "/r", throttle)
    stats = throttle.stats()
    assert list(stats) == [server.url]
    snap = stats[server.url]
    assert (snap.key, snap.rate, snap.burst, snap.waiting) == (server.url, 0.001, 3, 0)
    assert snap.tokens == pytest.approx(2.0, abs=0.01)


@pytest.mark.looptime
async def test_throttle_stats_count_callers_waiting(server, session):
    throttle = resilient.Throttle(0.1)
    await fetch(session, server.url + "/r", throttle)
    calls = [asyncio.create_task(fetch(session, server.url + "/r", throttle)) for _ in range(2)]
    await until(lambda: throttle.waiting(server.url) == 2)
    assert throttle.stats()[server.url].waiting == 2
    await asyncio.gather(*calls)
    assert throttle.stats()[server.url].waiting == 0


async def test_throttle_stats_show_the_adaptive_rate_after_a_429(server, session):
    throttle = resilient.Throttle(100.0, burst=10, adaptive=True)
    server.script("/r", 429)
    await fetch(session, server.url + "/r", throttle)
    # a first 429 before anything was measured: slow start from 1/s, floored at rate / 20
    assert throttle.stats()[server.url].rate == pytest.approx(max(SLOW_START_MIN, 100.0 / 20))


# --- RateLimitBackoff -------------------------------------------------------------------


@pytest.mark.looptime
async def test_pause_stats_show_the_pause_its_utc_end_and_waiters(server, session):
    policy = resilient.RateLimitBackoff()
    server.script("/r", retry_after(429, 3600))
    first = asyncio.create_task(fetch(session, server.url + "/r", policy))
    await until(lambda: policy.paused_for(server.url) > 0)
    second = asyncio.create_task(fetch(session, server.url + "/r", policy))
    await until(lambda: policy.stats()[server.url].waiting == 2)
    snap = policy.stats()[server.url]
    assert (snap.paused, snap.probing) == (True, False)
    assert snap.remaining == pytest.approx(3600.0, abs=1.0)
    assert about(snap.paused_until, 3600.0)
    assert await asyncio.gather(first, second) == [200, 200]
    after = policy.stats()[server.url]
    assert (after.paused, after.paused_until, after.waiting) == (False, None, 0)


async def test_pause_stats_are_empty_before_any_request(server, session):
    assert resilient.RateLimitBackoff().stats() == {}


# --- CircuitBreaker -------------------------------------------------------------------


async def test_circuit_stats_show_calls_failures_and_ratio(server, session):
    breaker = resilient.CircuitBreaker(min_calls=10)
    server.script("/r", 500, 200, 503, 200)
    for _ in range(4):
        await fetch(session, server.url + "/r", breaker)
    snap = breaker.stats()[server.url]
    assert (snap.state, snap.calls, snap.failures) == ("closed", 4, 2)
    assert snap.failure_ratio == 0.5
    assert (snap.retry_after, snap.open_until, snap.probes) == (0.0, None, 0)


async def test_circuit_stats_show_an_open_circuit_and_when_it_half_opens(server, session):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0, open_for=120.0)
    server.script("/r", 500)
    await fetch(session, server.url + "/r", breaker)
    snap = breaker.stats()[server.url]
    assert snap.state == "open"
    assert 119.0 < snap.retry_after <= 120.0
    assert about(snap.open_until, 120.0)


@pytest.mark.looptime
async def test_circuit_stats_read_half_open_once_open_for_has_passed(server, session):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0, open_for=10.0)
    server.script("/r", 500)
    await fetch(session, server.url + "/r", breaker)
    await asyncio.sleep(10.0)
    snap = breaker.stats()[server.url]
    assert (snap.state, snap.open_until) == ("half_open", None)


# --- Retry ------------------------------------------------------------------------------


async def test_retry_stats_show_the_budget_window(server, session):
    retry = resilient.Retry(backoff=lambda a: 0.0, budget=resilient.RetryBudget(0.5, 0.1))
    server.script("/r", 503)
    await fetch(session, server.url + "/r", retry)
    await fetch(session, server.url + "/r", retry)
    assert retry.stats() == RetryStats(first_attempts=2, retries=1, retries_left=1.0)


async def test_retry_stats_without_a_budget_have_no_allowance(server, session):
    retry = resilient.Retry(budget=None)
    await fetch(session, server.url + "/r", retry)
    assert retry.stats().retries_left is None


# --- snapshots --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ThrottleStats, PauseStats, CircuitStats, RetryStats])
def test_a_snapshot_is_frozen(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    snapshot = cls(**dict.fromkeys(names, 0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(snapshot, names[0], 1)
