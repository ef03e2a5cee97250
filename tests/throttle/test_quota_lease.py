"""Quota windows shared through Redis with leases (``resilient/throttle/_lease.py``): a busy
key boards several requests in one round trip and its callers take those places without
one; near the limit every request boards alone; no window of arrivals, nor of sends,
ever holds more than the quota; unused places go back by name; a lease that never
answers its caller leaves nothing behind.

Real ``redis-server``, real time (Redis keeps time on its own clock); short windows.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter
from redis_proxy import arg

import resilient
from resilient import StorageError, Throttle
from resilient.storage._redis import RedisStore
from resilient.throttle import _lease
from resilient.throttle._lease import LEASE, SPARE_TTL, USED_FLUSH, granted
from resilient.throttle._quota import NAMESPACE
from resilient.throttle._redis import RedisQuotas

pytestmark = pytest.mark.timeout(60)

JITTER = 0.005
"""Seconds of tolerance on a window of arrival times (the server reads its clock when
the handler starts, a little after the request arrived)."""
HERE = os.path.dirname(__file__)


@pytest.fixture
def asks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every round trip a caller waited for (``RedisQuotas.ask``): did it board?"""
    seen: list[bool] = []
    ask = RedisQuotas.ask

    async def counted(self: RedisQuotas, key: str, in_flight: int) -> tuple[float, str]:
        answer = await ask(self, key, in_flight)
        seen.append(not answer[0])
        return answer

    monkeypatch.setattr(RedisQuotas, "ask", counted)
    return seen


@pytest.fixture
async def direct(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def store_of(throttle: Throttle) -> RedisQuotas:
    quotas = throttle._quotas
    assert isinstance(quotas, RedisQuotas)
    return quotas


def flying_key(server: Any) -> str:
    return f"resilient:throttle/{{{server.url}}}/flying"


async def get(session: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, StorageError) as exc:
        return type(exc).__name__


def most_in_any_window(times: list[float], span: float, jitter: float = 0.0) -> int:
    """The most times within any ``span``-second span (less ``jitter``)."""
    times = sorted(times)
    return max(
        sum(1 for t in times[i:] if t < start + span - jitter) for i, start in enumerate(times)
    )


async def remaining(throttle: Throttle, server: Any, quota: str) -> int:
    """What ``limits`` reads of the key's window: the slots left."""
    limiter = MovingWindowRateLimiter(store_of(throttle).store.limits)
    stats = await limiter.get_window_stats(parse(quota), NAMESPACE, "{" + server.url + "}")
    return int(stats.remaining)


async def settled(quotas: RedisQuotas, key: str) -> int:
    """The spares of ``key`` once no lease asked ahead is on its way (a renewal may be in
    flight right after a request took the last spare)."""
    async with asyncio.timeout(2.0):
        while (lease := quotas._leases.get(key)) is not None and lease.asking:
            await asyncio.sleep(0.001)
    return quotas.spares(key)


async def close(*throttles: Throttle) -> None:
    for throttle in throttles:
        quotas = store_of(throttle)
        await quotas.drain()
        await quotas.store.close()


# --- round trips ------------------------------------------------------------------------


async def test_a_busy_key_takes_its_places_from_leases_without_round_trips(
    server, redis_url, asks, direct
):
    quota = "100000/minute"
    throttle = Throttle(1000.0, burst=1000, quotas=quota, storage=redis_url)
    async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
        for _ in range(60):
            assert await get(session, server.url + "/x") == 200
        assert await settled(store_of(throttle), server.url) > 0  # leased ahead, unused
        await store_of(throttle).drain()
    assert len(asks) <= 12  # one board alone, then leases renewed ahead in the background
    assert await direct.zcard(flying_key(server)) == 0  # spares handed back, all landed
    assert await remaining(throttle, server, quota) == 100000 - 60  # each took its slot
    await close(throttle)


async def test_near_the_limit_every_request_boards_alone(server, redis_url, asks, direct):
    """Room for 7 more: a lease needs room for 4 places per place (8 for 2)."""
    throttle = Throttle(1000.0, burst=1000, quotas="7/minute", storage=redis_url)
    async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
        for _ in range(7):
            assert await get(session, server.url + "/x") == 200
            assert store_of(throttle).spares(server.url) == 0
    assert len(asks) == 7
    assert await direct.zcard(flying_key(server)) == 0
    await close(throttle)


async def test_a_busy_process_leases_at_most_a_quarter_of_the_room(server, redis_url):
    """One process sends 20 requests one after another against 40 a minute: it leases
    places ahead, yet never so many that another process finds no room."""
    busy = Throttle(1000.0, burst=1000, quotas="40/minute", storage=redis_url)
    other = Throttle(1000.0, burst=1000, quotas="40/minute", storage=redis_url)
    async with (
        aiohttp.ClientSession(middlewares=(busy,)) as mine,
        aiohttp.ClientSession(middlewares=(other,)) as theirs,
    ):
        for _ in range(20):
            assert await get(mine, server.url + "/x") == 200
        held = await settled(store_of(busy), server.url)
        assert 0 < held <= (40 - 20) // 4
        with resilient.deadline(1.0):  # a full window would make it wait a minute
            assert await get(theirs, server.url + "/y") == 200
    await close(busy, other)


# --- never more than the quota -------------------------------------------------------


async def _slow_ok(request: web.Request) -> web.Response:
    await asyncio.sleep(random.Random(request.path_qs).uniform(0.0, 0.01))
    return web.Response(text="ok")


@pytest.mark.timeout(90)
async def test_instances_sharing_a_quota_never_exceed_it_in_any_window(server, redis_url, asks):
    """Four Throttles (four Redis clients, as four processes), six lanes each sending one
    request after another: the quota is used to the full (leases at every window's
    start, single boardings at its end), and no second of arrivals, nor of sends, holds
    more than the quota."""
    server.default("/q", _slow_ok)
    quota, amount, lanes, count = "80/second", 80, 6, 10
    throttles = [Throttle(1000.0, burst=1000, quotas=quota, storage=redis_url) for _ in range(4)]
    sends: list[float] = []

    async def stamp(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        sends.append(time.monotonic())
        return await handler(request)

    sessions = [aiohttp.ClientSession(middlewares=(*resilient.chain(t), stamp)) for t in throttles]

    async def lane(session: aiohttp.ClientSession) -> list[int | str]:
        return [await get(session, server.url + "/q") for _ in range(count)]

    try:
        outcomes = await asyncio.gather(*(lane(s) for s in sessions for _ in range(lanes)))
    finally:
        for session in sessions:
            await session.close()
        await close(*throttles)
    total = 4 * lanes * count
    assert [s for lane in outcomes for s in lane] == [200] * total
    arrivals = [a.time for a in server.arrivals]
    assert most_in_any_window(arrivals, 1.0, JITTER) <= amount
    assert most_in_any_window(sends, 1.0) <= amount
    assert sum(asks) <= 0.9 * total  # some requests took leased places instead
    assert max(arrivals) - min(arrivals) < (total / amount) + 1.0  # and the quota was used


@pytest.mark.timeout(120)
async def test_processes_sharing_a_quota_never_exceed_it_in_any_window(server, redis_url):
    """Three OS processes (``lease_worker.py``), four lanes each: the same as above."""
    server.default("/q", _slow_ok)
    quota, amount, lanes, count = "40/second", 40, 4, 10
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(HERE))]))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            os.path.join(HERE, "lease_worker.py"),
            server.url + "/q",
            redis_url,
            quota,
            str(lanes),
            str(count),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(3)
    ]
    outs = await asyncio.gather(*(p.communicate() for p in procs))
    assert [p.returncode for p in procs] == [0, 0, 0]
    results = [json.loads(out) for out, _ in outs]
    total = 3 * lanes * count
    assert [s for r in results for s in r["statuses"]] == [200] * total
    assert most_in_any_window([a.time for a in server.arrivals], 1.0, JITTER) <= amount
    assert most_in_any_window([t for r in results for t in r["sends"]], 1.0) <= amount
    assert sum(r["boarded"] for r in results) < total  # some took leased places instead


# --- what is held is handed back ------------------------------------------------------


async def test_unused_leased_places_go_back_after_the_lease(server, redis_url, direct):
    throttle = Throttle(1000.0, burst=1000, quotas="100000/minute", storage=redis_url)
    quotas = store_of(throttle)
    async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
        for _ in range(20):
            assert await get(session, server.url + "/x") == 200
        assert await settled(quotas, server.url) > 0
        spares = [ticket for ticket, _ in quotas._leases[server.url].spare]
        assert spares
        # Redis drops them by itself SPARE_TTL after their lease (a process that exits
        # holding them holds them no longer)
        seconds, micros = await direct.time()
        now = seconds + micros / 1e6
        for ticket in spares:
            score = await direct.zscore(flying_key(server), ticket)
            assert score is not None
            assert now < score <= now + SPARE_TTL
        await asyncio.sleep(LEASE + 0.2)  # no request: the lease's timer hands them back
        assert quotas.spares(server.url) == 0
        assert await direct.zcard(flying_key(server)) == 0
    await close(throttle)


async def test_a_leased_place_in_use_is_leased_as_in_flight_until_it_lands(
    server, redis_url, direct, monkeypatch
):
    """A request that took a spare and is still on the wire USED_FLUSH later holds its
    place in Redis as long as a request boarded alone would; it lands when it ends."""
    monkeypatch.setattr(_lease, "LEASE", 30.0)  # no spare goes back by its timer meanwhile
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="held")

    server.default("/held", held)
    throttle = Throttle(1000.0, burst=1000, quotas="100000/minute", storage=redis_url)
    quotas = store_of(throttle)

    async def scores() -> dict[bytes, float]:
        """Each ticket in flight in Redis: the seconds its lease there has left."""
        seconds, micros = await direct.time()
        now = seconds + micros / 1e6
        held = await direct.zrange(flying_key(server), 0, -1, withscores=True)
        return {ticket: score - now for ticket, score in held}

    try:
        async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
            for _ in range(10):
                assert await get(session, server.url + "/x") == 200
            assert await settled(quotas, server.url) > 0
            await asyncio.sleep(0.05)  # the last landing reached Redis
            spares = await scores()
            assert spares
            assert all(left <= SPARE_TTL for left in spares.values())
            slow = asyncio.ensure_future(get(session, server.url + "/held"))
            while server.count("/held") < 1:
                await asyncio.sleep(0.005)
            await asyncio.sleep(USED_FLUSH + 0.3)
            long_lived = [t for t, left in (await scores()).items() if left > SPARE_TTL + 60.0]
            assert len(long_lived) == 1  # one minute + 300 s, as a request boarded alone
            assert long_lived[0] in spares  # the request took a leased place
            gate.set()
            assert await slow == 200
            await quotas.drain()
    finally:
        gate.set()
    assert await direct.zcard(flying_key(server)) == 0
    assert await remaining(throttle, server, "100000/minute") == 100000 - 11
    await close(throttle)


@pytest.fixture
def lease_of_8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every caller that asks Redis asks for 8 places (a key whose demand is 7)."""
    monkeypatch.setattr(_lease.Lease, "want", lambda self, now: 8)


async def test_a_lease_whose_caller_is_cancelled_leaves_no_place(
    server, redis_url, proxy, direct, lease_of_8
):
    throttle = Throttle(1000.0, burst=1000, quotas="1000/minute", storage=proxy.url)
    quotas = store_of(throttle)
    async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
        assert await get(session, server.url + "/warm") == 200  # scripts loaded
        assert quotas.spares(server.url) == 7
        await quotas.drain()
        proxy.hold_reply(arg(repr(SPARE_TTL)))  # the next board's reply (a lease of 8)
        caller = asyncio.ensure_future(get(session, server.url + "/x"))
        await asyncio.wait_for(proxy.held.wait(), 5.0)
        async with asyncio.timeout(5.0):
            while await direct.zcard(flying_key(server)) < 8:  # Redis leased them
                await asyncio.sleep(0.005)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        proxy.release()
        await quotas.drain()
        assert await direct.zcard(flying_key(server)) == 0
        assert quotas.spares(server.url) == 0
    assert server.count("/x") == 0
    assert await remaining(throttle, server, "1000/minute") == 1000 - 1
    await close(throttle)


@pytest.mark.parametrize("held", ["reply", "command"])
async def test_a_lease_that_times_out_leaves_no_place(
    server, redis_url, proxy, direct, monkeypatch, lease_of_8, held
):
    """StorageError after the storage timeout and no place left in Redis, whether Redis
    leased before the timeout (its reply held) or after (its command held, arriving after
    the places were taken out: its first ticket is marked gone)."""
    throttle = Throttle(1000.0, burst=1000, quotas="1000/minute", storage=proxy.url)
    quotas = store_of(throttle)
    async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
        assert await get(session, server.url + "/warm") == 200
        await quotas.drain()
        monkeypatch.setattr("resilient.storage._redis.STORAGE_TIMEOUT", 0.2)
        marker = arg(repr(SPARE_TTL))
        if held == "reply":
            proxy.hold_reply(marker)
        else:
            proxy.hold_command(marker)
        assert await get(session, server.url + "/x") == "StorageError"
        await quotas.drain()  # the places are taken out, or their boarding marked gone
        proxy.release()  # then Redis answers, or runs the held lease
        await asyncio.sleep(0.1)
        assert await direct.zcard(flying_key(server)) == 0
        for _ in range(3):  # the key goes on: nothing is held
            assert await get(session, server.url + "/y") == 200
    assert server.count("/x") == 0
    await close(throttle)


# --- the rule, mirrored in Lua ------------------------------------------------------------


def test_a_lease_is_granted_the_largest_halving_that_leaves_three_quarters_of_the_room():
    assert [granted(8, room) for room in (0, 1, 7, 8, 15, 16, 31, 32, 100)] == [
        0, 1, 1, 2, 2, 4, 4, 8, 8,
    ]  # fmt: skip
    assert granted(1, 1000) == 1
    assert granted(6, 24) == 6
    assert granted(6, 23) == 3
    assert granted(8, 20, held=3) == 2  # 4 · (3 + 2) <= 20 + 3 < 4 · (3 + 4)
    assert granted(8, 100, held=200, used=0) == 0  # holds too much already: nothing ahead
    assert granted(8, 1, used=0) == 0  # a caller would board alone; ahead, nothing


async def _lua_grant(
    redis_url: str, windows: list[tuple[int, int, int]], others: int, held: int, ask: int, used: int
) -> tuple[Any, int]:
    """Run ``quota_board.lua`` on fresh keys: each window holds ``used`` slots in it and
    ``old`` slots that have left it (60 s windows); in flight, ``others`` tickets of other
    processes and ``held`` spares of the asking one. Returns the reply to a call asking
    for ``ask`` places (``used``: 1 from a caller, 0 ahead) and the tickets then in flight."""
    client = redis.asyncio.Redis.from_url(redis_url)
    store = RedisStore(redis_url)
    base = f"test:lease:{random.getrandbits(64)}"
    keys = [f"{base}/flying", *(f"{base}/{w}" for w in range(len(windows))), f"{base}/gone"]
    try:
        seconds, micros = await client.time()
        now = seconds + micros / 1e6
        args: list[Any] = []
        for w, (amount, in_window, old) in enumerate(windows):
            stamps = [now - 120.0 - i for i in range(old)]
            stamps += [now - 1.0 - i / 64 for i in range(in_window)]
            if stamps:
                await client.lpush(keys[1 + w], *sorted(stamps))  # the newest ends up first
            args += [amount, 60]
        tickets = {f"other:{i}": now + 600 for i in range(others)}
        tickets.update({f"me:spare{i}": now + 6 for i in range(held)})
        if tickets:
            await client.zadd(keys[0], tickets)
        reply = await store.run(
            "throttle/quota_board",
            keys,
            ["me", 1, ask, 360.0, SPARE_TTL, used, held, 0.05, _lease.SPREAD, *args],
        )
        return reply, await client.zcard(keys[0])
    finally:
        await client.delete(*keys)
        await store.close()
        await client.aclose()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    windows=st.lists(
        st.tuples(st.integers(1, 60), st.integers(0, 60), st.integers(0, 10)),
        min_size=1,
        max_size=2,
    ),
    others=st.integers(0, 20),
    held=st.integers(0, 10),
    ask=st.integers(1, 130),
    used=st.sampled_from([0, 1]),
)
def test_the_lua_lease_grants_what_the_python_rule_says(
    redis_url, windows, others, held, ask, used
):
    """``quota_board.lua`` against :func:`_lease.granted` on random windows: the least room
    of the windows (``amount − slots in the window − tickets in flight``) decides."""
    reply, after = asyncio.run(_lua_grant(redis_url, windows, others, held, ask, used))
    room = min(amount - in_window - others - held for amount, in_window, _ in windows)
    expected = granted(ask, room, held, used)
    flying = others + held
    if expected:
        assert (reply, after) == (expected, flying + expected)
    elif used:
        assert isinstance(reply, list)  # the wait
        assert after == flying
    else:
        assert (reply, after) == (0, flying)
