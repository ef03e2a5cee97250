"""deadline(): a contextvar budget on the loop clock; allowance() adds aiohttp's total timeout."""

from __future__ import annotations

import asyncio
import math

import aiohttp
import pytest

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

    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=300), middlewares=(outer, inner)
    ) as s, s.get(server.url):
        pass
    assert seen[0] == pytest.approx(100 - TIMEOUT_MARGIN, abs=1e-3)
