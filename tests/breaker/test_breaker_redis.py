"""The shared breaker's round trips (storage/_breaker.py) on a real ``redis-server``.

A caller waits for Redis only when this process does not know its key: an answer
"closed" is trusted for ``CLOSED_LEASE``, "open" until the break ends; outcomes go in the
background (successes batched, a failure at once, and the key's next caller waits for its
answer). Redis's own counters (``INFO commandstats``) count the scripts run. The batch
format is checked against the Python state machine (``Circuit.record_runs``).

Breakers are called in-process (``await breaker(request, handler)``) with a stand-in
request and response, so nothing but Redis is awaited.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_server import evalsha_calls

from resilient import CircuitBreaker, CircuitOpenError
from resilient.breaker._circuit import BUCKETS, NEVER, Circuit, Settings
from resilient.breaker._redis import CLOSED_LEASE, RECORD_FLUSH, RedisCircuits

pytestmark = pytest.mark.timeout(60)

KEY = "k"


def _breaker(url: str, **options: Any) -> CircuitBreaker:
    options.setdefault("key", lambda request: KEY)
    return CircuitBreaker(storage=url, **options)


async def ok(request: Any) -> Any:
    return SimpleNamespace(status=200)


async def down(request: Any) -> Any:
    return SimpleNamespace(status=503)


def _request() -> Any:
    return SimpleNamespace(loop=asyncio.get_running_loop())


async def _call(breaker: CircuitBreaker, handler: Any) -> int | str:
    try:
        return int((await breaker(_request(), handler)).status)
    except CircuitOpenError:
        return "CircuitOpenError"


async def test_a_key_known_closed_costs_no_round_trip_on_the_callers_path(redis_url):
    breaker = _breaker(redis_url)
    assert await _call(breaker, ok) == 200  # connected, script loaded, closed: leased
    await breaker._shared.drain()  # type: ignore[union-attr]
    before = await evalsha_calls(redis_url)
    assert [await _call(breaker, ok) for _ in range(200)] == [200] * 200
    assert await evalsha_calls(redis_url) == before  # not one script on a caller's path
    await breaker._shared.drain()  # type: ignore[union-attr]
    assert await evalsha_calls(redis_url) == before + 1  # the 200 successes, in one batch


async def test_a_busy_healthy_key_renews_its_lease_in_the_background(redis_url, monkeypatch):
    asked = 0
    ask = RedisCircuits.ask

    async def counted(self: RedisCircuits, key: str, request: Any) -> Any:
        nonlocal asked
        asked += 1
        return await ask(self, key, request)

    monkeypatch.setattr(RedisCircuits, "ask", counted)
    breaker = _breaker(redis_url)
    assert await _call(breaker, ok) == 200  # connected, script loaded
    await breaker._shared.drain()  # type: ignore[union-attr]
    await asyncio.sleep(CLOSED_LEASE)  # the lease is over
    asked = 0
    loop = asyncio.get_running_loop()
    until = loop.time() + 5 * CLOSED_LEASE
    calls = 0
    while loop.time() < until:
        assert await _call(breaker, ok) == 200
        calls += 1
        await asyncio.sleep(0.002)
    await breaker._shared.drain()  # type: ignore[union-attr]
    assert asked == 1  # the first call only: each batch's answer renewed the lease
    assert calls > 50


async def test_a_failure_is_news_the_next_caller_waits_for_instead_of_asking(redis_url):
    breaker = _breaker(redis_url, consecutive_failures=2)
    assert await _call(breaker, ok) == 200
    await breaker._shared.drain()  # type: ignore[union-attr]
    before = await evalsha_calls(redis_url)
    assert await _call(breaker, down) == 503  # sent at once, in the background
    assert await _call(breaker, down) == 503  # waited for the first one's answer
    assert await _call(breaker, ok) == "CircuitOpenError"  # the trip, seen at once here
    assert await evalsha_calls(redis_url) == before + 2  # the two failures, nothing else


async def test_an_open_key_is_refused_here_without_asking_redis(redis_url):
    breaker = _breaker(redis_url, consecutive_failures=2, open_for=30.0)
    for _ in range(2):
        await _call(breaker, down)
    await breaker._shared.drain()  # type: ignore[union-attr]
    before = await evalsha_calls(redis_url)
    refused = [await _call(breaker, ok) for _ in range(100)]
    assert refused == ["CircuitOpenError"] * 100
    assert await evalsha_calls(redis_url) == before


async def test_a_trip_by_another_process_is_seen_within_the_lease(redis_url):
    mine = _breaker(redis_url)
    other = _breaker(redis_url, consecutive_failures=2, open_for=30.0)
    assert await _call(mine, ok) == 200  # closed: trusted for the lease
    for _ in range(2):
        await _call(other, down)
    await other._shared.drain()  # type: ignore[union-attr]
    loop = asyncio.get_running_loop()
    tripped = loop.time()
    while await _call(mine, ok) == 200:
        await asyncio.sleep(0.005)
    assert loop.time() - tripped <= CLOSED_LEASE + RECORD_FLUSH


async def test_probes_that_succeed_one_by_one_close_the_circuit_together(redis_url):
    """``half_open_probes=2``: each probe's success goes alone (news); the first is kept
    in Redis (found by the model test: it was counted, then not saved)."""
    breaker = _breaker(redis_url, consecutive_failures=1, open_for=0.1, half_open_probes=2)
    store = breaker._shared
    assert store is not None
    await _call(breaker, down)
    await store.drain()
    await asyncio.sleep(0.15)
    request = _request()
    first = store.admit(KEY, request) or await store.ask(KEY, request)
    second = store.admit(KEY, request) or await store.ask(KEY, request)
    assert first.probe
    assert second.probe
    store.record(first, False, request.loop.time())
    await store.drain()
    assert (await store.read(KEY))[0] == "half_open"
    store.record(second, False, request.loop.time())
    await store.drain()
    assert (await store.read(KEY))[0] == "closed"


@pytest.mark.parametrize("consecutive", [3, None])
async def test_a_batch_trips_where_its_outcomes_one_by_one_would(redis_url, consecutive):
    """Successes wait for the flush; failures go at once, each batch in order: the run
    of failures counts as if each outcome went alone (a success ends it)."""
    breaker = _breaker(redis_url, consecutive_failures=consecutive, min_calls=100)
    await _call(breaker, ok)
    for handler in (down, down, ok, down, down, ok, down, down):
        await _call(breaker, handler)
    await breaker._shared.drain()  # type: ignore[union-attr]
    state = (await breaker._shared.read(KEY))[0]  # type: ignore[union-attr]
    assert state == "closed"  # never 3 in a row
    await _call(breaker, down)
    await breaker._shared.drain()  # type: ignore[union-attr]
    state = (await breaker._shared.read(KEY))[0]  # type: ignore[union-attr]
    assert state == ("open" if consecutive else "closed")


# --- the Lua batch is the Python batch ------------------------------------------------


async def _lua_batch(url: str, settings: Settings, batches: list[list[int]]) -> tuple[Any, ...]:
    """Send each batch (runs of one closed epoch: the epoch current when it is sent) to a
    fresh key; the hash's state, streak and counts after the last, and every change."""
    breaker = _breaker(
        url,
        failure_ratio=settings.failure_ratio,
        min_calls=settings.min_calls,
        window=settings.width * BUCKETS,
        open_for=settings.open_for,
        consecutive_failures=None if settings.consecutive == NEVER else settings.consecutive,
    )
    store = breaker._shared
    assert store is not None
    direct = redis.asyncio.Redis.from_url(url)
    try:
        await direct.delete(f"resilient:breaker/{{{KEY}}}")
        request = _request()
        changes: list[str] = []
        for runs in batches:
            ticket = store.admit(KEY, request) or await store.ask(KEY, request)
            _, _, _, done = await store._run(
                KEY, "record", store._outcome, 1, ticket.epoch, 0, len(runs), *runs
            )
            changes += [change for change, _, _ in done]
            if changes and changes[-1] == "opened":
                break
        h = {
            k.decode(): v.decode()
            for k, v in (await direct.hgetall(f"resilient:breaker/{{{KEY}}}")).items()
        }
        calls = sum(int(h.get(f"n{i}", "0")) for i in range(BUCKETS))
        fails = sum(int(h.get(f"f{i}", "0")) for i in range(BUCKETS))
        return int(h["state"]), int(h["streak"]), calls, fails, changes
    finally:
        await direct.aclose()
        await store.store.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.lists(st.integers(0, 5), max_size=8), min_size=1, max_size=4),
    ratio=st.sampled_from([0.1, 0.5, 0.75, 1.0]),
    min_calls=st.integers(1, 8),
    consecutive=st.sampled_from([1, 3, NEVER]),
)
def test_the_lua_counts_a_batch_as_the_python_circuit(
    redis_url, batches, ratio, min_calls, consecutive
):
    settings = Settings(ratio, min_calls, 30.0, 1, 100.0, consecutive, 30.0)
    lua = asyncio.run(_lua_batch(redis_url, settings, batches))
    circuit = Circuit(KEY, settings)
    changes: list[str] = []
    for runs in batches:
        changes += circuit.record_runs(1000.0, circuit.epoch, runs)
        if changes and changes[-1] == "opened":
            break
    python = (circuit.state, circuit.streak, circuit.calls, circuit.fails, changes)
    assert lua == python
