"""The Throttle's quota windows, driven through both stores, with faults (hypothesis,
stateful).

Two "processes" (two ``Throttle(quotas=...)`` instances, each alone as a middleware or
through ``resilient.chain``, drawn per example) send requests of one or two keys to a
real loopback aiohttp server whose every reply the test scripts: 200, 429, or a dropped
connection. The test starts callers (some under a ``resilient.deadline``), cancels them
(also after any number of turns of the loop: waiting for a token or a quota place,
boarding, on the wire, reading the reply after the landing), answers the requests on the
wire and lets time pass. With ``storage="memory://"`` each process has its own windows
and time is virtual (``looptime``); with a real ``redis-server`` they share them (process
0 through a :class:`~redis_proxy.RedisProxy`), time is real and short, each process's
``on_storage_error`` is drawn, and the faults add Redis stopped, started again (its data
lost) or killed and restarted, and a ``quota_board`` or ``quota_land`` call whose reply
or command is held past the storage timeout (or whose command is lost on the way).

The rules, checked after every step:

- no window admits more than its quota: the sends (stamped by a middleware inside the
  Throttle) of any ``expiry``-second span number at most ``amount``, per process in
  memory; with Redis across processes for the places Redis gave (per Redis lifetime: a
  restart loses its count) and per process for those its own windows gave while Redis
  failed (``on_storage_error="allow"``);
- nothing is held by a call that ended: a key's in-flight count is between its calls on
  the wire and its calls alive (0 once every call ended); Redis's in-flight set holds
  only tickets a process holds, by name (spares, places on the wire or on their way,
  landings and hand-backs not sent yet); once every call ended no landing, re-lease or
  hand-back is left unsent, and once the spares have gone back
  (:data:`~resilient.throttle._lease.LEASE` later) Redis holds nothing in flight;
- nobody is stranded: once every window has emptied, a key whose callers still wait has
  its quota full of requests on the wire (or its callers have all gone);
- no caller waits past its deadline (with Redis: plus one storage call, which the
  storage timeout bounds): it sends before, or ends with ``DeadlineExceeded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import looptime
import pytest
import redis.asyncio
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, web
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis_proxy import RedisProxy, script
from scripted import drop_connection, poll

import resilient
import resilient.storage._redis as redis_module
import resilient.throttle._redis as quota_redis
from resilient import DeadlineExceeded, StorageError, Throttle
from resilient.testing import RedisServer
from resilient.throttle import _lease
from resilient.throttle._quota import Quotas, parse_quotas
from resilient.throttle._redis import RedisQuotas

KEYS = ("a", "b")
MEMORY_QUOTA = "5 per 1 second; 7 per 4 seconds"
REDIS_QUOTA = "5 per 1 second"
RATE = 200.0
"""Tokens per second: a burst's callers leave 5 ms apart (a Redis round trip comes back
in between, so its later callers lease places), and the quotas decide."""
DEADLINES = (None, None, 0.05, 0.4, 3.0)
REPLIES = ("held", "held", "200", "429", "dropped")
SHORT_TIMEOUT = 0.25
"""The storage timeout in the Redis model (a held reply costs that much real time)."""
REAL_SETTLE = 0.03
"""Seconds of real time a step of the Redis model lets the loop run."""
VIRTUAL_SETTLE = 0.002
"""Virtual seconds a step of the memory model lets the loop run."""
JITTER = 1e-6
"""Seconds: float rounding on a window's edge (looptime runs in microseconds)."""


def most_in_a_span(times: list[float], span: float) -> int:
    """The most ``times`` within any half-open ``[t, t + span)``."""
    times = sorted(times)
    return max(
        (sum(1 for u in times[i:] if u < t + span - JITTER) for i, t in enumerate(times)),
        default=0,
    )


@dataclass(eq=False)
class Caller:
    which: int
    key: str
    deadline: float | None
    start: float
    reply: str
    """How the server answers its attempts: "held" (until the test answers), else at once
    ("200", "429", "dropped")."""
    task: asyncio.Task[None] = field(init=False)
    outcome: str | None = None
    end: float | None = None
    sends: list[Send] = field(default_factory=list)
    stormy: bool = False
    """It lived through a held storage call or an outage (its waits may be one storage
    timeout longer than its deadline)."""


@dataclass(eq=False)
class Send:
    """An attempt that left the Throttle: its process, key, time, who gave its place."""

    number: int
    which: int
    key: str
    time: float
    giver: tuple[Any, ...] | None
    """("memory", process), ("local", process) (Redis failed, this process's windows
    decided), ("redis", lifetime) or None (a place Redis gave in a lifetime that ended
    meanwhile: no window of it is checked)."""
    caller: Caller | None
    ticket: str
    """Its place in Redis ("" in memory, or given by this process's own windows)."""
    ended: float | None = None
    """When the attempt ended (None: on the wire)."""


@dataclass(eq=False)
class Arrival:
    """A request at the server, waiting for the test's answer."""

    number: int
    answer: asyncio.Future[str]


class QuotaModel(RuleBasedStateMachine):
    """See the module docstring; ``server``: a Redis server (shared), else memory."""

    server: RedisServer | None = None

    def __init__(self) -> None:
        super().__init__()
        self.memory = self.server is None
        self.loop: asyncio.AbstractEventLoop = (
            looptime.new_event_loop() if self.memory else asyncio.new_event_loop()
        )
        self.quota = MEMORY_QUOTA if self.memory else REDIS_QUOTA
        self.windows = [(i.amount, float(i.get_expiry())) for i in parse_quotas(self.quota)]
        self.amount = min(a for a, _ in self.windows)
        self.longest = max(e for _, e in self.windows)
        self.callers: list[Caller] = []
        self.ended: list[Caller] = []
        self.sends: list[Send] = []
        self.arrivals: list[Arrival] = []
        self.boarded: dict[asyncio.Task[Any], tuple[tuple[Any, ...], str]] = {}
        """A caller's task -> who gave the place it boarded last, and its ticket (read by
        the stamp)."""
        self.boarding: set[str] = set()
        """The tickets of the Redis boardings on their way."""
        self.lifetime: dict[str, int | None] = {}
        """A Redis ticket -> the Redis lifetime it was boarded in (None: unknown)."""
        self.broken: list[str] = []
        self.wrong: str | None = None
        self.numbers = itertools.count()
        self.epoch = 0
        self.up = True
        self.proxy: RedisProxy | None = None
        self.direct: Any = None
        self.throttles: list[Throttle] = []
        self.sessions: list[aiohttp.ClientSession] = []
        self.runner: web.AppRunner | None = None
        self.url = self.run(self._serve())
        if self.server is not None:
            self.server.flush()
            self.proxy = RedisProxy(self.server.port)
            self.run(self.proxy.start())
            self.direct = redis.asyncio.Redis.from_url(self.server.url)

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def clock(self) -> float:
        """Sends and waits on the windows' clock: the loop's (virtual) in memory, the
        wall clock (Redis's ``TIME``) with Redis."""
        return self.loop.time() if self.memory else time.time()

    async def _serve(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        answer = request.headers["X-Reply"]
        if answer == "held":
            arrival = Arrival(int(request.headers["X-Send"]), self.loop.create_future())
            self.arrivals.append(arrival)
            try:
                answer = await arrival.answer
            finally:
                self.arrivals.remove(arrival)
        if answer == "dropped":
            return await drop_connection(request)
        return web.Response(status=int(answer), text=answer)

    @initialize(
        chained=st.tuples(st.booleans(), st.booleans()),
        allow=st.tuples(st.booleans(), st.booleans()),
    )
    def processes(self, chained: tuple[bool, bool], allow: tuple[bool, bool]) -> None:
        """Process 0 and 1: each alone as a middleware or through chain(); with Redis,
        each with its own ``on_storage_error``."""
        for which in (0, 1):
            options: dict[str, Any] = {
                "burst": 2,
                "quotas": self.quota,
                "key": lambda request: request.url.path.strip("/"),
            }
            if self.server is not None:
                assert self.proxy is not None
                options["storage"] = self.proxy.url if which == 0 else self.server.url
                options["on_storage_error"] = "allow" if allow[which] else "raise"
            throttle = Throttle(RATE, **options)
            self._watch(throttle, which)
            self.throttles.append(throttle)
            inner = (*resilient.chain(throttle),) if chained[which] else (throttle,)
            self.sessions.append(self.run(self._session((*inner, self._stamp(which)))))

    async def _session(self, middlewares: tuple[Any, ...]) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            middlewares=middlewares, timeout=aiohttp.ClientTimeout(total=None)
        )

    def _watch(self, throttle: Throttle, which: int) -> None:
        """Note who gives each place (observing only: the stores behave as they are)."""
        model = self
        fallback = throttle._fallback
        if fallback is not None:
            board = fallback.board

            def local(key: str, in_flight: int, now: float) -> tuple[float, str]:
                answer = board(key, in_flight, now)
                if not answer[0]:
                    model.boarded[asyncio.current_task()] = (("local", which), "")  # type: ignore[index]
                return answer

            fallback.board = local  # type: ignore[method-assign]
        quotas = throttle._quotas
        if not isinstance(quotas, RedisQuotas):
            return

        class Watched(RedisQuotas):
            __slots__ = ()

            def board(self, key: str, in_flight: int, now: float) -> tuple[float, str] | None:
                answer = super().board(key, in_flight, now)
                if answer is not None and not answer[0]:
                    model._boarded(answer[1])
                return answer

            async def ask(self, key: str, in_flight: int) -> tuple[float, str]:
                answer = await super().ask(key, in_flight)
                if not answer[0]:
                    model._boarded(answer[1])
                return answer

            async def _board(
                self, key: str, want: int, used: int, held: int
            ) -> tuple[list[str], tuple[float, str]]:
                epoch = model.epoch
                names = {f"{self._client}:{self._seq + 1 + i}" for i in range(want)}
                model.boarding |= names
                try:
                    answer = await super()._board(key, want, used, held)
                finally:
                    model.boarding -= names
                for ticket in answer[0]:
                    model.lifetime[ticket] = epoch if epoch == model.epoch else None
                return answer

        quotas.__class__ = Watched

    def _boarded(self, ticket: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        epoch = self.lifetime.get(ticket)
        self.boarded[task] = (("redis", epoch) if epoch is not None else ("lost",)), ticket

    def _stamp(self, which: int) -> Any:
        """The innermost middleware: every attempt that leaves the Throttle."""

        async def stamp(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
            task = asyncio.current_task()
            assert task is not None
            giver: tuple[Any, ...] | None = ("memory", which)
            ticket = ""
            if not self.memory:
                giver, ticket = self.boarded.pop(task, (None, ""))
                if giver is None:
                    self.broken.append(f"process {which}: a send that boarded nowhere")
                elif giver[0] == "lost":
                    giver = None
            key = request.url.path.strip("/")
            caller = next((c for c in self.callers if c.task is task), None)
            send = Send(next(self.numbers), which, key, self.clock(), giver, caller, ticket)
            self.sends.append(send)
            if caller is not None:
                caller.sends.append(send)
            request.headers["X-Send"] = str(send.number)
            request.headers["X-Reply"] = "held" if caller is None else caller.reply
            try:
                return await handler(request)
            finally:
                send.ended = self.clock()

        return stamp

    def teardown(self) -> None:
        async def shut() -> None:
            for caller in self.callers:
                caller.task.cancel()
            await asyncio.gather(*(c.task for c in self.callers), return_exceptions=True)
            for arrival in self.arrivals:
                if not arrival.answer.done():
                    arrival.answer.set_result("200")
            for session in self.sessions:
                await session.close()
            for throttle in self.throttles:
                quotas = throttle._quotas
                if isinstance(quotas, RedisQuotas):
                    await quotas.drain()
                    await quotas.store.close()
            if self.runner is not None:
                await self.runner.cleanup()
            if self.direct is not None:
                await self.direct.aclose()
            if self.proxy is not None:
                await self.proxy.close()

        try:
            if self.server is not None and not self.up:
                self.server.start()
            self.run(shut())
        finally:
            left = asyncio.all_tasks(self.loop)
            for task in left:
                task.cancel()
            if left:
                self.run(asyncio.gather(*left, return_exceptions=True))
            self.loop.close()

    # --- callers -----------------------------------------------------------------------

    async def _call(self, caller: Caller) -> None:
        session = self.sessions[caller.which]
        try:
            with contextlib.ExitStack() as stack:
                if caller.deadline is not None:
                    stack.enter_context(resilient.deadline(caller.deadline))
                async with session.get(f"{self.url}/{caller.key}") as resp:
                    await resp.read()
                    caller.outcome = str(resp.status)
        except (DeadlineExceeded, StorageError, aiohttp.ServerDisconnectedError) as exc:
            caller.outcome = type(exc).__name__
        except asyncio.CancelledError:
            caller.outcome = "cancelled"
            raise
        except Exception as exc:  # nothing else may reach a caller
            self.broken.append(f"process {caller.which}: {exc!r}")
        finally:
            caller.end = self.clock()

    def _start(self, which: int, key: str, deadline: float | None, reply: str = "held") -> Caller:
        caller = Caller(which, key, deadline, self.clock(), reply)
        caller.stormy = not self.up
        caller.task = self.loop.create_task(self._call(caller))
        self.callers.append(caller)
        return caller

    async def _settle(self, seconds: float | None = None) -> None:
        if seconds is None:
            seconds = VIRTUAL_SETTLE if self.memory else REAL_SETTLE
        if self.memory:
            for _ in range(20):  # loopback I/O, a few turns at a time
                await asyncio.sleep(seconds / 20)
        else:
            await asyncio.sleep(seconds)
        for caller in [c for c in self.callers if c.task.done()]:
            self.callers.remove(caller)
            self.ended.append(caller)

    def settle(self, seconds: float | None = None) -> None:
        self.run(self._settle(seconds))

    def _until(self, check: Any, limit: float) -> Any:
        """``check()`` once it is truthy, or its last value after ``limit`` seconds."""
        return self.run(poll(self.loop, self._settle, check, limit))

    def _comes_right(self, find: Any, limit: float) -> bool:
        """``await find()`` (what is wrong, or None) comes to None within ``limit``
        seconds; its last finding stays in ``self.wrong``."""

        async def right() -> bool:
            self.wrong = await find()
            return self.wrong is None

        return bool(self._until(right, limit))

    # --- rules ---------------------------------------------------------------------------

    @rule(
        which=st.integers(0, 1),
        key=st.sampled_from(KEYS),
        count=st.integers(1, 7),
        deadline=st.sampled_from(DEADLINES),
        reply=st.sampled_from(REPLIES),
        wait=st.booleans(),
    )
    def callers_arrive(
        self, which: int, key: str, count: int, deadline: float | None, reply: str, wait: bool
    ) -> None:
        """Callers start (answered at once, or held); ``wait``: then the windows empty
        (those beyond the quota go when the first slots leave)."""
        for _ in range(count):
            self._start(which, key, deadline, reply)
        self.settle()
        if wait:
            self.time_passes("windows")

    @rule(index=st.integers(0, 15), answer=st.sampled_from(["200", "429", "dropped"]))
    def a_request_is_answered(self, index: int, answer: str) -> None:
        waiting = self._answerable()
        if waiting:
            waiting[index % len(waiting)].answer.set_result(answer)
            self.settle()

    @rule(answer=st.sampled_from(["200", "429", "dropped"]))
    def every_request_is_answered(self, answer: str) -> None:
        for arrival in self._answerable():
            arrival.answer.set_result(answer)
        self.settle()

    def _answerable(self) -> list[Arrival]:
        alive = {s.number for s in self.sends if s.ended is None}
        return [a for a in self.arrivals if a.number in alive and not a.answer.done()]

    @rule(index=st.integers(0, 15))
    def a_caller_is_cancelled(self, index: int) -> None:
        """A caller waiting (for a token, a quota place, Redis) or on the wire."""
        if self.callers:
            self.callers[index % len(self.callers)].task.cancel()
            self.settle()

    @rule(
        which=st.integers(0, 1),
        key=st.sampled_from(KEYS),
        turns=st.integers(0, 12),
        deadline=st.sampled_from(DEADLINES),
        reply=st.sampled_from(REPLIES),
    )
    def a_caller_is_cancelled_at_some_await(
        self, which: int, key: str, turns: int, deadline: float | None, reply: str
    ) -> None:
        async def go() -> None:
            caller = self._start(which, key, deadline, reply)
            for _ in range(turns):
                await asyncio.sleep(0)
            caller.task.cancel()

        self.run(go())
        self.settle()

    @rule(
        index=st.integers(0, 15),
        answer=st.sampled_from(["200", "429", "dropped"]),
        turns=st.integers(0, 8),
    )
    def a_caller_is_cancelled_as_its_attempt_ends(
        self, index: int, answer: str, turns: int
    ) -> None:
        """Its answer is on its way back (the landing, reading the reply) when it is
        cancelled."""
        waiting = self._answerable()
        if not waiting:
            return
        arrival = waiting[index % len(waiting)]
        send = next(s for s in self.sends if s.number == arrival.number)

        async def go() -> None:
            arrival.answer.set_result(answer)
            for _ in range(turns):
                await asyncio.sleep(0)
            if send.caller is not None:
                send.caller.task.cancel()

        self.run(go())
        self.settle()

    @rule(seconds=st.sampled_from(["short", "lease", "windows"]))
    def time_passes(self, seconds: str) -> None:
        """Time passes; once every window has emptied, nobody waits without cause."""
        span = {"short": 0.3, "lease": 0.15, "windows": self.longest + 0.1}[seconds]
        if self.memory and seconds == "short":
            span = 0.7
        self.settle(span)
        if seconds != "windows":
            return

        limit = 0.01 if self.memory else 0.6
        if not self.up:  # each ask of a waiter may take the storage timeout
            limit += SHORT_TIMEOUT * (2 + len(self.callers)) + self.longest
        if not self._comes_right(self._stranded, limit):
            self.broken.append(f"stranded: {self.wrong}")

    async def _stranded(self) -> str | None:
        """A key whose callers wait (none of them on the wire) though the store that
        decides has room for one more: in memory (or in this process's windows while
        Redis is down, ``on_storage_error="allow"``) ``used + in_flight < amount`` in
        every window; with Redis, its slots in the window and its places in flight
        (every process's) fall short of the quota."""
        for which, throttle in enumerate(self.throttles):
            for key in KEYS:
                waiting = [
                    c
                    for c in self.callers
                    if (c.which, c.key) == (which, key)
                    and not any(s.ended is None for s in self.sends if s.caller is c)
                ]
                if not waiting:
                    continue
                state = throttle._states.get(key)
                mine = 0 if state is None else state.flying
                where = f"process {which} key {key}: {len(waiting)} wait"
                local = throttle._quotas if self.memory else throttle._fallback
                if self.memory or not self.up:
                    if not isinstance(local, Quotas):
                        return f"{where}, Redis is down and they do not fail"
                    if not local.room_at(key, mine, self.loop.time())[0]:
                        return f"{where}, {mine} in flight, room in the windows"
                    continue
                used = await self._used_in_redis(key)
                if used < self.amount:
                    return f"{where}, {used} slots and places in flight in Redis"
        return None

    async def _used_in_redis(self, key: str) -> int:
        """The key's places in flight and slots in its window, in Redis."""
        quotas = self.throttles[1]._quotas
        assert isinstance(quotas, RedisQuotas)
        flying, window, _ = quotas._keys(key)
        seconds, micros = await self.direct.time()
        cutoff = seconds + micros / 1e6 - self.longest
        slots = await self.direct.lrange(window, 0, -1)
        return await self.direct.zcard(flying) + sum(1 for s in slots if float(s) > cutoff)

    # --- faults (Redis) -------------------------------------------------------------------

    @precondition(lambda self: self.server is not None and self.up)
    @rule()
    def redis_is_killed_and_restarted(self) -> None:
        assert self.server is not None
        self._storm()
        self.server.stop()
        self.epoch += 1
        self.server.start()
        self.epoch += 1
        self._reconnect()
        self.settle()

    @precondition(lambda self: self.server is not None and self.up)
    @rule()
    def redis_stops(self) -> None:
        assert self.server is not None
        self._storm()
        self.server.stop()
        self.epoch += 1
        self.up = False
        self.settle()

    @precondition(lambda self: self.server is not None and not self.up)
    @rule()
    def redis_starts(self) -> None:
        assert self.server is not None
        self.server.start()
        self.epoch += 1
        self.up = True
        self._reconnect()
        self.settle()

    def _storm(self) -> None:
        for caller in self.callers:
            caller.stormy = True

    def _reconnect(self) -> None:
        assert self.server is not None
        self.run(self.direct.aclose())
        self.direct = redis.asyncio.Redis.from_url(self.server.url)

    @precondition(lambda self: self.proxy is not None and self.up)
    @rule(
        op=st.sampled_from(["quota_board", "quota_land"]),
        held=st.sampled_from(["reply", "command", "lost"]),
        key=st.sampled_from(KEYS),
        cancel=st.booleans(),
    )
    def a_storage_call_is_held_past_the_timeout(
        self, op: str, held: str, key: str, cancel: bool
    ) -> None:
        """Process 0's next ``op`` has its reply (or its command) held past the storage
        timeout, or its command lost: the caller gets StorageError (or its own windows'
        answer), and what the op took is handed back. A new caller boards (process 0 has
        handed back its spares first); one on the wire lands; the one boarding may be
        cancelled meanwhile."""
        proxy = self.proxy
        assert proxy is not None
        marker = script(f"throttle/{op}")
        (proxy.hold_reply if held == "reply" else proxy.hold_command)(marker)
        self._storm()

        async def hold() -> None:
            caller = None
            if op == "quota_board":  # no spare to take: the caller boards in Redis
                quotas = self.throttles[0]._quotas
                assert isinstance(quotas, RedisQuotas)
                await quotas.drain()
                caller = self._start(0, key, None)
            else:
                mine = [
                    a
                    for a in self._answerable()
                    if any(s.number == a.number and s.which == 0 for s in self.sends)
                ]
                if mine:
                    mine[0].answer.set_result("200")
            await asyncio.sleep(SHORT_TIMEOUT / 2)
            if cancel and caller is not None:
                caller.task.cancel()
            await asyncio.sleep(SHORT_TIMEOUT / 2 + 0.1)
            await self._quiet()  # what was taken out reached Redis first
            if held == "lost":
                proxy.drop()
            else:
                proxy.release()  # then the held reply (or command) comes, to nobody

        try:
            self.run(hold())
        finally:
            proxy.release()
        self.settle()

    # --- the rules, after every step -------------------------------------------------------

    async def _quiet(self) -> None:
        """Wait until the stores' background sends have ended."""
        for _ in range(50):
            tasks = [
                task
                for throttle in self.throttles
                if isinstance(throttle._quotas, RedisQuotas)
                for task in throttle._quotas._tasks
            ]
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    @invariant()
    def nothing_broke(self) -> None:
        assert not self.broken, self.broken

    @invariant()
    def no_window_admits_more_than_its_quota(self) -> None:
        groups: dict[tuple[Any, ...], list[float]] = {}
        for send in self.sends:
            if send.giver is not None:
                groups.setdefault((send.key, *send.giver), []).append(send.time)
        for group, times in groups.items():
            for amount, expiry in self.windows:
                most = most_in_a_span(times, expiry)
                assert most <= amount, f"{group}: {most} sends within {expiry} s (quota {amount})"

    @invariant()
    def no_caller_waits_past_its_deadline(self) -> None:
        now = self.clock()
        for caller in [*self.callers, *self.ended]:
            if caller.deadline is None:
                continue
            # With Redis: a round trip on a busy machine, plus one storage call (a first
            # one connects and loads a script: CI saw 0.17 s), which the timeout bounds.
            slack = 1e-3 if self.memory else 0.05 + SHORT_TIMEOUT
            if caller.stormy:
                slack += SHORT_TIMEOUT
            bound = caller.start + caller.deadline + slack
            ready = bound  # aiohttp re-sends a dropped request at once (no wait)
            for send in caller.sends:
                assert send.time <= ready, ("a wait past the deadline", caller, ready)
                ready = max(bound, (send.ended or send.time) + slack)
            if caller.outcome == "DeadlineExceeded":
                assert caller.end is not None
                assert caller.end <= ready, (caller, ready)
            waiting = not caller.task.done() and not any(
                s.ended is None for s in self.sends if s.caller is caller
            )
            assert not waiting or now <= bound, ("still waiting", caller, now, bound)
        self.ended = [c for c in self.ended if c.deadline is not None][-50:]

    @invariant()
    def in_flight_counts_what_is_in_flight(self) -> None:
        for which, throttle in enumerate(self.throttles):
            for key in KEYS:
                state = throttle._states.get(key)
                flying = 0 if state is None else state.flying
                on_wire = sum(
                    1 for s in self.sends if (s.which, s.key) == (which, key) and s.ended is None
                )
                alive = sum(1 for c in self.callers if (c.which, c.key) == (which, key))
                assert on_wire <= flying <= alive, (which, key, on_wire, flying, alive)
                if state is not None and not alive:
                    assert not state.waiters, (which, key, "waiters left")
                    assert state.landed is None, (which, key, "a wake-up left")

    @invariant()
    def redis_holds_only_what_a_process_holds(self) -> None:
        if self.server is None or not self.up:
            return
        assert self._comes_right(self._held_in_redis, 0.6), self.wrong

    async def _held_in_redis(self) -> str | None:
        await self._quiet()
        stores = [t._quotas for t in self.throttles if isinstance(t._quotas, RedisQuotas)]
        before = self._holding(stores)
        for key in KEYS:
            members = await self.direct.zrange(f"resilient:throttle/{{{key}}}/flying", 0, -1)
            stray = {m.decode() for m in members} - before - self._holding(stores)
            if stray:
                return f"key {key}: Redis holds {sorted(stray)}, which no process holds"
        if self.callers:
            return None
        for which, store in enumerate(stores):
            for name in ("_landed", "_used", "_returned", "_again", "_flights"):
                if getattr(store, name):
                    return f"process {which}: {name} left {getattr(store, name)}"
        return None

    def _holding(self, stores: list[RedisQuotas]) -> set[str]:
        """Every ticket a process holds: spares, places on the wire or on their way to
        Redis, landings and hand-backs not sent yet."""
        held = set(self.boarding)
        held.update(s.ticket for s in self.sends if s.ended is None)
        for store in stores:
            held |= _held(store)
        return held

    @rule(answer=st.sampled_from(["200", "429", "dropped"]))
    def every_call_ends(self, answer: str) -> None:
        """The requests on the wire are answered and the callers still waiting are
        cancelled: nothing is held in this process, and once a lease's spares have gone
        back (LEASE), nothing in Redis either."""
        for arrival in self._answerable():
            arrival.answer.set_result(answer)
        self.settle()
        for caller in self.callers:
            caller.task.cancel()
        self.settle()
        assert not self.callers, self.callers
        self.settle(_lease.LEASE + 0.05)
        if self.server is None or not self.up:
            return
        assert self._comes_right(self._left_in_redis, 0.6), self.wrong

    async def _left_in_redis(self) -> str | None:
        await self._quiet()
        for which, throttle in enumerate(self.throttles):
            if isinstance(throttle._quotas, RedisQuotas):
                for key in KEYS:
                    if throttle._quotas.spares(key):
                        return f"process {which} key {key} holds spares"
        for key in KEYS:
            if await self.direct.zcard(f"resilient:throttle/{{{key}}}/flying"):
                return f"key {key}: Redis holds places in flight"
        return None


def _held(store: RedisQuotas) -> set[str]:
    """The tickets ``store`` knows it holds: spares, and what it has yet to send."""
    held = {ticket for lease in store._leases.values() for ticket, _ in lease.spare}
    for pending in (store._landed, store._used, store._returned):
        for tickets in pending.values():
            held.update(tickets)
    for batch in store._again.values():
        for tickets in batch[:3]:
            held.update(tickets)
    return held


@pytest.mark.timeout(120)
def test_memory_quotas_hold_through_cancellations_and_outcomes() -> None:
    run_state_machine_as_test(
        QuotaModel, settings=settings(max_examples=100, stateful_step_count=30, deadline=None)
    )


@pytest.fixture
def short_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A storage timeout a held reply spends in a fraction of a second; a lease may take
    all the room it finds (SPREAD 1: leases, and spares, come at these small quotas)."""
    monkeypatch.setattr(redis_module, "STORAGE_TIMEOUT", SHORT_TIMEOUT)
    monkeypatch.setattr(quota_redis, "SPREAD", 1)


@pytest.mark.timeout(180)
def test_redis_quotas_hold_across_processes_through_faults(
    short_storage: None, redis_server: RedisServer
) -> None:
    class OnRedis(QuotaModel):
        server = redis_server

    run_state_machine_as_test(
        OnRedis, settings=settings(max_examples=12, stateful_step_count=25, deadline=None)
    )
