"""ConcurrencyLimit's fast path in the pipeline (``resilient.chain``): a free slot with
nobody queued is taken in ``before`` and handed back in ``after``, whatever the outcome;
anything else (queue, refusal) runs the limit whole. Against a real loopback server, in
virtual time (looptime): the same slots, events and stats as the limit alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import scripted
from aiohttp import web
from scripted import delayed, drop_connection, held, status_of, until

import resilient
from resilient import ConcurrencyLimit, LimitExceeded
from resilient._pipeline import Pipeline

pytestmark = [pytest.mark.timeout(30), pytest.mark.looptime]

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Watched(scripted.Watched, ConcurrencyLimit):
    """A limit that counts how the pipeline ran it (``scripted.Watched``)."""


async def test_a_free_slot_is_taken_and_handed_back_on_the_fast_path(server, client):
    limit = Watched(2)
    server.script("/x", delayed(0.5))
    flying = asyncio.create_task(status_of(client, server.url + "/x", resilient.chain(limit)))
    await until(lambda: server.count("/x") == 1)
    assert limit.in_flight(server.url) == 1  # held while on the wire
    assert await flying == 200
    assert limit.in_flight(server.url) == 0
    assert (limit.whole, limit.tickets) == (0, 1)
    hold = limit.stats()[server.url].hold
    assert hold == pytest.approx(0.5, abs=0.01)  # the slot's holding time was sampled


async def test_a_5xx_or_an_exception_hands_the_slot_back(server, client):
    limit = Watched(1)
    server.script("/x", 503, drop_connection, drop_connection)  # aiohttp re-sends once
    chain = resilient.chain(limit)
    assert await status_of(client, server.url + "/x", chain) == 503
    assert await status_of(client, server.url + "/x", chain) == "ServerDisconnectedError"
    assert limit.in_flight(server.url) == 0
    assert await status_of(client, server.url + "/x", chain) == 200
    assert limit.whole == 0


async def test_a_call_cancelled_mid_attempt_hands_its_slot_back(server, client, gate):
    limit = Watched(1, max_queue=0)
    server.script("/held", held(gate))
    chain = resilient.chain(limit)
    flying = asyncio.create_task(status_of(client, server.url + "/held", chain))
    await until(lambda: server.count("/held") == 1)
    assert await status_of(client, server.url + "/x", chain) == "LimitExceeded"  # the slot is held
    flying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flying
    assert limit.in_flight(server.url) == 0
    assert await status_of(client, server.url + "/x", chain) == 200
    assert limit.tickets == 2


async def test_a_caller_that_must_queue_runs_the_limit_whole_and_gets_the_slot_handed_over(
    server, client
):
    limit = Watched(1)
    server.script("/first", delayed(1.0))
    chain = resilient.chain(limit)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = asyncio.create_task(status_of(client, server.url + "/first", chain))
    await until(lambda: server.count("/first") == 1)
    second = asyncio.create_task(status_of(client, server.url + "/second", chain))
    await until(lambda: limit.waiting(server.url) == 1)
    assert await first == 200
    assert await second == 200
    assert server.arrivals[1].time - started == pytest.approx(1.0, abs=0.01)  # delayed /first
    assert (limit.whole, limit.tickets) == (1, 1)
    assert (limit.in_flight(server.url), limit.waiting(server.url)) == (0, 0)


async def test_a_refusal_is_that_of_the_limit_alone(server, client, gate, events):
    seen = []
    for middlewares_of in (lambda lim: (lim,), resilient.chain):
        limit = Watched(1, max_queue=0)
        server.script("/held", held(gate))
        chain = middlewares_of(limit)
        flying = asyncio.create_task(status_of(client, server.url + "/held", chain))
        await until(lambda lim=limit: lim.in_flight(server.url) == 1)
        events.clear()
        with pytest.raises(LimitExceeded) as caught:
            await client.get(server.url + "/x", middlewares=chain)
        gate.set()
        assert await flying == 200
        gate.clear()
        stats = limit.stats()[server.url]
        facts = [(e.kind, e.key, e.policy, e.method, e.url, e.reason) for e in events]
        seen.append((caught.value.key, caught.value.reason, facts, stats.rejected))
    assert seen[1] == seen[0]
    assert seen[0][:2] == (server.url, "queue full")
    assert server.count("/x") == 0


async def test_the_slot_is_held_while_an_inner_policy_resends(server, client):
    """A 503 retried by a Retry nested inside the limit (by hand: ``chain()`` puts Retry
    outside): one slot for the whole exchange, handed back once, as when run whole."""
    limit = Watched(1)
    retry = resilient.Retry(backoff=lambda attempt: 0.5)
    server.script("/x", 503, 200)
    assert await status_of(client, server.url + "/x", (Pipeline([limit, retry]),)) == 200
    assert server.count("/x") == 2
    assert limit.tickets == 1
    assert limit.in_flight(server.url) == 0
    assert limit.stats()[server.url].hold == pytest.approx(0.5, abs=0.01)  # both attempts
