"""A Redis that holds or answers nonsense: requests fail with ``StorageError`` or wait no
longer than their limits; nothing else escapes and nothing hangs.

Two kinds of hostility: keys written by someone else into a real Redis (the realistic
threat: see SECURITY.md), and a fake Redis on loopback that answers every script with
a reply of the wrong shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio

import resilient
from resilient import (
    CircuitBreaker,
    CircuitOpenError,
    DeadlineExceeded,
    RateLimitBackoff,
    RateLimited,
    StorageError,
    Throttle,
)
from resilient.ratelimit._pause import MAX_PAUSE


@pytest.fixture
async def direct(redis_url) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_pause_written_to_end_in_the_far_future_is_refused_at_once(
    server, redis_url, direct
):
    await direct.hset(f"resilient:pause/{{{server.url}}}", "until", "1e308")
    policy = RateLimitBackoff(max_wait=10.0, storage=redis_url)
    async with aiohttp.ClientSession(middlewares=(policy,)) as session:
        with pytest.raises(RateLimited) as caught:
            await asyncio.wait_for(session.get(server.url + "/x"), 5.0)
    assert caught.value.retry_after <= MAX_PAUSE
    assert server.count() == 0


async def test_a_circuit_written_open_forever_waits_at_most_open_for(server, redis_url, direct):
    key = f"resilient:breaker/{{{server.url}}}"
    await direct.hset(key, mapping={"state": 1, "epoch": 7, "until": "1e308"})
    policy = CircuitBreaker(open_for=30.0, storage=redis_url)
    async with aiohttp.ClientSession(middlewares=(policy,)) as session:
        with pytest.raises(CircuitOpenError) as caught:
            await session.get(server.url + "/x")
    assert caught.value.retry_after <= 30.0
    assert server.count() == 0


async def test_a_quota_window_full_of_future_slots_waits_no_longer_than_the_deadline(
    server, redis_url, direct
):
    window = f"resilient:LIMITER/resilient-throttle/{{{server.url}}}/2/1/second"
    await direct.lpush(window, "1e308", "1e308")
    policy = Throttle(100.0, quotas="2/second", storage=redis_url)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession(middlewares=(policy,)) as session:
        with pytest.raises(DeadlineExceeded):
            with resilient.deadline(2.5):
                await session.get(server.url + "/x")
    assert loop.time() - started < 2.5 + 1.0  # each wait is capped at the window (1 s)
    assert server.count() == 0


@pytest.mark.parametrize("policy", ["throttle", "pause", "breaker"])
async def test_a_key_of_the_wrong_type_is_a_storage_error(server, redis_url, direct, policy):
    name = {
        "throttle": f"resilient:throttle/{{{server.url}}}/flying",
        "pause": f"resilient:pause/{{{server.url}}}",
        "breaker": f"resilient:breaker/{{{server.url}}}",
    }[policy]
    await direct.set(name, "not a hash")
    made = {
        "throttle": Throttle(100.0, quotas="2/second", storage=redis_url),
        "pause": RateLimitBackoff(storage=redis_url),
        "breaker": CircuitBreaker(storage=redis_url),
    }[policy]
    async with aiohttp.ClientSession(middlewares=(made,)) as session:
        with pytest.raises(StorageError, match="ResponseError"):
            await session.get(server.url + "/x")
    assert server.count() == 0


class NonsenseRedis:
    """Speaks just enough RESP: +OK to connection set-up, ``reply`` to every script."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readline()
                if not header.startswith(b"*"):
                    return
                words = []
                for _ in range(int(header[1:])):
                    size = int((await reader.readline())[1:])
                    words.append((await reader.readexactly(size + 2))[:-2])
                scripted = words[0].upper() in (b"EVALSHA", b"EVAL")
                writer.write(self.reply if scripted else b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return
        finally:
            writer.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"$3\r\nnan\r\n",  # a NaN duration
        b"$4\r\n-inf\r\n",
        b"*2\r\n$6\r\nsoon!!\r\n:9\r\n",  # a wait that is not a number, a window that is not
        b"*1\r\n:5\r\n",  # an array too short
        b":42\r\n",  # a number where an array belongs
        b"*3\r\n$7\r\nmaybe??\r\n:1\r\n:1\r\n",  # an unknown verdict
    ],
    ids=["nan", "-inf", "words", "short", "number", "verdict"],
)
@pytest.mark.parametrize("policy", ["throttle", "pause", "breaker"])
async def test_a_malformed_reply_is_a_storage_error(server, reply, policy):
    fake = NonsenseRedis(reply)
    url = await fake.start()
    made = {
        "throttle": Throttle(100.0, quotas="2/second", storage=url),
        "pause": RateLimitBackoff(max_wait=5.0, storage=url),
        "breaker": CircuitBreaker(storage=url),
    }[policy]
    try:
        async with aiohttp.ClientSession(middlewares=(made,)) as session:
            try:
                async with asyncio.timeout(10.0):
                    async with session.get(server.url + "/x") as resp:
                        status: int | str = resp.status
            except aiohttp.ClientError as exc:
                status = type(exc).__name__
    finally:
        fake.close()
    # nonsense is refused (StorageError); a bare number too (the pause's admission is a
    # verdict with its numbers, never a bare number)
    assert status == "StorageError"
    assert server.count() == 0
