"""OpenTelemetry metrics, read back with the SDK's in-memory reader (no global provider)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import resilient
from resilient import _metrics

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


def retry_after(status: int, seconds: int) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Retry-After": str(seconds)})

    return reply


class Metrics:
    """The in-memory reader of one MeterProvider, instrumented for the test."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def value(self, name: str, **attributes: object) -> float:
        """The sum of ``name``'s points whose attributes include ``attributes``."""
        return sum(
            p.value
            for p in self.points(name)
            if all(p.attributes.get(k) == v for k, v in attributes.items())
        )


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    uninstrument = resilient.instrument_opentelemetry(m.provider)
    yield m
    uninstrument()
    m.provider.shutdown()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=resilient.DEFAULT_TIMEOUT) as s:
        yield s


async def fetch(session: aiohttp.ClientSession, url: str, *policies: object) -> int:
    async with session.get(url, middlewares=resilient.chain(*policies)) as resp:
        await resp.read()
        return resp.status


def quick_retry(**kwargs: object) -> resilient.Retry:
    return resilient.Retry(backoff=lambda attempt: 0.0, budget=None, **kwargs)


# --- counters -----------------------------------------------------------------------


async def test_a_call_is_counted_once_by_the_outermost_policy(server, session, metrics):
    policies = (quick_retry(), resilient.CircuitBreaker(), resilient.Throttle(1e3, burst=10))
    await fetch(session, server.url + "/r", *policies)
    await fetch(session, server.url + "/r", *policies)
    assert metrics.value("resilient.requests", key=server.url, policy="retry", status=200) == 2
    assert metrics.value("resilient.requests") == 2


async def test_a_retried_call_is_counted_once_with_its_final_status(server, session, metrics):
    server.script("/r", 503)
    await fetch(session, server.url + "/r", quick_retry(), resilient.Throttle(1e3, burst=10))
    assert metrics.value("resilient.requests", policy="retry", status=200) == 1
    assert metrics.value("resilient.requests") == 1
    assert metrics.value("resilient.retries") == 1


async def test_a_call_through_one_policy_is_counted_by_it(server, session, metrics):
    await fetch(session, server.url + "/r", resilient.Throttle(1e3, burst=10))
    assert metrics.value("resilient.requests", key=server.url, policy="throttle", status=200) == 1


async def test_a_request_that_raises_is_counted_with_the_exception_name(server, session, metrics):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0)
    server.script("/r", 500)
    await fetch(session, server.url + "/r", breaker)
    with pytest.raises(resilient.CircuitOpenError):
        await fetch(session, server.url + "/r", breaker)
    assert metrics.value("resilient.requests", policy="circuit_breaker", status=500) == 1
    assert metrics.value("resilient.requests", status="CircuitOpenError") == 1


async def test_retries_are_counted_with_the_status_that_caused_them(server, session, metrics):
    server.script("/r", 503, 502)
    assert await fetch(session, server.url + "/r", quick_retry()) == 200
    assert metrics.value("resilient.retries", key=server.url, policy="retry", status=503) == 1
    assert metrics.value("resilient.retries", status=502) == 1


@pytest.mark.looptime
async def test_rate_limited_counts_each_pause(server, session, metrics):
    server.script("/r", retry_after(429, 60), retry_after(429, 60))
    assert await fetch(session, server.url + "/r", resilient.RateLimitBackoff()) == 200
    attrs = {"key": server.url, "policy": "rate_limit_backoff", "status": 429}
    assert metrics.value("resilient.rate_limited", **attrs) == 2


@pytest.mark.looptime
async def test_circuit_transitions_are_counted_by_state(server, session, metrics):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0, open_for=10.0)
    server.script("/r", 500)
    await fetch(session, server.url + "/r", breaker)
    await asyncio.sleep(10.0)
    await fetch(session, server.url + "/r", breaker)
    for state in ("open", "half_open", "closed"):
        assert metrics.value("resilient.circuit.transitions", key=server.url, state=state) == 1


# --- waits ----------------------------------------------------------------------------


@pytest.mark.looptime
async def test_wait_duration_records_the_time_waited(server, session, metrics):
    server.script("/r", retry_after(503, 30))
    assert await fetch(session, server.url + "/r", resilient.Retry(budget=None)) == 200
    (point,) = metrics.points("resilient.wait.duration")
    assert point.attributes == {"key": server.url, "policy": "retry", "status": 503}
    assert point.count == 1
    assert point.sum == pytest.approx(30.0, abs=0.1)


@pytest.mark.looptime
async def test_waiting_counts_callers_during_a_wait_and_returns_to_zero(server, session, metrics):
    server.script("/r", retry_after(429, 3600))
    policy = resilient.RateLimitBackoff()
    call = asyncio.create_task(fetch(session, server.url + "/r", policy))
    while not policy.paused_for(server.url):
        await asyncio.sleep(0.01)
    await asyncio.sleep(60.0)
    assert metrics.value("resilient.waiting", policy="rate_limit_backoff") == 1
    assert await call == 200
    assert metrics.value("resilient.waiting", policy="rate_limit_backoff") == 0


@pytest.mark.looptime
async def test_throttle_waits_are_measured(server, session, metrics):
    throttle = resilient.Throttle(0.5)
    await fetch(session, server.url + "/r", throttle)
    await fetch(session, server.url + "/r", throttle)
    (point,) = metrics.points("resilient.wait.duration")
    assert point.attributes == {"key": server.url, "policy": "throttle"}
    assert point.sum == pytest.approx(2.0, abs=0.05)
    assert metrics.value("resilient.waiting", policy="throttle") == 0


@pytest.mark.looptime
async def test_a_cancelled_waiter_is_no_longer_counted_as_waiting(server, session, metrics):
    throttle = resilient.Throttle(0.01)
    await fetch(session, server.url + "/r", throttle)
    call = asyncio.create_task(fetch(session, server.url + "/r", throttle))
    await asyncio.sleep(1.0)
    assert metrics.value("resilient.waiting", policy="throttle") == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert metrics.value("resilient.waiting", policy="throttle") == 0
    assert metrics.value("resilient.requests", status="CancelledError") == 1


# --- instrumenting --------------------------------------------------------------------


async def test_instrumenting_twice_does_not_count_twice(server, session, metrics):
    again = resilient.instrument_opentelemetry(metrics.provider)
    await fetch(session, server.url + "/r", quick_retry())
    assert metrics.value("resilient.requests", policy="retry") == 1
    again()
    assert _metrics.recorder is None


async def test_uninstrument_stops_recording(server, session):
    m = Metrics()
    uninstrument = resilient.instrument_opentelemetry(m.provider)
    await fetch(session, server.url + "/r", quick_retry())
    uninstrument()
    uninstrument()  # idempotent
    await fetch(session, server.url + "/r", quick_retry())
    assert m.value("resilient.requests") == 1
    m.provider.shutdown()


async def test_a_new_provider_replaces_the_old_one(server, session, metrics):
    other = Metrics()
    uninstrument = resilient.instrument_opentelemetry(other.provider)
    try:
        await fetch(session, server.url + "/r", quick_retry())
    finally:
        uninstrument()
        other.provider.shutdown()
    assert other.value("resilient.requests") == 1
    assert metrics.value("resilient.requests") == 0


def test_a_missing_opentelemetry_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"pip install 'resilient\[otel\]'"):
        resilient.instrument_opentelemetry()
