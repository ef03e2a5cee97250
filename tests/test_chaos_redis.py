"""Chaos soak with shared state: three clients on one Redis, faults, a server restart
and a Redis restart, in real time.

The same seeded fault plan as ``test_chaos.py`` (503, 500, 429 with valid and garbage
``Retry-After``, connections dropped before and after processing, slow replies, a
server restart), but the four policies of each of three clients (three
``ClientSession``s with their own policy instances and connectors: three Redis clients,
as three processes would be) share their quota windows, pauses and circuits through a
real ``redis-server``, which is killed and restarted midway. ``on_storage_error=
"allow"`` keeps the calls going on local state while Redis is down.

Real time: Redis keeps time on its own clock, so delays are scaled down (server
latency 5 ms, pauses and backoffs under 0.5 s) instead of fast-forwarded.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from redis_server import new_redis_server
from test_chaos import Chaos, Job, chaos_middleware, make_jobs, run_job

import resilient
from resilient import sage
from resilient.testing import RedisServer, SimulatedAPI

SEED = 20_261_123
CALLS = 900
CLIENTS = 3
CONCURRENCY = 60
POOL = 10
READ_TIMEOUT = 1.0
SOAK_LIMIT = 60.0
"""Seconds the soak may take; beyond it the test fails as hung."""
REDIS_DOWN = 0.5


def shared_policies(url: str) -> tuple[resilient.Policy, ...]:
    key, shared = sage.by_business, {"storage": url, "on_storage_error": "allow"}
    return (
        resilient.Retry(attempts=4, backoff=resilient.FullJitter(0.02, 0.2)),
        resilient.CircuitBreaker(
            failure_ratio=0.5, min_calls=20, window=2.0, open_for=0.25, key=key, **shared
        ),
        resilient.RateLimitBackoff(max_wait=5.0, base=0.02, cap=0.2, key=key, **shared),
        resilient.Throttle(2_000.0, burst=50, quotas="300/second", key=key, **shared),
    )


@dataclass
class Soak:
    outcomes: Counter[str] = field(default_factory=Counter)
    references: Counter[str] = field(default_factory=Counter)
    posts_created: int = 0
    drawn: Counter[str] = field(default_factory=Counter)
    drained: list[str] = field(default_factory=list)
    acquired_after: list[int] = field(default_factory=list)
    left_behind: set[asyncio.Task[Any]] = field(default_factory=set)
    redis_restarted: bool = False
    shared_keys: int = 0


async def soak(redis: RedisServer) -> Soak:
    tasks_before = asyncio.all_tasks()
    result = Soak()
    chaos = Chaos(random.Random(SEED + 1))
    api = SimulatedAPI(quota=None, seed=SEED)
    api.app.middlewares.append(chaos_middleware(api, chaos))
    await api.start()
    queue = list(reversed(make_jobs(random.Random(SEED))[:CALLS]))
    restart_when = len(queue) // 2
    background: list[asyncio.Task[None]] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=READ_TIMEOUT, sock_read=READ_TIMEOUT)
    clients = [shared_policies(redis.url) for _ in range(CLIENTS)]
    connectors = [aiohttp.TCPConnector(limit=POOL) for _ in range(CLIENTS)]
    sessions = [
        resilient.session(*policies, connector=connector, timeout=timeout)
        for policies, connector in zip(clients, connectors, strict=True)
    ]

    async def restarts() -> None:
        redis.stop()
        await asyncio.gather(api.restart(downtime=0.3), asyncio.sleep(REDIS_DOWN))
        redis.start()
        result.redis_restarted = True

    try:

        async def worker(n: int) -> None:
            session = sessions[n % CLIENTS]
            while queue:
                job = queue.pop()
                if len(queue) == restart_when:
                    background.append(asyncio.create_task(restarts()))
                outcome, wait = await run_job(session, api.url, job)
                result.outcomes[outcome] += 1
                if job.method == "POST" and outcome == "201":
                    result.posts_created += 1
                if wait:
                    await asyncio.sleep(min(wait, 0.5))

        async with asyncio.timeout(SOAK_LIMIT):
            await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
            await asyncio.gather(*background)
        chaos.active = False
        drain = Job("GET", "/contacts/1", "drain-check")
        for session in sessions:
            async with asyncio.timeout(10.0):
                outcomes = await asyncio.gather(
                    *(run_job(session, api.url, drain) for _ in range(2 * POOL))
                )
            result.drained += [outcome for outcome, _ in outcomes]
        for policies in clients:  # background landings reach Redis before we look
            throttle = policies[-1]
            await throttle._quotas.drain()  # type: ignore[attr-defined]
        result.acquired_after = [len(c._acquired) for c in connectors]  # no public count
        result.shared_keys = len(await _keys(redis.url))
    finally:
        for session in sessions:
            await session.close()
        await api.close()
    await asyncio.sleep(3 * READ_TIMEOUT)  # slow server handlers end
    result.left_behind = {
        t for t in asyncio.all_tasks() - tasks_before if t is not asyncio.current_task()
    }
    result.drawn = chaos.drawn
    result.references = Counter(str(i.get("reference")) for i in api.invoices)
    return result


async def _keys(url: str) -> list[bytes]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        return [k async for k in client.scan_iter("resilient:*")]
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def soaked() -> Iterator[Soak]:
    redis = new_redis_server()
    redis.start()
    try:
        yield asyncio.run(soak(redis))
    finally:
        redis.stop()


def test_shared_soak_completes_every_call_with_a_response_or_a_client_error(soaked):
    assert soaked.outcomes.total() == CALLS
    assert [o for o in soaked.outcomes if o.startswith("ESCAPED")] == []


def test_shared_soak_processes_no_post_twice(soaked):
    assert {ref: n for ref, n in soaked.references.items() if n > 1} == {}
    assert soaked.references.total() >= soaked.posts_created > 0


def test_shared_soak_leaks_no_connection_and_no_task(soaked):
    assert soaked.drained == ["200"] * (2 * POOL * CLIENTS)
    assert soaked.acquired_after == [0] * CLIENTS
    assert soaked.left_behind == set()


def test_shared_soak_used_redis_through_its_restart(soaked):
    assert soaked.redis_restarted
    assert soaked.shared_keys > 0  # written after the restart: Redis was used again
    assert {"429 valid", "429 garbage", "drop_after", "503"} <= set(soaked.drawn)
