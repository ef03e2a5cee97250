"""The pause gate's rules, driven through both stores, with faults (hypothesis, stateful).

Two "processes" (two RateLimitBackoff instances, each run through a pipeline as
``resilient.chain`` builds it) send requests of one key to a scripted wire: the test
answers each request on the wire (200, a 429 with a short ``Retry-After``, a dropped
connection), cancels callers (also after any number of turns of the loop: at every
await of the call), and lets real time pass. With ``storage="memory://"`` each process
has its own pause; with a real ``redis-server`` they share it (process 0 through a
:class:`~redis_proxy.RedisProxy`), and the faults add a Redis killed and restarted (its
data lost) and a reply of ``admit``, ``claim`` or ``pause`` held past the storage timeout.

The rules, checked at every send and after every step (background work drained):

- a request leaves only while its process's gate is open, or as that gate's probe;
- one probe at a time: in a process, and with Redis across processes (save probes whose
  claim Redis lost in a restart);
- nothing is held by a call that ended: a gate's ``probing`` only while its probe is on
  the wire, its ``flying`` never above its requests on the wire, and a probe claim in
  Redis only while the probe it names is on the wire;
- nobody is stranded: once every pause is over (time passes), a process whose callers
  wait has a request on the wire, or its callers have all gone.

Times are kept short (pauses of at most 0.2 s; the learned rate's floor raised so paced
departures are milliseconds apart; the healthy lease off, so every admission asks Redis).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from multidict import CIMultiDict, CIMultiDictProxy
from redis_proxy import RedisProxy, arg
from scripted import poll
from yarl import URL

import resilient.ratelimit._learned as learned_module
import resilient.ratelimit._redis as pause_module
import resilient.storage._redis as redis_module
from resilient import RateLimitBackoff, RateLimited, StorageError
from resilient._pipeline import Pipeline
from resilient.testing import RedisServer

KEY = "k"
HASH = f"resilient:pause/{{{KEY}}}"
SHORT_TIMEOUT = 0.2
"""Seconds a storage call may take while a reply is held."""
SETTLE = 0.03
"""Seconds of real time a step lets the loop run before it is checked."""
OVER = 0.45
"""Seconds after which every pause is over (pauses are at most 0.2 s; a claim found busy
looks again within PROBE_POLL) and a waiting caller has moved on."""
SETTLE_CLAIM = 2.5
"""Seconds a claim may be on its way (at most the storage timeout) before its probe leaves."""


class Response:
    """What the policy reads of a response: status, headers, release()."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self.released = False

    def release(self) -> None:
        self.released = True


@dataclass(eq=False)
class Sent:
    """A request on the wire: its process, whether it probes, the restarts it saw."""

    which: int
    probe: bool
    epoch: int
    answer: asyncio.Future[Any]
    task: asyncio.Task[Any] | None


@dataclass(eq=False)
class Caller:
    which: int
    task: asyncio.Task[Any]
    outcome: list[str] = field(default_factory=list)


class PauseModel(RuleBasedStateMachine):
    """See the module docstring; ``server``: a Redis server (shared), else memory."""

    server: RedisServer | None = None

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.wire: list[Sent] = []
        self.callers: list[Caller] = []
        self.broken: list[str] = []
        self.wrong: str | None = None
        self.epoch = 0
        self.proxy: RedisProxy | None = None
        self.direct: Any = None
        storages = ["memory://", "memory://"]
        if self.server is not None:
            self.server.flush()
            self.proxy = RedisProxy(self.server.port)
            storages = [self.run(self.proxy.start()), self.server.url]
            self.direct = redis.asyncio.Redis.from_url(self.server.url)
        options: dict[str, Any] = {"key": lambda request: KEY, "base": 0.05, "cap": 0.2}
        self.policies = [RateLimitBackoff(storage=s, max_wait=30.0, **options) for s in storages]
        self.pipelines = [Pipeline([policy]) for policy in self.policies]
        self.request = SimpleNamespace(
            loop=self.loop,
            method="GET",
            url=URL("http://k/x"),
            body=b"",
            session=SimpleNamespace(timeout=SimpleNamespace(total=None)),
            _timer=None,
        )

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def teardown(self) -> None:
        async def shut() -> None:
            for sent in self.wire:
                if not sent.answer.done():
                    sent.answer.set_result(Response(200, {}))
            for caller in self.callers:
                caller.task.cancel()
            await asyncio.gather(*(c.task for c in self.callers), return_exceptions=True)
            for policy in self.policies:
                if policy._shared is not None:
                    await policy._shared.drain()
                    await policy._shared._store.close()
            if self.direct is not None:
                await self.direct.aclose()
            if self.proxy is not None:
                await self.proxy.close()

        try:
            self.run(shut())
        finally:
            left = asyncio.all_tasks(self.loop)
            for task in left:
                task.cancel()
            if left:
                self.run(asyncio.gather(*left, return_exceptions=True))
            self.loop.close()

    # --- the wire and the callers ------------------------------------------------------

    def _handler(self, which: int) -> Any:
        policy = self.policies[which]

        async def send(request: Any) -> Any:
            gate = policy._gates.get(KEY)
            probe = gate is not None and gate.closed
            if probe and not gate.probing:  # type: ignore[union-attr]
                self.broken.append(f"process {which} sent while its gate was closed")
            mates = [s for s in self.wire if s.probe and s.epoch == self.epoch]
            if probe and self.server is None:
                mates = [s for s in mates if s.which == which]
            if probe and mates:
                self.broken.append(f"process {which} probes beside {len(mates)} other probe(s)")
            future = self.loop.create_future()
            sent = Sent(which, probe, self.epoch, future, asyncio.current_task())
            self.wire.append(sent)
            try:
                return await sent.answer
            finally:
                self.wire.remove(sent)

        return send

    async def _call(self, caller: Caller) -> None:
        pipeline = self.pipelines[caller.which]
        try:
            resp = await pipeline(self.request, self._handler(caller.which))  # type: ignore[arg-type]
            caller.outcome.append(str(resp.status))
        except (RateLimited, StorageError, aiohttp.ClientConnectionError) as exc:
            caller.outcome.append(type(exc).__name__)
        except Exception as exc:  # nothing else may reach a caller
            self.broken.append(f"process {caller.which}: {exc!r}")

    def _start(self, which: int) -> Caller:
        caller = Caller(which, None)  # type: ignore[arg-type]
        caller.task = self.loop.create_task(self._call(caller))
        self.callers.append(caller)
        return caller

    async def _settle(self, seconds: float = SETTLE) -> None:
        await asyncio.sleep(seconds)
        for _ in range(2):
            for policy in self.policies:
                if policy._shared is not None:
                    await policy._shared.drain()
            await asyncio.sleep(0.005)
        self.callers = [c for c in self.callers if not c.task.done()]

    def settle(self, seconds: float = SETTLE) -> None:
        self.run(self._settle(seconds))

    # --- rules ---------------------------------------------------------------------------

    @rule(which=st.integers(0, 1))
    def a_caller_arrives(self, which: int) -> None:
        self._start(which)
        self.settle()

    @rule(
        index=st.integers(0, 7),
        answer=st.sampled_from(["200", "429 0.05", "429 0.15", "429", "dropped"]),
    )
    def a_request_is_answered(self, index: int, answer: str) -> None:
        waiting = [s for s in self.wire if not s.answer.done()]
        if not waiting:
            return
        sent = waiting[index % len(waiting)]
        if answer == "dropped":
            sent.answer.set_exception(aiohttp.ServerDisconnectedError())
        elif answer == "200":
            sent.answer.set_result(Response(200, {}))
        else:
            after = answer.split()[1:]  # "429 <Retry-After>", or "429" without one
            sent.answer.set_result(Response(429, {"Retry-After": after[0]} if after else {}))
        self.settle()

    @rule(index=st.integers(0, 15))
    def a_caller_is_cancelled(self, index: int) -> None:
        """A caller waiting (for its turn, its departure) or on the wire is cancelled."""
        if self.callers:
            self.callers[index % len(self.callers)].task.cancel()
            self.settle()

    @rule(cancelled=st.booleans())
    def a_probe_ends_without_an_answer(self, cancelled: bool) -> None:
        """The probe on the wire (once the pause is over, if callers wait) is cancelled, or
        its connection drops: the next waiter probes instead, and the claim in Redis is
        handed back."""
        if not self.callers:
            return
        probes = self._until(lambda: [s for s in self.wire if s.probe and not s.answer.done()])
        if not probes:
            return
        if cancelled and probes[0].task is not None:
            probes[0].task.cancel()
        else:
            probes[0].answer.set_exception(aiohttp.ServerDisconnectedError())
        self.settle()

    @rule(which=st.integers(0, 1), turns=st.integers(0, 8))
    def a_caller_is_cancelled_at_some_await(self, which: int, turns: int) -> None:
        async def go() -> None:
            caller = self._start(which)
            for _ in range(turns):
                await asyncio.sleep(0)
            caller.task.cancel()

        self.run(go())
        self.settle()

    @rule()
    def time_passes(self) -> None:
        """Every pause ends: a process whose callers wait has a request on the wire."""
        self.settle(OVER)
        for which in (0, 1):
            if self._until(lambda w=which: not self._stranded(w)) is False:
                self.broken.append(f"process {which}: callers stranded")

    def _stranded(self, which: int) -> bool:
        waiting = [c for c in self.callers if c.which == which]
        on_wire = [s for s in self.wire if s.which == which]
        return bool(waiting) and not on_wire and not self._busy_elsewhere(which)

    def _until(self, check: Any, limit: float = OVER) -> Any:
        """``check()`` once it is truthy, or its last value after ``limit`` seconds (a
        Redis round trip on its way, a pause about to end: what holds at rest)."""
        return self.run(poll(self.loop, self._settle, check, limit))

    def _busy_elsewhere(self, which: int) -> bool:
        """With Redis, another process's probe on the wire holds the key for everyone."""
        return self.server is not None and any(s.probe and s.which != which for s in self.wire)

    # --- faults (Redis) -------------------------------------------------------------------

    @precondition(lambda self: self.server is not None)
    @rule()
    def redis_restarts(self) -> None:
        assert self.server is not None
        self.server.stop()
        self.server.start()
        self.epoch += 1
        self.run(self.direct.aclose())
        self.direct = redis.asyncio.Redis.from_url(self.server.url)
        self.settle()

    @precondition(lambda self: self.proxy is not None)
    @rule(op=st.sampled_from(["admit", "claim", "pause"]), arrive=st.booleans())
    def a_reply_is_held_past_the_timeout(self, op: str, arrive: bool) -> None:
        """Process 0's next ``op`` runs in Redis but its reply comes after the storage
        timeout: the caller gets StorageError, and what the op took is handed back."""
        proxy = self.proxy
        assert proxy is not None
        proxy.hold_reply(arg(op))
        timeout = redis_module.STORAGE_TIMEOUT
        redis_module.STORAGE_TIMEOUT = SHORT_TIMEOUT

        async def hold() -> None:
            if arrive:
                self._start(0)
            limited = [s for s in self.wire if s.which == 0 and not s.answer.done()]
            if op == "pause" and limited:
                limited[0].answer.set_result(Response(429, {"Retry-After": "0.05"}))
            await asyncio.sleep(SHORT_TIMEOUT + 0.1)
            for policy in self.policies:
                await policy._shared.drain()  # type: ignore[union-attr]  # releases first
            proxy.release()  # then the held reply comes, to nobody

        try:
            self.run(hold())
        finally:
            redis_module.STORAGE_TIMEOUT = timeout
        self.settle()

    # --- the rules, after every step -------------------------------------------------------

    @invariant()
    def nothing_broke(self) -> None:
        assert not self.broken, self.broken

    @invariant()
    def a_gate_holds_only_what_is_on_the_wire(self) -> None:
        for which, policy in enumerate(self.policies):
            gate = policy._gates.get(KEY)
            if gate is None:
                continue
            mine = [s for s in self.wire if s.which == which]
            assert gate.flying <= len(mine), (which, gate.flying, len(mine))
            if gate.probing:  # its claim may be on its way to Redis: the probe follows
                probing = self._until(
                    lambda w=which, g=gate: (
                        not g.probing or any(s.probe for s in self.wire if s.which == w)
                    ),
                    SETTLE_CLAIM,
                )
                assert probing, f"process {which}: a probe role without a probe"

    @invariant()
    def a_redis_claim_names_a_probe_on_the_wire(self) -> None:
        if self.server is None:
            return

        async def sound() -> bool:
            self.wrong = await self._orphan_claim()
            return self.wrong is None

        assert self._until(sound, SETTLE_CLAIM), self.wrong

    async def _orphan_claim(self) -> str | None:
        """What is wrong with the probe claim in Redis, if anything."""
        claim = await self.direct.hget(HASH, "probe")
        if claim is None:
            return None
        token = claim.decode()
        holders = [
            which
            for which, policy in enumerate(self.policies)
            if policy._shared is not None and policy._shared._held.get(KEY) == token
        ]
        if not holders:
            return f"the claim {token} is held by no process"
        if not any(s.probe and s.which == holders[0] for s in self.wire):
            return f"process {holders[0]} holds the claim {token} and no probe is on the wire"
        return None


@pytest.fixture
def fast_law(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paced departures milliseconds apart (the learned rate's floor and slow start raised,
    in Python and in the Lua loaded after this); every admission asks Redis; a busy claim
    looks again within 0.1 s."""
    monkeypatch.setattr(learned_module, "MIN_RATE", 200.0)
    monkeypatch.setattr(learned_module, "SLOW_START_MIN", 200.0)
    monkeypatch.setattr(pause_module, "SLOW_START_MIN", 200.0)
    monkeypatch.setattr(pause_module, "HEALTHY_LEASE", 0.0)
    monkeypatch.setattr(pause_module, "PROBE_POLL", 0.1)


@pytest.mark.timeout(600)
def test_the_memory_store_follows_the_pause_rules(fast_law: None) -> None:
    run_state_machine_as_test(
        PauseModel, settings=settings(max_examples=25, stateful_step_count=25, deadline=None)
    )


@pytest.mark.timeout(600)
def test_the_redis_store_follows_the_pause_rules_through_faults(
    fast_law: None, redis_server: RedisServer
) -> None:
    class OnRedis(PauseModel):
        server = redis_server

    run_state_machine_as_test(
        OnRedis, settings=settings(max_examples=25, stateful_step_count=25, deadline=None)
    )
