"""ConcurrencyLimit against a real loopback server, in virtual time (looptime): at most N
in flight, first come first served, refusals with nothing sent, deadlines, cancelled
waiters, failed attempts; and a model-based property test of the slot rule."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

import resilient
from resilient import ConcurrencyLimit, LimitExceeded

pytestmark = [pytest.mark.timeout(30)]

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gauge:
    """Counts requests the server is working on, and the most at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def reply(self, seconds: float, text: str = "ok") -> Reply:
        async def reply(request: web.Request) -> web.StreamResponse:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                await asyncio.sleep(seconds)
            finally:
                self.now -= 1
            return web.Response(text=text)

        return reply


def dropped() -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        raise asyncio.CancelledError

    return reply


@pytest.fixture
async def connector() -> AsyncIterator[aiohttp.TCPConnector]:
    conn = aiohttp.TCPConnector(limit=100)
    yield conn
    await conn.close()


def session_with(
    connector: aiohttp.TCPConnector, *middlewares: Any, **kw: Any
) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector, connector_owner=False, middlewares=middlewares, **kw
    )


async def get(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        return await resp.text()


async def until(condition: Callable[[], bool], steps: int = 1_000) -> None:
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


# --- the limit and the queue ------------------------------------------------------------


@pytest.mark.looptime
async def test_at_most_max_concurrent_requests_are_in_flight(server, connector):
    gauge = Gauge()
    server.default("/", gauge.reply(1.0))
    loop = asyncio.get_running_loop()
    limit = ConcurrencyLimit(3)
    async with session_with(connector, limit) as session:
        t0 = loop.time()
        await asyncio.gather(*(get(session, server.url + "/") for _ in range(9)))
        assert loop.time() - t0 == pytest.approx(3.0, abs=0.05)
    assert gauge.peak == 3
    assert server.count() == 9
    (stats,) = limit.stats().values()
    assert (stats.in_flight, stats.waiting, stats.rejected) == (0, 0, 0)
    assert stats.hold == pytest.approx(1.0, abs=0.01)


@pytest.mark.looptime
async def test_waiters_are_served_first_come_first_served(server, connector):
    gauge = Gauge()
    for i in range(6):
        server.default(f"/{i}", gauge.reply(1.0))
    limit = ConcurrencyLimit(1)
    async with session_with(connector, limit) as session:
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(get(session, f"{server.url}/{i}")))
            await asyncio.sleep(0.01)  # arrive in order 0, 1, 2, ...
        await asyncio.gather(*tasks)
    assert [a.path for a in server.arrivals] == [f"/{i}" for i in range(6)]
    assert gauge.peak == 1


@pytest.mark.looptime
async def test_keys_have_slots_of_their_own(server, connector):
    gauge = Gauge()
    server.default("/", gauge.reply(1.0))
    loop = asyncio.get_running_loop()
    port = server.url.rsplit(":", 1)[1]
    async with session_with(connector, ConcurrencyLimit(1)) as session:
        t0 = loop.time()
        await asyncio.gather(
            get(session, f"http://127.0.0.1:{port}/"), get(session, f"http://localhost:{port}/")
        )
        assert loop.time() - t0 == pytest.approx(1.0, abs=0.05)


@pytest.mark.looptime
async def test_the_slot_is_free_once_the_headers_arrived_while_the_body_is_unread(
    server, connector
):
    server.default("/", Gauge().reply(0.1))
    limit = ConcurrencyLimit(1)
    async with session_with(connector, limit) as session:
        async with session.get(server.url + "/") as outer:  # held open, body unread
            assert limit.in_flight(next(iter(limit.stats()))) == 0
            assert await get(session, server.url + "/") == "ok"  # no self-deadlock
            assert await outer.text() == "ok"


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.looptime
async def test_beyond_max_queue_a_caller_is_refused_at_once_with_nothing_sent(server, connector):
    events: list[resilient.Event] = []
    remove = resilient.add_hook(events.append)
    server.default("/", Gauge().reply(1.0))
    loop = asyncio.get_running_loop()
    limit = ConcurrencyLimit(2, max_queue=1)
    try:
        async with session_with(connector, limit) as session:
            tasks = [asyncio.create_task(get(session, server.url + "/")) for _ in range(3)]
            await until(lambda: server.count() == 2)
            key = next(iter(limit.stats()))
            assert limit.waiting(key) == 1
            t0 = loop.time()
            with pytest.raises(LimitExceeded) as caught:
                await get(session, server.url + "/over")
            assert loop.time() == t0
            assert (caught.value.key, caught.value.reason) == (key, "queue full")
            assert isinstance(caught.value, resilient.ResilienceError)
            await asyncio.gather(*tasks)
    finally:
        remove()
    assert server.count() == 3
    assert server.count("/over") == 0
    (event,) = events
    assert (event.kind, event.policy) == ("limit_rejected", "concurrency_limit")
    assert event.reason.startswith("queue full")
    assert limit.stats()[key].rejected == 1


@pytest.mark.looptime
async def test_max_queue_zero_never_waits(server, connector):
    server.default("/", Gauge().reply(1.0))
    async with session_with(connector, ConcurrencyLimit(1, max_queue=0)) as session:
        first = asyncio.create_task(get(session, server.url + "/"))
        await until(lambda: server.count() == 1)
        with pytest.raises(LimitExceeded, match="queue full"):
            await get(session, server.url + "/")
        await first
    assert server.count() == 1


@pytest.mark.looptime
async def test_a_turn_expected_past_the_deadline_is_refused_at_once(server, connector):
    server.default("/", Gauge().reply(1.0))
    loop = asyncio.get_running_loop()
    limit = ConcurrencyLimit(1)
    async with session_with(connector, limit) as session:
        await get(session, server.url + "/")  # the key learns: a slot is held ~1 s
        first = asyncio.create_task(get(session, server.url + "/"))
        await until(lambda: server.count() == 2)
        t0 = loop.time()
        with resilient.deadline(0.5), pytest.raises(LimitExceeded) as caught:
            await get(session, server.url + "/late")
        assert caught.value.reason == "deadline"
        assert loop.time() == t0
        await first
    assert server.count("/late") == 0


@pytest.mark.looptime
async def test_a_caller_whose_turn_leaves_no_time_for_its_request_is_refused(server, connector):
    server.default("/", Gauge().reply(1.0))
    limit = ConcurrencyLimit(1)
    async with session_with(connector, limit) as session:
        await get(session, server.url + "/")  # a slot is held ~1 s
        first = asyncio.create_task(get(session, server.url + "/"))
        await until(lambda: server.count() == 2)
        # Its turn is ~1 s away and its request takes ~1 s: 2 s > 1.5 s.
        with resilient.deadline(1.5), pytest.raises(LimitExceeded, match="deadline"):
            await get(session, server.url + "/late")
        with resilient.deadline(2.5):  # 2 s <= 2.5 s: it queues, and is answered in time
            assert await get(session, server.url + "/soon") == "status 200"
        await first
    assert server.count("/late") == 0


@pytest.mark.looptime
async def test_a_waiter_still_queued_at_its_deadline_is_refused_then(server, connector):
    server.default("/", Gauge().reply(10.0))
    loop = asyncio.get_running_loop()
    async with session_with(connector, ConcurrencyLimit(1)) as session:
        first = asyncio.create_task(get(session, server.url + "/"))
        await until(lambda: server.count() == 1)  # no hold estimate yet: the waiter queues
        t0 = loop.time()
        with resilient.deadline(2.0), pytest.raises(LimitExceeded, match="deadline"):
            await get(session, server.url + "/late")
        assert loop.time() - t0 == pytest.approx(2.0, abs=0.01)
        await first
    assert server.count("/late") == 0


@pytest.mark.looptime
async def test_the_sessions_total_timeout_bounds_the_wait(server, connector):
    server.default("/", Gauge().reply(10.0))
    timeout = aiohttp.ClientTimeout(total=3.0)
    loop = asyncio.get_running_loop()
    limit = ConcurrencyLimit(1)
    async with session_with(connector, limit, timeout=timeout) as session:
        first = asyncio.create_task(get(session, server.url + "/"))
        await until(lambda: server.count() == 1)
        t0 = loop.time()
        with pytest.raises(LimitExceeded, match="deadline"):
            await get(session, server.url + "/late")
        assert loop.time() - t0 < 3.0
        with pytest.raises(asyncio.TimeoutError):
            await first
    assert server.count("/late") == 0


# --- cancellation and failures ------------------------------------------------------------


@pytest.mark.looptime
async def test_a_cancelled_waiter_leaves_no_trace(server, connector):
    for path in ("/a", "/b", "/c"):
        server.default(path, Gauge().reply(1.0))
    limit = ConcurrencyLimit(1)
    async with session_with(connector, limit) as session:
        first = asyncio.create_task(get(session, server.url + "/a"))
        await until(lambda: server.count() == 1)
        middle = asyncio.create_task(get(session, server.url + "/b"))
        last = asyncio.create_task(get(session, server.url + "/c"))
        await asyncio.sleep(0.1)
        key = next(iter(limit.stats()))
        assert limit.waiting(key) == 2
        middle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await middle
        assert limit.waiting(key) == 1
        await asyncio.gather(first, last)
        assert (limit.in_flight(key), limit.waiting(key)) == (0, 0)
    assert [a.path for a in server.arrivals] == ["/a", "/c"]


@pytest.mark.looptime
async def test_a_slot_handed_to_a_waiter_cancelled_in_that_instant_goes_to_the_next(
    server, connector
):
    for path in ("/a", "/b", "/c"):
        server.default(path, Gauge().reply(1.0))
    limit = ConcurrencyLimit(1)
    head: list[asyncio.Task[str]] = []

    async def cancel_the_head_on_release(request, handler):
        resp = await handler(request)  # the limit (inside) has just handed the slot on
        if request.url.path == "/a":
            head[0].cancel()
        return resp

    async with session_with(connector, cancel_the_head_on_release, limit) as session:
        first = asyncio.create_task(get(session, server.url + "/a"))
        await until(lambda: server.count() == 1)
        head.append(asyncio.create_task(get(session, server.url + "/b")))
        await asyncio.sleep(0.01)
        last = asyncio.create_task(get(session, server.url + "/c"))
        await first
        with pytest.raises(asyncio.CancelledError):
            await head[0]
        assert await last == "ok"
        key = next(iter(limit.stats()))
        assert (limit.in_flight(key), limit.waiting(key)) == (0, 0)
    assert [a.path for a in server.arrivals] == ["/a", "/c"]


@pytest.mark.looptime
async def test_a_cancelled_request_on_the_wire_frees_its_slot(server, connector):
    server.script("/", Gauge().reply(10.0))
    limit = ConcurrencyLimit(1)
    async with session_with(connector, limit) as session:
        task = asyncio.create_task(get(session, server.url + "/"))
        await until(lambda: server.count() == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await get(session, server.url + "/") == "status 200"
        assert limit.in_flight(next(iter(limit.stats()))) == 0


@pytest.mark.looptime
async def test_an_exception_frees_the_slot(server, connector):
    server.default("/", dropped())  # aiohttp's own re-send of the call fails too
    limit = ConcurrencyLimit(1)
    async with session_with(connector, limit) as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(session, server.url + "/")
        assert limit.in_flight(next(iter(limit.stats()))) == 0
        server.default("/", 200)
        assert await get(session, server.url + "/") == "status 200"


@pytest.mark.looptime
async def test_retry_does_not_retry_a_refusal_and_the_breaker_does_not_count_it(server, connector):
    server.default("/", Gauge().reply(1.0))
    breaker = resilient.CircuitBreaker(min_calls=1, consecutive_failures=1)
    policies = resilient.chain(resilient.Retry(), breaker, ConcurrencyLimit(1, max_queue=0))
    async with session_with(connector, *policies) as session:
        first = asyncio.create_task(get(session, server.url + "/"))
        await until(lambda: server.count() == 1)
        with pytest.raises(LimitExceeded):
            await get(session, server.url + "/")
        await first
        assert next(iter(breaker.stats().values())).state == "closed"
    assert server.count() == 1


# --- the rule as a model -------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.just(("start", 0)),
        st.tuples(st.just("finish"), st.integers(0, 30)),
        st.tuples(st.just("fail"), st.integers(0, 30)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
    ),
    max_size=60,
)


@given(st.integers(1, 4), OPS)
def test_slots_are_never_exceeded_lost_or_given_out_of_order(limit_n, ops):
    asyncio.run(_model(limit_n, ops))


async def _model(limit_n: int, ops: list[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    limit = ConcurrencyLimit(limit_n, key=lambda request: "k")
    gates: list[asyncio.Future[None]] = []
    tasks: list[asyncio.Task[Any]] = []
    admitted: list[int] = []
    running: set[int] = set()

    def handler_for(i: int) -> Callable[[Any], Awaitable[Any]]:
        async def handler(request: Any) -> Any:
            admitted.append(i)
            running.add(i)
            try:
                await gates[i]
            finally:
                running.discard(i)
            return "resp"

        return handler

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    for op, index in ops:
        if op == "start":
            i = len(tasks)
            gates.append(loop.create_future())
            request = SimpleNamespace(loop=loop, session=None, _timer=None)
            tasks.append(asyncio.create_task(limit(request, handler_for(i))))  # type: ignore[arg-type]
        elif tasks:
            i = index % len(tasks)
            if op == "cancel":
                tasks[i].cancel()
            elif op == "finish" and not gates[i].done():
                gates[i].set_result(None)
            elif op == "fail" and i in running and not gates[i].done():
                gates[i].set_exception(aiohttp.ClientConnectionError("dropped"))
        await settle()
        assert len(running) <= limit_n
        assert limit.in_flight("k") == len(running) if "k" in limit.stats() else not running
        # First come, first served: admitted in start order, skipping cancelled waiters.
        assert admitted == sorted(admitted)
        # A free slot never idles while someone waits.
        if limit.waiting("k"):
            assert limit.in_flight("k") == limit_n
    for gate in gates:
        if not gate.done():
            gate.set_result(None)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert limit.in_flight("k") == 0
    assert limit.waiting("k") == 0
    started_not_cancelled = [i for i, t in enumerate(tasks) if not t.cancelled()]
    assert set(started_not_cancelled) <= set(admitted)


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((0,), {}, "max_concurrent"),
        ((1.5,), {}, "max_concurrent"),
        ((True,), {}, "max_concurrent"),
        ((10**7,), {}, "max_concurrent"),
        (("adaptive-ish",), {}, "max_concurrent"),
        ((1,), {"max_queue": -1}, "max_queue"),
        ((1,), {"max_queue": 1.0}, "max_queue"),
        ((1,), {"key": None}, "key"),
        ((1,), {"max_keys": 0}, "max_keys"),
    ],
)
def test_invalid_arguments_are_refused_by_name(args, kwargs, name):
    with pytest.raises(ValueError, match=f"ConcurrencyLimit: {name} must be"):
        ConcurrencyLimit(*args, **kwargs)


def test_repr_and_defaults():
    limit = ConcurrencyLimit(8)
    assert (limit.max_concurrent, limit.max_queue) == (8, None)
    assert repr(limit) == "ConcurrencyLimit(8, max_queue=None, key=by_host)"
    assert repr(ConcurrencyLimit(2, max_queue=0)) == (
        "ConcurrencyLimit(2, max_queue=0, key=by_host)"
    )


def test_limit_exceeded_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(LimitExceeded("http://h", "queue full")))
    assert (err.key, err.reason) == ("http://h", "queue full")
    assert math.isfinite(len(str(err)))


@pytest.mark.looptime
async def test_per_key_state_is_bounded_and_busy_keys_are_kept(server, connector):
    server.default("/busy", Gauge().reply(10.0))
    limit = ConcurrencyLimit(1, key=lambda request: request.url.path, max_keys=16)
    async with session_with(connector, limit) as session:
        busy = asyncio.create_task(get(session, server.url + "/busy"))
        await until(lambda: server.count("/busy") == 1)
        for i in range(100):
            await get(session, f"{server.url}/{i}")
        assert len(limit.stats()) <= 16
        assert limit.in_flight("/busy") == 1  # a key holding a slot is never evicted
        busy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await busy
        assert limit.in_flight("/busy") == 0
