"""CircuitBreaker's fast path in the pipeline (``resilient.chain``): ``before`` admits or
refuses without a frame of its own, ``after`` records the outcome; against a real
loopback server (and a real redis-server), the same refusals, events and stats as the
breaker alone, and every probe slot handed back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import scripted
from aiohttp import web
from redis_server import evalsha_calls
from scripted import drop_connection, facts, held, ms, status_of, telemetry, until

import resilient
from resilient import CircuitBreaker, CircuitOpenError
from resilient.breaker import _redis

pytestmark = pytest.mark.timeout(30)

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_FOR = 30.0


class Watched(scripted.Watched, CircuitBreaker):
    """A breaker that counts how the pipeline ran it (``scripted.Watched``), with this
    file's rules unless told otherwise."""

    def __init__(self, **options: Any) -> None:
        options = {
            "min_calls": 4,
            "failure_ratio": 0.5,
            "window": 10.0,
            "open_for": OPEN_FOR,
            "max_open_for": OPEN_FOR,  # every break lasts open_for (no jitter)
            "consecutive_failures": None,
            **options,
        }
        super().__init__(**options)


async def refusal(client: aiohttp.ClientSession, url: str, middlewares: Any) -> CircuitOpenError:
    with pytest.raises(CircuitOpenError) as caught:
        await client.get(url, middlewares=middlewares)
    return caught.value


async def trip(client: aiohttp.ClientSession, server: Any, cb: Watched) -> None:
    """Open ``cb`` for ``server`` with four 500s through the chain."""
    server.script("/trip", 500, 500, 500, 500)
    for _ in range(4):
        assert await status_of(client, server.url + "/trip", resilient.chain(cb)) == 500
    assert cb.state(server.url) == "open"


# --- closed: admitted and counted on the fast path ---------------------------------------


async def test_a_success_is_admitted_and_counted_on_the_fast_path(server, client):
    cb = Watched()
    assert await status_of(client, server.url + "/x", resilient.chain(cb)) == 200
    assert (cb.whole, cb.tickets, cb.refused) == (0, 1, 0)
    stats = cb.stats()[server.url]
    assert (stats.state, stats.calls, stats.failures) == ("closed", 1, 0)


async def test_5xx_are_counted_on_the_fast_path_and_open_the_circuit(server, client):
    cb = Watched()
    server.script("/x", 200, 503, 404, 500)
    statuses = [await status_of(client, server.url + "/x", resilient.chain(cb)) for _ in range(4)]
    assert statuses == [200, 503, 404, 500]  # the 404 is a success: the host answered
    assert cb.whole == 0
    assert cb.state(server.url) == "open"
    assert await status_of(client, server.url + "/x", resilient.chain(cb)) == "CircuitOpenError"
    assert server.count() == 4  # nothing sent while open


async def test_a_dropped_connection_is_a_failure_on_the_fast_path(server, client):
    cb = Watched(consecutive_failures=1)
    server.script("/x", drop_connection)
    outcome = await status_of(client, server.url + "/x", resilient.chain(cb))
    # aiohttp re-sends a request whose connection dropped (a new request through the
    # chain): the first failure opened the circuit, so the re-send is refused
    assert outcome == "CircuitOpenError"
    assert server.count("/x") == 1
    assert cb.whole == 0
    assert cb.state(server.url) == "open"


async def test_an_error_of_an_inner_policy_is_not_an_outcome(server, client, gate):
    limit = resilient.ConcurrencyLimit(1, max_queue=0)
    cb = Watched(consecutive_failures=1)
    server.script("/held", held(gate))
    chain = resilient.chain(cb, limit)
    first = asyncio.create_task(status_of(client, server.url + "/held", chain))
    await until(lambda: server.count("/held") == 1)
    assert await status_of(client, server.url + "/x", chain) == "LimitExceeded"
    gate.set()
    assert await first == 200
    assert cb.whole == 0
    stats = cb.stats()[server.url]
    assert (stats.state, stats.calls, stats.failures) == ("closed", 1, 0)


@pytest.mark.looptime
async def test_an_attempt_abandoned_by_retrys_attempt_timeout_is_a_failure(server, client, gate):
    server.default("/slow", held(gate))
    retry = resilient.Retry(attempts=2, attempt_timeout=1.0)
    cb = Watched(consecutive_failures=2)
    with pytest.raises(aiohttp.SocketTimeoutError):
        await client.get(server.url + "/slow", middlewares=resilient.chain(retry, cb))
    assert server.count("/slow") == 2  # retried once, then given up
    assert (cb.whole, cb.tickets) == (0, 2)  # inside Retry's attempt, on the fast path
    assert cb.state(server.url) == "open"  # each abandoned attempt counted as a failure


@pytest.mark.looptime
async def test_a_cancelled_call_of_a_closed_circuit_counts_nothing(server, client, gate):
    cb = Watched()
    server.script("/held", held(gate, status=500))
    flying = asyncio.create_task(status_of(client, server.url + "/held", resilient.chain(cb)))
    await until(lambda: server.count("/held") == 1)
    flying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flying
    stats = cb.stats()[server.url]
    assert (stats.calls, stats.failures) == (0, 0)


# --- open: refused on the fast path, as the breaker alone refuses ------------------------


@pytest.mark.looptime
async def test_an_open_circuit_refuses_on_the_fast_path_as_the_breaker_alone(
    server, client, events
):
    alone, piped = Watched(), Watched()
    await trip(client, server, alone)
    await trip(client, server, piped)
    await asyncio.sleep(10.0)
    events.clear()
    by_alone = await refusal(client, server.url + "/x", (alone,))
    seen_alone = facts(events)
    events.clear()
    by_pipeline = await refusal(client, server.url + "/x", resilient.chain(piped))
    assert (piped.whole, piped.refused) == (0, 1)
    assert by_pipeline.key == by_alone.key == server.url
    assert by_pipeline.retry_after == pytest.approx(by_alone.retry_after, abs=1e-3)
    assert by_pipeline.retry_after == pytest.approx(OPEN_FOR - 10.0, abs=0.01)
    assert facts(events) == seen_alone
    url = server.url
    assert seen_alone == [
        (
            "circuit_rejected",
            url,
            "circuit_breaker",
            "GET",
            url + "/x",
            0,
            None,
            "open",
            ms(by_alone.retry_after),
        )
    ]
    assert server.count("/x") == 0


@pytest.mark.looptime
async def test_a_refusal_fails_fast_through_the_whole_chain(server, client):
    cb = Watched()
    await trip(client, server, cb)
    chain = resilient.chain(
        resilient.Retry(),
        cb,
        resilient.RateLimitBackoff(),
        resilient.ConcurrencyLimit(4),
        resilient.Throttle(100.0),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    caught = await refusal(client, server.url + "/x", chain)
    assert loop.time() - started < 0.01  # a 30 s break is not waited out
    assert caught.retry_after == pytest.approx(OPEN_FOR, abs=0.01)
    assert cb.whole == 0
    assert server.count("/x") == 0


# --- half-open: the probe on the fast path ------------------------------------------------


@pytest.mark.looptime
async def test_a_probe_goes_through_the_fast_path_and_closes_the_circuit(
    server, client, gate, events
):
    cb = Watched()
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    events.clear()
    server.script("/probe", held(gate))
    probe = asyncio.create_task(status_of(client, server.url + "/probe", resilient.chain(cb)))
    await until(lambda: server.count("/probe") == 1)
    assert cb.state(server.url) == "half_open"
    other = await refusal(client, server.url + "/x", resilient.chain(cb))  # its slot is taken
    assert other.retry_after == pytest.approx(OPEN_FOR, abs=0.01)  # until the probe is given up
    gate.set()
    assert await probe == 200
    assert cb.state(server.url) == "closed"
    assert (cb.whole, cb.refused) == (0, 1)
    assert [(e.kind, e.reason) for e in events] == [
        ("circuit_half_open", "open_for elapsed"),
        ("circuit_rejected", "half_open"),
        ("circuit_closed", "probes succeeded"),
    ]


@pytest.mark.looptime
async def test_a_failed_probe_on_the_fast_path_opens_the_circuit_again(server, client):
    cb = Watched()
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    server.script("/probe", 502)
    assert await status_of(client, server.url + "/probe", resilient.chain(cb)) == 502
    assert cb.state(server.url) == "open"
    caught = await refusal(client, server.url + "/x", resilient.chain(cb))
    assert caught.retry_after == pytest.approx(OPEN_FOR, abs=0.01)
    assert cb.whole == 0


@pytest.mark.looptime
async def test_a_probe_cancelled_mid_attempt_hands_its_slot_back(server, client, gate):
    cb = Watched()
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    server.script("/probe", held(gate))
    probe = asyncio.create_task(status_of(client, server.url + "/probe", resilient.chain(cb)))
    await until(lambda: server.count("/probe") == 1)
    await refusal(client, server.url + "/x", resilient.chain(cb))  # the slot is held
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert cb.stats()[server.url].probes == 0  # handed back, not counted
    assert await status_of(client, server.url + "/x", resilient.chain(cb)) == 200  # the next probe
    assert cb.state(server.url) == "closed"
    assert cb.whole == 0


# --- identical to the breaker alone -------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.looptime
async def test_events_stats_and_requests_are_those_of_the_breaker_alone(server, client, events):
    """Each step run twice in turn, by a breaker alone as a middleware and by the same
    configuration in the pipeline: the same outcome, requests, events and stats."""
    steps: list[tuple[str, list[int | Reply]] | float] = [
        ("/a", [200]),
        ("/a", [404]),
        ("/a", [500]),
        ("/a", [drop_connection]),  # 2 failures of 4 calls: opened, aiohttp's re-send refused
        ("/a", []),  # refused: open
        5.0,
        ("/a", []),  # refused, 25 s left
        OPEN_FOR,
        ("/probe", [502]),  # the probe fails: open again
        ("/a", []),  # refused
        OPEN_FOR,
        ("/probe", [200]),  # the probe succeeds: closed
        ("/a", [200]),
        ("/a", [503]),
    ]
    alone, piped = Watched(), Watched()
    for step in steps:
        if isinstance(step, float):
            await asyncio.sleep(step)
            continue
        path, replies = step
        seen: list[tuple[Any, ...]] = []
        for middlewares in ((alone,), resilient.chain(piped)):
            server.script(path, *replies)
            events.clear()
            before = len(server.arrivals)
            outcome = await status_of(client, server.url + path, middlewares)
            sent = [a.path for a in server.arrivals[before:]]
            seen.append((outcome, sent, facts(events)))
        assert seen[1] == seen[0], step
    assert piped.whole == 0
    assert (alone.refused, piped.refused) == (0, 4)
    assert _comparable(piped) == _comparable(alone)
    assert _comparable(alone)[0][1:4] == ("closed", 2, 1)


def _comparable(cb: CircuitBreaker) -> list[tuple[Any, ...]]:
    return [
        (s.key, s.state, s.calls, s.failures, s.probes, round(s.retry_after, 3))
        for s in cb.stats().values()
    ]


# --- shared through Redis: the fast path while the mirror knows the key -------------------

LEASE = 30.0
"""``CLOSED_LEASE`` in these tests (real time): longer than any stall of a busy machine,
so a call made after an answer "closed" is on the fast path."""


async def test_a_redis_breaker_admits_and_refuses_on_the_fast_path_while_it_knows_the_key(
    server, client, redis_url, monkeypatch
):
    monkeypatch.setattr(_redis, "CLOSED_LEASE", LEASE)
    cb = Watched(storage=redis_url, consecutive_failures=2)
    store = cb._shared
    assert store is not None
    try:
        chain = resilient.chain(cb)
        assert await status_of(client, server.url + "/x", chain) == 200
        assert (cb.whole, cb.tickets) == (1, 0)  # unknown: asked Redis (the slow path)
        statuses = [await status_of(client, server.url + "/x", chain) for _ in range(20)]
        assert statuses == [200] * 20
        assert (cb.whole, cb.tickets) == (1, 20)  # known closed (its lease): no round trip
        server.script("/x", 503, 503)
        assert await status_of(client, server.url + "/x", chain) == 503
        assert await status_of(client, server.url + "/x", chain) == 503
        await store.drain()
        assert cb.state(server.url) == "open"  # the mirror learnt the trip
        scripts, whole, sent = await evalsha_calls(redis_url), cb.whole, server.count()
        refused = [await refusal(client, server.url + "/x", chain) for _ in range(10)]
        assert {(e.key, round(e.retry_after)) for e in refused} == {(server.url, OPEN_FOR)}
        assert (cb.refused, cb.whole) == (10, whole)  # on the fast path
        assert await evalsha_calls(redis_url) == scripts  # not one round trip
        assert server.count() == sent
        assert (await store.read(server.url))[0] == "open"  # what every process sees
    finally:
        await store.drain()
        await store.store.close()


async def test_a_redis_breaker_counts_nothing_for_a_call_cancelled_on_the_fast_path(
    server, client, redis_url, gate, monkeypatch
):
    monkeypatch.setattr(_redis, "CLOSED_LEASE", LEASE)
    cb = Watched(storage=redis_url, consecutive_failures=1)
    store = cb._shared
    assert store is not None
    try:
        chain = resilient.chain(cb)
        assert await status_of(client, server.url + "/x", chain) == 200  # asked: known closed
        server.script("/held", held(gate, status=503))
        flying = asyncio.create_task(status_of(client, server.url + "/held", chain))
        await until(lambda: server.count("/held") == 1)
        assert (cb.whole, cb.tickets) == (1, 1)  # the held call is on the fast path
        flying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flying
        await store.drain()
        assert (await store.read(server.url))[0] == "closed"  # one failure would open it
        assert await status_of(client, server.url + "/x", chain) == 200
    finally:
        await store.drain()
        await store.store.close()


# --- with telemetry: run whole, counted once ------------------------------------------------


async def test_with_telemetry_the_breaker_runs_whole_and_the_call_is_counted_once(server, client):
    cb = Watched()
    with telemetry() as counted:
        assert await status_of(client, server.url + "/x", resilient.chain(cb)) == 200
    assert (cb.whole, cb.tickets) == (2, 0)  # __call__, re-entered by the counting
    assert counted() == [("circuit_breaker", 200, 1)]
