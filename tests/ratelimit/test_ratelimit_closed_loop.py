"""RateLimitBackoff's closed loop: learned rate, paced release, the key's streak floor,
advertised limits (virtual time), and a real nginx ``limit_req`` (real time)."""

from __future__ import annotations

import asyncio
import collections
import itertools

import aiohttp
import pytest
from aiohttp import web
from nginx_server import new_nginx_server

import resilient
from resilient import RateLimitBackoff
from resilient.testing import limit_req_config


def too_many(retry_after: str) -> object:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": retry_after})

    return reply


def ok_with(headers: dict[str, str]) -> object:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", headers=headers)

    return reply


async def get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


@pytest.mark.looptime
async def test_waiters_released_by_the_probe_leave_at_the_learned_rate_not_at_once(server):
    server.script("/x", too_many("10"))
    policy = RateLimitBackoff()
    async with resilient.session(policy) as s:
        first = asyncio.create_task(get(s, server.url + "/x"))
        await asyncio.sleep(0.1)
        others = [asyncio.create_task(get(s, server.url + "/x")) for _ in range(20)]
        assert set(await asyncio.gather(first, *others)) == {200}
        rate = policy.rate(f"http://127.0.0.1:{server.url.rsplit(':', 1)[1]}")
    assert rate is not None
    times = sorted(a.time for a in server.arrivals)
    probe, released = times[1], times[2:]
    assert probe >= times[0] + 10
    assert len(released) == 20
    # no two departures closer than the slowest rate the key was paced at
    gaps = [b - a for a, b in zip([probe, *released], released, strict=False)]
    assert min(gaps) > 0.0
    assert released[-1] - probe >= 1.0  # 20 callers spread out, not a burst


@pytest.mark.looptime
async def test_the_backoff_floor_belongs_to_the_key_not_to_one_callers_history(server):
    """A caller that met three 429s does not stretch the next caller's pause: a success
    on the key ends the streak."""
    server.script("/x", too_many("0"), too_many("0"), too_many("0"), 200)
    server.script("/y", too_many("0"))
    policy = RateLimitBackoff(key=lambda request: "one key", base=1.0)
    async with resilient.session(policy) as s:
        assert await get(s, server.url + "/x") == 200
        before = asyncio.get_running_loop().time()
        assert await get(s, server.url + "/y") == 200
        after = asyncio.get_running_loop().time()
    # three 429s in a row on the key: floors 0, 1, 2 s; after the success the streak
    # starts over, so /y's Retry-After: 0 is trusted: its retry waits only for its paced
    # departure (the key learned about 1/s), not the 4 s a continued streak would floor
    xs = [a.time for a in server.arrivals if a.path == "/x"]
    assert xs[2] - xs[1] >= 1.0
    assert xs[3] - xs[2] >= 2.0
    assert after - before < 3.0


@pytest.mark.looptime
async def test_retry_after_zero_forever_never_loops_hot(server):
    server.default("/x", too_many("0"))
    async with resilient.session(RateLimitBackoff(max_wait=60.0, base=1.0)) as s:
        assert await get(s, server.url + "/x") == 429
    assert server.count("/x") <= 8  # 0, 1, 2, 4, 8, 16, 32 s floors within 60 s


@pytest.mark.looptime
async def test_learned_rate_is_cut_by_a_429_and_rises_while_requests_succeed(server):
    server.script("/x", too_many("1"))
    policy = RateLimitBackoff()
    key = f"http://127.0.0.1:{server.url.rsplit(':', 1)[1]}"
    async with resilient.session(policy) as s:
        assert policy.rate(key) is None  # not paced before any 429
        assert await get(s, server.url + "/x") == 200
        first = policy.rate(key)
        assert first is not None
        for _ in range(30):
            assert await get(s, server.url + "/x") == 200
        later = policy.rate(key)
        assert later is not None
        assert later > first
        server.script("/x", too_many("1"))
        assert await get(s, server.url + "/x") == 200
        cut = policy.rate(key)
        assert cut is not None
        assert cut < later * 1.5
        stats = policy.stats()[key]
        assert stats.rate == pytest.approx(policy.rate(key), rel=0.5)


@pytest.mark.looptime
@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit-Policy": '"default";q=10;w=30', "RateLimit": '"default";r=0;t=30'},
        {"RateLimit-Limit": "10", "RateLimit-Remaining": "0", "RateLimit-Reset": "30"},
        {"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "30"},
    ],
    ids=["ietf-draft-11", "legacy", "x-ratelimit"],
)
async def test_an_exhausted_advertised_limit_waits_for_the_reset_without_a_429(server, headers):
    server.script("/x", ok_with(headers))
    async with resilient.session(RateLimitBackoff()) as s:
        assert await get(s, server.url + "/x") == 200
        assert await get(s, server.url + "/x") == 200
    first, second = (a.time for a in server.arrivals)
    assert second - first >= 30.0


@pytest.mark.looptime
@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit-Policy": '"default";q=1000;w=60', "RateLimit": '"default";r=900;t=60'},
        {"RateLimit-Limit": "1000", "RateLimit-Remaining": "900", "RateLimit-Reset": "60"},
        {"X-RateLimit-Limit": "1000", "X-RateLimit-Remaining": "900", "X-RateLimit-Reset": "60"},
    ],
    ids=["ietf-draft-11", "legacy", "x-ratelimit"],
)
async def test_plenty_left_on_an_advertised_limit_means_no_wait(server, headers):
    server.default("/x", ok_with(headers))
    async with resilient.session(RateLimitBackoff()) as s:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(20):
            assert await get(s, server.url + "/x") == 200
        assert loop.time() - t0 < 0.5


@pytest.mark.looptime
async def test_little_left_is_spread_over_the_time_to_the_reset(server):
    server.default("/x", ok_with({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "10"}))
    async with resilient.session(RateLimitBackoff()) as s:
        for _ in range(4):
            assert await get(s, server.url + "/x") == 200
    times = [a.time for a in server.arrivals]
    assert min(b - a for a, b in itertools.pairwise(times)) >= 1.9  # 5 per 10 s


@pytest.mark.looptime
async def test_a_hostile_advertised_reset_never_waits_past_max_wait(server):
    server.script("/x", ok_with({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "9" * 400}))
    async with resilient.session(RateLimitBackoff(max_wait=5.0)) as s:
        assert await get(s, server.url + "/x") == 200
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(resilient.RateLimited):
            await get(s, server.url + "/x")
        assert loop.time() - t0 < 5.0


@pytest.mark.timeout(90)
async def test_against_nginx_limit_req_the_default_chain_finishes_every_call():
    """A real nginx ``limit_req`` (50 r/s, burst 5, ``Retry-After: 1``) whose rate the
    client is not told: 25 callers, 250 GETs through the default chain without a Throttle.
    Every call succeeds, most without a 429, and after a pause the callers do not stampede
    (each 429 round stays small)."""
    nginx = new_nginx_server(limit_req_config(50, 5))
    nginx.start()
    try:
        policy = RateLimitBackoff()
        statuses: collections.Counter[int] = collections.Counter()
        async with resilient.session(resilient.Retry(), resilient.CircuitBreaker(), policy) as s:
            todo = list(range(250))

            async def worker() -> None:
                while todo:
                    todo.pop()
                    statuses[await get(s, nginx.url + "/x")] += 1

            # bounded: the old chain finished 42 of 500 such calls in 60 s
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(25))), 60)
            learned = policy.rate(nginx.url)
    finally:
        refused = nginx.error_log().count("limiting requests")
        nginx.close()
    assert statuses == {200: 250}
    assert learned is not None
    assert learned < 200
    assert refused <= 0.25 * 250  # the old chain earned 175 429s for 42 calls


@pytest.mark.looptime
async def test_callers_cancelled_while_queued_for_a_paced_departure_leave_no_trace(server):
    """A paced key (1/s after its first 429): the head and a middle caller of the departure
    queue are cancelled; the others still leave one by one and the queue ends empty."""
    server.script("/x", too_many("0"))
    policy = RateLimitBackoff(key=lambda request: "k")
    async with resilient.session(policy) as s:
        assert await get(s, server.url + "/x") == 200  # learned: slow start from 1/s
        tasks = [asyncio.create_task(get(s, server.url + "/x")) for _ in range(6)]
        await asyncio.sleep(0.01)  # the retry just took a slot: all six queue
        gate = policy._gates.get("k")
        assert gate is not None
        assert gate._departures is not None
        assert len(gate._departures) == 6
        tasks[0].cancel()  # the head of the queue, asleep until its slot
        tasks[3].cancel()  # one in the middle
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert not gate._departures
        assert gate.is_idle() or gate.next_slot > asyncio.get_running_loop().time()
    cancelled = [r for r in results if isinstance(r, asyncio.CancelledError)]
    assert len(cancelled) == 2
    assert [r for r in results if not isinstance(r, BaseException)] == [200] * 4
    times = sorted(a.time for a in server.arrivals)[2:]  # after the 429 and its retry
    assert len(times) == 4
    assert all(b > a for a, b in itertools.pairwise(times))  # one by one, never together
