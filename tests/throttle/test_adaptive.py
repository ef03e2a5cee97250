"""Throttle(adaptive=True): the learned-rate law (resilient.ratelimit._learned) steering a key's
bucket, against a real loopback server in virtual time."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import pytest
from aiohttp import ClientRequest

import resilient
from resilient.ratelimit._learned import _K, BETA, SLOW_START_MIN
from resilient.throttle._throttle import Throttle

TICK = 1e-6
RATE = 10.0


async def get(session: aiohttp.ClientSession, url: str, throttle: Throttle) -> int:
    async with session.get(url, middlewares=(throttle,)) as resp:
        await resp.read()
        return resp.status


def gaps(server) -> list[float]:
    t = [a.time for a in server.arrivals]
    return [b - a for a, b in itertools.pairwise(t)]


def by_path(request: ClientRequest) -> str:
    return request.url.path


def cuts(throttle: Throttle, key: str) -> int:
    state = throttle._states.get(key)
    assert state is not None
    assert state.learned is not None
    return state.learned.cuts


async def warm(client: aiohttp.ClientSession, url: str, throttle: Throttle, n: int) -> None:
    """``n`` accepted requests at the throttle's pace (the rate is measured from them)."""
    for _ in range(n):
        assert await get(client, url, throttle) == 200


# --- the rate is cut from what the server accepted, and climbs back --------------------


@pytest.mark.looptime
async def test_a_429_cuts_the_rate_to_beta_times_the_rate_the_server_accepted(server, client):
    throttle = Throttle(RATE, adaptive=True)
    await warm(client, server.url + "/x", throttle, 20)  # 2 s at 10/s
    server.script("/x", 429)
    assert await get(client, server.url + "/x", throttle) == 429
    cut = throttle.current_rate(server.url)
    assert cut == pytest.approx(BETA * RATE, rel=0.15)
    assert cut < RATE
    await get(client, server.url + "/x", throttle)
    assert gaps(server)[-1] == pytest.approx(1 / cut, rel=0.05)  # not 1 / RATE


@pytest.mark.looptime
async def test_a_first_429_before_anything_was_measured_starts_a_slow_start(server, client):
    throttle = Throttle(RATE, adaptive=True, min_rate=0.1)
    server.script("/x", 429)
    assert await get(client, server.url + "/x", throttle) == 429
    assert throttle.current_rate(server.url) == pytest.approx(SLOW_START_MIN)
    await warm(client, server.url + "/x", throttle, 8)  # each accepted answer raises it
    assert SLOW_START_MIN < throttle.current_rate(server.url) <= RATE


@pytest.mark.looptime
async def test_without_adaptive_a_429_leaves_the_rate_alone(server, client):
    throttle = Throttle(RATE)
    server.script("/x", 429)
    await get(client, server.url + "/x", throttle)
    await get(client, server.url + "/x", throttle)
    assert throttle.current_rate(server.url) == RATE
    assert gaps(server) == pytest.approx([1 / RATE], abs=TICK)


@pytest.mark.looptime
async def test_successes_bring_the_configured_rate_back(server, client):
    throttle = Throttle(RATE, adaptive=True)
    await warm(client, server.url + "/x", throttle, 20)
    server.script("/x", 429)
    await get(client, server.url + "/x", throttle)
    cut = throttle.current_rate(server.url)
    await warm(client, server.url + "/x", throttle, int(RATE * _K / 2))
    assert cut < throttle.current_rate(server.url) < RATE  # climbing, not there yet
    await warm(client, server.url + "/x", throttle, int(RATE * 4 * _K))
    assert throttle.current_rate(server.url) == RATE


@pytest.mark.looptime
async def test_the_rate_never_exceeds_the_configured_rate(server, client):
    throttle = Throttle(RATE, burst=3, adaptive=True)
    await warm(client, server.url + "/x", throttle, 30)
    server.script("/x", 429)
    await get(client, server.url + "/x", throttle)
    await warm(client, server.url + "/x", throttle, 2_000)  # far past the plateau
    assert throttle.current_rate(server.url) == RATE


@pytest.mark.looptime
async def test_429s_of_requests_sent_together_cut_the_rate_once(server, client):
    throttle = Throttle(RATE, burst=5, adaptive=True)
    await warm(client, server.url + "/x", throttle, 20)
    await asyncio.sleep(1.0)  # the bucket refills: the five leave together
    server.script("/x", *[429] * 5)
    statuses = await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(5)))
    assert statuses == [429] * 5
    assert cuts(throttle, server.url) == 1


@pytest.mark.looptime
async def test_a_429_to_a_request_sent_after_a_cut_cuts_again(server, client):
    throttle = Throttle(RATE, adaptive=True)
    await warm(client, server.url + "/x", throttle, 20)
    server.script("/x", 429, 429)
    await get(client, server.url + "/x", throttle)
    first = throttle.current_rate(server.url)
    await get(client, server.url + "/x", throttle)
    assert cuts(throttle, server.url) == 2
    assert throttle.current_rate(server.url) <= first


@pytest.mark.looptime
async def test_the_rate_never_falls_below_min_rate(server, client):
    throttle = Throttle(100.0, adaptive=True, min_rate=30.0)
    server.script("/x", 429)  # unmeasured: slow start at 1/s, floored at 30/s
    await get(client, server.url + "/x", throttle)
    assert throttle.current_rate(server.url) == 30.0
    await get(client, server.url + "/x", throttle)
    assert gaps(server)[-1] == pytest.approx(1 / 30.0, rel=0.01)


@pytest.mark.looptime
async def test_a_cut_is_per_key(server, client):
    throttle = Throttle(RATE, adaptive=True, key=by_path, min_rate=0.1)
    server.script("/a", 429)
    await get(client, server.url + "/a", throttle)
    await get(client, server.url + "/b", throttle)
    assert throttle.current_rate("/a") == pytest.approx(SLOW_START_MIN)
    assert throttle.current_rate("/b") == RATE


async def test_a_slowed_key_is_not_forgotten_while_other_keys_come_and_go(server, client):
    throttle = Throttle(1e9, adaptive=True, key=by_path, max_keys=4)
    server.script("/slowed", 429)
    await get(client, server.url + "/slowed", throttle)
    for i in range(20):
        await get(client, f"{server.url}/{i}", throttle)
    assert throttle.current_rate("/slowed") == 1e9 / 20  # the min_rate floor


# --- in a chain: one learned rate per key -------------------------------------------


@pytest.mark.looptime
async def test_in_a_chain_the_throttle_reads_the_backoffs_learned_rate(server):
    throttle = Throttle(RATE, adaptive=True)
    backoff = resilient.RateLimitBackoff()
    server.script("/x", 429)
    async with resilient.session(backoff, throttle) as session:
        async with session.get(server.url + "/x") as resp:
            assert resp.status == 200  # the 429 was waited out
        learned = backoff.rate(server.url)
        assert learned is not None
        assert throttle.current_rate(server.url) == pytest.approx(min(RATE, learned))
        assert throttle._states.get(server.url).learned is None  # nothing learned twice


@pytest.mark.looptime
async def test_a_throttle_keyed_differently_keeps_its_own_rate(server):
    throttle = Throttle(RATE, adaptive=True, key=by_path, min_rate=0.1)
    backoff = resilient.RateLimitBackoff()
    server.script("/x", 429)
    async with resilient.session(backoff, throttle) as session:
        async with session.get(server.url + "/x") as resp:
            assert resp.status == 200
    assert throttle.current_rate("/x") < RATE  # it learned on its own
