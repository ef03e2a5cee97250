"""The learned rate and its paced departures shared through Redis (ratelimit/rate.lua).

The Lua law is checked against resilient.ratelimit._learned's on the same schedules
(explicit times), and two RateLimitBackoff instances (each a process: they share nothing
but Redis) against a real loopback server, in real time with small numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import math

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import evalsha_calls

from resilient import RateLimitBackoff, RateLimited
from resilient.ratelimit._learned import SLOW_START_MIN, LearnedRate
from resilient.storage._redis import RedisStore

pytestmark = pytest.mark.timeout(60)

# (gap before the op in s, op, n): accepted n answers / a 429 / the probe answered
ops = st.lists(
    st.tuples(
        st.floats(0.0, 3.0),
        st.sampled_from(["accepted", "cut", "resume"]),
        st.integers(1, 40),
    ),
    max_size=25,
)


async def _lua_rates(url: str, key: str, schedule, ceiling: float, probes) -> list[float]:
    store = RedisStore(url)
    keys = [f"test:pause/{{{key}}}", f"test:rate/{{{key}}}"]
    bound = "" if ceiling == math.inf else ceiling

    async def run(op: str, now: float, x: float) -> object:
        return await store.run("ratelimit/rate", keys, [op, repr(now), bound, x])

    try:
        now, cuts, seen = 100.0, 0, []
        await run("cut", now, 0)  # the key's first 429
        cuts = 1
        for gap, op, n in schedule:
            now += gap
            if op == "cut":
                await run("cut", now, cuts)
                cuts += 1
            else:
                await run(op, now, n)
            for probe in probes:
                reply = await run("rate", now + probe, 0)
                seen.append(float(reply[0]))  # type: ignore[index]
        return seen
    finally:
        await store.limits.bridge.get_connection().delete(*keys)
        await store.close()


def _python_rates(schedule, ceiling: float, probes) -> list[float]:
    law = LearnedRate(100.0, ceiling)
    now, seen = 100.0, []
    law.cut(now)
    for gap, op, n in schedule:
        now += gap
        if op == "accepted":
            for _ in range(n):
                law.accepted(now)
        elif op == "cut":
            law.cut(now)
        else:  # the probe's answer: sending resumes, and it counts
            law.resume(now)
            law.accepted(now)
        seen += [law.rate(now + probe) for probe in probes]
    return seen


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schedule=ops, ceiling=st.one_of(st.just(math.inf), st.floats(0.5, 500.0)))
def test_the_lua_law_is_the_python_law(redis_url, schedule, ceiling):
    probes = (0.0, 0.7, 12.0)
    lua = asyncio.run(_lua_rates(redis_url, "law", schedule, ceiling, probes))
    python = _python_rates(schedule, ceiling, probes)
    assert lua == pytest.approx(python, rel=1e-9)


def _limited_once(retry_after: str):
    """A 429 with ``Retry-After: retry_after`` (the server's reply to the first request)."""

    async def reply(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": retry_after})

    return reply


async def test_another_process_is_paced_at_the_shared_rate_from_its_first_request(
    server, redis_url
):
    """Process A earns the key's first 429 (a shared slow start from 1/s); process B,
    which never saw a 429, leaves one by one after the shared pause, not all at once."""
    server.script("/x", _limited_once("0.3"))
    host, url = server.url, server.url + "/x"
    a, b = RateLimitBackoff(storage=redis_url), RateLimitBackoff(storage=redis_url)
    async with aiohttp.ClientSession(middlewares=(a,)) as sa:
        async with sa.get(url) as resp:  # 429, paused 0.3 s, then the probe: 200
            assert resp.status == 200
    await a._shared.drain()  # type: ignore[union-attr]
    assert a.rate(host) is not None
    async with aiohttp.ClientSession(middlewares=(b,)) as sb:

        async def get() -> int:
            async with sb.get(url) as resp:
                return resp.status

        statuses = await asyncio.gather(*(get() for _ in range(4)))
    await b._shared.drain()  # type: ignore[union-attr]
    assert statuses == [200] * 4
    arrivals = [arrival.time for arrival in server.arrivals]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals[2:])]
    # slow start from the probe: 1/s + 2.77/s per accepted answer, so about 0.27 s, 0.15 s,
    # 0.1 s between B's departures (unshared, B would send all four at once)
    assert len(gaps) == 3
    assert all(gap > 0.05 for gap in gaps), gaps
    learned = b.rate(host)
    assert learned is not None
    assert learned >= SLOW_START_MIN


# --- the local mirror: a healthy key costs no round trip -------------------------------


async def test_a_healthy_key_costs_one_round_trip_per_lease_not_per_request(server, redis_url):
    from resilient.ratelimit._redis import HEALTHY_LEASE

    policy = RateLimitBackoff(storage=redis_url)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(middlewares=(policy,)) as session:
        async with session.get(server.url + "/warm") as resp:  # connected, scripts loaded
            assert resp.status == 200
        before, started = await evalsha_calls(redis_url), loop.time()
        for _ in range(30):
            async with session.get(server.url + "/x") as resp:
                assert resp.status == 200
        elapsed = loop.time() - started
        used = await evalsha_calls(redis_url) - before
    assert used <= math.ceil(elapsed / HEALTHY_LEASE) + 1  # 30 without the mirror


async def test_a_pause_begun_elsewhere_is_seen_within_the_lease(server, redis_url):
    from resilient.ratelimit._redis import HEALTHY_LEASE

    mine, other = (
        RateLimitBackoff(max_wait=1.0, storage=redis_url),
        RateLimitBackoff(storage=redis_url),
    )
    async with aiohttp.ClientSession(middlewares=(mine,)) as session:
        async with session.get(server.url + "/x") as resp:  # healthy: trusted for the lease
            assert resp.status == 200
        assert other._shared is not None
        await other._shared.pause(server.url, 30.0)  # another process's 429
        await asyncio.sleep(HEALTHY_LEASE * 1.5)
        with pytest.raises(RateLimited):  # 30 s > max_wait: refused, nothing sent
            async with session.get(server.url + "/y"):
                pass
    assert server.count("/y") == 0


async def test_two_other_processes_share_the_learned_rate(server, redis_url):
    """After this process earns a key's first 429, two OS processes that never saw one
    send three GETs each at once: Redis hands out their departure slots, so no two of
    the six arrive together (unshared, each process would send its three at once)."""
    import json
    import os
    import sys

    server.script("/x", _limited_once("0.2"))
    url = server.url + "/x"
    mine = RateLimitBackoff(storage=redis_url)
    here = os.path.dirname(os.path.dirname(__file__))  # tests/
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    async with aiohttp.ClientSession(middlewares=(mine,)) as session:
        async with session.get(url) as resp:  # the 429, the pause, then the probe
            assert resp.status == 200
    await mine._shared.drain()  # type: ignore[union-attr]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            os.path.join(here, "shared_worker.py"),
            "pause",
            url,
            redis_url,
            "3",
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    outs = await asyncio.gather(*(p.communicate() for p in procs))
    assert all(p.returncode == 0 for p in procs)
    assert [json.loads(out) for out, _ in outs] == [[200] * 3] * 2
    theirs = sorted(arrival.time for arrival in server.arrivals[2:])
    assert len(theirs) == 6
    gaps = [later - earlier for earlier, later in itertools.pairwise(theirs)]
    assert min(gaps) > 0.02, gaps


async def test_a_caller_cancelled_while_waiting_for_its_shared_slot_leaves_no_trace(
    server, redis_url
):
    """Its slot in Redis simply goes unused; nothing is counted in flight, nothing is sent,
    and the callers behind it still leave."""
    server.script("/x", _limited_once("0.2"))
    url = server.url + "/x"
    a, b = RateLimitBackoff(storage=redis_url), RateLimitBackoff(storage=redis_url)
    async with aiohttp.ClientSession(middlewares=(a,)) as sa:
        async with sa.get(url) as resp:
            assert resp.status == 200
    await a._shared.drain()  # type: ignore[union-attr]
    sent_before = server.count()
    async with aiohttp.ClientSession(middlewares=(b,)) as sb:

        async def get() -> int:
            async with sb.get(url) as resp:
                return resp.status

        first = asyncio.ensure_future(get())
        waiting = asyncio.ensure_future(get())  # its slot is about 0.27 s away
        await asyncio.sleep(0.05)
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await first == 200
        assert await get() == 200
    await b._shared.drain()  # type: ignore[union-attr]
    gate = b._gates.get(server.url)
    assert gate is not None
    assert gate.flying == 0
    assert server.count() == sent_before + 2
