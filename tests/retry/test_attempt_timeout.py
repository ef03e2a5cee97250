"""Retry(attempt_timeout=...): an attempt without response headers in time is abandoned,
counts as a read timeout, leaks no connection, and is bounded by the caller's allowance.

Real loopback server, virtual time (looptime): the server's slow replies sleep on the
loop's clock, so a 30 s reply costs nothing."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

import resilient
from resilient import Event
from resilient._errors import DeadlineExceeded
from resilient.retry._retry import Retry

pytestmark = [pytest.mark.timeout(30), pytest.mark.looptime]

NO_WAIT = {"backoff": lambda attempt: 0.0, "budget": None}
"""Retries at once, without a budget: the timings below are the attempts' alone."""


def slow(seconds: float, status: int = 200, headers: dict[str, str] | None = None):
    """A reply that answers after ``seconds`` of loop time."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=status, headers=headers, text=f"after {seconds}")

    return reply


@pytest.fixture
def events() -> Iterator[list[Event]]:
    seen: list[Event] = []
    remove = resilient.add_hook(seen.append)
    yield seen
    remove()


@pytest.fixture
async def pool() -> AsyncIterator[aiohttp.TCPConnector]:
    """A connector of one connection: a connection leaked by an abandoned attempt would
    leave the next call waiting forever (the test would time out)."""
    connector = aiohttp.TCPConnector(limit=1)
    yield connector
    await connector.close()


def acquired(connector: aiohttp.BaseConnector) -> int:
    """Connections handed out and not yet given back or closed."""
    return len(connector._acquired)


def clock() -> float:
    return asyncio.get_running_loop().time()


# --- the rule ------------------------------------------------------------------------------


async def test_a_slow_get_is_abandoned_and_retried_and_succeeds_on_attempt_2(server, pool, events):
    server.script("/", slow(30))
    retry = Retry(attempt_timeout=2, **NO_WAIT)
    async with aiohttp.ClientSession(connector=pool, middlewares=(retry,)) as session:
        start = clock()
        async with session.get(server.url) as resp:
            assert resp.status == 200
            assert await resp.text() == "status 200"
        assert clock() - start == pytest.approx(2.0, abs=0.1)
        assert server.count() == 2
        assert server.arrivals[1].time - server.arrivals[0].time == pytest.approx(2.0, abs=0.1)
        assert acquired(pool) == 0
    scheduled = [e for e in events if e.kind == "retry_scheduled"]
    assert [(e.attempt, e.reason, e.status) for e in scheduled] == [(1, "attempt_timeout", None)]


async def test_a_fast_answer_is_untouched(server, client):
    retry = Retry(attempt_timeout=1, **NO_WAIT)
    for _ in range(3):
        async with client.get(server.url, middlewares=(retry,)) as resp:
            assert resp.status == 200
    assert server.count() == 3


async def test_the_bound_is_on_the_response_headers_not_the_body(server, client):
    async def slow_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)  # headers now
        await asyncio.sleep(5)
        await resp.write(b"late body")
        await resp.write_eof()
        return resp

    server.script("/", slow_body)
    async with client.get(server.url, middlewares=(Retry(attempt_timeout=1),)) as resp:
        assert await resp.read() == b"late body"
    assert server.count() == 1


async def test_a_slow_post_is_sent_once_and_the_caller_gets_a_read_timeout(server, pool, events):
    server.script("/invoices", slow(30, 201), 201)
    retry = Retry(attempt_timeout=2, **NO_WAIT)
    async with aiohttp.ClientSession(connector=pool, middlewares=(retry,)) as session:
        start = clock()
        with pytest.raises(aiohttp.SocketTimeoutError, match=r"attempt_timeout=2\.0s") as caught:
            await session.post(f"{server.url}/invoices", json={"n": 1})
        assert clock() - start == pytest.approx(2.0, abs=0.1)
        # What except clauses written for aiohttp's sock_read timeout catch:
        assert isinstance(caught.value, aiohttp.ServerTimeoutError)
        assert isinstance(caught.value, asyncio.TimeoutError)
        assert isinstance(caught.value, aiohttp.ClientConnectionError)
        assert not isinstance(caught.value, resilient.ResilienceError)
        assert acquired(pool) == 0
        async with session.get(server.url) as resp:  # the pool's one connection is free
            assert resp.status == 200
    assert server.count(method="POST") == 1
    assert not [e for e in events if e.kind == "retry_scheduled"]


async def test_a_post_with_an_idempotency_key_is_retried_after_a_timeout(server, client):
    server.script("/invoices", slow(30, 201), 201)
    retry = Retry(attempt_timeout=2, **NO_WAIT)
    async with client.post(
        f"{server.url}/invoices",
        json={},
        headers={"Idempotency-Key": "k-1"},
        middlewares=(retry,),
    ) as resp:
        assert resp.status == 201
    assert server.count(method="POST") == 2


async def test_every_attempt_timing_out_raises_the_last_read_timeout(server, pool, events):
    server.default("/", slow(30))
    retry = Retry(attempts=3, attempt_timeout=1, **NO_WAIT)
    async with aiohttp.ClientSession(connector=pool, middlewares=(retry,)) as session:
        start = clock()
        with pytest.raises(aiohttp.SocketTimeoutError):
            await session.get(server.url)
        assert clock() - start == pytest.approx(3.0, abs=0.1)
        assert acquired(pool) == 0
    assert server.count() == 3
    (gave_up,) = [e for e in events if e.kind == "retry_gave_up"]
    assert (gave_up.attempt, gave_up.reason) == (3, "attempts exhausted (attempt_timeout)")


async def test_aiohttp_s_own_read_timeout_keeps_its_name(server, events):
    server.script("/", slow(30))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=1)
    retry = Retry(attempt_timeout=5, **NO_WAIT)
    async with (
        aiohttp.ClientSession(timeout=timeout, middlewares=(retry,)) as session,
        session.get(server.url) as resp,
    ):
        assert resp.status == 200
    scheduled = [e for e in events if e.kind == "retry_scheduled"]
    assert [e.reason for e in scheduled] == ["SocketTimeoutError"]


# --- the caller's allowance ------------------------------------------------------------------


async def test_a_deadline_shorter_than_attempt_timeout_wins(server, pool):
    server.script("/", slow(30))
    retry = Retry(attempt_timeout=10, **NO_WAIT)
    async with aiohttp.ClientSession(connector=pool, middlewares=(retry,)) as session:
        start = clock()
        with resilient.deadline(3), pytest.raises(DeadlineExceeded, match="deadline"):
            await session.get(server.url)
        assert clock() - start == pytest.approx(3.0, abs=0.1)
        assert acquired(pool) == 0
    assert server.count() == 1


async def test_a_deadline_leaves_room_for_one_more_attempt_only(server):
    server.default("/", slow(30))
    retry = Retry(attempts=4, attempt_timeout=2, **NO_WAIT)
    async with aiohttp.ClientSession(middlewares=(retry,)) as session:
        start = clock()
        with resilient.deadline(3), pytest.raises(DeadlineExceeded):
            await session.get(server.url)
        assert clock() - start == pytest.approx(3.0, abs=0.1)
    assert server.count() == 2  # 2 s abandoned, then the rest of the deadline: 1 s


async def test_the_session_total_timeout_wins_too(server):
    server.script("/", slow(30))
    timeout = aiohttp.ClientTimeout(total=3)
    retry = Retry(attempt_timeout=10, **NO_WAIT)
    async with aiohttp.ClientSession(timeout=timeout, middlewares=(retry,)) as session:
        start = clock()
        with pytest.raises(DeadlineExceeded):
            await session.get(server.url)
        assert clock() - start == pytest.approx(3.0, abs=0.1)  # just before aiohttp's own
    assert server.count() == 1


async def test_a_cancelled_caller_is_cancelled_not_timed_out(server, pool):
    server.script("/", slow(30))
    retry = Retry(attempt_timeout=5, **NO_WAIT)
    async with aiohttp.ClientSession(connector=pool, middlewares=(retry,)) as session:
        task = asyncio.create_task(session.get(server.url))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert acquired(pool) == 0
        await asyncio.sleep(10)  # the attempt's clock is gone with it
    assert server.count() == 1


# --- inner waits do not count --------------------------------------------------------------


async def test_a_throttle_wait_inside_retry_does_not_count(server, client):
    server.default("/", slow(1.5))
    policies = resilient.chain(
        Retry(attempt_timeout=2, **NO_WAIT), resilient.Throttle(rate=0.2, burst=1)
    )
    first = asyncio.create_task(client.get(server.url, middlewares=policies))
    second = asyncio.create_task(client.get(server.url, middlewares=policies))
    start = clock()
    for resp in await asyncio.gather(first, second):
        assert resp.status == 200
        resp.release()
    # The second waited 5 s for its token, then 1.5 s on the wire: not timed out.
    assert clock() - start == pytest.approx(6.5, abs=0.1)
    assert server.count() == 2


async def test_the_clock_starts_when_the_throttle_lets_the_request_go(server, client):
    server.script("/", 200, slow(30))
    policies = resilient.chain(
        Retry(attempts=2, attempt_timeout=2, **NO_WAIT), resilient.Throttle(rate=0.2, burst=1)
    )
    async with client.get(server.url, middlewares=policies) as resp:
        assert resp.status == 200
    start = clock()
    async with client.get(server.url, middlewares=policies) as resp:
        assert resp.status == 200
    times = [a.time - start for a in server.arrivals[1:]]
    # Token at 5 s; abandoned 2 s later; the retry waits for its token (10 s) and answers.
    assert times == [pytest.approx(5.0, abs=0.1), pytest.approx(10.0, abs=0.1)]


async def test_a_resend_after_a_429_pause_gets_the_whole_attempt_timeout(server, client):
    server.script("/", slow(1.5, 429, {"Retry-After": "4"}), slow(1.5))
    policies = resilient.chain(
        Retry(attempt_timeout=2, **NO_WAIT), resilient.RateLimitBackoff(max_wait=60)
    )
    start = clock()
    async with client.get(server.url, middlewares=policies) as resp:
        assert resp.status == 200
    # 1.5 s to the 429, a 4 s pause, 1.5 s again: each send well within its 2 s.
    assert clock() - start == pytest.approx(7.0, abs=0.2)
    assert server.count() == 2


async def test_a_concurrency_limit_queue_does_not_count(server):
    server.default("/", slow(1.5))
    policies = resilient.chain(Retry(attempt_timeout=2, **NO_WAIT), resilient.ConcurrencyLimit(1))
    async with aiohttp.ClientSession(middlewares=policies) as session:
        resps = await asyncio.gather(*(session.get(server.url) for _ in range(3)))
        assert [r.status for r in resps] == [200, 200, 200]
        for r in resps:
            r.release()
    assert server.count() == 3  # the third queued 3 s, then 1.5 s on the wire


# --- telemetry -----------------------------------------------------------------------------


async def test_the_abandoned_attempt_is_a_read_timeout_in_the_spans(server, client):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exporter))
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    uninstrument = resilient.instrument_opentelemetry(meters, tracers)
    try:
        server.script("/", slow(30))
        retry = Retry(attempt_timeout=2, **NO_WAIT)
        async with client.get(server.url, middlewares=(retry,)) as resp:
            assert resp.status == 200
    finally:
        uninstrument()
        meters.shutdown()
        tracers.shutdown()
    spans = sorted(
        (s for s in exporter.get_finished_spans() if s.instrumentation_scope.name == "resilient"),
        key=lambda s: s.start_time or 0,
    )
    assert [s.attributes.get("error.type") for s in spans] == ["SocketTimeoutError", None]


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, -1, math.nan, math.inf, True, "2"])
def test_attempt_timeout_must_be_none_or_a_finite_number_above_zero(value):
    with pytest.raises(ValueError, match=r"Retry: attempt_timeout must be None .* > 0"):
        Retry(attempt_timeout=value)


def test_attempt_timeout_defaults_to_none_and_shows_in_the_repr():
    assert Retry().attempt_timeout is None
    retry = Retry(attempt_timeout=2)
    assert retry.attempt_timeout == 2.0
    assert isinstance(retry.attempt_timeout, float)
    assert "attempt_timeout=2.0)" in repr(retry)


async def test_a_breaker_inside_retry_counts_an_abandoned_attempt_as_a_failure(server, client):
    """A host that hangs is caught only by attempt_timeout: the breaker inside Retry sees
    each abandoned attempt as a read timeout (a failure), so it trips."""
    server.script("/", slow(30), slow(30))
    breaker = resilient.CircuitBreaker(consecutive_failures=2, open_for=60.0)
    retry = Retry(attempts=2, attempt_timeout=1, **NO_WAIT)
    with pytest.raises(aiohttp.SocketTimeoutError):
        await client.get(server.url, middlewares=resilient.chain(retry, breaker))
    assert breaker.state(server.url) == "open"
    with pytest.raises(resilient.CircuitOpenError):
        await client.get(server.url, middlewares=(breaker,))
    assert server.count() == 2
