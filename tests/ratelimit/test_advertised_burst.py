"""RateLimitBackoff's proactive reading when little is left: the callers already queued
go at once (up to what is left), a lone caller is spread, and a reading that never
counts down frees one burst per spread (virtual time, real loopback servers)."""

from __future__ import annotations

import asyncio
import collections

import aiohttp
import pytest
from aiohttp import web

import resilient
from resilient import RateLimitBackoff
from resilient.testing import SimulatedAPI

QUOTA, WINDOW, CALLERS, CALLS = 20, 10.0, 10, 60


async def get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("limiter", "dialect"), [("fixed", "ietf"), ("moving", "x")], ids=["ietf-fixed", "x-moving"]
)
async def test_queued_callers_spend_what_is_left_at_once_and_fill_every_window(limiter, dialect):
    """20 per 10 s advertised, 10 closed-loop callers, 60 calls: each window takes its
    whole quota at its start (the last 10% is not spread over the window, nor its last
    slot pushed into the next one), so the calls end at the third window's start, with
    no 429."""
    async with SimulatedAPI(quota=None, limiter=(limiter, QUOTA, WINDOW), advertise=dialect) as api:
        statuses: list[int] = []
        started = 0
        async with resilient.session(RateLimitBackoff()) as s:
            start = asyncio.get_running_loop().time()

            async def caller() -> None:
                nonlocal started
                while started < CALLS:
                    started += 1
                    statuses.append(await get(s, api.url + "/contacts/1"))

            await asyncio.gather(*(caller() for _ in range(CALLERS)))
        windows = collections.Counter(int((e.time - start) // WINDOW) for e in api.log)
        codes = collections.Counter(e.status for e in api.log)
    assert statuses == [200] * CALLS
    assert codes == {200: CALLS}
    assert windows == {0: QUOTA, 1: QUOTA, 2: QUOTA}
    assert max(e.time for e in api.log) - start == pytest.approx(2 * WINDOW, abs=0.01)


def constant(headers: dict[str, str]) -> object:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", headers=headers)

    return reply


@pytest.mark.looptime
async def test_a_reading_that_never_counts_down_frees_one_burst_per_spread(server):
    """Every answer says 5 left for 10 s, whatever was sent: after the first, 10 callers
    queue; one burst of at most 5 goes with the first slot, and the rest keep the spread's
    spacing (10 s / 5), never one burst per answer."""
    server.default("/x", constant({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "10"}))
    async with resilient.session(RateLimitBackoff()) as s:
        assert await get(s, server.url + "/x") == 200  # the spread starts: 2 s a slot
        assert await asyncio.gather(*(get(s, server.url + "/x") for _ in range(10))) == [200] * 10
    times = [a.time for a in server.arrivals]
    at_once = collections.Counter(round(t - times[0], 3) for t in times)
    assert max(at_once.values()) <= 1 + 5  # the slot's caller and one burst
    assert times[-1] - times[0] >= 2.0 + 4 * 1.9  # the other four: a slot each, 2 s apart


@pytest.mark.looptime
async def test_a_lone_caller_is_still_spread(server):
    """Nobody queued when the reading comes: nothing goes at once, the spread paces."""
    server.default("/x", constant({"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "4",
                                   "X-RateLimit-Reset": "8"}))  # fmt: skip
    async with resilient.session(RateLimitBackoff()) as s:
        for _ in range(3):
            assert await get(s, server.url + "/x") == 200
    first, second, third = (a.time for a in server.arrivals)
    assert second - first >= 1.99
    assert third - second >= 1.99


def answer(after: float, headers: dict[str, str]) -> object:
    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(after)
        return web.Response(text="ok", headers=headers)

    return reply


@pytest.mark.looptime
async def test_a_limit_spent_during_a_spread_ends_it_and_the_callers_follow_the_probe(server):
    """A spread of 0.5/s runs (5 left for 10 s) when a slower answer says none is left for
    2 s: the key pauses until then, and after its probe the waiting callers go at once,
    not at the spread's old slots (the pause replaced the spread)."""
    limit = {"X-RateLimit-Limit": "100"}
    server.script(
        "/x",
        answer(1.0, {**limit, "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"}),
        answer(0.0, {**limit, "X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "10"}),
    )
    server.default("/x", constant({**limit, "X-RateLimit-Remaining": "50",
                                   "X-RateLimit-Reset": "10"}))  # fmt: skip
    async with resilient.session(RateLimitBackoff()) as s:
        slow = asyncio.create_task(get(s, server.url + "/x"))  # answers at 1 s: none left
        await asyncio.sleep(0.01)
        assert await get(s, server.url + "/x") == 200  # 5 left for 10 s: a slot each 2 s
        await asyncio.sleep(0.1)
        waiting = [asyncio.create_task(get(s, server.url + "/x")) for _ in range(4)]
        assert await asyncio.gather(slow, *waiting) == [200] * 5
    times = [a.time for a in server.arrivals]
    probe = times[2]
    assert probe - times[0] == pytest.approx(3.0, abs=0.05)  # the pause: 1 s + 2 s
    assert all(t - probe < 0.05 for t in times[3:])  # the other three right behind it
