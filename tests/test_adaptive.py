"""Throttle(adaptive=True): AIMD on 429s, against a real loopback server in virtual time."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import pytest
from aiohttp import ClientRequest
from hypothesis import given
from hypothesis import strategies as st

from resilient._adaptive import DECREASE, INCREASE, decreased, increased
from resilient._throttle import Throttle

TICK = 1e-6
RATE = 2.0


async def get(session: aiohttp.ClientSession, url: str, throttle: Throttle) -> int:
    async with session.get(url, middlewares=(throttle,)) as resp:
        await resp.read()
        return resp.status


def gaps(server) -> list[float]:
    t = [a.time for a in server.arrivals]
    return [b - a for a, b in itertools.pairwise(t)]


def by_path(request: ClientRequest) -> str:
    return request.url.path


# --- the rate drops after a 429 and comes back --------------------------------------


@pytest.mark.looptime
async def test_a_429_halves_the_rate_of_the_key(server, client):
    throttle = Throttle(RATE, adaptive=True)
    server.script("/x", 429)
    assert await get(client, server.url + "/x", throttle) == 429
    assert throttle.current_rate(server.url) == RATE * DECREASE
    await get(client, server.url + "/x", throttle)
    assert gaps(server) == pytest.approx([1 / (RATE * DECREASE)], abs=TICK)  # not 1 / RATE


@pytest.mark.looptime
async def test_without_adaptive_a_429_leaves_the_rate_alone(server, client):
    throttle = Throttle(RATE)
    server.script("/x", 429)
    await get(client, server.url + "/x", throttle)
    await get(client, server.url + "/x", throttle)
    assert throttle.current_rate(server.url) == RATE
    assert gaps(server) == pytest.approx([1 / RATE], abs=TICK)


@pytest.mark.looptime
async def test_successes_restore_the_configured_rate(server, client):
    throttle = Throttle(RATE, adaptive=True)
    server.script("/x", 429)
    await get(client, server.url + "/x", throttle)
    restoring = round((1 - DECREASE) / INCREASE)  # 25 successes undo one halving
    for _ in range(restoring - 1):
        await get(client, server.url + "/x", throttle)
    assert throttle.current_rate(server.url) < RATE
    await get(client, server.url + "/x", throttle)
    assert throttle.current_rate(server.url) == RATE
    await get(client, server.url + "/x", throttle)
    assert gaps(server)[-1] == pytest.approx(1 / RATE, abs=TICK)


@pytest.mark.looptime
async def test_the_rate_never_exceeds_the_configured_rate(server, client):
    throttle = Throttle(RATE, burst=3, adaptive=True)
    for _ in range(30):
        await get(client, server.url + "/x", throttle)
    assert throttle.current_rate(server.url) == RATE


@pytest.mark.looptime
async def test_429s_of_requests_sent_together_cut_the_rate_once(server, client):
    throttle = Throttle(10.0, burst=5, adaptive=True)
    server.script("/x", *[429] * 5)
    statuses = await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(5)))
    assert statuses == [429] * 5
    assert throttle.current_rate(server.url) == 10.0 * DECREASE


@pytest.mark.looptime
async def test_a_429_after_a_cut_cuts_again(server, client):
    throttle = Throttle(8.0, adaptive=True)
    server.script("/x", 429, 429)
    await get(client, server.url + "/x", throttle)
    await get(client, server.url + "/x", throttle)
    assert throttle.current_rate(server.url) == 8.0 * DECREASE * DECREASE


@pytest.mark.looptime
async def test_the_rate_never_falls_below_min_rate(server, client):
    throttle = Throttle(1.0, adaptive=True, min_rate=0.3)
    server.script("/x", *[429] * 4)
    for _ in range(4):
        await get(client, server.url + "/x", throttle)
    assert throttle.current_rate(server.url) == 0.3
    await get(client, server.url + "/x", throttle)
    assert gaps(server)[-1] == pytest.approx(1 / 0.3, abs=TICK)


@pytest.mark.looptime
async def test_a_cut_is_per_key(server, client):
    throttle = Throttle(RATE, adaptive=True, key=by_path)
    server.script("/a", 429)
    await get(client, server.url + "/a", throttle)
    await get(client, server.url + "/b", throttle)
    assert throttle.current_rate("/a") == RATE * DECREASE
    assert throttle.current_rate("/b") == RATE


async def test_a_slowed_key_is_not_forgotten_while_other_keys_come_and_go(server, client):
    throttle = Throttle(1e9, adaptive=True, key=by_path, max_keys=4)
    server.script("/slowed", 429)
    await get(client, server.url + "/slowed", throttle)
    for i in range(20):
        await get(client, f"{server.url}/{i}", throttle)
    assert throttle.current_rate("/slowed") == 1e9 * DECREASE


# --- the formulas -----------------------------------------------------------------

rates = st.floats(1e-6, 1e9)


@given(rate=rates, floor=rates)
def test_decreased_is_the_cut_rate_or_the_floor(rate, floor):
    assert decreased(rate, floor) == max(floor, rate * DECREASE)


@given(rate=rates, ceiling=rates)
def test_increased_adds_a_step_and_never_passes_the_ceiling(rate, ceiling):
    rate = min(rate, ceiling)
    grown = increased(rate, ceiling)
    assert grown <= ceiling
    assert grown == min(ceiling, rate + ceiling * INCREASE)
