"""deadline(): a contextvar budget on the loop clock; allowance() adds aiohttp's total timeout."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest
from aiohttp import web

import resilient
from resilient import _clock
from resilient._deadline import TIMEOUT_MARGIN, allowance, mark_start, remaining


@pytest.mark.looptime
async def test_remaining_counts_down_on_the_loop_clock():
    with resilient.deadline(10):
        await asyncio.sleep(4)
        assert remaining() == pytest.approx(6, abs=1e-6)


async def test_remaining_is_infinite_outside_a_deadline():
    assert remaining() == math.inf


@pytest.mark.looptime
async def test_nested_deadline_keeps_the_earlier_end():
    with resilient.deadline(5):
        with resilient.deadline(60):
            assert remaining() == pytest.approx(5, abs=1e-6)
        with resilient.deadline(2):
            assert remaining() == pytest.approx(2, abs=1e-6)
        assert remaining() == pytest.approx(5, abs=1e-6)
    assert remaining() == math.inf


@pytest.mark.looptime
async def test_async_with_form_works_too():
    async with resilient.deadline(3):
        assert remaining() == pytest.approx(3, abs=1e-6)
    assert remaining() == math.inf


async def test_deadline_does_not_leak_into_other_tasks():
    seen: list[float] = []

    async def other() -> None:
        seen.append(remaining())

    task = asyncio.create_task(other())  # created outside the block: its own context
    with resilient.deadline(1):
        await task
    assert seen == [math.inf]


@pytest.mark.parametrize("bad", [-1, float("nan"), "5", None])
def test_invalid_deadline_names_the_argument(bad):
    with pytest.raises(ValueError, match="seconds"):
        resilient.deadline(bad)


@pytest.mark.looptime
async def test_allowance_subtracts_time_spent_from_the_session_total(server):
    seen: list[float] = []

    async def probe(request, handler):
        started = _clock.now() - 100.0  # pretend the request began 100 s ago
        seen.append(allowance(request, started))
        return await handler(request)

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, middlewares=(probe,)) as s:
        async with s.get(server.url) as r:
            assert r.status == 200
    assert seen[0] == pytest.approx(200 - TIMEOUT_MARGIN, abs=1e-3)


@pytest.mark.looptime
async def test_allowance_is_the_smaller_of_deadline_and_total(server):
    seen: list[float] = []

    async def probe(request, handler):
        seen.append(allowance(request, _clock.now()))
        return await handler(request)

    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=300), middlewares=(probe,)
    ) as s:
        with resilient.deadline(7):
            async with s.get(server.url):
                pass
        async with s.get(server.url):
            pass
    assert seen[0] == pytest.approx(7, abs=1e-3)
    assert seen[1] == pytest.approx(300 - TIMEOUT_MARGIN, abs=1e-3)


async def test_allowance_is_unbounded_without_total_or_deadline(server):
    seen: list[float] = []

    async def probe(request, handler):
        seen.append(allowance(request, _clock.now()))
        return await handler(request)

    async with resilient.session(probe) as s, s.get(server.url):
        pass
    assert seen == [math.inf]


@pytest.mark.looptime
async def test_an_inner_policy_counts_time_spent_by_an_outer_one(server):
    """The outer policy marks the start; the inner one's allowance includes the outer wait."""
    seen: list[float] = []

    async def outer(request, handler):
        mark_start(request, _clock.now())
        await asyncio.sleep(200)  # e.g. Retry's backoff before this attempt
        return await handler(request)

    async def inner(request, handler):
        seen.append(allowance(request, _clock.now()))
        return await handler(request)

    async with (
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=300), middlewares=(outer, inner)
        ) as s,
        s.get(server.url),
    ):
        pass
    assert seen[0] == pytest.approx(100 - TIMEOUT_MARGIN, abs=1e-3)


# --- the call's own clock: one start for the whole call ---------------------------------


def _slow(status: int, seconds: float, headers: dict[str, str] | None = None):
    """A reply of ``status`` after ``seconds`` (server side, on the loop clock)."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=status, text=f"status {status}", headers=headers)

    return reply


async def _dropped(request: web.Request) -> web.StreamResponse:
    """After 3 s, close the connection without an answer: aiohttp re-sends the GET itself."""
    await asyncio.sleep(3)
    assert request.transport is not None
    request.transport.close()
    await asyncio.sleep(1)  # the client is gone; nothing is written
    return web.Response()


@pytest.mark.timeout(10)
@pytest.mark.looptime
async def test_a_throttle_after_a_429_pause_does_not_wait_past_the_total_without_retry(server):
    """No Retry in the chain: RateLimitBackoff marks the call's start, so the Throttle's
    wait after the 3 s pause counts those 3 s against ClientTimeout.total (8 s): its 7 s
    wait (a token every 10 s) is not started; aiohttp's TimeoutError never comes."""
    server.script("/x", _slow(429, 0, {"Retry-After": "3"}))
    policies = resilient.chain(resilient.RateLimitBackoff(), resilient.Throttle(0.1))
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=8), middlewares=policies
    ) as s:
        t0 = _clock.now()
        with pytest.raises(resilient.DeadlineExceeded):
            await s.get(server.url + "/x")
        assert _clock.now() - t0 < 8
    assert server.count("/x") == 1


@pytest.mark.timeout(10)
@pytest.mark.looptime
async def test_a_redirect_keeps_the_calls_start(server):
    """The 302 makes aiohttp build a new ClientRequest and run the chain again; the hop
    to /b still counts the 3 s spent on /a against the session's total."""
    server.script("/a", _slow(302, 3, {"Location": "/b"}))
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=8), middlewares=(resilient.Throttle(0.1),)
    ) as s:
        t0 = _clock.now()
        with pytest.raises(resilient.DeadlineExceeded):
            await s.get(server.url + "/a")
        assert _clock.now() - t0 < 8
    assert [a.path for a in server.arrivals] == ["/a"]


@pytest.mark.timeout(10)
@pytest.mark.looptime
async def test_aiohttps_own_resend_keeps_the_calls_start(server):
    """A dropped connection makes aiohttp re-send the GET with a new ClientRequest; the
    re-send's throttle wait still counts the 3 s already spent."""
    server.script("/d", _dropped)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=8), middlewares=(resilient.Throttle(0.1),)
    ) as s:
        t0 = _clock.now()
        with pytest.raises(resilient.DeadlineExceeded):
            await s.get(server.url + "/d")
        assert _clock.now() - t0 < 8
    assert server.count("/d") == 1


@pytest.mark.timeout(10)
@pytest.mark.looptime
async def test_a_redirect_within_the_total_is_followed(server):
    """The call's start is kept, not moved earlier: a hop whose wait fits is made."""
    server.script("/a", _slow(302, 1, {"Location": "/b"}))
    async with (
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=15), middlewares=(resilient.Throttle(0.1),)
        ) as s,
        s.get(server.url + "/a") as resp,
    ):
        assert resp.status == 200
    assert [a.path for a in server.arrivals] == ["/a", "/b"]


@pytest.mark.timeout(10)
@pytest.mark.looptime
async def test_the_next_call_in_the_same_task_starts_its_own_clock(server):
    """The mark belongs to one call: a later call of the same task starts afresh."""
    server.script("/slow", _slow(200, 6))
    throttle = resilient.Throttle(0.1)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=8), middlewares=(throttle,)
    ) as s:
        async with s.get(server.url + "/slow") as resp:  # 6 s of the first call's total
            assert resp.status == 200
        async with s.get(server.url + "/fast") as resp:  # waits 4 s for its token
            assert resp.status == 200
    assert server.count() == 2
