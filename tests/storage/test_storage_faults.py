"""Shared-state faults of issue 14: every exception and cancellation path hands back what
it holds (a probe, a half-open slot, a quota ticket), and every release names the claim
it frees (a token), so it can never free another's.

Real ``redis-server``; a :class:`~redis_proxy.RedisProxy` between a client and Redis
withholds a reply (Redis ran the command, the answer comes late) or a command (Redis runs
it late). Real time, with pauses and breaks of a fraction of a second.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from redis_proxy import arg

import resilient.storage._redis as redis_module
from resilient import CircuitBreaker, RateLimitBackoff, Throttle
from resilient.testing import RedisServer

SHORT_TIMEOUT = 0.2
"""Seconds a storage call may take in the tests that let a reply arrive after it."""


async def _get(session: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


def _limited() -> web.Response:
    return web.Response(status=429, headers={"Retry-After": "0"})


async def limited(request: web.Request) -> web.Response:
    return _limited()


@pytest.fixture
def short_storage_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage calls give up after :data:`SHORT_TIMEOUT` (below the socket timeout, so
    redis-py does not re-send the command)."""
    monkeypatch.setattr(redis_module, "STORAGE_TIMEOUT", SHORT_TIMEOUT)


async def _until(predicate, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


# --- 1. the probe's 429 that cannot be written to Redis ---------------------------------


@pytest.mark.timeout(30)
async def test_a_probe_429_that_redis_never_records_does_not_block_the_key(
    server, redis_server: RedisServer
):
    """Redis dies while the probe is on the wire; the probe's 429 cannot be shared
    (StorageError). The key must not stay blocked for this process once Redis is back."""

    async def limited_and_redis_dies(request: web.Request) -> web.Response:
        redis_server.stop()
        return _limited()

    server.script("/p", limited, limited_and_redis_dies)
    policy = RateLimitBackoff(storage=redis_server.url, max_wait=5.0, base=0.05, cap=0.1)
    async with aiohttp.ClientSession(middlewares=(policy,)) as session:
        assert await _get(session, server.url + "/p") == "StorageError"
        assert server.count("/p") == 2  # the 429, then the probe's 429
        redis_server.start()
        assert await asyncio.wait_for(_get(session, server.url + "/p"), 3.0) == 200


@pytest.mark.timeout(30)
async def test_a_probe_cancelled_while_sharing_its_429_does_not_block_the_key(server, proxy):
    """The probe's caller is cancelled during the round trip that shares its 429: the key
    must not stay blocked for the other callers of this process."""

    async def limited_and_hold_the_pause(request: web.Request) -> web.Response:
        proxy.hold_reply(arg("pause"))  # the probe's `pause` runs; its reply is held
        return _limited()

    server.script("/p", limited, limited_and_hold_the_pause)
    policy = RateLimitBackoff(storage=proxy.url, max_wait=5.0, base=0.05, cap=0.1)
    async with aiohttp.ClientSession(middlewares=(policy,)) as session:
        caller = asyncio.ensure_future(_get(session, server.url + "/p"))
        await asyncio.wait_for(proxy.held.wait(), 3.0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        proxy.release()
        others = [_get(session, server.url + "/p") for _ in range(2)]
        assert await asyncio.wait_for(asyncio.gather(*others), 3.0) == [200, 200]


# --- 2. one probe at a time across processes --------------------------------------------


@pytest.mark.timeout(30)
async def test_a_failed_probe_release_never_frees_the_next_probe_claim(server, redis_url, proxy):
    """The failed probe's release reaches Redis after this process's next probe claimed:
    it must not free that claim, so another process never probes at the same time."""
    mine, other = RateLimitBackoff(storage=proxy.url), RateLimitBackoff(storage=redis_url)
    assert mine._shared is not None
    assert other._shared is not None
    key = server.url
    answer = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await answer.wait()
        return web.Response(text="ok")

    server.default("/p", held)
    await other._shared.pause(key, 0.0)  # paused in Redis; a probe is due now
    async with aiohttp.ClientSession(middlewares=(mine,)) as session:
        first = asyncio.ensure_future(_get(session, server.url + "/p"))
        await _until(lambda: server.count("/p") == 1)  # our probe is on the wire
        second = asyncio.ensure_future(_get(session, server.url + "/p"))
        await asyncio.sleep(0.05)  # queued behind the probe
        proxy.hold_command(arg("release"))  # the failed probe's release arrives late
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(proxy.held.wait(), 3.0)
        await asyncio.sleep(0.1)  # the second caller claims meanwhile
        proxy.release()
        await asyncio.gather(*mine._shared._tasks)  # the release reached Redis
        await _until(lambda: server.count("/p") == 2)  # the second caller probes now
        assert (await other._shared.claim(key))[0] == "busy"  # so no one else may
        answer.set()
        assert await asyncio.wait_for(second, 3.0) == 200


@pytest.mark.timeout(30)
async def test_a_claim_overtaken_by_its_release_probes_nothing(server, redis_url, proxy):
    """The caller is cancelled before its claim reaches Redis; the release gets there
    first. The claim, arriving after, must not take the probe for its lease."""
    mine, other = RateLimitBackoff(storage=proxy.url), RateLimitBackoff(storage=redis_url)
    assert mine._shared is not None
    assert other._shared is not None
    key = server.url
    await mine._shared.claim("warm-up")  # loads the scripts
    await mine._shared.admit("warm-up", 1.0, 1.0)
    await other._shared.pause(key, 0.0)  # paused in Redis; a probe is due now
    async with aiohttp.ClientSession(middlewares=(mine,)) as session:
        proxy.hold_command(arg("claim"))
        caller = asyncio.ensure_future(_get(session, server.url + "/p"))
        await asyncio.wait_for(proxy.held.wait(), 3.0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await mine._shared.drain()  # the release reached Redis first
        proxy.release()
        await asyncio.sleep(0.1)  # then the claim
    assert (await other._shared.claim(key))[0] == "probe"
    assert server.count("/p") == 0


@pytest.mark.timeout(30)
async def test_a_release_lost_on_the_way_is_sent_again_with_the_next_claim(
    server, redis_url, proxy, short_storage_timeout
):
    """A failed probe's release never reaches Redis (its claim stays, leased for minutes):
    this process's next claim of the key frees it, so the key is not blocked once Redis
    answers again; meanwhile other processes still see the claim."""
    mine = RateLimitBackoff(storage=proxy.url, max_wait=2.0)
    other = RateLimitBackoff(storage=redis_url)
    assert mine._shared is not None
    assert other._shared is not None
    key = server.url
    answer = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await answer.wait()
        return web.Response(text="ok")

    server.script("/p", held)
    await other._shared.pause(key, 0.0)
    async with aiohttp.ClientSession(middlewares=(mine,)) as session:
        first = asyncio.ensure_future(_get(session, server.url + "/p"))
        await _until(lambda: server.count("/p") == 1)  # our probe is on the wire
        proxy.hold_command(arg("release"))
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        answer.set()
        await mine._shared.drain()  # the release timed out
        proxy.drop()  # and never reaches Redis
        assert (await other._shared.claim(key))[0] == "busy"  # the lost release's claim
        assert await asyncio.wait_for(_get(session, server.url + "/p"), 3.0) == 200
    assert server.count("/p") == 2


# --- 3. the breaker's half-open slot ------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", ["cancelled", "timed_out", "overtaken"])
async def test_an_admission_that_never_answers_hands_back_its_half_open_slot(
    server, redis_url, proxy, monkeypatch, fault
):
    """The caller admitted as the half-open probe never learns it (cancelled, or the
    reply came after the storage timeout): its slot is freed at once, not after
    ``open_for``, so another process probes. ``overtaken``: the caller is cancelled
    before its admission reaches Redis, which runs it after the release: it takes no
    slot."""
    open_for = 0.6
    mine = CircuitBreaker(min_calls=2, open_for=open_for, storage=proxy.url)
    other = CircuitBreaker(min_calls=2, open_for=open_for, storage=redis_url)
    server.script("/x", 503, 503)
    async with (
        aiohttp.ClientSession(middlewares=(mine,)) as session,
        aiohttp.ClientSession(middlewares=(other,)) as other_session,
    ):
        assert [await _get(other_session, server.url + "/x") for _ in range(2)] == [503] * 2
        assert await _get(other_session, server.url + "/x") == "CircuitOpenError"
        await asyncio.sleep(open_for + 0.05)  # half-open is due
        if fault == "timed_out":
            monkeypatch.setattr(redis_module, "STORAGE_TIMEOUT", SHORT_TIMEOUT)
        if fault == "overtaken":
            proxy.hold_command(arg("admit"))  # the admission reaches Redis late
        else:
            proxy.hold_reply(arg("admit"))  # Redis admits the probe; the answer is held
        caller = asyncio.ensure_future(_get(session, server.url + "/x"))
        await asyncio.wait_for(proxy.held.wait(), 3.0)
        await asyncio.sleep(0.05)  # Redis ran the admission (unless overtaken)
        if fault == "timed_out":
            assert await caller == "StorageError"
        else:
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        if fault == "overtaken":
            await mine._shared.drain()  # type: ignore[union-attr]  # the release ran first
        proxy.release()
        await asyncio.sleep(0.05)  # a held admission has reached Redis
        loop = asyncio.get_running_loop()
        until = loop.time() + open_for / 2  # well before the slot's own time ends
        outcome = await _get(other_session, server.url + "/x")
        while outcome == "CircuitOpenError" and loop.time() < until:
            await asyncio.sleep(0.01)
            outcome = await _get(other_session, server.url + "/x")
        assert outcome == 200
    assert server.count("/x") == 3  # the two failures, then the other process's probe


# --- 4. the quota ticket of a board whose reply comes too late ----------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("held", ["reply", "command"])
async def test_a_board_that_times_out_leaves_no_ticket(
    server, redis_url, proxy, short_storage_timeout, held
):
    """StorageError after the storage timeout, and no ticket left in Redis: whether Redis
    boarded the request before the timeout (its reply held) or after (its command held,
    arriving after the ticket was taken out)."""
    throttle = Throttle(1000.0, burst=100, quotas="5/minute", storage=proxy.url)
    direct = redis.asyncio.Redis.from_url(redis_url)
    flying = f"resilient:throttle/{{{server.url}}}/flying"
    quotas = throttle._quotas
    assert quotas is not None
    try:
        async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
            assert await _get(session, server.url + "/warm") == 200  # loads the scripts
            await quotas.drain()  # type: ignore[attr-defined]
            if held == "reply":
                proxy.hold_reply(b"/flying")
            else:
                proxy.hold_command(b"/flying")
            assert await _get(session, server.url + "/x") == "StorageError"
            await quotas.drain()  # type: ignore[attr-defined]  # the ticket is taken out
            proxy.release()  # then Redis answers, or runs the held boarding
            await asyncio.sleep(0.1)
            assert await direct.zcard(flying) == 0
            for _ in range(4):  # the 4 slots left are all there
                assert await asyncio.wait_for(_get(session, server.url + "/y"), 2.0) == 200
    finally:
        await direct.aclose()
    assert server.count("/x") == 0
