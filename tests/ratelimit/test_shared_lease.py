"""The lease of a key known healthy in Redis, renewed in the background (``rate.lua``
``peek``; ``resilient/ratelimit/_redis.py``): while a busy key stays neither paused nor
paced, no caller waits for Redis; a renewal's late answer never overwrites a newer state;
a renewal that fails (Redis down) strands nothing and the callers fall back as
``on_storage_error`` says once the lease has run out.

Real ``redis-server`` behind :class:`~redis_proxy.RedisProxy` (which withholds a command
or a reply on demand), real time with short leases: the lease is loop time and a renewal's
reply is real I/O, which a virtual clock would overtake (looptime would jump to the
storage timeout while the reply is on its way).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from redis_proxy import RedisProxy, arg
from redis_server import evalsha_calls

import resilient
from resilient import RateLimitBackoff, StorageError
from resilient.ratelimit import _redis as lease_module
from resilient.ratelimit._redis import SharedPause
from resilient.testing import RedisServer

pytestmark = pytest.mark.timeout(60)

Wrap = Callable[[RateLimitBackoff], tuple[Any, ...]]


def in_chain(policy: RateLimitBackoff) -> tuple[Any, ...]:
    return resilient.chain(policy)


def whole(policy: RateLimitBackoff) -> tuple[Any, ...]:
    return (policy,)


def lease(monkeypatch: pytest.MonkeyPatch, seconds: float, ahead: float) -> None:
    """Leases of ``seconds``, renewed once less than ``ahead`` seconds are left."""
    monkeypatch.setattr(lease_module, "HEALTHY_LEASE", seconds)
    monkeypatch.setattr(lease_module, "RENEW_AHEAD", ahead)


def shared_of(policy: RateLimitBackoff) -> SharedPause:
    shared = policy._shared
    assert shared is not None
    return shared


async def close(policy: RateLimitBackoff) -> None:
    shared = shared_of(policy)
    await asyncio.wait_for(shared.drain(), 10.0)
    assert not shared._tasks
    await shared._store.close()


async def get(session: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except StorageError as exc:
        return type(exc).__name__


# --- no caller waits while the lease is renewed -----------------------------------------


@pytest.mark.parametrize("wrap", [whole, in_chain], ids=["whole", "chain"])
async def test_a_busy_healthy_key_asks_redis_once_then_only_in_the_background(
    server, redis_url, proxy, monkeypatch, wrap: Wrap
):
    """After the first call's ``admit``, every ``admit`` is withheld by the proxy: a caller
    that asked Redis would wait until the storage timeout. Callers 5 ms apart over five
    leases all answer, no ``admit`` reached the proxy, and the lease outlived its first
    end only through ``peek`` renewals (every script Redis ran since was one)."""
    lease(monkeypatch, 0.2, 0.1)
    policy = RateLimitBackoff(storage=proxy.url)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(middlewares=wrap(policy)) as session:
        assert await get(session, server.url + "/warm") == 200  # admit: healthy
        before = await evalsha_calls(redis_url)
        proxy.hold_command(arg("admit"))
        started, statuses = loop.time(), []
        while loop.time() - started < 5 * 0.2:
            statuses.append(await get(session, server.url + "/x"))
            await asyncio.sleep(0.005)
        assert not proxy.held.is_set()  # no caller asked Redis
        renewals = await evalsha_calls(redis_url) - before
        proxy.release()
    await close(policy)
    assert statuses == [200] * len(statuses)
    assert len(statuses) > 20
    assert renewals >= 4  # the lease ran 1 s past its first end: renewed every 0.1 s


async def test_callers_go_on_while_a_renewal_is_on_its_way(server, proxy, monkeypatch):
    """A renewal whose reply is withheld holds no caller up: the callers within the lease
    answer while it is on its way; its reply, once it comes, renews the lease."""
    lease(monkeypatch, 5.0, 5.0)  # renewed by the next caller; long enough not to run out
    policy = RateLimitBackoff(storage=proxy.url)
    shared = shared_of(policy)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(middlewares=in_chain(policy)) as session:
        assert await get(session, server.url + "/warm") == 200
        first = shared._healthy[server.url].until
        proxy.hold_reply(arg("peek"))
        assert await get(session, server.url + "/x") == 200  # sends the peek
        await asyncio.wait_for(proxy.held.wait(), 5.0)
        asked = loop.time()
        assert [await get(session, server.url + "/x") for _ in range(20)] == [200] * 20
        assert shared._healthy[server.url].renewing  # one renewal at a time, still out
        proxy.release()
        await asyncio.wait_for(shared.drain(), 5.0)
    renewed = shared._healthy[server.url]
    assert not renewed.renewing
    assert first < renewed.until <= asked + 5.0
    await close(policy)
    assert server.count("/x") == 21


# --- a late answer never overwrites a newer state ----------------------------------------


async def test_a_renewal_answered_after_the_key_became_paced_does_not_trust_it(
    server, redis_url, proxy, monkeypatch
):
    """The renewal's ``open`` (Redis ran it before the cut) arrives after this process saw
    a 429 and ``admit`` answered ``go`` (paced): the key stays untrusted, so its next
    caller still takes a departure slot in Redis (trusted, it would leave unpaced)."""
    lease(monkeypatch, 5.0, 5.0)  # the stale answer would be trusted for 5 s
    key = server.url
    mine = RateLimitBackoff(storage=proxy.url)
    other = RateLimitBackoff(storage=redis_url)
    shared, theirs = shared_of(mine), shared_of(other)
    loop = asyncio.get_running_loop()
    assert (await shared.admit(key, math.inf, 10.0)).verdict == "open"
    proxy.hold_reply(arg("peek"))
    assert shared.healthy(key, loop.time())  # the renewal goes out
    await asyncio.wait_for(proxy.held.wait(), 5.0)  # Redis answered "open"; withheld
    theirs.cut(key, 0, math.inf)  # another process's 429: the key is paced from now on
    await theirs.drain()
    shared.cut(key, 0, math.inf)  # a 429 here too (the same round: not news in Redis)
    assert not shared.healthy(key, loop.time())
    assert (await shared.admit(key, math.inf, 10.0)).verdict == "go"
    proxy.release()  # the stale "open" comes now
    await asyncio.wait_for(shared.drain(), 5.0)
    assert not shared.healthy(key, loop.time())
    assert (await shared.admit(key, math.inf, 10.0)).verdict == "go"
    await close(mine)
    await close(other)


async def test_an_admit_answered_open_after_a_paced_answer_does_not_trust_the_key(
    server, redis_url, proxy, monkeypatch
):
    """Two callers ask at once; the first one's ``open`` (Redis ran it before another
    process's cut) arrives after the second one's ``go``: the key is not trusted."""
    lease(monkeypatch, 5.0, 0.0)  # the stale answer would be trusted for 5 s
    key = server.url
    mine = RateLimitBackoff(storage=proxy.url)
    other = RateLimitBackoff(storage=redis_url)
    shared, theirs = shared_of(mine), shared_of(other)
    loop = asyncio.get_running_loop()
    proxy.hold_reply(arg("admit"))
    early = asyncio.ensure_future(shared.admit(key, math.inf, 10.0))
    await asyncio.wait_for(proxy.held.wait(), 5.0)  # Redis answered "open"; withheld
    theirs.cut(key, 0, math.inf)
    await theirs.drain()
    assert (await shared.admit(key, math.inf, 10.0)).verdict == "go"  # another connection
    proxy.release()
    assert (await early).verdict == "open"  # the stale answer, last
    assert not shared.healthy(key, loop.time())
    assert (await shared.admit(key, math.inf, 10.0)).verdict == "go"
    await close(mine)
    await close(other)


# --- Redis down during a renewal ---------------------------------------------------------


@pytest.mark.parametrize("on_error", ["allow", "raise"])
async def test_redis_down_during_a_renewal_strands_nothing_and_callers_fall_back(
    server, redis_server: RedisServer, monkeypatch, on_error: str
):
    """The renewal's command is lost with Redis: it fails (StorageError, in the
    background), nothing is left renewing or in the background, the callers go on until
    the lease ends, then fall back (``allow``: sent; ``raise``: StorageError, nothing
    sent); once Redis is back, the key is leased and renewed again."""
    lease(monkeypatch, 0.3, 0.3)  # the next caller renews
    proxy = RedisProxy(redis_server.port)
    await proxy.start()
    policy = RateLimitBackoff(storage=proxy.url, on_storage_error=on_error)  # type: ignore[arg-type]
    shared = shared_of(policy)
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession(middlewares=in_chain(policy)) as session:
            assert await get(session, server.url + "/warm") == 200
            ends = shared._healthy[server.url].until
            proxy.hold_command(arg("peek"))
            assert await get(session, server.url + "/x") == 200  # sends the renewal
            await asyncio.wait_for(proxy.held.wait(), 5.0)
            redis_server.stop()
            proxy.drop()  # the renewal never reaches Redis
            await asyncio.wait_for(shared.drain(), 5.0)
            held = shared._healthy[server.url]
            assert not held.renewing  # failed ...
            assert held.until == ends  # ... and renewed nothing
            assert not shared._tasks
            if loop.time() < ends:  # within the lease: no caller asks (Redis is down)
                assert await get(session, server.url + "/x") == 200
            await asyncio.sleep(max(0.0, ends - loop.time()) + 0.01)
            sent = server.count("/y")
            fallen = await get(session, server.url + "/y")
            assert fallen == (200 if on_error == "allow" else "StorageError")
            assert server.count("/y") == sent + (on_error == "allow")
            redis_server.start()
            assert await get(session, server.url + "/z") == 200  # asks again: leased
            assert shared.healthy(server.url, loop.time())
    finally:
        await close(policy)
        await proxy.close()


async def test_a_renewal_answered_after_the_storage_timeout_is_dropped(server, proxy, monkeypatch):
    """The renewal's reply comes after the storage timeout: the renewal failed (nothing
    renewing, nothing in the background), the reply lands on nobody, and the lease runs
    out at its own end; the next caller asks again."""
    lease(monkeypatch, 0.3, 0.3)
    monkeypatch.setattr("resilient.storage._redis.STORAGE_TIMEOUT", 0.05)
    policy = RateLimitBackoff(storage=proxy.url)
    shared = shared_of(policy)
    async with aiohttp.ClientSession(middlewares=in_chain(policy)) as session:
        assert await get(session, server.url + "/warm") == 200
        ends = shared._healthy[server.url].until
        proxy.hold_reply(arg("peek"))
        assert await get(session, server.url + "/x") == 200
        await asyncio.wait_for(proxy.held.wait(), 5.0)
        await asyncio.wait_for(shared.drain(), 5.0)  # timed out
        held = shared._healthy[server.url]
        assert not held.renewing
        assert held.until == ends
        proxy.release()  # the reply comes late, to a closed connection
        await asyncio.sleep(0.05)
        assert shared._healthy[server.url].until == ends
    await close(policy)


async def test_a_cancelled_renewal_holds_nothing_and_the_next_caller_renews(
    server, proxy, monkeypatch
):
    """The renewal is cancelled while its reply is withheld (the loop shutting down, say):
    nothing is left renewing or in the background, the lease is as it was, and the next
    caller within it sends a new renewal, whose answer renews it."""
    lease(monkeypatch, 5.0, 5.0)
    policy = RateLimitBackoff(storage=proxy.url)
    shared = shared_of(policy)
    async with aiohttp.ClientSession(middlewares=in_chain(policy)) as session:
        assert await get(session, server.url + "/warm") == 200
        ends = shared._healthy[server.url].until
        proxy.hold_reply(arg("peek"))
        assert await get(session, server.url + "/x") == 200
        await asyncio.wait_for(proxy.held.wait(), 5.0)
        (renewal,) = shared._tasks
        renewal.cancel()
        await asyncio.gather(renewal, return_exceptions=True)
        held = shared._healthy[server.url]
        assert not held.renewing
        assert held.until == ends
        assert not shared._tasks
        proxy.release()
        assert await get(session, server.url + "/x") == 200  # renews again
        await asyncio.wait_for(shared.drain(), 5.0)
        assert shared._healthy[server.url].until > ends
    await close(policy)
