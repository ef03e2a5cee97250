"""The breaker's model (``test_breaker_model.py``) against the Redis store, with faults.

The same :class:`~test_breaker_model.CircuitModel` drives two
:class:`~resilient.breaker._redis.RedisCircuits` (two "processes": one through a
:class:`~redis_proxy.RedisProxy`, one direct) sharing one key's circuit on a real
``redis-server``, in real time (breaks of 0.1 to 0.2 s, times read from Redis's
clock; the window is 100 s, so no outcome slides out during an example). On top of
the model's rules, faults:

- Redis killed and restarted (its data lost): a fresh circuit, and no outcome of a
  call admitted before counts in it;
- an admission whose reply (or command) is held past the storage timeout:
  ``StorageError``, and whatever it took is handed back;
- a caller cancelled at every await of the breaker's call (waiting for its key's news
  on the way, the admission's round trip, the send), possibly right after a failure.

After every step the stores' background work is drained, then Redis's hash is compared
with the model: the half-open slots it holds are exactly those of the probes in flight
(or succeeded), named by their tokens. The lease of an answer "closed" is 0 here (each
admission asks Redis, so both stores see every transition at once); the lease is tested
in ``test_storage_redis.py``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import redis.asyncio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule, run_state_machine_as_test
from redis_proxy import RedisProxy, arg
from test_breaker_model import KEY, CircuitModel, Stub, View

import resilient.breaker._redis as breaker_module
import resilient.storage._redis as redis_module
from resilient import CircuitBreaker, CircuitOpenError, StorageError
from resilient.breaker._circuit import BUCKETS, NEVER, Settings, Ticket
from resilient.breaker._redis import RedisCircuits
from resilient.testing import RedisServer

SHORT_TIMEOUT = 0.2
"""Seconds a storage call may take in the steps that hold a reply past it."""
HASH = f"resilient:breaker/{{{KEY}}}"


class Response:
    status = 200


class RedisBackend:
    """Two Redis stores of one key, each step drained; times on Redis's clock."""

    tolerance = 0.05

    def __init__(self, settings: Settings, server: RedisServer) -> None:
        self.settings = settings
        self.server = server
        self.loop = asyncio.new_event_loop()
        server.flush()
        self.proxy = RedisProxy(server.port)
        self.run(self.proxy.start())
        options: dict[str, Any] = {
            "failure_ratio": settings.failure_ratio,
            "min_calls": settings.min_calls,
            "window": settings.width * BUCKETS,
            "open_for": settings.open_for,
            "half_open_probes": settings.half_open_probes,
            "consecutive_failures": None if settings.consecutive == NEVER else settings.consecutive,
            "max_open_for": settings.max_open_for,
            "key": lambda request: KEY,
        }
        self.breakers = [
            CircuitBreaker(storage=self.proxy.url, **options),
            CircuitBreaker(storage=server.url, **options),
        ]
        self.stores: list[RedisCircuits] = [b._shared for b in self.breakers]  # type: ignore[misc]
        self.direct = redis.asyncio.Redis.from_url(server.url)
        self.request = Stub(self.loop)
        self.owner: dict[int, RedisCircuits] = {}
        self.lease = breaker_module.CLOSED_LEASE
        breaker_module.CLOSED_LEASE = 0.0

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def close(self) -> None:
        breaker_module.CLOSED_LEASE = self.lease

        async def shut() -> None:
            for store in self.stores:
                await store.drain()
                await store.store.close()
            await self.direct.aclose()
            await self.proxy.close()

        try:
            self.run(shut())
        finally:
            self.run(_cancel_all())
            self.loop.close()

    async def _settle(self) -> None:
        for _ in range(2):  # a release may follow a record's failure
            for store in self.stores:
                await store.drain()

    # --- the backend interface of the model --------------------------------------------

    def time(self) -> float:
        seconds, micros = self.run(self.direct.time())
        return float(seconds) + micros / 1e6

    def advance(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    def admit(self, which: int) -> Ticket:
        store = self.stores[which]

        async def admit() -> Ticket:
            ticket = store.admit(KEY, self.request)  # type: ignore[arg-type]
            if ticket is None:
                ticket = await store.ask(KEY, self.request)  # type: ignore[arg-type]
            return ticket

        try:
            ticket: Ticket = self.run(admit())
        finally:
            self.run(self._settle())
        self.owner[id(ticket)] = store
        return ticket

    def record(self, outcomes: list[tuple[Ticket, bool]]) -> None:
        async def record() -> None:  # as the breaker does: inside the loop, then on
            for ticket, failed in outcomes:
                self.owner[id(ticket)].record(ticket, failed, self.loop.time())
            await self._settle()

        self.run(record())

    def release(self, ticket: Ticket) -> None:
        async def release() -> None:
            self.owner[id(ticket)].release(ticket)
            await self._settle()

        self.run(release())

    def observe(self) -> View:
        return self.run(self._observe())

    async def _observe(self) -> View:
        raw = await self.direct.hgetall(HASH)
        h = {k.decode(): v.decode() for k, v in raw.items()}
        if not h:
            return View("closed", 0, 0.0, [], 0, 0, 0, 0, 0)
        seconds, micros = await self.direct.time()
        tick = math.floor((float(seconds) + micros / 1e6) / self.settings.width)
        calls = fails = 0
        for i in range(BUCKETS):
            if float(h.get(f"b{i}", "-1")) > tick - BUCKETS:
                calls += int(h.get(f"n{i}", "0"))
                fails += int(h.get(f"f{i}", "0"))
        return View(
            ("closed", "open", "half_open")[int(h.get("state", "0"))], int(h.get("epoch", "0")),
            float(h.get("until", "0")), h.get("slots", "").split(), int(h.get("successes", "0")),
            int(h.get("streak", "0")), int(h.get("level", "0")), calls, fails,
        )  # fmt: skip

    # --- faults ------------------------------------------------------------------------

    def restart(self) -> None:
        """Kill Redis (its data is lost) and start it again; wait until nothing this
        process learnt before (a break it refuses for) is still believed."""
        self.server.stop()
        self.server.start()
        self.run(self.direct.aclose())  # the test's own client: a fresh connection
        self.direct = redis.asyncio.Redis.from_url(self.server.url)
        self.run(asyncio.sleep(self.settings.max_open_for + 0.05))

    def held_admission(self, held: str) -> Ticket | BaseException:
        """An admission through the proxy whose reply (or command) is held past the
        storage timeout; the hold is lifted once its release reached Redis."""
        store = self.stores[0]
        marker = arg("admit")
        if held == "reply":
            self.proxy.hold_reply(marker)
        else:
            self.proxy.hold_command(marker)
        timeout = redis_module.STORAGE_TIMEOUT
        redis_module.STORAGE_TIMEOUT = SHORT_TIMEOUT

        async def admit() -> Ticket | BaseException:
            try:
                ticket = store.admit(KEY, self.request)  # type: ignore[arg-type]
                return ticket or await store.ask(KEY, self.request)  # type: ignore[arg-type]
            except (StorageError, CircuitOpenError) as exc:
                return exc
            finally:
                await store.drain()  # the release reached Redis (on another connection)
                self.proxy.release()  # then the held reply comes, or the command runs
                await asyncio.sleep(0.05)

        try:
            outcome: Ticket | BaseException = self.run(admit())
        finally:
            redis_module.STORAGE_TIMEOUT = timeout
            self.run(self._settle())
        if isinstance(outcome, Ticket):
            self.owner[id(outcome)] = store
        return outcome

    def cancelled_call(self, steps: int, failure: Ticket | None) -> str:
        """A call through the breaker (store 0) cancelled after ``steps`` turns of the
        loop (its send never answers); with ``failure``, a failure of that closed call is
        recorded just before (its news is on the way when the call begins)."""
        breaker = self.breakers[0]
        entered = asyncio.Event()

        async def never(request: Any) -> Any:
            entered.set()
            await asyncio.Event().wait()
            return Response()

        async def call() -> str:
            if failure is not None:
                self.stores[0].record(failure, True, self.loop.time())
            task = asyncio.ensure_future(breaker(self.request, never))  # type: ignore[arg-type]
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "sent, cancelled" if entered.is_set() else "cancelled"
            except CircuitOpenError:
                return "refused"
            return "answered"  # pragma: no cover - the send never answers

        try:
            return str(self.run(call()))
        finally:
            self.run(self._settle())


async def _cancel_all() -> None:
    """Cancel what a failed step left running (nothing, when every step passed)."""
    left = asyncio.all_tasks() - {asyncio.current_task()}
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)


class RedisModel(CircuitModel):
    WIDTH = 10.0  # window = 100 s: nothing slides out during an example
    OPEN_FORS = (0.1,)
    GROWTHS = (1.0, 2.0)
    ADVANCES = (0.0, 0.05, 0.25)
    STORES = 2
    server: RedisServer

    def new_backend(self, settings: Settings) -> Any:
        return RedisBackend(settings, self.server)

    @rule()
    def redis_restarts(self) -> None:
        self.backend.restart()
        self._move("closed")  # a fresh circuit: no call admitted before counts in it
        self.outcomes.clear()
        self.slots, self.successes, self.streak, self.level = set(), 0, 0, 0

    def _late(self, late: bool) -> None:
        """``late``: first wait until the break (or the probe time) is over, where an
        admission begins a spell or takes a slot: where a lost answer holds something."""
        if late and self.state != "closed":
            self.backend.advance(max(0.0, self.until - self.backend.time()) + 0.02)

    @rule(held=st.sampled_from(["reply", "command"]), late=st.booleans())
    def an_admission_times_out(self, held: str, late: bool):  # type: ignore[no-untyped-def]
        self._late(late)
        before, t1 = self.backend.observe(), self.backend.time()
        outcome = self.backend.held_admission(held)
        t2 = self.backend.time()
        ends = {self._admission(t1), self._admission(t2)}
        if isinstance(outcome, CircuitOpenError):  # this process knew it open: not asked
            assert "refused" in ends, ends
            return
        if isinstance(outcome, Ticket):  # pragma: no cover - a hold always outlasts 0.2 s
            raise AssertionError(f"admitted through a held {held}: {outcome}")
        assert isinstance(outcome, StorageError), outcome
        # Redis ran the admission (a held reply; a held command ran after its release:
        # refused as gone): a spell it began stays, the slot it took is freed.
        self._follow(before, ends if held == "reply" else set(), (t1, t2))

    @rule(steps=st.integers(0, 8), after_failure=st.booleans(), late=st.booleans())
    def a_caller_is_cancelled(self, steps: int, after_failure: bool, late: bool) -> None:
        """Cancelled after ``steps`` turns of the loop; ``after_failure`` (while closed):
        right after a failure of this process, whose news it waits for."""
        self._late(late)
        if after_failure and self.state == "closed":
            t1 = self.backend.time()
            failure = self.backend.admit(0)
            call = self._admitted(failure, (t1, t1), False)
            self.backend.cancelled_call(steps, failure)
            self._outcome(call, True, (t1, self.backend.time()))
            return  # closed, or opened by the failure a moment ago: nothing else changed
        before, t1 = self.backend.observe(), self.backend.time()
        self.backend.cancelled_call(steps, None)
        t2 = self.backend.time()
        self._follow(before, {self._admission(t1), self._admission(t2)}, (t1, t2))


@pytest.mark.timeout(600)
def test_the_redis_store_follows_the_model_through_faults(redis_server: RedisServer) -> None:
    def machine() -> RedisModel:
        model = RedisModel()
        model.server = redis_server
        return model

    run_state_machine_as_test(
        machine, settings=settings(max_examples=25, stateful_step_count=25, deadline=None)
    )
