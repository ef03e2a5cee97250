"""Throttle's fast path in the pipeline (``resilient.chain``): ``before`` takes the token
(and the quota place, from memory or from a lease) when it is there now, ``after`` does
what ``__call__`` does once the attempt ended; anything that must wait runs the policy
whole. Against a real loopback server (and a real redis-server): the same requests,
times, events and stats as the Throttle alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import scripted
from aiohttp import web
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from scripted import drop_connection, held, status_of, telemetry, until

import resilient
from resilient import DeadlineExceeded, Event, Throttle
from resilient.throttle._quota import NAMESPACE
from resilient.throttle._redis import RedisQuotas

pytestmark = pytest.mark.timeout(30)

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]
TICK = 1e-6
"""Tolerance (seconds) on arrival times in virtual time."""


class Watched(scripted.Watched, Throttle):
    """A Throttle that counts how the pipeline ran it (``scripted.Watched``)."""


def times(server, path: str | None = None) -> list[float]:
    t0 = server.arrivals[0].time
    return [a.time - t0 for a in server.arrivals if path is None or a.path == path]


# --- memory: the token and the quota place on the fast path -------------------------------


@pytest.mark.looptime
async def test_a_token_there_now_is_taken_on_the_fast_path_and_waits_run_whole(server, client):
    throttle = Watched(2.0)
    chain = resilient.chain(throttle)
    outcomes = await asyncio.gather(
        *(status_of(client, server.url + "/x", chain) for _ in range(5))
    )
    assert outcomes == [200] * 5
    assert times(server) == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0], abs=TICK)
    assert (throttle.tickets, throttle.whole) == (1, 4)  # the first had its token


@pytest.mark.looptime
async def test_quota_places_in_memory_are_taken_on_the_fast_path(server, client):
    throttle = Watched(1000.0, burst=10, quotas="2/second")
    chain = resilient.chain(throttle)
    outcomes = await asyncio.gather(
        *(status_of(client, server.url + "/x", chain) for _ in range(5))
    )
    assert outcomes == [200] * 5
    assert times(server) == pytest.approx([0.0, 0.0, 1.0, 1.0, 2.0], abs=TICK)
    assert (throttle.tickets, throttle.whole) == (2, 3)  # a full window: waited whole
    assert throttle.stats()[server.url].in_flight == 0  # every request landed


@pytest.mark.looptime
async def test_a_full_window_hands_the_token_back_before_running_whole(server, client):
    """A request that has its token but not its quota place gives the token back: the
    whole run takes it again, and the bucket ends as the Throttle alone leaves it."""
    alone = Throttle(1.0, burst=3, quotas="2/minute")
    piped = Watched(1.0, burst=3, quotas="2/minute")
    for middlewares in ((alone,), resilient.chain(piped)):
        await asyncio.gather(*(status_of(client, server.url + "/a", middlewares) for _ in range(2)))
        with resilient.deadline(1.0):
            assert await status_of(client, server.url + "/b", middlewares) == "DeadlineExceeded"
    assert (piped.tickets, piped.whole) == (2, 1)
    tokens = [t.stats()[server.url].tokens for t in (alone, piped)]
    assert tokens == pytest.approx([1.0, 1.0], abs=1e-3)  # 3, less the two sent


@pytest.mark.looptime
async def test_a_request_cancelled_on_the_wire_still_lands(server, client, gate):
    """Cancelled in flight on the fast path, a request takes its quota slot (it may have
    reached the server) and stops counting in flight: the window reads 1 of 2 used."""
    throttle = Watched(1000.0, quotas="2/minute")
    chain = resilient.chain(throttle)
    server.default("/held", held(gate))
    flying = asyncio.create_task(status_of(client, server.url + "/held", chain))
    await until(lambda: server.count("/held") == 1)
    assert throttle.stats()[server.url].in_flight == 1
    flying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flying
    assert throttle.stats()[server.url].in_flight == 0
    assert await status_of(client, server.url + "/second", chain) == 200  # slot 2 of 2
    with resilient.deadline(1.0):
        assert await status_of(client, server.url + "/third", chain) == "DeadlineExceeded"
    assert throttle.tickets == 2
    assert server.count("/third") == 0


@pytest.mark.looptime
async def test_a_dropped_connection_on_the_fast_path_spends_its_token_and_slot(server, client):
    throttle = Watched(1.0, quotas="2/minute")
    chain = resilient.chain(throttle)
    server.script("/x", drop_connection)
    with pytest.raises(aiohttp.ServerDisconnectedError):  # a POST: aiohttp does not re-send
        await client.post(server.url + "/x", middlewares=chain)
    assert throttle.tickets == 1
    assert await status_of(client, server.url + "/y", chain) == 200  # one token a second
    assert times(server, "/y") == pytest.approx([1.0], abs=TICK)
    with resilient.deadline(1.0):  # 2 of 2 slots: the dropped one took its slot
        assert await status_of(client, server.url + "/z", chain) == "DeadlineExceeded"


@pytest.mark.looptime
async def test_an_adaptive_throttle_learns_on_the_fast_path_as_alone(server, client):
    """A 429 cuts the learned rate in ``after`` as it does in ``__call__``."""
    alone, piped = Throttle(10.0, adaptive=True), Watched(10.0, adaptive=True)
    rates = []
    for throttle, middlewares in ((alone, (alone,)), (piped, resilient.chain(piped))):
        server.script("/x", *[200] * 5, 429)
        for _ in range(6):
            await status_of(client, server.url + "/x", middlewares)
        rates.append(throttle.current_rate(server.url))
    assert rates[0] < 10.0
    assert rates[1] == pytest.approx(rates[0])
    assert piped.tickets >= 1


# --- identical to the Throttle alone -------------------------------------------------------


def facts(events: list[Event]) -> list[tuple[object, ...]]:
    """What an event says (its delay to the microsecond; not its URL: the paths differ)."""
    return [(e.kind, e.key, e.policy, e.reason, round(e.delay or 0.0, 6)) for e in events]


def comparable(throttle: Throttle) -> list[tuple[object, ...]]:
    return [
        (s.key, round(s.tokens, 6), round(s.rate, 6), s.burst, s.waiting, s.in_flight)
        for s in throttle.stats().values()
    ]


@pytest.mark.looptime
async def test_requests_times_events_and_stats_are_those_of_the_throttle_alone(
    server, client, events
):
    """The same bursts sent through a Throttle alone and through the same configuration
    in the pipeline (token waits, quota waits, a 429 that cuts the adaptive rate, a 503):
    the same outcomes, arrival times, events and stats."""
    options: dict[str, Any] = {"burst": 2, "quotas": "3 per 2 seconds", "adaptive": True}
    alone, piped = Throttle(2.0, **options), Watched(2.0, **options)
    seen = []
    for throttle, middlewares, path in (
        (alone, (alone,), "/alone"),
        (piped, resilient.chain(piped), "/piped"),
    ):
        server.script(path, 200, 200, 429, 200, 503)
        events.clear()
        start = asyncio.get_running_loop().time()
        outcomes: list[int | str] = []
        for burst in (3, 1, 2):
            outcomes += await asyncio.gather(
                *(status_of(client, server.url + path, middlewares) for _ in range(burst))
            )
            await asyncio.sleep(0.7)
        arrivals = [round(a.time - start, 6) for a in server.arrivals if a.path == path]
        seen.append((outcomes, arrivals, facts(events), comparable(throttle)))
    assert seen[1] == seen[0]
    assert 429 in seen[0][0]
    assert any(kind == "throttled" for kind, *_ in seen[0][2])
    assert piped.tickets > 0  # some went on the fast path


# --- shared through Redis: leased places on the fast path ----------------------------------


async def test_a_leased_place_is_taken_on_the_fast_path_without_a_round_trip(
    server, client, redis_url
):
    throttle = Watched(1000.0, burst=1000, quotas="100000/minute", storage=redis_url)
    quotas = throttle._quotas
    assert isinstance(quotas, RedisQuotas)
    chain = resilient.chain(throttle)
    try:
        assert [await status_of(client, server.url + "/x", chain) for _ in range(40)] == [200] * 40
        assert throttle.tickets >= 25  # leased places: no round trip
        assert throttle.whole == 40 - throttle.tickets  # the others asked Redis, whole
        await quotas.drain()
        limiter = MovingWindowRateLimiter(quotas.store.limits)
        stats = await limiter.get_window_stats(
            parse("100000/minute"), NAMESPACE, "{" + server.url + "}"
        )
        assert stats.remaining == 100000 - 40  # every one landed in Redis
    finally:
        await quotas.drain()
        await quotas.store.close()


async def test_with_telemetry_the_throttle_runs_whole_and_the_call_is_counted_once(server, client):
    throttle = Watched(1000.0, quotas="5/second")
    with telemetry() as counted:
        assert await status_of(client, server.url + "/x", resilient.chain(throttle)) == 200
    assert (throttle.whole, throttle.tickets) == (2, 0)  # __call__, re-entered by the count
    assert counted() == [("throttle", 200, 1)]
    assert throttle.stats()[server.url].in_flight == 0


@pytest.mark.looptime
async def test_a_deadline_refusal_is_the_same_through_the_chain(server, client):
    for middlewares in ((Throttle(1.0),), resilient.chain(Throttle(1.0))):
        assert await status_of(client, server.url + "/first", middlewares) == 200
        with resilient.deadline(0.5), pytest.raises(DeadlineExceeded, match="rate limit"):
            await client.get(server.url + "/second", middlewares=middlewares)
    assert server.count("/second") == 0
