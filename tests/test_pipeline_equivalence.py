"""The pipeline changes nothing but the cost: the policies of a chain as one
:class:`~resilient._pipeline.Pipeline` (``chain()``: each policy's fast path, handing over
to its slow path on a wait, a 429, a retry) and as one ordinary middleware each
(``_chain.ordered()``: each policy run whole) give the same results, the same requests
on the wire at the same times, the same events and the same state, whatever the server
answers. Three chains: the default four policies, a Sage-like one, and a hedged one.

Hypothesis draws the callers (when each starts, GET or POST) and what the server
answers each caller's attempts: 200, 500, 503, 429 with or without ``Retry-After``, a
dropped connection, a slow 200, an advertised limit nearly spent. Both runs are in
virtual time (looptime), start on the same phase of every time window, and draw the
same jitter (``random`` seeded alike).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import Reply, delayed, drop_connection, reply

import resilient
from resilient import (
    CircuitBreaker,
    ConcurrencyLimit,
    Hedge,
    RateLimitBackoff,
    Retry,
    Throttle,
)
from resilient._chain import ordered
from resilient._pipeline import Pipeline

ALIGN, OFFSET = 1000.0, 0.000123
"""Both runs start ``OFFSET`` after a multiple of ``ALIGN`` (loop time): every window
has the same phase, and a time a whole number of seconds after the start (a
``Retry-After``) is not on a window's edge, where float rounding at the two origins
could put it in either bucket."""


def _us(seconds: float | None) -> float | None:
    """A time or a delay to the microsecond (looptime's tick): the two runs' times are the
    same ticks seen from other origins, so they differ by float rounding only."""
    return None if seconds is None else round(seconds, 6)


def _rate(rate: float | None) -> float | None:
    """A rate to 6 significant digits (learned from times read at other origins)."""
    return None if rate is None else float(f"{rate:.6g}")


REPLIES: dict[str, Callable[[], Reply]] = {
    "200": lambda: reply(200),
    "500": lambda: reply(500),
    "503": lambda: reply(503),
    "429": lambda: reply(429),
    "429 Retry-After 1": lambda: reply(429, **{"Retry-After": "1"}),
    "429 Retry-After 3": lambda: reply(429, **{"Retry-After": "3"}),
    "dropped": lambda: drop_connection,
    "slow 200": lambda: delayed(0.35),
    "200, 1 of 10 left for 2 s": lambda: reply(
        200, **{"RateLimit-Limit": "10", "RateLimit-Remaining": "1", "RateLimit-Reset": "2"}
    ),
}

Caller = tuple[float, list[str], str]
"""When a caller starts (seconds after the run's start), the server's answers to its
attempts, in order (then 200), and its method."""

callers = st.lists(
    st.tuples(
        st.integers(0, 400).map(lambda t: t * 0.0137),  # rarely two at one instant
        st.lists(st.sampled_from(sorted(REPLIES)), max_size=4),
        st.sampled_from(["GET", "POST"]),  # a POST is not sent again after it may have landed
    ),
    min_size=1,
    max_size=14,
)


def _business(request: Any) -> str:
    """A key none of the by_host policies shares (the pipeline then passes no key)."""
    return "business"


def _default() -> tuple[Any, ...]:
    """The default chain on a small scale, so that every path is met: the breaker opens
    after 3 failures in a row, the throttle makes callers queue, the backoff pauses and
    paces."""
    return (
        Retry(attempts=3, backoff=resilient.FullJitter(base=0.2, cap=2.0)),
        CircuitBreaker(consecutive_failures=3, min_calls=4, window=2.0, open_for=0.5),
        RateLimitBackoff(max_wait=10.0),
        Throttle(8.0, burst=2),
    )


def _sage_like() -> tuple[Any, ...]:
    """``sage.policies()``'s shape: quota windows, the backoff and throttle keyed by
    business, the breaker by host; and a concurrency limit with a queue."""
    return (
        Retry(attempts=3, backoff=resilient.FullJitter(base=0.2, cap=2.0)),
        CircuitBreaker(consecutive_failures=3, min_calls=4, window=2.0, open_for=0.5),
        RateLimitBackoff(max_wait=10.0, key=_business),
        ConcurrencyLimit(2, max_queue=8),
        Throttle(8.0, burst=2, quotas="5 per 2 seconds", key=_business),
    )


def _hedged() -> tuple[Any, ...]:
    """A hedge around the default chain: a copy of a GET still unanswered after 0.2 s."""
    return (Hedge(delay=0.2), *_default())


async def _run(
    server: Any,
    policies: tuple[Any, ...],
    wrap: str,
    prefix: str,
    plan: list[Caller],
    seed: int,
) -> Any:
    """``plan`` through ``policies`` as ``wrap`` (``"chain"``: one Pipeline; ``"ordered"``:
    one middleware each): what the callers, the server and the hooks saw, times
    relative to the run's start, and each policy's state at the end."""
    middlewares = resilient.chain(*policies) if wrap == "chain" else ordered(*policies)
    assert isinstance(middlewares[0], Pipeline) == (wrap == "chain")
    for i, (_, replies, _) in enumerate(plan):
        server.script(f"{prefix}/c{i}", *(REPLIES[r]() for r in replies))
    loop = asyncio.get_running_loop()
    await asyncio.sleep(ALIGN - loop.time() % ALIGN + OFFSET)
    start = loop.time()
    random.seed(seed)
    events: list[resilient.Event] = []
    remove = resilient.add_hook(events.append)

    async def call(i: int, at: float, method: str) -> tuple[int, object, float]:
        await asyncio.sleep(at)
        try:
            async with session.request(method, f"{server.url}{prefix}/c{i}", data=b"x") as resp:
                await resp.read()
                outcome: object = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = type(exc).__name__
        return i, outcome, _us(loop.time() - start)

    try:
        async with aiohttp.ClientSession(middlewares=middlewares) as session:
            results = await asyncio.gather(
                *(call(i, at, method) for i, (at, _, method) in enumerate(plan))
            )
    finally:
        remove()
    retry, breaker, backoff, *_, throttle = (p for p in policies if not isinstance(p, Hedge))
    hedges = [p for p in policies if isinstance(p, Hedge)]
    limits = [p for p in policies if isinstance(p, ConcurrencyLimit)]
    return {
        "results": results,
        "arrivals": sorted(
            (a.path.removeprefix(prefix), _us(a.time - start))
            for a in server.arrivals
            if a.path.startswith(prefix + "/")
        ),
        "events": sorted((_fact(e, server.url + prefix) for e in events), key=repr),
        "breaker": {
            k: (c.state, c.calls, c.failures, _us(c.retry_after), c.probes)
            for k, c in breaker.stats().items()
        },
        "backoff": {
            k: (p.paused, _us(p.remaining), p.probing, p.waiting, _rate(p.rate))
            for k, p in backoff.stats().items()
        },
        "throttle": {
            k: (round(t.tokens, 6), _rate(t.rate), t.waiting, t.in_flight)
            for k, t in throttle.stats().items()
        },
        "limit": [
            {
                k: (s.limit, s.in_flight, s.waiting, s.rejected, _us(s.hold))
                for k, s in limit.stats().items()
            }
            for limit in limits
        ],
        "hedge": [
            {k: (_us(h.delay), h.samples, h.hedged, h.won) for k, h in hedge.stats().items()}
            for hedge in hedges
        ],
        "budget": retry.stats(),
    }


def _fact(event: resilient.Event, base: str) -> tuple[object, ...]:
    """What ``event`` says, its URL relative to the run's ``base`` and its delay in ticks
    (sorted by the caller: outcomes of one instant may come in either order)."""
    url, delay = (event.url or "").removeprefix(base), _us(event.delay)
    return (event.kind, event.policy, event.attempt, event.status, event.reason, url, delay)


@pytest.mark.looptime
@pytest.mark.timeout(300)
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=callers, seed=st.integers(0, 2**32 - 1))
@pytest.mark.parametrize(
    "policies", [_default, _sage_like, _hedged], ids=["default", "sage-like", "hedged"]
)
async def test_the_pipeline_behaves_as_the_policies_run_as_middlewares(
    server, policies, plan, seed
):
    run = f"/{len(server.arrivals)}"  # one server for every example: fresh paths each time
    whole = await _run(server, policies(), "ordered", run + "o", plan, seed)
    chained = await _run(server, policies(), "chain", run + "p", plan, seed)
    assert chained == whole
