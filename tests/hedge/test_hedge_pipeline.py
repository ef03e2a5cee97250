"""Hedge in the pipeline (``resilient.chain``): a request it never hedges (see
``hedgeable``) goes once on the fast path, with no ticket; any other runs Hedge whole
(its race needs tasks). Against a real loopback server, in virtual time (looptime): the
same requests, events and stats as Hedge alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import scripted
from aiohttp import web
from scripted import delayed, held, telemetry, until

import resilient
from resilient import Hedge

pytestmark = [pytest.mark.timeout(30), pytest.mark.looptime]

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Watched(scripted.Watched, Hedge):
    """A Hedge that counts how the pipeline ran it (``scripted.Watched``)."""


async def fetch(
    client: aiohttp.ClientSession, method: str, url: str, middlewares: Any, **kw: Any
) -> tuple[int, str] | str:
    """``(status, text)`` of one call, or the name of the exception it raised."""
    try:
        async with client.request(method, url, middlewares=middlewares, **kw) as resp:
            return resp.status, await resp.text()
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def test_a_post_goes_once_on_the_fast_path(server, client):
    hedge = Watched(delay=0.5)
    server.script("/", delayed(2.0, text="own"))
    outcome = await fetch(client, "POST", server.url + "/", resilient.chain(hedge), data=b"x")
    assert outcome == (200, "own")
    assert [a.body for a in server.arrivals] == [b"x"]  # no copy, although slow
    assert (hedge.whole, hedge.tickets) == (0, 1)
    assert hedge.stats() == {}  # no latency recorded (as alone)


async def test_a_streamed_body_goes_once_on_the_fast_path(server, client):
    async def stream() -> AsyncIterator[bytes]:
        yield b"chunk"

    hedge = Watched(delay=0.5)
    server.script("/", delayed(2.0, text="own"))
    outcome = await fetch(client, "PUT", server.url + "/", resilient.chain(hedge), data=stream())
    assert outcome == (200, "own")
    assert server.count() == 1
    assert (hedge.whole, hedge.tickets) == (0, 1)


async def test_a_get_runs_hedge_whole_and_its_copy_wins(server, client):
    hedge = Watched(delay=0.5)
    server.script("/", delayed(10.0, text="own"), delayed(0.1, text="copy"))
    outcome = await fetch(client, "GET", server.url + "/", resilient.chain(hedge))
    assert outcome == (200, "copy")
    assert (hedge.whole, hedge.tickets) == (1, 0)
    stats = hedge.stats()[server.url]
    assert (stats.hedged, stats.won, stats.samples) == (1, 1, 1)


async def test_a_post_cancelled_mid_attempt_leaves_nothing_held_in_the_chain(server, client, gate):
    hedge = Watched(delay=0.5)
    breaker = resilient.CircuitBreaker(consecutive_failures=1)
    limit = resilient.ConcurrencyLimit(1)
    chain = resilient.chain(hedge, breaker, limit)
    server.script("/held", held(gate))
    flying = asyncio.create_task(fetch(client, "POST", server.url + "/held", chain, data=b"x"))
    await until(lambda: server.count("/held") == 1)
    assert limit.in_flight(server.url) == 1
    flying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flying
    assert limit.in_flight(server.url) == 0
    assert breaker.stats()[server.url].calls == 0  # a cancellation is not an outcome
    assert hedge.stats() == {}
    assert await fetch(client, "POST", server.url + "/", chain, data=b"y") == (200, "status 200")
    assert server.count() == 2  # no copy of either POST
    assert hedge.whole == 0


async def test_requests_events_and_stats_are_those_of_hedge_alone(server, client, events):
    """Each case run twice in turn, by Hedge alone as a middleware and by the same
    configuration in the pipeline."""
    key = {"Idempotency-Key": "k1"}
    cases: list[tuple[str, dict[str, Any], list[Reply]]] = [
        ("POST", {"data": b"a"}, [delayed(2.0, text="own")]),
        ("GET", {}, [delayed(0.1, text="fast")]),
        ("GET", {}, [delayed(3.0, text="own"), delayed(0.1, text="copy")]),
        (
            "POST",
            {"data": b"b", "headers": key},
            [delayed(3.0, text="own"), delayed(0.1, text="copy")],
        ),
        ("DELETE", {}, [delayed(0.2, text="own")]),
        ("PATCH", {"data": b"c"}, [delayed(2.0, text="own")]),
    ]
    alone, piped = Watched(delay=1.0), Watched(delay=1.0)
    for method, options, replies in cases:
        seen: list[tuple[Any, ...]] = []
        for middlewares in ((alone,), resilient.chain(piped)):
            server.script("/", *replies)
            events.clear()
            before = len(server.arrivals)
            outcome = await fetch(client, method, server.url + "/", middlewares, **options)
            await asyncio.sleep(0.01)  # the cancelled losers ran their cleanup
            sent = [(a.method, a.body) for a in server.arrivals[before:]]
            facts = [(e.kind, e.key, e.method, e.url, e.attempt, e.status) for e in events]
            seen.append((outcome, sent, facts))
        assert seen[1] == seen[0], method
    assert piped.stats() == alone.stats()
    assert alone.stats()[server.url].hedged == 2
    assert (piped.whole, piped.tickets) == (4, 2)  # GET, GET, POST with a key, DELETE


async def test_with_telemetry_hedge_and_the_limit_run_whole_and_the_call_is_counted_once(
    server, client
):
    hedge = Watched(delay=0.5)
    limit = resilient.ConcurrencyLimit(1)
    with telemetry() as counted:
        chain = resilient.chain(hedge, limit)
        assert await fetch(client, "POST", server.url + "/", chain) == (200, "status 200")
        assert limit.in_flight(server.url) == 0
    assert hedge.tickets == 0  # run whole: __call__ counts the call
    assert counted() == [("hedge", 200, 1)]  # once, by the outermost policy
