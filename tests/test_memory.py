"""Bounded memory: per-key state stays bounded for unbounded key sets, and 10,000 callers
parked behind one pause cost a bounded amount each.

The key-set tests call the middlewares in-process (``await policy(request, handler)``)
with one real :class:`aiohttp.ClientRequest` and real, pre-fetched
:class:`aiohttp.ClientResponse` objects, like ``benchmarks/scenarios/inprocess.py``; the
key function returns a fresh key for every call.

- Each keyed policy gets 30,000 distinct keys with ``max_keys=1_000``, traced by
  ``tracemalloc`` from an empty map: the map never holds more than ``max_keys``
  entries and the traced peak stays below ``max_keys × BYTES_PER_KEY + SLACK``.
- One long run sends distinct keys through the full chain (every 20th key gets a 429,
  so pause state is created too) with the default ``max_keys=10_000``: no map ever
  exceeds ``max_keys`` and the process's peak RSS does not grow once the maps are full.
  It sends 1,000,000 keys (the issue's count: every policy of the chain sees each of
  them; a new key costs about 20 µs through the whole chain, about 22 s in all);
  ``RESILIENT_MEMORY_KEYS=200000`` runs a shorter one while you work.

Bound: a policy holds at most ``max_keys`` keys plus those that are not idle (waiters,
an unfinished pause or open circuit, a Throttle bucket not yet refilled), each at most
``BYTES_PER_KEY`` bytes (key string included).
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import tracemalloc
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, web

import resilient
from resilient._state import DEFAULT_MAX_KEYS

SMALL_MAX_KEYS = 1_000
SMALL_KEYS = 30_000
LONG_KEYS = int(os.environ.get("RESILIENT_MEMORY_KEYS", "1000000"))
CHECK_EVERY = 5_000
PAUSE = 120.0
"""Retry-After (seconds) of the 429 that parks 10,000 callers."""

BYTES_PER_KEY = {"CircuitBreaker": 800, "Throttle": 1_200, "RateLimitBackoff": 1_700}
"""Documented upper bound of the state one key holds (key string included), per policy.
Measured (CPython 3.11, 64-bit): about 600, 1,010 and 1,500 bytes (Throttle's and
RateLimitBackoff's include an empty ``deque`` for their waiters; every key of the
RateLimitBackoff run met a 429, so it also holds its learned rate, about 550 bytes)."""
SLACK = 256 * 1024
"""Bytes of traced memory allowed beyond the full map (eviction's scratch list, the
loop's own allocations)."""
RSS_GROWTH = 16 * 1024 * 1024
"""Bytes the long run's peak RSS may grow by once every map is full (a leak of 100 bytes
per call would add 16 MB over 160,000 calls)."""


class Keys:
    """A key function that returns ``key-<n>`` for the current call number ``n``."""

    def __init__(self) -> None:
        self.n = 0
        self.current = "key-0"

    def next(self) -> None:
        self.n += 1
        self.current = f"key-{self.n}"

    def __call__(self, request: ClientRequest) -> str:
        return self.current


async def prefetch(url: str) -> tuple[ClientRequest, ClientResponse]:
    """One real request and its real response (read, released), captured by a middleware."""
    captured: dict[str, Any] = {}

    async def grab(req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        resp = await handler(req)
        captured["req"], captured["resp"] = req, resp
        return resp

    async with aiohttp.ClientSession(middlewares=(grab,)) as s, s.get(url) as resp:
        await resp.read()
    return captured["req"], captured["resp"]


@pytest.fixture
async def exchange(server) -> dict[str, Any]:
    """``{"request": ..., "ok": 200 response, "429": 429 response (Retry-After: 0),
    "pause": 429 response (Retry-After: PAUSE)}``."""

    async def too_many(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "0"})

    async def paused(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": f"{PAUSE:g}"})

    server.default("/429", too_many)
    server.default("/pause", paused)
    request, ok = await prefetch(server.url + "/ok")
    _, limited = await prefetch(server.url + "/429")
    _, pause = await prefetch(server.url + "/pause")
    return {"request": request, "ok": ok, "429": limited, "pause": pause}


def handler_for(exchange: dict[str, Any], keys: Keys, every: int) -> ClientHandlerType:
    """Answers 200, except the first attempt of every ``every``-th key: 429 (Retry-After 0),
    so RateLimitBackoff pauses that key and sends one probe (which gets the 200)."""
    ok, limited = exchange["ok"], exchange["429"]
    limited_key = [""]

    async def handler(request: ClientRequest) -> ClientResponse:
        if every and keys.n % every == 0 and limited_key[0] != keys.current:
            limited_key[0] = keys.current
            return limited  # type: ignore[no-any-return]
        return ok  # type: ignore[no-any-return]

    return handler


def keyed_policies(keys: Keys, max_keys: int) -> dict[str, Any]:
    return {
        "CircuitBreaker": resilient.CircuitBreaker(key=keys, max_keys=max_keys),
        "Throttle": resilient.Throttle(1e9, key=keys, max_keys=max_keys),
        "RateLimitBackoff": resilient.RateLimitBackoff(key=keys, max_keys=max_keys),
    }


def state_of(policy: Any) -> Any:
    """The policy's per-key map (a ``KeyedState``)."""
    for name in ("_circuits", "_states", "_gates"):
        if hasattr(policy, name):
            return getattr(policy, name)
    raise AssertionError(f"no keyed state on {policy!r}")


async def drive(
    call: Callable[[ClientRequest], Any],
    request: ClientRequest,
    keys: Keys,
    n: int,
    maps: list[Any],
) -> int:
    """``n`` calls with ``n`` fresh keys; the largest size any map reached at a check."""
    largest = 0
    for i in range(n):
        keys.next()
        await call(request)
        if i % CHECK_EVERY == 0 or i == n - 1:
            largest = max(largest, *(len(m) for m in maps))
    return largest


@pytest.mark.parametrize("name", ["CircuitBreaker", "Throttle", "RateLimitBackoff"])
async def test_policy_state_stays_within_max_keys_and_its_memory_bound(exchange, name):
    keys = Keys()
    policy = keyed_policies(keys, SMALL_MAX_KEYS)[name]
    handler = handler_for(exchange, keys, every=1 if name == "RateLimitBackoff" else 0)

    async def call(request: ClientRequest) -> ClientResponse:
        return await policy(request, handler)  # type: ignore[no-any-return]

    state = state_of(policy)
    gc.collect()
    tracemalloc.start()
    try:
        largest = await drive(call, exchange["request"], keys, SMALL_KEYS, [state])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert largest <= SMALL_MAX_KEYS
    assert len(state) <= SMALL_MAX_KEYS
    assert peak <= SMALL_MAX_KEYS * BYTES_PER_KEY[name] + SLACK


@pytest.mark.timeout(240)
async def test_many_keys_through_the_full_chain_keep_every_map_bounded(exchange):
    keys = Keys()
    policies = keyed_policies(keys, DEFAULT_MAX_KEYS)
    chain = resilient.chain(resilient.Retry(), *policies.values())
    handler = handler_for(exchange, keys, every=20)
    for middleware in reversed(chain):  # aiohttp's nesting, without its wrapper objects
        handler = _wrap(middleware, handler)
    maps = [state_of(p) for p in policies.values()]
    request = exchange["request"]
    warm = min(LONG_KEYS // 5, 50_000)  # every map is full by then
    largest = await drive(handler, request, keys, warm, maps)
    rss_warm = peak_rss()
    largest = max(largest, await drive(handler, request, keys, LONG_KEYS - warm, maps))
    assert keys.n == LONG_KEYS
    assert largest <= DEFAULT_MAX_KEYS
    assert peak_rss() - rss_warm <= RSS_GROWTH


def peak_rss() -> int:
    """The process's peak resident set size, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _wrap(middleware: Any, inner: ClientHandlerType) -> ClientHandlerType:
    async def handler(request: ClientRequest) -> ClientResponse:
        return await middleware(request, inner)  # type: ignore[no-any-return]

    return handler


# --- 10,000 callers behind one pause -------------------------------------------------

WAITERS = 10_000
BYTES_PER_WAITER = 4 * 1024
"""Documented bound on what one caller parked behind a pause holds, its own task and
coroutine frames included (queue entry, future, the policy's frames). Measured: about
2.8 KB."""


@pytest.mark.looptime
async def test_ten_thousand_callers_behind_one_pause_send_one_probe_then_all_pass(exchange):
    """One 429 (Retry-After 120 s) pauses the key; 10,000 callers park behind it. None
    sends while it lasts; when it ends exactly one probe goes first, and once it is
    answered every caller is served. Memory per parked caller is bounded."""
    keys = Keys()  # one key for everyone: keys.current never changes
    backoff = resilient.RateLimitBackoff(key=keys)
    ok = exchange["ok"]
    sent: list[float] = []
    probe_answered = asyncio.Event()
    answers = iter([exchange["pause"]])
    loop = asyncio.get_running_loop()

    async def wire(request: ClientRequest) -> ClientResponse:
        sent.append(loop.time())
        resp = next(answers, ok)
        if len(sent) == 2:  # the probe: answered a little later, everyone else waits
            await asyncio.sleep(1.0)
            probe_answered.set()
        return resp  # type: ignore[no-any-return]

    async def call() -> int:
        resp = await backoff(exchange["request"], wire)
        return resp.status

    owner = asyncio.create_task(call())
    await asyncio.sleep(0)
    assert backoff.paused_for(keys.current) == pytest.approx(PAUSE)
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        callers = [asyncio.create_task(call()) for _ in range(WAITERS)]
        await asyncio.sleep(1.0)  # every caller parks
        parked, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    gate = state_of(backoff).get(keys.current)
    assert gate.waiting() == WAITERS + 1
    assert len(sent) == 1  # only the 429
    await probe_answered.wait()
    statuses = await asyncio.gather(owner, *callers)
    assert statuses == [200] * (WAITERS + 1)
    assert sent[1] == pytest.approx(sent[0] + PAUSE, abs=1e-3)  # the probe, at the end
    assert min(sent[2:]) >= sent[1] + 1.0  # the rest only once the probe was answered
    assert len(sent) == WAITERS + 2
    assert (parked - before) / WAITERS <= BYTES_PER_WAITER
