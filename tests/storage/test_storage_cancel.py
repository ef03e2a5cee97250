"""Cancellation at the Redis await points: a caller cancelled while its script's reply
is on the way leaves nothing behind in Redis (no ticket in flight, no probe held).

A proxy between the client and a real Redis passes commands at once and holds the reply
to the first command that carries a marker (``b"claim"``, a key name): the caller is
cancelled exactly there, after Redis ran its script.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio

from resilient import RateLimitBackoff, Throttle


class HoldingProxy:
    """TCP proxy to ``127.0.0.1:port``; once :meth:`hold` is armed, the reply to the first
    command containing its marker (and every later reply) waits until :meth:`release`."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.marker: bytes | None = None
        self.held = False
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    def hold(self, marker: bytes) -> None:
        self.marker = marker

    def release(self) -> None:
        self._released.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        pending: list[bool] = []  # per command sent, in order: is its reply held?

        async def upstream() -> None:
            while chunk := await reader.read(65536):
                marked = self.marker is not None and self.marker in chunk
                if marked:
                    self.marker, self.held = None, True
                pending.append(marked)
                up_writer.write(chunk)
                await up_writer.drain()

        async def downstream() -> None:
            hold = False
            while chunk := await up_reader.read(65536):
                hold = hold or (pending.pop(0) if pending else False)
                if hold:
                    await self._released.wait()
                writer.write(chunk)
                await writer.drain()

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        self._tasks.update(pumps)
        with contextlib.suppress(Exception):
            await asyncio.gather(*pumps)
        writer.close()
        up_writer.close()


@pytest.fixture
async def proxy(redis_server_session, redis_url) -> AsyncIterator[tuple[HoldingProxy, str]]:
    holding = HoldingProxy(redis_server_session.port)
    url = await holding.start()
    try:
        yield holding, url
    finally:
        holding.release()
        await holding.close()


async def _until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def _until_true(read, expected, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while await read() != expected:
            await asyncio.sleep(0.005)


async def test_a_caller_cancelled_while_boarding_leaves_no_ticket(server, redis_url, proxy):
    holding, url = proxy
    throttle = Throttle(1000.0, burst=100, quotas="5/minute", storage=url)
    direct = redis.asyncio.Redis.from_url(redis_url)
    flying = f"resilient:throttle/{{{server.url}}}/flying"
    async with aiohttp.ClientSession(middlewares=(throttle,)) as session:
        async with session.get(server.url + "/warm") as resp:  # loads the scripts
            assert resp.status == 200
        await throttle._quotas.drain()  # type: ignore[union-attr]
        holding.hold(b"/flying")  # the next board's reply is held
        caller = asyncio.ensure_future(session.get(server.url + "/x"))
        await _until(lambda: holding.held)
        await _until_true(lambda: direct.zcard(flying), 1)  # boarded in Redis
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        holding.release()
        await throttle._quotas.drain()  # type: ignore[union-attr]
        assert await direct.zcard(flying) == 0
        async with asyncio.timeout(5.0):  # the 4 slots left are all there
            for _ in range(4):
                async with session.get(server.url + "/y") as resp:
                    assert resp.status == 200
    await direct.aclose()
    assert server.count("/x") == 0


async def test_a_caller_cancelled_while_claiming_the_probe_frees_it(server, redis_url, proxy):
    holding, url = proxy
    mine = RateLimitBackoff(storage=url)
    other = RateLimitBackoff(storage=redis_url)
    assert other._shared is not None
    assert mine._shared is not None
    await mine._shared.claim("warm-up")  # loads the scripts
    await mine._shared.admit("warm-up", 1.0, 1.0)
    await other._shared.pause(server.url, 0.0)  # paused; a probe is due now
    direct = redis.asyncio.Redis.from_url(redis_url)
    key = f"resilient:pause/{{{server.url}}}"
    async with aiohttp.ClientSession(middlewares=(mine,)) as session:
        holding.hold(b"claim")  # let `check` through, hold `claim`
        caller = asyncio.ensure_future(session.get(server.url + "/x"))
        await _until(lambda: holding.held)
        await _until_true(lambda: direct.hexists(key, "probe"), True)  # we won the claim
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        holding.release()
        await asyncio.gather(*mine._shared._tasks)
    await direct.aclose()
    assert (await other._shared.claim(server.url))[0] == "probe"  # not held by the cancelled
    assert server.count("/x") == 0


async def test_a_cancellation_during_a_shared_state_call_is_never_lost(redis_url):
    """A caller cancelled at any point of a Redis call gets CancelledError: the call does
    not finish normally behind its back (redis-py's per-reply ``wait_for`` swallowed it
    on Python 3.11: 84 of 373 in a probe)."""
    from resilient.storage._redis import RedisStore

    store = RedisStore(redis_url)
    keys, args = ["test:pause/{cancel}"], ["claim", "t", 1.0]
    await store.run("ratelimit/pause", keys, args)  # connected, script loaded
    lost = 0
    try:
        for i in range(300):
            call = asyncio.ensure_future(store.run("ratelimit/pause", keys, args))
            for _ in range(i % 7):  # cancel at every stage of the round trip
                await asyncio.sleep(0)
            if call.cancel():
                try:
                    await call
                    lost += 1
                except asyncio.CancelledError:
                    pass
    finally:
        await store.close()
    assert lost == 0
