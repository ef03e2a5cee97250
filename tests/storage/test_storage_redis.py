"""Shared state on a real ``redis-server``: quotas, the 429 pause and the breaker are
shared by clients (separate policy instances: separate Redis clients, as separate
processes would be), and Redis failures are bounded and named.

Redis keeps time on its own clock and ``limits`` windows are wall-clock windows, so
these tests use short real windows and pauses (docs/design.md, "Time"), not looptime.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web
from conftest import ScriptedServer
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter

import resilient
from resilient import CircuitBreaker, CircuitOpenError, RateLimitBackoff, StorageError, Throttle
from resilient.storage._redis import STORAGE_TIMEOUT, RedisStore
from resilient.testing import RedisServer
from resilient.throttle._quota import NAMESPACE

PASSWORD = "hunter2-secret"


def _with_password(url: str) -> str:
    return url.replace("redis://", f"redis://:{PASSWORD}@")


async def _get(session: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


def _most_in_any_window(times: list[float], span: float) -> int:
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u < t + span) for i, t in enumerate(times))


# --- quotas ---------------------------------------------------------------------------


async def test_two_clients_together_never_exceed_a_shared_quota(server, redis_url):
    a = Throttle(1000.0, burst=100, quotas="4/second", storage=redis_url)
    b = Throttle(1000.0, burst=100, quotas="4/second", storage=redis_url)
    async with (
        aiohttp.ClientSession(middlewares=(a,)) as sa,
        aiohttp.ClientSession(middlewares=(b,)) as sb,
    ):
        outcomes = await asyncio.gather(
            *(_get(sa if i % 2 else sb, server.url + "/q") for i in range(10))
        )
    assert outcomes == [200] * 10
    assert _most_in_any_window([x.time for x in server.arrivals], 1.0) <= 4


async def test_limits_reads_the_windows_the_throttle_writes(server, redis_url):
    throttle = Throttle(1000.0, burst=100, quotas="10/minute", storage=redis_url)
    async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
        for _ in range(3):
            assert await _get(session, server.url + "/w") == 200
    quotas = throttle._quotas
    await quotas.drain()  # type: ignore[union-attr]
    limiter = MovingWindowRateLimiter(quotas._store.limits)  # type: ignore[union-attr]
    stats = await limiter.get_window_stats(parse("10/minute"), NAMESPACE, "{" + server.url + "}")
    assert stats.remaining == 7


async def test_requests_in_flight_elsewhere_hold_their_slots(server, redis_url):
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    server.script("/s", slow)
    a = Throttle(1000.0, quotas="1/second", storage=redis_url)
    b = Throttle(1000.0, quotas="1/second", storage=redis_url)
    async with (
        aiohttp.ClientSession(middlewares=(a,)) as sa,
        aiohttp.ClientSession(middlewares=(b,)) as sb,
    ):
        first = asyncio.ensure_future(_get(sa, server.url + "/s"))
        while server.count("/s") < 1:
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(_get(sb, server.url + "/s"))
        await asyncio.sleep(1.3)  # longer than the window: only the flight holds the slot
        assert server.count("/s") == 1
        release.set()
        assert await first == 200
        assert await second == 200
    landed, sent = server.arrivals[0].time, server.arrivals[1].time
    assert sent > landed + 1.3


# --- the 429 pause ----------------------------------------------------------------------


def _limited_once(seconds: int) -> web.Response:
    return web.Response(status=429, headers={"Retry-After": str(seconds)})


async def test_a_429_seen_by_one_client_pauses_every_client(server, redis_url):
    async def once(request: web.Request) -> web.Response:
        return _limited_once(1)

    server.script("/p", once)
    a = RateLimitBackoff(storage=redis_url)
    b = RateLimitBackoff(storage=redis_url)
    async with (
        aiohttp.ClientSession(middlewares=(a,)) as sa,
        aiohttp.ClientSession(middlewares=(b,)) as sb,
    ):
        first = asyncio.ensure_future(_get(sa, server.url + "/p"))
        while server.count("/p") < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the pause is in Redis now
        others = [asyncio.ensure_future(_get(sb, server.url + "/p")) for _ in range(3)]
        assert await first == 200
        assert await asyncio.gather(*others) == [200] * 3
    times = [x.time for x in server.arrivals]
    assert len(times) == 5  # the 429, then one probe and 3 followers: no one else sent
    assert min(times[1:]) >= times[0] + 0.95


async def test_one_probe_for_all_clients_when_a_shared_pause_ends(server, redis_url):
    answered: list[float] = []

    async def slow_ok(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        answered.append(asyncio.get_running_loop().time())
        return web.Response(text="ok")

    async def once(request: web.Request) -> web.Response:
        return _limited_once(1)

    server.script("/p", once, slow_ok)
    policies = [RateLimitBackoff(storage=redis_url) for _ in range(3)]
    sessions = [aiohttp.ClientSession(middlewares=(p,)) for p in policies]
    try:
        assert await _get(sessions[0], server.url + "/p") == 200  # 429, pause, probe
        server.script("/p", once, slow_ok)
        first = asyncio.ensure_future(_get(sessions[0], server.url + "/p"))
        while server.count("/p") < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        calls = [
            asyncio.ensure_future(_get(s, server.url + "/p")) for s in sessions for _ in range(2)
        ]
        assert await first == 200
        assert await asyncio.gather(*calls) == [200] * 6
    finally:
        for session in sessions:
            await session.close()
    after_pause = [x.time for x in server.arrivals[3:]]
    probe = min(after_pause)
    assert all(t >= answered[-1] - 0.01 for t in after_pause if t != probe)


async def test_the_pause_end_is_redis_time_so_every_client_agrees(redis_url):
    a = RateLimitBackoff(storage=redis_url)._shared
    b = RateLimitBackoff(storage=redis_url)._shared
    assert a is not None
    assert b is not None
    assert (await a.admit("k", 1.0, 1.0)).verdict == "open"
    assert await a.pause("k", 30.0) == pytest.approx(30.0, abs=0.05)
    paused = await b.admit("k", 1.0, 1.0)
    assert paused.verdict == "paused"
    assert 29.5 < paused.seconds <= 30.0
    assert (await b.claim("k"))[0] == "paused"


async def test_exactly_one_client_wins_the_probe_claim(redis_url):
    pauses = [RateLimitBackoff(storage=redis_url)._shared for _ in range(5)]
    await pauses[0].pause("k", 0.0)  # type: ignore[union-attr]
    verdicts = await asyncio.gather(*(p.claim("k") for p in pauses))  # type: ignore[union-attr]
    assert sorted(v for v, _ in verdicts) == ["busy"] * 4 + ["probe"]


# --- the breaker ------------------------------------------------------------------------


async def test_a_breaker_opened_by_one_client_fails_fast_in_another(server, redis_url):
    server.default("/down", 503)
    a = CircuitBreaker(min_calls=2, open_for=60.0, storage=redis_url)
    b = CircuitBreaker(min_calls=2, open_for=60.0, storage=redis_url)
    async with (
        aiohttp.ClientSession(middlewares=(a,)) as sa,
        aiohttp.ClientSession(middlewares=(b,)) as sb,
    ):
        assert [await _get(sa, server.url + "/down") for _ in range(2)] == [503, 503]
        with pytest.raises(CircuitOpenError) as caught:
            async with sb.get(server.url + "/down"):
                pass
    assert server.count("/down") == 2
    assert 59.0 < caught.value.retry_after <= 60.0


async def test_half_open_admits_one_probe_across_clients_and_closes_for_all(server, redis_url):
    server.default("/flaky", 503)
    breakers = [CircuitBreaker(min_calls=2, open_for=0.5, storage=redis_url) for _ in range(3)]
    sessions = [aiohttp.ClientSession(middlewares=(b,)) for b in breakers]
    try:
        assert [await _get(sessions[0], server.url + "/flaky") for _ in range(2)] == [503] * 2
        await asyncio.sleep(0.6)
        server.default("/flaky", 200)

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(0.2)
            return web.Response(text="ok")

        server.script("/flaky", slow)
        outcomes = await asyncio.gather(*(_get(s, server.url + "/flaky") for s in sessions))
        assert sorted(map(str, outcomes)) == ["200", "CircuitOpenError", "CircuitOpenError"]
        assert [await _get(s, server.url + "/flaky") for s in sessions] == [200] * 3
    finally:
        for session in sessions:
            await session.close()
    assert server.count("/flaky") == 2 + 1 + 3


# --- when Redis fails ---------------------------------------------------------------------


def _policies(url: str, on_error: str = "raise") -> list[resilient.Policy]:
    return [
        Throttle(1000.0, quotas="100/second", storage=url, on_storage_error=on_error),  # type: ignore[arg-type]
        RateLimitBackoff(storage=url, on_storage_error=on_error),  # type: ignore[arg-type]
        CircuitBreaker(storage=url, on_storage_error=on_error),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["throttle", "pause", "breaker"])
async def test_unreachable_redis_fails_with_a_storage_error_without_the_password(
    server, redis_server: RedisServer, index: int
):
    url = _with_password(redis_server.url)
    redis_server.stop()
    policy = _policies(url)[index]
    async with aiohttp.ClientSession(middlewares=(policy,)) as session:
        with pytest.raises(StorageError) as caught:
            await asyncio.wait_for(session.get(server.url + "/x"), STORAGE_TIMEOUT + 5)
    assert caught.value.storage == redis_server.url
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(policy)
    assert server.count() == 0


async def test_a_silent_redis_fails_within_the_storage_timeout(server):
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # swallows every command, replies nothing

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        policy = RateLimitBackoff(storage=f"redis://127.0.0.1:{port}/0")
        async with aiohttp.ClientSession(middlewares=(policy,)) as session:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(StorageError, match="TimeoutError"):
                async with asyncio.timeout(STORAGE_TIMEOUT + 5):
                    await session.get(server.url + "/x")
            assert loop.time() - started < STORAGE_TIMEOUT + 1.0
    finally:
        silent.close()
    assert server.count() == 0


async def test_allow_goes_on_with_local_state_and_warns(server, redis_server, caplog):
    url = _with_password(redis_server.url)
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger="resilient")
    for policy in _policies(url, "allow"):
        async with aiohttp.ClientSession(middlewares=(policy,)) as session:
            assert await _get(session, server.url + "/x") == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) >= 3
    assert all(redis_server.url in w for w in warnings)
    assert not any(PASSWORD in w for w in warnings)
    assert server.count("/x") == 3


async def test_killed_mid_run_then_restarted_redis_serves_again(server, redis_server):
    server.default("/x", 200)
    policies = _policies(redis_server.url)
    async with aiohttp.ClientSession(middlewares=tuple(policies)) as session:
        assert await _get(session, server.url + "/x") == 200
        redis_server.stop()
        assert await _get(session, server.url + "/x") == "StorageError"
        redis_server.start()
        assert await _get(session, server.url + "/x") == 200
    assert server.count("/x") == 2


async def test_a_redis_killed_while_a_request_is_in_flight_loses_no_response(server, redis_server):
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    server.script("/x", slow)
    policies = _policies(redis_server.url)
    async with aiohttp.ClientSession(middlewares=tuple(policies)) as session:
        call = asyncio.ensure_future(_get(session, server.url + "/x"))
        while server.count("/x") < 1:
            await asyncio.sleep(0.01)
        redis_server.stop()
        release.set()
        assert await call == 200  # the outcome is not recorded; the response is kept


async def test_store_is_built_lazily_and_shows_no_password(redis_url):
    store = RedisStore(_with_password(redis_url))
    assert PASSWORD not in repr(store)
    assert store.name == redis_url


# --- three OS processes -----------------------------------------------------------------


async def _workers(policy: str, url: str, redis_url: str, count: int, n: int) -> list[list[object]]:
    import json
    import os
    import sys

    here = os.path.dirname(os.path.dirname(__file__))  # tests/
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            os.path.join(here, "shared_worker.py"),
            policy,
            url,
            redis_url,
            str(count),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(n)
    ]
    outs = await asyncio.gather(*(p.communicate() for p in procs))
    assert all(p.returncode == 0 for p in procs)
    return [json.loads(out) for out, _ in outs]


async def test_three_processes_share_one_quota(server: ScriptedServer, redis_url):
    outcomes = await _workers("quota", server.url + "/q", redis_url, 4, 3)
    assert outcomes == [[200] * 4] * 3
    assert _most_in_any_window([x.time for x in server.arrivals], 1.0) <= 5


async def test_a_429_in_this_process_pauses_two_other_processes(server, redis_url):
    async def limited(request: web.Request) -> web.Response:
        return _limited_once(3)

    server.script("/p", limited)
    mine = RateLimitBackoff(max_wait=1.0, storage=redis_url)  # gives up: 3 s > max_wait
    async with aiohttp.ClientSession(middlewares=(mine,)) as session:
        assert await _get(session, server.url + "/p") == 429
    paused_at = server.arrivals[0].time
    outcomes = await _workers("pause", server.url + "/p", redis_url, 2, 2)
    assert outcomes == [[200, 200]] * 2
    assert all(x.time >= paused_at + 2.9 for x in server.arrivals[1:])


async def test_a_breaker_opened_here_is_open_in_another_process(server, redis_url):
    server.default("/down", 503)
    mine = CircuitBreaker(min_calls=2, open_for=60.0, storage=redis_url)
    async with aiohttp.ClientSession(middlewares=(mine,)) as session:
        assert [await _get(session, server.url + "/down") for _ in range(2)] == [503, 503]
    outcomes = await _workers("breaker", server.url + "/down", redis_url, 3, 1)
    assert outcomes == [["CircuitOpenError"] * 3]
    assert server.count("/down") == 2


async def test_a_shared_breaker_emits_its_transitions_and_rejections(server, redis_url):
    server.default("/down", 503)
    seen: list[resilient.Event] = []
    remove = resilient.add_hook(seen.append)
    try:
        breaker = CircuitBreaker(min_calls=2, open_for=60.0, storage=redis_url)
        async with aiohttp.ClientSession(middlewares=(breaker,)) as session:
            assert [await _get(session, server.url + "/down") for _ in range(3)] == [
                503,
                503,
                "CircuitOpenError",
            ]
    finally:
        remove()
    kinds = [e.kind for e in seen if e.policy == "circuit_breaker"]
    assert kinds == ["circuit_opened", "circuit_rejected"]
    assert seen[-1].url == server.url + "/down"


@pytest.mark.parametrize("deployment", ["cluster", "sentinel"])
async def test_a_cluster_or_sentinel_shares_quota_pause_and_breaker(server, request, deployment):
    """limits' ``redis+cluster://`` (three masters; every script's keys share one hash
    tag) and ``redis+sentinel://`` URIs: the same sharing as a single Redis."""

    async def once(request: web.Request) -> web.Response:
        return _limited_once(1)

    server.script("/p", once)
    server.default("/down", 503)
    url = request.getfixturevalue(f"redis_{deployment}_url")
    chain = (
        CircuitBreaker(min_calls=2, open_for=60.0, storage=url),
        RateLimitBackoff(storage=url),
        Throttle(1000.0, burst=100, quotas="3/second", storage=url),
    )
    other = CircuitBreaker(min_calls=2, open_for=60.0, storage=url)
    async with aiohttp.ClientSession(middlewares=chain) as session:
        first = asyncio.ensure_future(_get(session, server.url + "/p"))
        while server.count("/p") < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # paused in the cluster now
        rest = await asyncio.gather(*(_get(session, server.url + "/p") for _ in range(4)))
        assert [await first, *rest] == [200] * 5
        p_times = [x.time for x in server.arrivals if x.path == "/p"]
        assert min(p_times[1:]) >= p_times[0] + 0.95  # the pause held everyone
        assert _most_in_any_window(p_times, 1.0) <= 3  # the quota too
        for _ in range(12):
            await _get(session, server.url + "/down")
    async with aiohttp.ClientSession(middlewares=(other,)) as session:
        assert await _get(session, server.url + "/down") == "CircuitOpenError"


async def test_a_probe_whose_redis_dies_still_returns_its_response(server, redis_server):
    answer = asyncio.Event()

    async def held_ok(request: web.Request) -> web.Response:
        await answer.wait()
        return web.Response(text="ok")

    async def once(request: web.Request) -> web.Response:
        return _limited_once(1)

    server.script("/p", once, held_ok)
    policy = RateLimitBackoff(storage=redis_server.url)
    async with aiohttp.ClientSession(middlewares=(policy,)) as session:
        call = asyncio.ensure_future(_get(session, server.url + "/p"))
        while server.count("/p") < 2:  # the 429, then the probe
            await asyncio.sleep(0.01)
        redis_server.stop()
        answer.set()
        assert await asyncio.wait_for(call, STORAGE_TIMEOUT + 5) == 200


async def test_waiters_whose_redis_dies_fail_fast_and_none_hangs(server, redis_server):
    async def later(request: web.Request) -> web.Response:
        return _limited_once(2)

    server.script("/p", later)
    policy = RateLimitBackoff(storage=redis_server.url)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(middlewares=(policy,), connector=connector) as session:
        first = asyncio.ensure_future(_get(session, server.url + "/p"))
        while server.count("/p") < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(_get(session, server.url + "/p"))
        await asyncio.sleep(0.1)
        redis_server.stop()  # both wait for the pause to end, then must claim the probe
        outcomes = await asyncio.wait_for(asyncio.gather(first, second), 2 + 2 * 5)
        assert outcomes == ["StorageError", "StorageError"]
        redis_server.start()
        assert await _get(session, server.url + "/p") == 200  # no connection was leaked
    assert server.count("/p") == 2


async def test_a_429_whose_pause_cannot_be_shared_is_released_before_the_error(
    server, redis_server
):
    async def limited(request: web.Request) -> web.Response:
        redis_server.stop()  # Redis dies between the send and the 429
        return _limited_once(1)

    server.script("/p", limited)
    policy = RateLimitBackoff(storage=redis_server.url)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(middlewares=(policy,), connector=connector) as session:
        assert await _get(session, server.url + "/p") == "StorageError"
        redis_server.start()
        async with asyncio.timeout(5):  # the 429's connection went back to the pool
            assert await _get(session, server.url + "/p") == 200
