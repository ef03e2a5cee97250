"""The quota store interface (``resilient/throttle/_store.py``): the Throttle's call is
written once against it, memory and Redis are peers, and "raise, or warn and fall back"
is decided once, in the Throttle.

Real ``redis-server`` (stopped and restarted by the tests that need it); real time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from redis_proxy import RedisProxy, script
from scripted import held, until

import resilient
import resilient.storage._redis as redis_module
import resilient.throttle._redis as quota_redis
from resilient import StorageError, Throttle
from resilient.throttle import _lease
from resilient.throttle._quota import Quotas
from resilient.throttle._redis import RedisQuotas
from resilient.throttle._store import QuotaStore

pytestmark = pytest.mark.timeout(60)


async def get(session: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, resilient.ResilienceError) as exc:
        return type(exc).__name__


def test_memory_and_redis_are_two_stores_of_one_interface():
    memory = Throttle(1.0, quotas="5/second")
    shared = Throttle(1.0, quotas="5/second", storage="redis://localhost:6379/0")
    allowed = Throttle(
        1.0, quotas="5/second", storage="redis://localhost:6379/0", on_storage_error="allow"
    )
    stores: list[QuotaStore | None] = [t._quotas for t in (memory, shared, allowed)]
    assert [type(s) for s in stores] == [Quotas, RedisQuotas, RedisQuotas]
    assert (memory._fallback, shared._fallback) == (None, None)
    assert type(allowed._fallback) is Quotas  # the windows that decide while Redis fails
    assert Throttle(1.0)._quotas is None


async def test_memory_boards_at_once_and_every_ticket_is_empty():
    quotas = Quotas("2/minute")
    assert quotas.board("k", 0, 10.0) == (0.0, "")
    assert quotas.board("k", 2, 10.0) == (60.0, "quota 2 per 1 minute")  # 2 in flight
    quotas.land("k", 10.0, "")
    quotas.land("k", 11.0, "")
    assert quotas.board("k", 0, 12.0) == (58.0, "quota 2 per 1 minute")
    assert await quotas.ask("k", 0) == quotas.board("k", 0, asyncio.get_running_loop().time())


async def test_a_redis_failure_raises_a_storage_error_and_holds_nothing(server, redis_server):
    throttle = Throttle(1.0, quotas="5/second", storage=redis_server.url)
    redis_server.stop()
    async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
        assert await get(session, server.url + "/x") == "StorageError"
        stats = throttle.stats()[server.url]
        assert (stats.tokens, stats.in_flight, stats.waiting) == (1.0, 0, 0)  # token back
    assert server.count() == 0


async def test_allow_counts_in_this_process_windows_while_redis_is_down(
    server, redis_server, caplog
):
    """Redis down, ``on_storage_error="allow"``: this process's windows decide (and
    count what they let through), with a warning naming the storage."""
    caplog.set_level(logging.WARNING, logger="resilient")
    throttle = Throttle(
        1000.0, quotas="2/minute", storage=redis_server.url, on_storage_error="allow"
    )
    redis_server.stop()
    async with aiohttp.ClientSession(middlewares=resilient.chain(throttle)) as session:
        assert [await get(session, server.url + "/x") for _ in range(2)] == [200, 200]
        with resilient.deadline(1.0):  # the local window is full: 2 of 2
            assert await get(session, server.url + "/x") == "DeadlineExceeded"
        assert throttle.stats()[server.url].in_flight == 0
    assert server.count() == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings
    assert all(redis_server.url in w for w in warnings)


async def test_redis_decides_again_once_it_is_back(server, redis_server):
    throttle = Throttle(
        1000.0, quotas="3/minute", storage=redis_server.url, on_storage_error="allow"
    )
    other = Throttle(1000.0, quotas="3/minute", storage=redis_server.url)
    async with (
        aiohttp.ClientSession(middlewares=(throttle,)) as session,
        aiohttp.ClientSession(middlewares=(other,)) as others,
    ):
        redis_server.stop()
        assert await get(session, server.url + "/local") == 200  # counted here only
        redis_server.start()
        assert [await get(others, server.url + "/x") for _ in range(3)] == [200] * 3
        with resilient.deadline(1.0):  # Redis's window is full: the local one is not read
            assert await get(session, server.url + "/x") == "DeadlineExceeded"
    for t in (throttle, other):
        quotas: Any = t._quotas
        await quotas.drain()
        await quotas.store.close()


@pytest.mark.parametrize("drained", [False, True], ids=["by-itself", "at-drain"])
@pytest.mark.parametrize("lost", ["quota_land", "quota_forget"])
async def test_a_send_redis_never_got_is_sent_again(
    server, redis_server, monkeypatch, caplog, lost, drained
):
    """A background send's command is lost on the way (Redis never runs it; the call
    times out): it goes again, after its pause or at once at :meth:`RedisQuotas.drain`,
    so Redis's in-flight set is empty now, not at the tickets' 300 s lease.

    ``quota_land``: the landing of a request that went; its slot is counted in Redis's
    window once. ``quota_forget``: a boarding whose reply came too late (the caller got
    StorageError) is taken out."""
    caplog.set_level(logging.WARNING, logger="resilient")
    monkeypatch.setattr(redis_module, "STORAGE_TIMEOUT", 0.2)
    monkeypatch.setattr(redis_module, "WARN_EVERY", 0.0)
    monkeypatch.setattr(quota_redis, "SEND_AGAIN", (30.0 if drained else 0.05,))
    proxy = RedisProxy(redis_server.port)
    await proxy.start()
    direct = redis.asyncio.Redis.from_url(redis_server.url)
    throttle = Throttle(1000.0, quotas="5/minute", storage=proxy.url)
    quotas: Any = throttle._quotas
    flying = f"resilient:throttle/{{{server.url}}}/flying"
    try:
        async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
            assert await get(session, server.url + "/x") == 200  # Redis has the scripts
            await asyncio.wait_for(quotas.drain(), 5.0)
            assert await direct.zcard(flying) == 0
            if lost == "quota_forget":
                proxy.hold_reply(script("throttle/quota_board"))
            proxy.hold_command(script(f"throttle/{lost}"))
            went = await get(session, server.url + "/x")
        assert went == (200 if lost == "quota_land" else "StorageError")
        await asyncio.wait_for(proxy.held.wait(), 5.0)
        assert await direct.zcard(flying) == 1  # boarded; what takes it out is held
        async with asyncio.timeout(5.0):  # the held send timed out
            while not any("storage" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.01)
        proxy.drop()
        if drained:
            await asyncio.wait_for(quotas.drain(), 5.0)
        async with asyncio.timeout(5.0):
            while quotas._tasks:
                await asyncio.sleep(0.01)
        assert not quotas._again
        assert await direct.zcard(flying) == 0
        windows = [k async for k in direct.scan_iter("resilient:LIMITER/*")]
        counted = [await direct.llen(k) for k in windows]
        assert counted == ([2] if lost == "quota_land" else [1])  # once, in Redis
    finally:
        await quotas.drain()
        await quotas.store.close()
        await direct.aclose()
        await proxy.close()


async def test_a_landing_counts_once_here_however_often_redis_fails_to_take_it(
    server, redis_server, monkeypatch, caplog
):
    """Redis goes down while the request is on the wire: its landing fails, is sent
    again and fails each time; this process's windows count its slot once, and then
    the landing is given up (its ticket's lease frees it in Redis)."""
    caplog.set_level(logging.WARNING, logger="resilient")
    monkeypatch.setattr(quota_redis, "SEND_AGAIN", (0.01, 0.02))
    monkeypatch.setattr(redis_module, "WARN_EVERY", 0.0)
    gate = asyncio.Event()
    server.default("/x", held(gate))
    throttle = Throttle(
        1000.0, quotas="5/minute", storage=redis_server.url, on_storage_error="allow"
    )
    quotas: Any = throttle._quotas
    async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
        call = asyncio.create_task(get(session, server.url + "/x"))
        await until(lambda: server.count("/x") == 1)
        redis_server.stop()
        gate.set()
        assert await call == 200
        async with asyncio.timeout(10.0):
            while quotas._tasks:
                await asyncio.sleep(0.01)
    local: Any = throttle._fallback
    assert [len(w.slots) for w in local._windows[server.url]] == [1]
    assert not quotas._again
    assert not quotas._landed
    thens = [r.getMessage().rsplit("; ", 1)[-1] for r in caplog.records]
    assert thens[-3:] == ["the landings are sent again"] * 2 + ["given up"]


def _serve_and_send(throttle: Throttle, count: int) -> tuple[list[int | str], int]:
    """In a new event loop: serve ``/x``, send ``count`` GETs one after another through
    ``throttle``; return their outcomes and the spares it holds then (not drained)."""

    async def run() -> tuple[list[int | str], int]:
        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/x", ok)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        quotas: Any = throttle._quotas
        try:
            async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
                url = f"http://127.0.0.1:{port}/x"
                outcomes = [await get(session, url) for _ in range(count)]
            async with asyncio.timeout(5.0):  # landings and leases reached Redis
                while quotas._tasks:
                    await asyncio.sleep(0.005)
            return outcomes, quotas.spares(f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()
            # redis-py's connections belong to this loop (not drained: spares stay held)
            await quotas.store.close()

    return asyncio.run(run())


def test_a_throttle_used_in_another_event_loop_starts_afresh(redis_server_session, monkeypatch):
    """Spares, timers and background sends belong to the loop they were made in: in the
    next loop the Throttle boards anew, and what the last loop held is handed back."""
    monkeypatch.setattr(_lease, "LEASE", 30.0)  # no spare goes back by its timer meanwhile
    url = redis_server_session.url
    redis_server_session.flush()
    throttle = Throttle(1000.0, burst=1000, quotas="100000/minute", storage=url)
    first, held = _serve_and_send(throttle, 20)
    assert first == [200] * 20
    assert held > 0  # the first loop ended holding spares

    async def flying_after_the_next_loop() -> int:
        quotas: Any = throttle._quotas
        await quotas.drain()  # in this (third) loop: what was owed is sent from here
        direct = redis.asyncio.Redis.from_url(url)
        try:
            keys = [k async for k in direct.scan_iter("resilient:throttle/*/flying")]
            return sum([await direct.zcard(k) for k in keys])
        finally:
            await direct.aclose()
            await quotas.store.close()

    second, _ = _serve_and_send(throttle, 5)
    assert second == [200] * 5
    assert asyncio.run(flying_after_the_next_loop()) == 0


def test_a_store_failure_is_never_a_bare_redis_error(server):
    """The interface's one failure is StorageError (naming the storage), whatever the
    backend: here an unreachable Redis, in ``ask``."""

    async def ask() -> None:
        quotas = RedisQuotas("5/second", _store("redis://127.0.0.1:1/0"), None)
        try:
            await quotas.ask("k", 0)
        finally:
            await quotas.drain()

    with pytest.raises(StorageError, match=r"redis://127\.0\.0\.1:1/0"):
        asyncio.run(ask())


def _store(uri: str) -> Any:
    from resilient.storage._redis import RedisStore

    return RedisStore(uri)
