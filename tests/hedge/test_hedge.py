"""Hedge against a real loopback server, in virtual time (looptime): when a copy goes,
which response wins, what happens to the loser, what is never hedged, the budget, the
learned p95."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

import resilient
from resilient import Hedge, RetryBudget
from resilient.hedge._hedge import MIN_SAMPLES, WARMUP_DELAY, WINDOW, Latencies, hedgeable, quantile

pytestmark = [pytest.mark.timeout(30)]

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


def after(seconds: float, text: str, status: int = 200) -> Reply:
    """A reply that answers ``text`` after ``seconds`` of (virtual) loop time."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=status, text=text)

    return reply


def dropped(seconds: float) -> Reply:
    """Close the connection without answering, after ``seconds``."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        assert request.transport is not None
        request.transport.close()
        raise asyncio.CancelledError

    return reply


@pytest.fixture
async def connector() -> AsyncIterator[aiohttp.TCPConnector]:
    conn = aiohttp.TCPConnector(limit=10)
    yield conn
    await conn.close()


def session_with(connector: aiohttp.TCPConnector, *policies: object) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector, connector_owner=False, middlewares=resilient.chain(*policies)
    )


async def acquired(connector: aiohttp.TCPConnector) -> int:
    """Connections the pool has handed out and not got back (aiohttp has no public count),
    once the cancelled losers ran their cleanup (cancellation lands at their next step: the
    winner is handed back at once, not after its losers)."""
    await asyncio.sleep(0.001)
    return len(connector._acquired)


async def fetch(session: aiohttp.ClientSession, url: str, method: str = "GET", **kw: object):
    async with session.request(method, url, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.text()


# --- the race -----------------------------------------------------------------------------


@pytest.mark.looptime
async def test_a_copy_goes_after_delay_and_the_first_response_wins(server, connector):
    server.script("/", after(10.0, "own"), after(0.1, "copy"))
    loop = asyncio.get_running_loop()
    async with session_with(connector, Hedge(delay=0.5)) as session:
        t0 = loop.time()
        assert await fetch(session, server.url + "/") == (200, "copy")
        assert loop.time() - t0 == pytest.approx(0.6, abs=0.01)
    first, second = server.arrivals
    assert second.time - first.time == pytest.approx(0.5, abs=0.01)


@pytest.mark.looptime
async def test_the_loser_is_cancelled_and_its_connection_released(server, connector):
    server.script("/", after(10.0, "own"), after(0.1, "copy"))
    async with session_with(connector, Hedge(delay=0.5)) as session:
        assert await fetch(session, server.url + "/") == (200, "copy")
        assert await acquired(connector) == 0
        await asyncio.sleep(20.0)  # the loser's reply would have come by now
        assert await acquired(connector) == 0
        assert await fetch(session, server.url + "/") == (200, "status 200")
    assert server.count() == 3


@pytest.mark.looptime
async def test_the_own_attempt_wins_when_it_answers_first(server, connector):
    server.script("/", after(0.7, "own"), after(10.0, "copy"))
    hedge = Hedge(delay=0.5)
    async with session_with(connector, hedge) as session:
        assert await fetch(session, server.url + "/") == (200, "own")
        assert await acquired(connector) == 0
    assert server.count() == 2
    (stats,) = hedge.stats().values()
    assert (stats.hedged, stats.won) == (1, 0)


@pytest.mark.looptime
async def test_a_fast_answer_sends_no_copy(server, connector):
    async with session_with(connector, Hedge(delay=0.5)) as session:
        for _ in range(5):
            assert await fetch(session, server.url + "/") == (200, "status 200")
    assert server.count() == 5


@pytest.mark.looptime
async def test_a_response_a_loser_delivers_at_the_same_instant_is_released(server, connector):
    # Both answer at t = 1.0: one wins, the other's response is released.
    server.script("/", after(1.0, "own"), after(0.5, "copy"))
    async with session_with(connector, Hedge(delay=0.5)) as session:
        status, _ = await fetch(session, server.url + "/")
        assert status == 200
        await asyncio.sleep(1.0)
        assert await acquired(connector) == 0


@pytest.mark.looptime
async def test_max_hedges_sends_one_copy_per_delay(server, connector):
    server.script("/", after(10.0, "own"), after(10.0, "copy 1"), after(0.1, "copy 2"))
    async with session_with(connector, Hedge(delay=0.5, max_hedges=2)) as session:
        assert await fetch(session, server.url + "/") == (200, "copy 2")
        await asyncio.sleep(20.0)
        assert await acquired(connector) == 0
    times = [a.time - server.arrivals[0].time for a in server.arrivals]
    assert times == pytest.approx([0.0, 0.5, 1.0], abs=0.01)


@pytest.mark.looptime
async def test_a_failed_attempt_waits_for_the_copy(server, connector):
    server.script("/", dropped(0.8), after(1.0, "copy"))
    async with session_with(connector, Hedge(delay=0.5)) as session:
        assert await fetch(session, server.url + "/") == (200, "copy")
    assert await acquired(connector) == 0


@pytest.mark.looptime
async def test_when_every_attempt_fails_the_own_error_is_raised(server, connector):
    server.default("/", dropped(0.8))  # aiohttp's own re-send of the call fails too
    async with session_with(connector, Hedge(delay=0.5)) as session:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(session, server.url + "/")
    assert await acquired(connector) == 0


@pytest.mark.looptime
async def test_a_caller_cancelled_during_the_race_cancels_every_copy(server, connector):
    server.default("/", after(10.0, "slow"))
    async with session_with(connector, Hedge(delay=0.5, max_hedges=2)) as session:
        task = asyncio.create_task(fetch(session, server.url + "/"))
        await asyncio.sleep(1.2)
        assert server.count() == 3
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        assert await acquired(connector) == 0
        assert not [t for t in asyncio.all_tasks() if "_send" in repr(t)]


@pytest.mark.looptime
async def test_a_cancelled_caller_waiting_on_copies_leaves_nothing(server, connector):
    server.script("/", dropped(0.6), after(10.0, "copy"))
    async with session_with(connector, Hedge(delay=0.5)) as session:
        task = asyncio.create_task(fetch(session, server.url + "/"))
        await asyncio.sleep(1.0)  # own attempt failed at 0.6, the copy runs
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        assert await acquired(connector) == 0


@pytest.mark.looptime
async def test_a_winning_copy_keeps_the_caller_task_uncancelled(server, connector):
    server.script("/", after(10.0, "own"), after(0.1, "copy"))
    async with session_with(connector, Hedge(delay=0.5)) as session:
        assert await fetch(session, server.url + "/") == (200, "copy")
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        await asyncio.sleep(0.01)  # no cancellation left pending for a later await


# --- what is never hedged -----------------------------------------------------------------


@pytest.mark.looptime
async def test_a_post_is_never_hedged(server, connector):
    server.script("/", after(2.0, "own"))
    async with session_with(connector, Hedge(delay=0.5)) as session:
        assert await fetch(session, server.url + "/", "POST", data=b"x") == (200, "own")
    assert server.count() == 1


@pytest.mark.looptime
async def test_a_post_with_an_idempotency_key_is_hedged(server, connector):
    server.script("/", after(2.0, "own"), after(0.1, "copy"))
    headers = {"Idempotency-Key": "k1"}
    async with session_with(connector, Hedge(delay=0.5)) as session:
        status = await fetch(session, server.url + "/", "POST", json={"a": 1}, headers=headers)
        assert status == (200, "copy")
    assert [a.body for a in server.arrivals] == [b'{"a": 1}', b'{"a": 1}']


@pytest.mark.looptime
async def test_a_streamed_body_is_sent_once(server, connector):
    async def stream() -> AsyncIterator[bytes]:
        yield b"chunk"

    server.script("/", after(2.0, "own"))
    async with session_with(connector, Hedge(delay=0.5)) as session:
        assert await fetch(session, server.url + "/", "PUT", data=stream()) == (200, "own")
    assert server.count() == 1


async def test_hedgeable_requests():
    from aiohttp.payload import JsonPayload
    from yarl import URL

    def request(method: str, **kw: object) -> aiohttp.ClientRequest:
        loop = asyncio.get_running_loop()
        return aiohttp.ClientRequest(method, URL("http://h/"), loop=loop, **kw)  # type: ignore[arg-type]

    async def stream() -> AsyncIterator[bytes]:
        yield b"x"

    assert hedgeable(request("GET"))
    assert hedgeable(request("PUT", data=b"x"))
    assert hedgeable(request("DELETE", data=JsonPayload({"a": 1})))
    assert not hedgeable(request("PUT", data=stream()))
    assert not hedgeable(request("POST", data=b"x"))
    assert not hedgeable(request("PATCH", data=b"x"))
    assert hedgeable(request("POST", data=b"x", headers={"Idempotency-Key": "1"}))


# --- the budget -----------------------------------------------------------------------------


@pytest.mark.looptime
async def test_no_copy_when_the_budget_is_exhausted(server, connector):
    events: list[resilient.Event] = []
    remove = resilient.add_hook(events.append)
    server.default("/", after(1.0, "slow"))
    hedge = Hedge(delay=0.5, budget=RetryBudget(ratio=0.0, min_per_second=0.2))  # 2 per 10 s
    try:
        async with session_with(connector, hedge) as session:
            for _ in range(4):
                assert await fetch(session, server.url + "/") == (200, "slow")
    finally:
        remove()
    assert server.count() == 4 + 2
    kinds = [e.kind for e in events]
    assert kinds.count("hedge_sent") == 2
    assert kinds.count("hedge_skipped") == 2
    skipped = next(e for e in events if e.kind == "hedge_skipped")
    assert skipped.reason == "hedge budget exhausted"


@pytest.mark.looptime
async def test_without_a_budget_every_slow_call_is_hedged(server, connector):
    server.default("/", after(1.0, "slow"))
    async with session_with(connector, Hedge(delay=0.5, budget=None)) as session:
        for _ in range(30):
            await fetch(session, server.url + "/")
    assert server.count() == 60


# --- the learned delay ----------------------------------------------------------------------


@pytest.mark.looptime
async def test_before_enough_samples_the_warmup_delay_applies(server, connector):
    server.script("/", after(10.0, "own"))
    hedge = Hedge()
    async with session_with(connector, hedge) as session:
        assert await fetch(session, server.url + "/") == (200, "status 200")
    first, second = server.arrivals
    assert second.time - first.time == pytest.approx(WARMUP_DELAY, abs=0.01)


@pytest.mark.looptime
async def test_the_p95_is_learned_per_key_and_used_as_the_delay(server, connector):
    # 80 calls answering in 800..10 ms (slowest first, so none is slower than the p95 of
    # those before it and none is hedged): p95 of 10..800 ms = 769.5 ms (position
    # 0.95 × 81 = 76.95, between 760 and 770 ms).
    latencies = [0.01 * (80 - i) for i in range(80)]
    server.script("/", *(after(s, "ok") for s in latencies))
    hedge = Hedge()
    async with session_with(connector, hedge) as session:
        for _ in latencies:
            await fetch(session, server.url + "/")
        assert server.count() == 80
        (stats,) = hedge.stats().values()
        assert stats.samples == 80
        assert stats.p95 == pytest.approx(0.7695, abs=1e-6)
        assert stats.delay == stats.p95
        key = next(iter(hedge.stats()))
        assert hedge.current_delay(key) == stats.p95
        assert hedge.current_delay("http://other") == WARMUP_DELAY
        server.script("/", after(10.0, "own"))
        n = server.count()
        assert await fetch(session, server.url + "/") == (200, "status 200")
    own, copy = server.arrivals[n:]
    assert copy.time - own.time == pytest.approx(0.7695, abs=0.01)


@given(st.lists(st.floats(0.0, 1e4, allow_nan=False), min_size=1, max_size=400))
def test_the_learned_p95_is_the_type_6_quantile_of_the_window(samples):
    latencies = Latencies()
    for s in samples:
        latencies.add(s)
    window = samples[-WINDOW:]
    assert len(latencies.ring) == len(window)
    assert sorted(latencies.ring) == sorted(window)
    if len(samples) < MIN_SAMPLES:
        assert latencies.p95 is None
        assert latencies.delay() == WARMUP_DELAY
        return
    assert latencies.p95 is not None
    # Recomputed at MIN_SAMPLES and every 16 samples: the window at the last recompute.
    last = max(n for n in range(MIN_SAMPLES, len(samples) + 1) if n == MIN_SAMPLES or n % 16 == 0)
    seen = sorted(samples[:last][-WINDOW:])
    assert latencies.p95 == quantile(seen, 0.95)
    assert min(seen) <= latencies.p95 <= max(seen)


@given(st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=1), st.floats(0.0, 1.0))
def test_quantile_lies_between_the_order_statistics_around_q_n_plus_1(values, q):
    x = quantile(values, q)
    ordered = sorted(values)
    n = len(ordered)
    h = q * (n + 1)
    low = ordered[min(n, max(1, math.floor(h))) - 1]
    high = ordered[min(n, max(1, math.ceil(h))) - 1]
    assert low - 1e-9 * abs(low) <= x <= high + 1e-9 * abs(high)


@given(st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=2), st.floats(0.0, 0.99))
def test_quantile_grows_with_q(values, q):
    assert quantile(values, q) <= quantile(values, min(1.0, q + 0.01)) + 1e-9


def test_quantile_of_known_values():
    ordered = [float(i) for i in range(1, 20)]  # n = 19: position 0.95 × 20 = 19
    assert quantile(ordered, 0.95) == 19.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5  # position 2.5
    assert quantile([5.0], 0.95) == 5.0


# --- in a chain, events, configuration ----------------------------------------------------


@pytest.mark.looptime
async def test_each_copy_goes_through_the_inner_policies(server, connector):
    server.script("/", after(10.0, "own"), 503, after(0.1, "copy retried"))
    retry = resilient.Retry(backoff=resilient.FullJitter(base=0.01, cap=0.01))
    async with session_with(connector, retry, Hedge(delay=0.5)) as session:
        assert await fetch(session, server.url + "/") == (200, "copy retried")
    assert server.count() == 3


@pytest.mark.looptime
async def test_events_of_a_hedged_call(server, connector):
    events: list[resilient.Event] = []
    remove = resilient.add_hook(events.append)
    server.script("/", after(10.0, "own"), after(0.1, "copy"))
    try:
        async with session_with(connector, Hedge(delay=0.5)) as session:
            await fetch(session, server.url + "/?secret=1")
    finally:
        remove()
    sent, won = events
    assert (sent.kind, sent.policy, sent.attempt) == ("hedge_sent", "hedge", 1)
    assert sent.reason == "no response after 0.500s"
    assert sent.url == server.url + "/"
    assert (won.kind, won.attempt, won.status) == ("hedge_won", 1, 200)


def test_chain_puts_hedge_outside_retry_and_the_limit_inside_the_backoff():
    policies = [
        resilient.Throttle(5.0),
        resilient.ConcurrencyLimit(4),
        resilient.Retry(),
        resilient.RateLimitBackoff(),
        Hedge(),
        resilient.CircuitBreaker(),
    ]
    chained = resilient.chain(*policies)  # the policies, or one pipeline holding them
    kinds = [q.kind for p in chained for q in getattr(p, "policies", (p,))]
    assert kinds == [
        "hedge", "retry", "circuit_breaker", "rate_limit_backoff", "concurrency_limit", "throttle",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="two hedge"):
        resilient.chain(Hedge(), Hedge())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"delay": -1.0}, "delay"),
        ({"delay": math.inf}, "delay"),
        ({"delay": math.nan}, "delay"),
        ({"delay": True}, "delay"),
        ({"delay": "1"}, "delay"),
        ({"max_hedges": 0}, "max_hedges"),
        ({"max_hedges": 11}, "max_hedges"),
        ({"max_hedges": 1.0}, "max_hedges"),
        ({"budget": 0.1}, "budget"),
        ({"key": "host"}, "key"),
        ({"max_keys": 0}, "max_keys"),
    ],
)
def test_invalid_arguments_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"Hedge: {name} must be"):
        Hedge(**kwargs)


def test_repr_and_defaults():
    hedge = Hedge()
    assert (hedge.delay, hedge.max_hedges, hedge.budget) == (None, 1, RetryBudget(0.1, 5.0))
    assert repr(hedge) == (
        "Hedge(delay=None, max_hedges=1, budget=RetryBudget(ratio=0.1, min_per_second=5.0),"
        " key=by_host)"
    )
    assert Hedge(delay=0).delay == 0.0


@pytest.mark.looptime
async def test_an_inner_middleware_that_swallows_the_cancel_still_loses(server, connector):
    async def stubborn(request, handler):
        try:
            return await handler(request)
        except asyncio.CancelledError:  # bad manners: answers anyway
            return await handler(request)

    server.script("/", after(10.0, "own"), after(0.1, "copy"), after(0.0, "stubborn"))
    async with aiohttp.ClientSession(
        connector=connector, connector_owner=False, middlewares=(Hedge(delay=0.5), stubborn)
    ) as session:
        assert await fetch(session, server.url + "/") == (200, "copy")
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        assert await acquired(connector) == 0


# --- the schedule ---------------------------------------------------------------------------


class FakeRace:
    """What the schedule asks of a race: is it over, and send its copy."""

    def __init__(self, fired: list[tuple[str, float]], name: str) -> None:
        self.fired, self.name = fired, name
        self.settled = False
        self.waiter = None

    def hedge(self, now: float) -> None:
        self.fired.append((self.name, now))


def test_the_schedule_fires_each_race_at_its_own_due_time_and_drops_ended_ones():
    import looptime

    from resilient.hedge._hedge import _Schedule

    fired: list[tuple[str, float]] = []
    schedule = _Schedule()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        late, early, ended = (FakeRace(fired, n) for n in ("late", "early", "ended"))
        schedule.add(loop, 1.0, late)  # type: ignore[arg-type]
        schedule.add(loop, 0.5, early)  # type: ignore[arg-type]
        schedule.add(loop, 0.7, ended)  # type: ignore[arg-type]
        ended.settled = True
        await asyncio.sleep(2.0)
        assert not schedule.heap
        assert schedule.handle is None

    loop = looptime.new_event_loop(start=0.0)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert fired == [("early", 0.5), ("late", 1.0)]


def test_a_hedge_used_from_another_event_loop_still_fires():
    import looptime

    from resilient.hedge._hedge import _Schedule

    fired: list[tuple[str, float]] = []
    schedule = _Schedule()

    async def once(name: str) -> None:
        loop = asyncio.get_running_loop()
        schedule.add(loop, loop.time() + 0.5, FakeRace(fired, name))  # type: ignore[arg-type]
        await asyncio.sleep(1.0)

    for name in ("first loop", "second loop"):
        loop = looptime.new_event_loop(start=0.0)
        try:
            loop.run_until_complete(once(name))
        finally:
            loop.close()
    assert [name for name, _ in fired] == ["first loop", "second loop"]


@pytest.mark.looptime
async def test_per_key_state_is_bounded(server, connector):
    hedge = Hedge(delay=5.0, key=lambda request: request.url.path, max_keys=16)
    async with session_with(connector, hedge) as session:
        for i in range(100):
            await fetch(session, f"{server.url}/{i}")
    assert len(hedge.stats()) <= 16
    assert not hedge._schedule.heap or all(race.settled for _, _, race in hedge._schedule.heap)
