"""RateLimitBackoff against a real loopback server, in virtual time (looptime)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web

import resilient
from resilient import RateLimited, _clock
from resilient.ratelimit._ratelimit import RateLimitBackoff, backoff_delay

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


def too_many(headers: dict[str, str] | None = None, body: str = "slow down") -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=429, text=body, headers=headers or {})

    return reply


def slow_ok(seconds: float) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(text="ok after a while")

    return reply


def key_of(server) -> str:
    return f"http://127.0.0.1:{server.url.rsplit(':', 1)[1]}"


async def until(condition: Callable[[], bool]) -> None:
    """Let virtual time pass in 10 ms steps until ``condition`` holds (at most 100 s)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def get(session: aiohttp.ClientSession, url: str, method: str = "GET") -> tuple[int, str]:
    async with session.request(method, url) as resp:
        return resp.status, await resp.text()


@pytest.fixture
def policy() -> RateLimitBackoff:
    return RateLimitBackoff()


@pytest.fixture
async def rsession(policy) -> AsyncIterator[aiohttp.ClientSession]:
    async with resilient.session(policy) as s:
        yield s


# --- the long wait ----------------------------------------------------------------


@pytest.mark.looptime
async def test_a_24_hour_retry_after_completes_in_virtual_time(server, rsession):
    server.script("/x", too_many({"Retry-After": "86400"}))
    assert await get(rsession, server.url + "/x") == (200, "status 200")
    first, second = server.arrivals
    assert second.time - first.time >= 86_400


@pytest.mark.looptime
async def test_an_http_date_retry_after_is_honoured(server, rsession):
    when = datetime.now(UTC) + timedelta(seconds=600)
    date = when.strftime("%a, %d %b %Y %H:%M:%S GMT")
    server.script("/x", too_many({"Retry-After": date}))
    assert (await get(rsession, server.url + "/x"))[0] == 200
    first, second = server.arrivals
    assert 590 <= second.time - first.time <= 601


@pytest.mark.looptime
async def test_x_ratelimit_reset_is_used_without_retry_after(server, rsession):
    server.script("/x", too_many({"X-RateLimit-Reset": "45"}))
    assert (await get(rsession, server.url + "/x"))[0] == 200
    first, second = server.arrivals
    assert second.time - first.time == pytest.approx(45, abs=0.01)


# --- one shared pause, one probe --------------------------------------------------


async def _pause_then_crowd(server, rsession, policy, n: int) -> list[tuple[int, str]]:
    """Caller 0 meets the 429; callers 1..n-1 arrive while the key is paused."""
    first = asyncio.create_task(get(rsession, server.url + "/x"))
    await until(lambda: policy.paused_for(key_of(server)) > 0)
    assert server.count() == 1
    rest = [asyncio.create_task(get(rsession, server.url + "/x")) for _ in range(n - 1)]
    return await asyncio.gather(first, *rest)


@pytest.mark.looptime
async def test_callers_behind_a_429_send_nothing_and_one_probe_goes_first(server, rsession, policy):
    server.script("/x", too_many({"Retry-After": "60"}), slow_ok(5))
    results = await _pause_then_crowd(server, rsession, policy, 30)
    assert [status for status, _ in results] == [200] * 30
    times = [a.time for a in server.arrivals]
    t0 = times[0]
    assert [t for t in times if t < t0 + 60] == [t0]  # nothing during the pause
    probe = times[1]
    assert probe == pytest.approx(t0 + 60, abs=0.01)
    followers = times[2:]
    assert len(followers) == 29
    assert min(followers) >= probe + 5  # only once the probe's answer was in


@pytest.mark.looptime
async def test_a_refused_probe_starts_a_new_pause_with_again_one_probe(server, rsession, policy):
    server.script(
        "/x", too_many({"Retry-After": "60"}), too_many({"Retry-After": "60"}), slow_ok(5)
    )
    results = await _pause_then_crowd(server, rsession, policy, 30)
    assert [status for status, _ in results] == [200] * 30
    t0, probe1, probe2, *followers = (a.time for a in server.arrivals)
    assert probe1 == pytest.approx(t0 + 60, abs=0.01)
    assert probe2 == pytest.approx(probe1 + 60, abs=0.01)
    assert len(followers) == 29
    assert min(followers) >= probe2 + 5


@pytest.mark.looptime
async def test_callers_whose_max_wait_equals_the_pause_follow_a_slow_probe(server):
    """A day-long 429 with max_wait of a day: the probe's round trip must not push the
    waiters over max_wait (they waited for the pause, not for the probe's answer)."""
    for _ in range(10):
        server.script("/x", too_many({"Retry-After": "86400"}))
    server.script("/x", slow_ok(5))
    async with resilient.session(RateLimitBackoff(max_wait=86_400)) as s:
        results = await asyncio.gather(*(get(s, server.url + "/x") for _ in range(10)))
    assert [status for status, _ in results] == [200] * 10
    assert len(server.arrivals) == 20


@pytest.mark.looptime
async def test_callers_that_all_met_the_429_send_one_probe(server, rsession):
    for _ in range(10):
        server.script("/x", too_many({"Retry-After": "30"}))
    server.script("/x", slow_ok(1))
    tasks = [asyncio.create_task(get(rsession, server.url + "/x")) for _ in range(10)]
    results = await asyncio.gather(*tasks)
    assert [status for status, _ in results] == [200] * 10
    times = sorted(a.time for a in server.arrivals)
    assert len(times) == 20
    probe, followers = times[10], times[11:]
    assert probe >= times[0] + 30
    assert min(followers) >= probe + 1


async def test_soak_100_callers_in_real_time_send_one_probe_per_pause(server, rsession, policy):
    """Real scheduling, scaled-down delays: a 0.2 s pause, a probe answered after 50 ms."""
    server.script("/x", too_many({"Retry-After": "0.2"}), slow_ok(0.05))
    results = await _pause_then_crowd(server, rsession, policy, 100)
    assert [status for status, _ in results] == [200] * 100
    t0, probe, *followers = (a.time for a in server.arrivals)
    assert probe >= t0 + 0.2
    assert len(followers) == 99
    assert min(followers) >= probe + 0.05


@pytest.mark.looptime
async def test_keys_are_paused_independently(server):
    policy = RateLimitBackoff(key=lambda request: request.url.path)
    server.script("/a", too_many({"Retry-After": "60"}))
    async with resilient.session(policy) as s:
        paused = asyncio.create_task(get(s, server.url + "/a"))
        await until(lambda: policy.paused_for("/a") > 0)
        assert (await get(s, server.url + "/b"))[0] == 200
        assert policy.paused_for("/b") == 0.0
        assert (await paused)[0] == 200
    b = next(a for a in server.arrivals if a.path == "/b")
    assert b.time < server.arrivals[0].time + 1


# --- limits of a wait -------------------------------------------------------------


@pytest.mark.looptime
async def test_plain_session_gets_the_429_instead_of_sleeping_into_its_total_timeout(server):
    server.script("/x", too_many({"Retry-After": "3600"}))
    async with aiohttp.ClientSession(middlewares=(RateLimitBackoff(),)) as s:  # total=300
        t0 = _clock.now()
        assert await get(s, server.url + "/x") == (429, "slow down")
        assert _clock.now() - t0 < 1
    assert server.count() == 1


@pytest.mark.looptime
async def test_plain_session_waits_when_the_pause_fits_its_total_timeout(server):
    server.script("/x", too_many({"Retry-After": "200"}))
    async with aiohttp.ClientSession(middlewares=(RateLimitBackoff(),)) as s:  # total=300
        assert (await get(s, server.url + "/x"))[0] == 200
    assert server.count() == 2


@pytest.mark.looptime
async def test_retry_after_beyond_max_wait_returns_the_429_at_once_readable(server):
    server.script("/x", too_many({"Retry-After": "60"}, body="come back later"))
    async with resilient.session(RateLimitBackoff(max_wait=10)) as s:
        t0 = _clock.now()
        assert await get(s, server.url + "/x") == (429, "come back later")
        assert _clock.now() - t0 < 1
    assert server.count() == 1


@pytest.mark.looptime
async def test_max_wait_bounds_the_total_over_several_429s(server):
    for _ in range(3):
        server.script("/x", too_many({"Retry-After": "40"}))
    async with resilient.session(RateLimitBackoff(max_wait=100)) as s:
        t0 = _clock.now()
        assert (await get(s, server.url + "/x"))[0] == 429  # 40 + 40, then 40 more > 100
        assert 80 <= _clock.now() - t0 < 81
    assert server.count() == 3


@pytest.mark.looptime
async def test_caller_arriving_at_a_paused_key_with_too_little_allowance_raises(
    server, rsession, policy
):
    server.script("/x", too_many({"Retry-After": "600"}))
    with resilient.deadline(1):  # the first caller may not wait: it gets the 429
        assert (await get(rsession, server.url + "/x"))[0] == 429
    with resilient.deadline(60), pytest.raises(RateLimited) as caught:
        await get(rsession, server.url + "/x")
    assert caught.value.key == key_of(server)
    assert caught.value.retry_after == pytest.approx(600, abs=1)
    assert server.count() == 1


@pytest.mark.looptime
async def test_caller_arriving_at_a_paused_key_within_its_allowance_waits(server, rsession, policy):
    server.script("/x", too_many({"Retry-After": "30"}))
    with resilient.deadline(1):
        assert (await get(rsession, server.url + "/x"))[0] == 429
    with resilient.deadline(60):
        assert (await get(rsession, server.url + "/x"))[0] == 200
    assert server.arrivals[1].time - server.arrivals[0].time == pytest.approx(30, abs=0.01)


@pytest.mark.looptime
async def test_a_429_on_a_key_paused_beyond_the_callers_allowance_is_returned(server):
    async def late_429(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(status=429, text="late", headers={"Retry-After": "10"})

    server.script("/slow", late_429)
    server.script("/x", too_many({"Retry-After": "3600"}))
    policy = RateLimitBackoff(key=lambda request: "one key")
    async with resilient.session(policy) as s:
        with resilient.deadline(100):
            in_flight = asyncio.create_task(get(s, server.url + "/slow"))
            await until(lambda: server.count() == 1)
            with resilient.deadline(1):
                assert (await get(s, server.url + "/x"))[0] == 429  # pauses the key 1 h
            t0 = _clock.now()
            assert await in_flight == (429, "late")  # its own 10 s fit; the key's 1 h not
            assert _clock.now() - t0 == pytest.approx(5, abs=0.1)
    assert server.count() == 2


@pytest.mark.looptime
async def test_waiter_gives_up_when_a_refused_probe_extends_the_pause_past_its_deadline(
    server, rsession, policy
):
    server.script("/x", too_many({"Retry-After": "10"}), too_many({"Retry-After": "3600"}))
    first = asyncio.create_task(get(rsession, server.url + "/x"))
    await until(lambda: policy.paused_for(key_of(server)) > 0)
    t0 = _clock.now()
    with resilient.deadline(100), pytest.raises(RateLimited):
        await get(rsession, server.url + "/x")
    assert _clock.now() - t0 == pytest.approx(10, abs=0.1)  # at the refusal, not at 100
    assert (await first)[0] == 200
    assert server.count() == 3


# --- Retry-After: 0, no header, hostile headers -----------------------------------


@pytest.mark.looptime
async def test_retry_after_zero_forever_does_not_hot_loop(server):
    server.default("/x", too_many({"Retry-After": "0"}))
    async with resilient.session(RateLimitBackoff(max_wait=600)) as s:
        assert (await get(s, server.url + "/x"))[0] == 429
    times = [a.time for a in server.arrivals]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # floors 0, 1, 2, 4, ... 256 s: 11 arrivals, then the next 300 s floor exceeds max_wait
    assert len(times) == 11
    assert gaps[0] < 0.01
    assert [round(g) for g in gaps[1:]] == [1, 2, 4, 8, 16, 32, 64, 128, 256]


@pytest.mark.looptime
async def test_no_header_backs_off_exponentially_with_jitter(server, rsession):
    for _ in range(4):
        server.script("/x", 429)
    assert (await get(rsession, server.url + "/x"))[0] == 200
    times = [a.time for a in server.arrivals]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 4
    for n, gap in enumerate(gaps, start=1):
        assert 0 <= gap <= 2 ** (n - 1) + 0.01


def test_backoff_without_retry_time_is_full_jitter_up_to_the_doubling_step():
    samples = [backoff_delay(None, 3, base=1.0, cap=300.0) for _ in range(2000)]
    assert all(0 <= s <= 4.0 for s in samples)
    assert min(samples) < 0.5
    assert max(samples) > 3.5


def test_backoff_step_is_capped_and_never_overflows():
    samples = [backoff_delay(None, 5000, base=1.0, cap=300.0) for _ in range(200)]
    assert all(0 <= s <= 300.0 for s in samples)
    assert backoff_delay(0.0, 10**6, base=1.0, cap=300.0) == 300.0


def test_server_retry_time_is_trusted_first_then_floored():
    assert backoff_delay(0.0, 1, base=1.0, cap=300.0) == 0.0
    assert backoff_delay(0.0, 2, base=1.0, cap=300.0) == 1.0
    assert backoff_delay(0.0, 4, base=1.0, cap=300.0) == 4.0
    assert backoff_delay(120.0, 4, base=1.0, cap=300.0) == 120.0


HOSTILE = [
    "soon",
    "-5",
    "1e309",
    "9" * 400,
    "Mon, 32 Foo 2099 99:99:99 GMT",
    "Fri, 31 Dec 9999 23:59:59 GMT",
]


@pytest.mark.looptime
@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_retry_after_never_crashes_nor_waits_beyond_the_deadline(
    server, rsession, value
):
    server.script("/x", too_many({"Retry-After": value}), too_many({"Retry-After": value}))
    t0 = _clock.now()
    with resilient.deadline(30):
        status, _ = await get(rsession, server.url + "/x")
    assert status in (200, 429)
    assert _clock.now() - t0 <= 30


@pytest.mark.looptime
@pytest.mark.parametrize("value", ["9" * 400, "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_retry_time_beyond_any_wait_returns_the_429_at_once(server, rsession, value):
    server.script("/x", too_many({"Retry-After": value}))
    t0 = _clock.now()
    assert (await get(rsession, server.url + "/x"))[0] == 429
    assert _clock.now() - t0 < 1
    assert server.count() == 1


# --- cancellation leaves no trace -------------------------------------------------


@pytest.mark.looptime
async def test_a_cancelled_probe_hands_the_probe_to_the_next_waiter(server, rsession, policy):
    server.script("/x", too_many({"Retry-After": "10"}), slow_ok(3600))
    first = asyncio.create_task(get(rsession, server.url + "/x"))
    await until(lambda: policy.paused_for(key_of(server)) > 0)
    second = asyncio.create_task(get(rsession, server.url + "/x"))
    await until(lambda: server.count() == 2)  # the first caller's probe is on the wire
    first.cancel()
    assert (await second)[0] == 200
    probe, handover = server.arrivals[1].time, server.arrivals[2].time
    assert handover - probe < 1
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.sleep(3600)  # let the server's slow reply finish in virtual time


@pytest.mark.looptime
async def test_a_cancelled_head_waiter_hands_the_probe_over(server, rsession, policy):
    server.script("/x", too_many({"Retry-After": "10"}))
    first = asyncio.create_task(get(rsession, server.url + "/x"))
    await until(lambda: policy.paused_for(key_of(server)) > 0)
    second = asyncio.create_task(get(rsession, server.url + "/x"))
    await asyncio.sleep(5)
    first.cancel()
    assert (await second)[0] == 200
    assert server.count() == 2
    assert server.arrivals[1].time - server.arrivals[0].time == pytest.approx(10, abs=0.01)


@pytest.mark.looptime
async def test_a_probe_failing_on_the_network_hands_the_probe_over(server, rsession, policy):
    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(1)
        return web.Response(text="never delivered")

    server.script("/x", too_many({"Retry-After": "10"}), drop)
    # POST: aiohttp itself would re-send a GET once on a dropped keep-alive connection
    first = asyncio.create_task(get(rsession, server.url + "/x", "POST"))
    await until(lambda: policy.paused_for(key_of(server)) > 0)
    second = asyncio.create_task(get(rsession, server.url + "/x"))
    with pytest.raises(aiohttp.ClientError):
        await first
    assert (await second)[0] == 200
    assert server.count() == 3
    dropped, handover = server.arrivals[1].time, server.arrivals[2].time
    assert handover - dropped < 1


@pytest.mark.looptime
async def test_after_all_waiters_are_cancelled_the_next_caller_proceeds(server, rsession, policy):
    server.script("/x", too_many({"Retry-After": "10"}))
    tasks = [asyncio.create_task(get(rsession, server.url + "/x"))]
    await until(lambda: policy.paused_for(key_of(server)) > 0)
    tasks += [asyncio.create_task(get(rsession, server.url + "/x")) for _ in range(3)]
    await asyncio.sleep(1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(20)
    assert policy.paused_for(key_of(server)) == 0.0
    assert (await get(rsession, server.url + "/x"))[0] == 200
    assert server.count() == 2


# --- release, bodies, logs --------------------------------------------------------


@pytest.mark.looptime
async def test_the_discarded_429_is_released_before_the_wait(server):
    server.script("/x", too_many({"Retry-After": "5"}, body="x" * 1_000_000))
    connector = aiohttp.TCPConnector(limit=1)
    async with resilient.session(RateLimitBackoff(), connector=connector) as s:
        async with asyncio.timeout(100):  # a held connection would block the re-send
            assert await get(s, server.url + "/x") == (200, "status 200")
    assert server.count() == 2


@pytest.mark.looptime
async def test_a_body_that_cannot_be_sent_again_gets_the_429_back(server, rsession):
    server.script("/x", too_many({"Retry-After": "5"}))

    async def stream() -> AsyncIterator[bytes]:
        yield b"once"

    async with rsession.post(server.url + "/x", data=stream()) as resp:
        assert resp.status == 429
    assert server.count() == 1


@pytest.mark.looptime
async def test_a_long_wait_logs_reason_key_and_utc_end_time(server, rsession, caplog):
    server.script("/x", too_many({"Retry-After": "120"}))
    caplog.set_level(logging.INFO, logger="resilient")
    expected_end = datetime.now(UTC) + timedelta(seconds=120)
    assert (await get(rsession, server.url + "/x"))[0] == 200
    [record] = [r for r in caplog.records if r.levelno == logging.INFO]
    message = record.getMessage()
    assert "rate_limit_backoff" in message
    assert "429 Retry-After" in message
    assert key_of(server) in message
    end = datetime.fromisoformat(re.search(r"until (\S+)", message).group(1))
    assert end.utcoffset() == timedelta(0)
    assert abs((end - expected_end).total_seconds()) < 5


@pytest.mark.looptime
async def test_paused_for_reports_the_seconds_left(server, rsession, policy):
    server.script("/x", too_many({"Retry-After": "600"}))
    with resilient.deadline(1):
        await get(rsession, server.url + "/x")
    assert policy.paused_for(key_of(server)) == pytest.approx(600, abs=1)
    await asyncio.sleep(100)
    assert policy.paused_for(key_of(server)) == pytest.approx(500, abs=1)
    assert policy.paused_for("http://elsewhere:80") == 0.0


# --- configuration ----------------------------------------------------------------


def test_policy_kind_and_order():
    assert (RateLimitBackoff.kind, RateLimitBackoff.order) == ("rate_limit_backoff", 30)
    assert RateLimitBackoff().max_wait == 86_400.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_wait": 0}, "max_wait"),
        ({"max_wait": -1}, "max_wait"),
        ({"max_wait": math.nan}, "max_wait"),
        ({"max_wait": math.inf}, "max_wait"),
        ({"max_wait": 8 * 86_400}, "max_wait"),
        ({"max_wait": "60"}, "max_wait"),
        ({"base": 0}, "base"),
        ({"base": -1.0}, "base"),
        ({"cap": 0.5}, "cap"),
        ({"base": 10, "cap": 5}, "cap"),
        ({"key": "host"}, "key"),
        ({"storage": "memcached://x"}, "storage"),
        ({"max_keys": 0}, "max_keys"),
    ],
)
def test_invalid_configuration_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RateLimitBackoff(**kwargs)


def test_storage_error_does_not_echo_a_password():
    with pytest.raises(ValueError, match="storage") as caught:
        RateLimitBackoff(storage="mongodb://admin:hunter2@cache:27017/0")
    assert "hunter2" not in str(caught.value)


def test_a_redis_uri_is_accepted_and_its_password_never_shown():
    policy = RateLimitBackoff(storage="redis://:hunter2@cache:6379/0")
    assert "hunter2" not in repr(policy)
    assert "redis://cache:6379/0" in repr(policy)


def test_policy_is_immutable():
    policy = RateLimitBackoff()
    with pytest.raises(AttributeError):
        policy.max_wait = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        policy.extra = 1  # type: ignore[attr-defined]


def test_default_key_is_by_host():
    assert "key=by_host" in repr(RateLimitBackoff())
