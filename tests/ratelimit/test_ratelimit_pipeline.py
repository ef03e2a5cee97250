"""RateLimitBackoff in a pipeline (resilient.chain): a key that may leave at once takes the
fast path (before / after), a 429 on it is handed to resume, and every call behaves as
the policy run whole: the same arrivals, statuses, events and stats (virtual time)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import scripted
from aiohttp import web
from redis_server import evalsha_calls
from scripted import reply

import resilient
from resilient import RateLimitBackoff, RateLimited

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]

pytestmark = pytest.mark.timeout(60)


class Counted(scripted.Watched, RateLimitBackoff):
    """A RateLimitBackoff that counts how it ran (``scripted.Watched``)."""


def limited(retry_after: str) -> Reply:
    return reply(429, **{"Retry-After": retry_after})


async def status(session: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except RateLimited:
        return "RateLimited"


def in_chain(policy: RateLimitBackoff) -> tuple[Any, ...]:
    return resilient.chain(policy)


def whole(policy: RateLimitBackoff) -> tuple[Any, ...]:
    return (policy,)


# --- the fast path and its hand-overs ---------------------------------------------------


@pytest.mark.looptime
async def test_a_healthy_key_never_runs_the_policy_whole_in_a_chain(server):
    policy = Counted()
    async with aiohttp.ClientSession(middlewares=in_chain(policy)) as s:
        assert [await status(s, server.url + "/x") for _ in range(5)] == [200] * 5
    assert (policy.tickets, policy.whole, policy.resumed) == (5, 0, 0)
    assert policy.stats() == {}  # no gate was made for it


@pytest.mark.looptime
async def test_a_429_on_the_fast_path_is_paused_probed_and_sent_again_by_resume(server):
    events: list[resilient.Event] = []
    remove = resilient.add_hook(events.append)
    server.script("/x", limited("2"))
    policy = Counted()
    try:
        async with aiohttp.ClientSession(middlewares=in_chain(policy)) as s:
            assert await status(s, server.url + "/x") == 200
    finally:
        remove()
    first, second = server.arrivals
    assert second.time - first.time >= 2.0
    assert (policy.tickets, policy.whole, policy.resumed) == (1, 0, 1)
    assert [(e.kind, e.attempt, e.delay) for e in events] == [
        ("rate_limited", 1, 2.0),
        ("pause_probe", 1, None),
    ]


@pytest.mark.looptime
async def test_callers_of_a_paused_key_run_the_policy_whole_until_it_opens(server):
    server.script("/x", limited("1"))
    policy = Counted()
    async with aiohttp.ClientSession(middlewares=in_chain(policy)) as s:
        first = asyncio.create_task(status(s, server.url + "/x"))
        await asyncio.sleep(0.5)  # paused until t = 1
        others = [asyncio.create_task(status(s, server.url + "/x")) for _ in range(3)]
        assert await asyncio.gather(first, *others) == [200] * 4
        assert policy.whole == 3  # they waited in the slow path
        # the key is paced now (its first 429): a caller whose slot is due leaves at once
        await asyncio.sleep(10.0)
        fast = policy.tickets
        assert await status(s, server.url + "/x") == 200
        assert policy.tickets == fast + 1
        # ... and one whose slot is not due yet waits for it, whole
        calls, rate = policy.whole, policy.rate(server.url)
        assert rate is not None
        assert await status(s, server.url + "/x") == 200
        assert policy.whole == calls + 1
    times = [a.time for a in server.arrivals]
    assert times[-1] - times[-2] >= 0.99 / rate  # paced: the second left a slot later


@pytest.mark.looptime
async def test_a_request_on_the_fast_path_counts_in_flight_until_it_ends(server):
    """A key with a gate (an advertised limit far from exhausted): the fast path counts its
    requests in flight (the advertised ``remaining`` is read less them), and a cancelled
    or failed one is no longer counted."""
    hold = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await hold.wait()
        return web.Response(text="ok")

    server.script("/x", reply(**{"RateLimit-Limit": "100", "RateLimit-Remaining": "90",
                                  "RateLimit-Reset": "60"}))  # fmt: skip
    server.default("/held", held)
    policy = Counted(key=lambda request: "k")  # the refused request below too
    async with aiohttp.ClientSession(middlewares=in_chain(policy)) as s:
        assert await status(s, server.url + "/x") == 200
        gate = policy._gates.get("k")
        assert gate is not None
        assert not gate.paced
        flying = [asyncio.create_task(status(s, server.url + "/held")) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert gate.flying == 3
        flying[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await flying[0]
        assert gate.flying == 2
        hold.set()
        assert await asyncio.gather(*flying[1:]) == [200, 200]
        assert gate.flying == 0
        with pytest.raises(aiohttp.ClientConnectionError):  # nothing listens there
            async with s.get("http://127.0.0.1:9/"):
                pass
    assert policy.tickets == 5  # /x, three /held, the refused one
    assert policy.whole == 0
    assert gate.flying == 0


@pytest.mark.looptime
async def test_an_exhausted_advertised_limit_read_on_the_fast_path_pauses_the_next_caller(server):
    server.script("/x", reply(**{"RateLimit-Limit": "10", "RateLimit-Remaining": "0",
                                  "RateLimit-Reset": "5"}))  # fmt: skip
    policy = Counted()
    async with aiohttp.ClientSession(middlewares=in_chain(policy)) as s:
        assert await status(s, server.url + "/x") == 200  # its answer stands
        assert policy.paused_for(server.url) == pytest.approx(5.0, abs=0.01)
        assert await status(s, server.url + "/x") == 200
    first, second = server.arrivals
    assert second.time - first.time >= 5.0
    assert (policy.tickets, policy.whole) == (1, 1)


# --- the same behaviour, whole or on the fast path -------------------------------------

Caller = tuple[float, str]  # (seconds after the start, path)


def _scenario_429s() -> tuple[dict[str, list[Reply]], list[Caller]]:
    """429s with Retry-After (a streak: its floor), callers arriving during the pauses and
    after, paced at the learned rate; the last 429 answers a request that left on the fast
    path (its cuts, and the answer counted before it, decide the rate's cut)."""
    replies = [limited("1"), reply(), limited("0.5"), limited("0")] + [reply()] * 14
    script = {"/x": [*replies, limited("0")]}
    callers = [(0.0, "/x"), (0.3, "/x"), (0.6, "/x"), (1.2, "/x"), (1.25, "/x")]
    callers += [(4.0 + 0.2 * i, "/x") for i in range(8)] + [(12.0, "/x"), (30.0, "/x")]
    callers += [(30.5, "/x"), (30.55, "/x"), (31.0, "/x")]
    return script, callers


def _scenario_advertised() -> tuple[dict[str, list[Reply]], list[Caller]]:
    """An advertised limit: a few left (spread over the reset), then none left (a pause
    with one probe first), then plenty."""
    few = reply(**{"RateLimit-Limit": "100", "RateLimit-Remaining": "4", "RateLimit-Reset": "4"})
    none = reply(**{"RateLimit-Limit": "100", "RateLimit-Remaining": "0", "RateLimit-Reset": "3"})
    script = {"/a": [few, reply(), reply(), none]}
    callers = [(0.0, "/a"), (0.1, "/a"), (0.1, "/a"), (0.2, "/a"), (0.3, "/a"), (2.0, "/a")]
    callers += [(5.0 + 0.5 * i, "/a") for i in range(6)] + [(20.0, "/a")]
    return script, callers


def _scenario_refused() -> tuple[dict[str, list[Reply]], list[Caller]]:
    """A pause longer than ``max_wait``: callers get the 429 back, or RateLimited."""
    script = {"/r": [limited("50"), limited("50")]}
    callers = [(0.0, "/r"), (1.0, "/r"), (2.0, "/r"), (60.0, "/r"), (60.0, "/r"), (61.0, "/r")]
    return script, callers


async def _trace(
    server: Any,
    wrap: Callable[[RateLimitBackoff], tuple[Any, ...]],
    prefix: str,
    scenario: tuple[dict[str, list[Reply]], list[Caller]],
    **options: Any,
) -> dict[str, Any]:
    """Run ``scenario`` through ``wrap(policy)``: what the server, the callers and the
    hooks saw (times relative to the start, to the millisecond)."""
    script, callers = scenario
    for path, replies in script.items():
        server.script(prefix + path, *replies)
    events: list[resilient.Event] = []
    remove = resilient.add_hook(events.append)
    policy = Counted(**options)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def call(at: float, path: str) -> int | str:
        await asyncio.sleep(at)
        return await status(s, server.url + prefix + path)

    try:
        async with aiohttp.ClientSession(middlewares=wrap(policy)) as s:
            results = await asyncio.gather(*(call(at, path) for at, path in callers))
            stats = {
                key: (p.paused, round(p.remaining, 3), p.probing, p.waiting, _round(p.rate))
                for key, p in policy.stats().items()
            }
    finally:
        remove()
    arrivals = [
        (a.path.removeprefix(prefix), round(a.time - start, 3))
        for a in server.arrivals
        if a.path.startswith(prefix)
    ]
    seen = [(e.kind, e.attempt, e.delay, e.status, e.reason, e.url) for e in events]
    return {
        "results": results,
        "arrivals": arrivals,
        "events": [(*e[:5], e[5].replace(prefix, "")) for e in seen],
        "stats": stats,
        "counts": (policy.tickets, policy.whole, policy.resumed),
    }


def _round(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 9)  # the runs start at other loop times


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("scenario", "options"),
    [
        (_scenario_429s, {}),
        (_scenario_advertised, {}),
        (_scenario_refused, {"max_wait": 10.0}),
    ],
    ids=["429s", "advertised", "refused"],
)
async def test_the_fast_path_behaves_as_the_policy_run_whole(server, scenario, options):
    alone = await _trace(server, whole, "/whole", scenario(), **options)
    chained = await _trace(server, in_chain, "/chain", scenario(), **options)
    assert chained["results"] == alone["results"]
    assert chained["arrivals"] == alone["arrivals"]
    assert chained["events"] == alone["events"]
    assert chained["stats"] == alone["stats"]
    fast, calls, resumed = chained["counts"]
    assert fast > 0  # the fast path was taken ...
    assert calls > 0  # ... and so was the slow one
    assert alone["counts"] == (0, len(scenario()[1]), 0)
    if scenario is _scenario_429s:
        assert resumed > 0  # a 429 met on the fast path was handed to resume


# --- Redis ------------------------------------------------------------------------------


async def test_a_key_known_healthy_in_redis_takes_the_fast_path_without_a_round_trip(
    server, redis_url
):
    from resilient.ratelimit._redis import HEALTHY_LEASE

    policy = Counted(storage=redis_url)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(middlewares=in_chain(policy)) as s:
        assert await status(s, server.url + "/warm") == 200  # asks Redis: healthy
        assert (policy.tickets, policy.whole) == (0, 1)
        before, started = await evalsha_calls(redis_url), loop.time()
        for _ in range(30):
            assert await status(s, server.url + "/x") == 200
        elapsed = loop.time() - started
        used = await evalsha_calls(redis_url) - before
    assert used <= math.ceil(elapsed / HEALTHY_LEASE) + 1
    assert policy.tickets >= 30 - used
    assert policy.tickets + policy.whole == 31


async def test_a_429_on_the_fast_path_pauses_every_process_through_redis(server, redis_url):
    server.script("/x", limited("0.3"))
    mine, other = Counted(storage=redis_url), RateLimitBackoff(storage=redis_url)
    assert other._shared is not None
    assert mine._shared is not None
    async with aiohttp.ClientSession(middlewares=in_chain(mine)) as s:
        assert await status(s, server.url + "/warm") == 200  # known healthy now
        paused = asyncio.create_task(status(s, server.url + "/x"))
        await asyncio.sleep(0.1)
        seen = await other._shared.admit(server.url, math.inf, 1.0)
        assert seen.verdict == "paused"
        assert await paused == 200
        await mine._shared.drain()
    assert mine.resumed == 1
    first, second = (a.time for a in server.arrivals if a.path == "/x")
    assert second - first >= 0.3


async def test_a_pause_begun_elsewhere_ends_the_fast_path_within_the_lease(server, redis_url):
    from resilient.ratelimit._redis import HEALTHY_LEASE

    mine = Counted(max_wait=1.0, storage=redis_url)
    other = RateLimitBackoff(storage=redis_url)
    assert other._shared is not None
    async with aiohttp.ClientSession(middlewares=in_chain(mine)) as s:
        assert await status(s, server.url + "/x") == 200
        await other._shared.pause(server.url, 30.0)
        await asyncio.sleep(HEALTHY_LEASE * 1.5)
        assert await status(s, server.url + "/y") == "RateLimited"  # nothing sent
    assert server.count("/y") == 0
    assert mine.whole == 2
