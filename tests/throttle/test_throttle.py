"""Throttle's token bucket against a real loopback server, in virtual time (looptime)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, web
from hypothesis import given
from hypothesis import strategies as st

import resilient
from resilient import DeadlineExceeded
from resilient.throttle._bucket import GRANT_SLACK, TokenBucket
from resilient.throttle._throttle import Throttle

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]

TICK = 1e-6
"""Tolerance (seconds) on arrival times in virtual time."""


async def get(session: aiohttp.ClientSession, url: str, throttle: Throttle) -> int:
    async with session.get(url, middlewares=(throttle,)) as resp:
        await resp.read()
        return resp.status


def times(server, path: str | None = None) -> list[float]:
    """Arrival times of ``path`` (or all), relative to the first arrival of any path."""
    t0 = server.arrivals[0].time
    return [a.time - t0 for a in server.arrivals if path is None or a.path == path]


def by_path(request: ClientRequest) -> str:
    return request.url.path


def slow(seconds: float, status: int) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=status, text="slow")

    return reply


async def started(n: int = 5) -> None:
    """Let freshly created tasks reach the throttle (a few loop iterations, no time)."""
    for _ in range(n):
        await asyncio.sleep(0)


# --- pacing and burst -------------------------------------------------------------


@pytest.mark.looptime
async def test_requests_are_spaced_one_over_rate_apart(server, client):
    throttle = Throttle(2.0)
    await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(5)))
    assert times(server) == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0], abs=TICK)


@pytest.mark.looptime
async def test_the_first_burst_requests_go_at_once(server, client):
    throttle = Throttle(1.0, burst=3)
    await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(5)))
    assert times(server) == pytest.approx([0.0, 0.0, 0.0, 1.0, 2.0], abs=TICK)


@pytest.mark.looptime
async def test_an_idle_key_refills_up_to_burst_only(server, client):
    throttle = Throttle(1.0, burst=2)
    await get(client, server.url + "/warm", throttle)
    await asyncio.sleep(100.0)  # refills 100 tokens' worth, capped at 2
    await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(4)))
    assert times(server, "/x") == pytest.approx([100.0, 100.0, 101.0, 102.0], abs=TICK)


# --- first come, first served -----------------------------------------------------


@pytest.mark.looptime
async def test_waiters_are_served_in_arrival_order(server, client):
    throttle = Throttle(1.0)
    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(get(client, f"{server.url}/{i}", throttle)))
        await asyncio.sleep(0.1)  # arrive one after the other, all before the first token
    await asyncio.gather(*tasks)
    assert [a.path for a in server.arrivals] == [f"/{i}" for i in range(6)]


@pytest.mark.looptime
async def test_a_newcomer_queues_behind_waiters_that_arrived_before_it(server, client):
    throttle = Throttle(1.0, burst=2)
    early = [asyncio.create_task(get(client, f"{server.url}/early{i}", throttle)) for i in range(4)]
    await asyncio.sleep(1.5)  # early0, early1 at 0; early2 at 1; early3 waits for 2
    late = asyncio.create_task(get(client, server.url + "/late", throttle))
    await asyncio.gather(*early, late)
    assert [a.path for a in server.arrivals][-2:] == ["/early3", "/late"]
    assert times(server, "/late") == pytest.approx([3.0], abs=TICK)


@pytest.mark.looptime
async def test_a_newcomer_does_not_overtake_a_waiter_even_when_a_token_is_there(server, client):
    # An adaptive key whose rate recovers while a waiter sleeps: a token comes due early.
    throttle = Throttle(10.0, burst=30, adaptive=True, min_rate=0.1)
    # the 429 starts a slow start at 1/s at once; the 29 answers at 0.5 raise it to 10/s
    server.script("/x", 429, *[slow(0.5, 200)] * 29)
    sent = [asyncio.create_task(get(client, server.url + "/x", throttle)) for _ in range(30)]
    await asyncio.sleep(0.1)
    assert throttle.current_rate(server.url) == 1.0
    waiter = asyncio.create_task(get(client, server.url + "/waiter", throttle))  # sleeps to 1
    await asyncio.sleep(0.5)
    assert throttle.current_rate(server.url) == 10.0  # a token has been there since 0.55
    newcomer = asyncio.create_task(get(client, server.url + "/newcomer", throttle))
    await asyncio.gather(*sent, waiter, newcomer)
    assert [a.path for a in server.arrivals][-2:] == ["/waiter", "/newcomer"]


# --- cancellation -----------------------------------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize(
    "cancelled", [(1,), (2,), (1, 2)], ids=["head", "middle", "head-and-next-together"]
)
async def test_cancelled_waiters_give_their_slots_to_the_ones_behind(server, client, cancelled):
    throttle = Throttle(1.0)
    tasks = []
    for i in range(4):  # /0 at 0; /1, /2, /3 would leave at 1, 2, 3
        tasks.append(asyncio.create_task(get(client, f"{server.url}/{i}", throttle)))
        await started()
    await asyncio.sleep(0.5)
    for i in cancelled:
        tasks[i].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(done[i], asyncio.CancelledError) for i in cancelled)
    kept = [f"/{i}" for i in range(4) if i not in cancelled]
    assert [a.path for a in server.arrivals] == kept
    assert times(server) == pytest.approx([0.0, 1.0, 2.0][: len(kept)], abs=TICK)  # moved up


@pytest.mark.looptime
async def test_the_queue_is_empty_after_all_its_waiters_are_cancelled(server, client):
    throttle = Throttle(0.1)
    await get(client, server.url + "/first", throttle)
    tasks = [asyncio.create_task(get(client, server.url + "/x", throttle)) for _ in range(3)]
    await started()
    assert throttle.waiting(server.url) == 3
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert throttle.waiting(server.url) == 0
    await asyncio.sleep(10.0)
    await get(client, server.url + "/next", throttle)
    assert times(server) == pytest.approx([0.0, 10.0], abs=TICK)


# --- keys -------------------------------------------------------------------------


@pytest.mark.looptime
async def test_keys_have_independent_buckets(server, client):
    throttle = Throttle(1.0, key=by_path)
    await asyncio.gather(
        *(get(client, server.url + path, throttle) for path in ("/a", "/b", "/a", "/b"))
    )
    assert times(server, "/a") == pytest.approx([0.0, 1.0], abs=TICK)
    assert times(server, "/b") == pytest.approx([0.0, 1.0], abs=TICK)


@pytest.mark.looptime
async def test_a_waiting_key_does_not_hold_up_another(server, client):
    throttle = Throttle(0.01, key=by_path)
    await get(client, server.url + "/slow", throttle)
    waiter = asyncio.create_task(get(client, server.url + "/slow", throttle))
    await started()
    await get(client, server.url + "/fast", throttle)
    assert times(server, "/fast") == pytest.approx([0.0], abs=TICK)
    await waiter
    assert times(server, "/slow") == pytest.approx([0.0, 100.0], abs=TICK)


async def test_idle_keys_are_forgotten_beyond_max_keys(server, client):
    throttle = Throttle(1e9, burst=1, key=by_path, max_keys=8)
    for i in range(40):
        await get(client, f"{server.url}/{i}", throttle)
    assert server.count() == 40
    assert len(throttle._states) <= 8


# --- retries and deadlines --------------------------------------------------------


class ResendOn503:
    """A minimal retrying middleware (outside the throttle): up to ``attempts`` sends."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        for _ in range(self.attempts - 1):
            resp = await handler(request)
            if resp.status != 503:
                return resp
            resp.release()
        return await handler(request)


@pytest.mark.looptime
async def test_every_retry_takes_a_token(server, client):
    server.script("/x", 503, 503)
    throttle = Throttle(0.5)
    async with client.get(server.url + "/x", middlewares=(ResendOn503(3), throttle)) as resp:
        assert resp.status == 200
    assert times(server) == pytest.approx([0.0, 2.0, 4.0], abs=TICK)


@pytest.mark.looptime
async def test_retries_through_resilient_chain_are_throttled(server):
    server.script("/x", 503, 503)
    policies = resilient.chain(
        resilient.Retry(backoff=resilient.FullJitter(base=0.001, cap=0.001), budget=None),
        Throttle(0.25),
    )
    async with (
        aiohttp.ClientSession(middlewares=policies) as session,
        session.get(server.url + "/x") as resp,
    ):
        assert resp.status == 200
    assert times(server) == pytest.approx([0.0, 4.0, 8.0], abs=1e-3)


@pytest.mark.looptime
async def test_a_wait_beyond_the_deadline_raises_without_sending(server, client):
    throttle = Throttle(1.0)
    await get(client, server.url + "/first", throttle)
    loop = asyncio.get_running_loop()
    before = loop.time()
    with resilient.deadline(0.5), pytest.raises(DeadlineExceeded):
        await get(client, server.url + "/second", throttle)
    assert loop.time() - before < TICK  # it did not sleep first
    assert server.count("/second") == 0


@pytest.mark.looptime
async def test_a_wait_within_the_deadline_is_made(server, client):
    throttle = Throttle(1.0)
    await get(client, server.url + "/first", throttle)
    with resilient.deadline(1.5):
        assert await get(client, server.url + "/second", throttle) == 200
    assert times(server) == pytest.approx([0.0, 1.0], abs=TICK)


@pytest.mark.looptime
async def test_a_queue_position_beyond_the_deadline_raises_at_once(server, client):
    throttle = Throttle(1.0)
    queued = [asyncio.create_task(get(client, server.url + "/q", throttle)) for _ in range(4)]
    await started()
    loop = asyncio.get_running_loop()
    before = loop.time()
    with resilient.deadline(2.5), pytest.raises(DeadlineExceeded):  # 4th in line: due at 4
        await get(client, server.url + "/late", throttle)
    assert loop.time() - before < TICK
    await asyncio.gather(*queued)
    assert server.count("/late") == 0
    assert server.count("/q") == 4


@pytest.mark.looptime
async def test_a_queued_waiter_gives_up_at_its_deadline_when_the_queue_slows(server, client):
    throttle = Throttle(10.0, adaptive=True)
    for _ in range(20):  # 0.0 .. 1.9: the server accepts 10/s; the next token is due at 2.0
        assert await get(client, server.url + "/warm", throttle) == 200
    loop = asyncio.get_running_loop()
    server.script("/first", slow(0.05, 429))  # cuts the rate at 2.05, after the others queued
    first = asyncio.create_task(get(client, server.url + "/first", throttle))  # leaves at 2.0
    await asyncio.sleep(0.01)
    queued = [asyncio.create_task(get(client, server.url + "/q", throttle)) for _ in range(30)]
    await started()  # due at 2.1 .. 5.0; the late one at 5.1, within its deadline (5.16)
    entered = loop.time()
    with resilient.deadline(3.25), pytest.raises(DeadlineExceeded):  # after the cut: ~5.7
        await get(client, server.url + "/late", throttle)
    assert loop.time() == pytest.approx(entered + 3.25, abs=TICK)  # not later, when it is head
    await asyncio.gather(first, *queued)
    assert server.count("/late") == 0


@pytest.mark.looptime
async def test_aiohttp_total_timeout_becomes_deadline_exceeded_not_timeout(server):
    throttle = Throttle(0.1)
    timeout = aiohttp.ClientTimeout(total=3.0)
    async with aiohttp.ClientSession(middlewares=(throttle,), timeout=timeout) as session:
        async with session.get(server.url + "/first") as resp:
            assert resp.status == 200
        with pytest.raises(DeadlineExceeded):
            await session.get(server.url + "/second")
    assert server.count() == 1


# --- logging ----------------------------------------------------------------------


@pytest.mark.looptime
async def test_a_wait_of_a_second_or_more_is_logged_at_info(server, client, caplog):
    throttle = Throttle(0.5)
    await get(client, server.url + "/first", throttle)
    with caplog.at_level(logging.INFO, logger="resilient"):
        await get(client, server.url + "/second", throttle)
    [record] = [r for r in caplog.records if r.name == "resilient"]
    assert record.levelno == logging.INFO
    assert f"throttle: rate limit on {server.url}; waiting 2.0s until" in record.getMessage()


# --- configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rate": 0}, "rate"),
        ({"rate": -1.0}, "rate"),
        ({"rate": float("inf")}, "rate"),
        ({"rate": float("nan")}, "rate"),
        ({"rate": True}, "rate"),
        ({"rate": "5"}, "rate"),
        ({"rate": 1.0, "burst": 0}, "burst"),
        ({"rate": 1.0, "burst": 2.5}, "burst"),
        ({"rate": 1.0, "burst": True}, "burst"),
        ({"rate": 1.0, "min_rate": 0.0}, "min_rate"),
        ({"rate": 1.0, "min_rate": 2.0}, "min_rate"),
        ({"rate": 1.0, "adaptive": "yes"}, "adaptive"),
        ({"rate": 1.0, "key": "host"}, "key"),
        ({"rate": 1.0, "storage": "memcached://localhost:11211"}, "storage"),
        ({"rate": 1.0, "storage": "memory"}, "storage"),
        ({"rate": 1.0, "storage": None}, "storage"),
        ({"rate": 1.0, "quotas": "200/fortnight"}, "quotas"),
        ({"rate": 1.0, "quotas": "0/second"}, "quotas"),
        ({"rate": 1.0, "quotas": "5 per 0 seconds"}, "quotas"),
        ({"rate": 1.0, "quotas": ""}, "quotas"),
        ({"rate": 1.0, "quotas": 200}, "quotas"),
        ({"rate": 1.0, "max_keys": 0}, "max_keys"),
    ],
)
def test_invalid_configuration_raises_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^Throttle: {name} must be"):
        Throttle(**kwargs)


def test_a_storage_uri_is_never_echoed():
    with pytest.raises(ValueError, match="storage") as info:
        Throttle(1.0, storage="mongodb://admin:hunter2@db.example:27017")
    assert "hunter2" not in str(info.value)


def test_repr_shows_the_configuration():
    throttle = Throttle(3.5, burst=10, quotas="200 per 60 seconds", adaptive=True)
    assert repr(throttle) == (
        "Throttle(rate=3.5, burst=10, quotas='200 per 60 seconds', key=by_host,"
        " storage='memory://', adaptive=True, min_rate=0.175)"
    )


def test_throttle_sits_innermost_in_the_chain():
    throttle = Throttle(1.0)
    assert (throttle.kind, throttle.order) == ("throttle", 40)
    (pipeline,) = resilient.chain(throttle, resilient.Retry())
    assert pipeline.policies[-1] is throttle  # type: ignore[attr-defined]


# --- the pure bucket --------------------------------------------------------------

steps = st.lists(st.tuples(st.floats(0.0, 3.0), st.booleans()), min_size=1, max_size=60)


@given(
    rate=st.floats(0.01, 1000.0),
    burst=st.integers(1, 20),
    start=st.floats(0.0, 1e6),
    steps=steps,
)
def test_a_bucket_never_grants_more_than_burst_plus_rate_times_t(rate, burst, start, steps):
    bucket = TokenBucket(rate, burst, start)
    now, grants = start, []
    for advance, retake in steps:
        now += advance / rate
        while bucket.take(now) == 0.0:
            grants.append(now)
            if not retake:
                break
    for i, first in enumerate(grants):
        for j in range(i, len(grants)):
            span = grants[j] - first
            assert j - i + 1 <= burst + rate * (span + GRANT_SLACK) + 1e-9


@given(
    rate=st.floats(0.01, 1e6),
    burst=st.integers(1, 20),
    start=st.floats(0.0, 1e6),
    taken=st.integers(1, 40),
)
def test_a_bucket_grants_at_the_time_it_names(rate, burst, start, taken):
    bucket = TokenBucket(rate, burst, start)
    now = start
    for _ in range(taken):
        delay = bucket.take(now)
        if delay:
            now += delay
            assert bucket.take(now) == 0.0


def test_a_bucket_refills_nothing_on_an_earlier_clock():
    bucket = TokenBucket(1.0, 1, 1000.0)
    assert bucket.take(1000.0) == 0.0
    assert bucket.take(5.0) == pytest.approx(1.0)  # another loop's clock: no refill, no debt
    assert bucket.take(6.0) == 0.0  # and the bucket refills from there
