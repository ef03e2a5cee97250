"""Hedge: when a call is slow to answer, send a copy; the first response wins.

Rule (for requests that are safe to send twice, see :func:`hedgeable`): the call's own
attempt goes at once; if no response headers came back after ``delay`` seconds, a copy
goes, and another after each further ``delay``, up to ``max_hedges`` copies. The first
response (any status) is returned; the attempts still running are cancelled, and a
response that arrives for a loser anyway is released, so no pooled connection is held.
An attempt that fails (an exception) does not end the race while another is running;
when all fail, the call's own attempt's exception is raised.

``delay=None`` learns it per key: the p95 of the key's last :data:`WINDOW` latencies
(time to response headers, measured from each attempt's own start; see
:class:`Latencies`), and :data:`WARMUP_DELAY` before :data:`MIN_SAMPLES` were seen.

Every copy spends from the policy's :class:`~resilient.RetryBudget` (in any 10 s window,
copies <= ratio × calls + min_per_second × 10; default 0.1 and 5/s): a copy the budget
does not cover is not sent, so hedging cannot double the load of a slow server.

The call's own attempt runs in the caller's task, so a call answered within ``delay``
costs a heap push and a few comparisons, no task and no timer of its own (one loop
timer per policy serves every call, see :class:`_Schedule`). A copy runs in a task of
its own, in the caller's context;
when it wins, the caller's attempt is cancelled the way ``asyncio.timeout`` cancels
(``task.cancel()``, then ``task.uncancel()`` once the cancellation came back), so a
cancellation from outside still propagates.

In a pipeline a request Hedge never hedges goes on the fast path (:meth:`Hedge.before`
gives no ticket, nothing is recorded); any other runs Hedge whole.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import math
from array import array
from collections.abc import Sequence
from typing import Any, ClassVar

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from aiohttp.payload import BytesPayload

from .. import _clock, _deadline
from .._keys import KeyFunc, by_host
from .._outcomes import is_idempotent
from .._policy import SLOW, Outcome, Policy
from .._state import DEFAULT_MAX_KEYS, KeyedState
from .._validate import integer, optional_number, reject
from ..observe import _events, _metrics
from ..observe._stats import HedgeStats
from ..retry._budget import Balance, RetryBudget

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_MAX_HEDGES",
    "MAX_HEDGES",
    "MIN_SAMPLES",
    "QUANTILE",
    "WARMUP_DELAY",
    "WINDOW",
    "Hedge",
    "Latencies",
    "hedgeable",
]

DEFAULT_MAX_HEDGES = 1
"""Copies a call may send besides its own attempt."""
MAX_HEDGES = 10
"""Largest accepted ``max_hedges``."""
DEFAULT_BUDGET = RetryBudget(0.1, 5.0)
"""Copies per call (0.1) plus copies per second allowed regardless of traffic (5)."""
QUANTILE = 0.95
"""``delay=None`` hedges after this quantile of the key's latencies."""
WINDOW = 128
"""Latencies remembered per key (the newest replace the oldest)."""
EVERY = 16
"""The quantile is recomputed (one sort of the window) every this many samples."""
MIN_SAMPLES = 20
"""Samples before the learned quantile is used."""
WARMUP_DELAY = 1.0
"""Seconds before a copy while a key has fewer than :data:`MIN_SAMPLES` latencies: a
response slower than a second is in anyone's tail (Polly's fixed default is 2 s)."""

_KIND = "hedge"
_OWNER = "Hedge"


def hedgeable(request: ClientRequest) -> bool:
    """Safe to have on the wire twice at once: idempotent
    (:func:`resilient._outcomes.is_idempotent`: GET, HEAD, OPTIONS, TRACE, PUT, DELETE, or
    an ``Idempotency-Key``), and a body that is
    absent or in memory (bytes, str, JSON, a urlencoded form), with no upload tracker and
    no ``Expect: 100-continue``. A stream or a file is re-readable one send at a time, not
    by two sends at once, so it is not hedged (the call simply goes once)."""
    if not is_idempotent(request):
        return False
    body = request._body
    if body is not None and not isinstance(body, BytesPayload):
        return False
    return request._continue is None and getattr(request, "_upload_tracker", None) is None


class Latencies:
    """One key's recent latencies: a ring of :data:`WINDOW` doubles (1 KiB a key) and
    its p95, recomputed by sorting the ring every :data:`EVERY` samples (amortised
    O(log n) per sample) once :data:`MIN_SAMPLES` were seen.

    ``p95`` is the sample quantile at position ``0.95 × (n + 1)`` of the n samples in the
    ring, interpolated between neighbours (Hyndman & Fan's type 6, Excel's
    ``PERCENTILE.EXC``): the k-th smallest of n samples is exceeded on average by a share
    ``(n + 1 − k) / (n + 1)`` of later ones, so this position is exceeded by 5 % of them,
    where the nearest rank (``ceil(0.95 × n)``-th) of 128 samples is exceeded by 5.4 %
    (8 % more copies than asked for). What is recorded is the latency of each *response*: the call's
    own attempt when it answers first, or the winning copy, timed from when it was sent.
    A cancelled loser records nothing (its latency is unknown), so once hedging hides a
    slow tail the estimate tracks the responses that arrive; the budget bounds the
    copies this may add.
    """

    __slots__ = ("count", "hedged", "p95", "ring", "won")

    def __init__(self) -> None:
        self.ring = array("d")  # 8 bytes a sample (a list of floats takes 32)
        self.count = 0
        self.p95: float | None = None
        self.hedged = 0
        self.won = 0

    def add(self, seconds: float) -> None:
        ring, count = self.ring, self.count
        if count < WINDOW:
            ring.append(seconds)
        else:
            ring[count % WINDOW] = seconds
        count = self.count = count + 1
        if count >= MIN_SAMPLES and (count == MIN_SAMPLES or count % EVERY == 0):
            self.p95 = quantile(ring, QUANTILE)

    def delay(self) -> float:
        p95 = self.p95
        return WARMUP_DELAY if p95 is None else p95


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (not empty) at position ``h = q × (n + 1)`` of the
    sorted values (1-based), linearly interpolated; the smallest value for ``h <= 1``, the
    largest for ``h >= n`` (Hyndman & Fan's type 6)."""
    ordered = sorted(values)
    position = q * (len(ordered) + 1)
    if position <= 1.0:
        return ordered[0]
    if position >= len(ordered):
        return ordered[-1]
    below = math.floor(position)
    low, high = ordered[below - 1], ordered[below]
    return low + (position - below) * (high - low)


class Hedge(Policy):
    """Send a copy of a slow idempotent call; the first response wins (module docstring).

    ``delay``: seconds without response headers before a copy goes; ``None`` (default):
    the key's observed p95, learned online (:data:`WARMUP_DELAY` until
    :data:`MIN_SAMPLES` latencies). ``max_hedges``: copies per call, in [1, 10] (each
    after another ``delay``). ``budget``: a :class:`~resilient.RetryBudget` the copies
    spend from (default ratio 0.1, 5/s), or ``None`` for no budget. ``key``: request ->
    key (default ``by_host``). ``max_keys``: keys remembered at once.

    Only :func:`hedgeable` requests are hedged; any other goes once, untouched. In a
    :func:`resilient.chain` it sits outside ``Retry`` (auth -> Hedge -> Retry -> ...), so
    each copy is retried, paced and broken like any call.
    """

    __slots__ = (
        "_balance",
        "_budget",
        "_delay",
        "_get",
        "_key",
        "_max_hedges",
        "_schedule",
        "_states",
    )

    kind: ClassVar[str] = _KIND
    order: ClassVar[int] = 5

    def __init__(
        self,
        *,
        delay: float | None = None,
        max_hedges: int = DEFAULT_MAX_HEDGES,
        budget: RetryBudget | None = DEFAULT_BUDGET,
        key: KeyFunc = by_host,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._delay = optional_number(
            _OWNER, "delay", delay, 0.0, math.inf, high_open=True, none_means="learn the p95"
        )
        self._max_hedges = integer(_OWNER, "max_hedges", max_hedges, 1, MAX_HEDGES)
        if budget is not None and not isinstance(budget, RetryBudget):
            raise reject(_OWNER, "budget", "a RetryBudget or None", budget)
        self._budget = budget
        self._balance = None if budget is None else Balance(budget)
        if not callable(key):
            raise reject(_OWNER, "key", "a callable (request) -> str", key)
        self._key = key
        self._states: KeyedState[Latencies] = KeyedState(
            lambda _key: Latencies(), _always_idle, integer(_OWNER, "max_keys", max_keys)
        )
        self._get = self._states.get
        self._schedule = _Schedule()

    @property
    def delay(self) -> float | None:
        return self._delay

    @property
    def max_hedges(self) -> int:
        return self._max_hedges

    @property
    def budget(self) -> RetryBudget | None:
        return self._budget

    def current_delay(self, key: str) -> float:
        """Seconds a call of ``key`` waits now before a copy goes."""
        if self._delay is not None:
            return self._delay
        state = self._states.get(key)
        return WARMUP_DELAY if state is None else state.delay()

    def stats(self) -> dict[str, HedgeStats]:
        """A snapshot of every key (call it inside the event loop)."""
        return {
            key: HedgeStats(
                key=key,
                delay=self._delay if self._delay is not None else state.delay(),
                samples=len(state.ring),
                p95=state.p95,
                hedged=state.hedged,
                won=state.won,
            )
            for key, state in self._states.items()
        }

    def __repr__(self) -> str:
        return (
            f"Hedge(delay={self._delay!r}, max_hedges={self._max_hedges!r},"
            f" budget={self._budget!r}, key={getattr(self._key, '__name__', 'key')})"
        )

    def keyed_by(self) -> KeyFunc:
        return self._key

    def before(self, request: ClientRequest, key: str | None, now: float) -> Any:
        """A request it never hedges (not :func:`hedgeable`) goes once, untouched: its
        ticket is None (nothing held, no latency recorded, as in ``__call__``; the pipeline
        calls no ``after`` for it); any
        other is :data:`SLOW` (the race needs a task)."""
        if hedgeable(request):
            return SLOW
        return None

    def after(self, ticket: None, request: ClientRequest, outcome: Outcome) -> bool:
        """Nothing to record: the outcome stands."""
        return True

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, self._key(request), request, handler)
        started = _clock.now_for(request)
        _deadline.mark_start(request, started)
        if not hedgeable(request):
            return await handler(request)
        key = self._key(request)
        state = self._get(key) or self._states.get_or_create(key)
        if self._balance is not None:
            self._balance.deposit(started)
        delay = self._delay if self._delay is not None else state.delay()
        race = _Race(self, request, handler, key, state, started, delay)
        self._schedule.add(request.loop, started + delay, race)
        try:
            resp = await handler(request)
        except BaseException as exc:
            return await race.own_failed(exc)
        if race.copies is None:  # no copy went: the common case
            race.settled = True  # its entry in the schedule is dropped when next looked at
            state.add(_clock.now_for(request) - started)
            return resp
        return race.own_answered(resp)


def _always_idle(state: Latencies) -> bool:
    """A key's latencies are only a cache: it may be evicted whenever the map is full."""
    return True


async def _send(handler: ClientHandlerType, request: ClientRequest) -> ClientResponse:
    """One copy on the wire (a coroutine, so it can be a task)."""
    return await handler(request)


class _Schedule:
    """When each race's next copy is due: a heap of ``(due, n, race)`` and one loop timer,
    armed for the earliest entry (so a call costs a heap push, not a timer of its own).

    A race that ends (answered, or settled) stays in the heap and is dropped when it
    reaches the top: each time the timer fires it pops every ended race at the top, sends
    the copies that are due, and re-arms for the next live entry; the heap holds at most
    the calls of the last ``delay`` seconds. Bound to one event loop; a policy used from
    another loop starts afresh.
    """

    __slots__ = ("at", "count", "handle", "heap", "loop")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, _Race]] = []
        self.handle: asyncio.TimerHandle | None = None
        self.at = math.inf
        self.loop: asyncio.AbstractEventLoop | None = None
        self.count = 0

    def add(self, loop: asyncio.AbstractEventLoop, due: float, race: _Race) -> None:
        if loop is not self.loop:  # first use, or another event loop
            self.loop, self.heap, self.handle, self.at = loop, [], None, math.inf
        self.count += 1
        heapq.heappush(self.heap, (due, self.count, race))
        if due < self.at:
            self._arm(loop, due)

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = loop.call_at(due, self._fire, loop)
        self.at = due

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Timer callback: drop ended races, send the copies due, re-arm."""
        self.handle, self.at = None, math.inf
        heap = self.heap
        now = loop.time()
        try:
            while heap:
                due, _, race = heap[0]
                if race.settled or race.waiter is not None:
                    heapq.heappop(heap)
                elif due <= now:
                    heapq.heappop(heap)
                    race.hedge(now)  # may add the race's next copy
                else:
                    break
        finally:
            if heap and heap[0][0] < self.at and loop is self.loop:
                self._arm(loop, heap[0][0])


class _Race:
    """One hedged call: its own attempt (in the caller's task) against its copies (tasks).

    ``copies``: ``(task, sent at)`` of each copy sent, None until the first. ``winner``:
    the response that won, set once; ``settled``: the race is over (a response won or
    the caller left), after which any response a copy still delivers is released.
    """

    __slots__ = (
        "base",
        "caller",
        "context",
        "copies",
        "delay",
        "handler",
        "key",
        "policy",
        "request",
        "settled",
        "started",
        "state",
        "waiter",
        "winner",
        "won_by",
    )

    def __init__(
        self,
        policy: Hedge,
        request: ClientRequest,
        handler: ClientHandlerType,
        key: str,
        state: Latencies,
        started: float,
        delay: float,
    ) -> None:
        self.policy = policy
        self.request = request
        self.handler = handler
        self.key = key
        self.state = state
        self.started = started
        self.delay = delay
        self.caller = asyncio.current_task(request.loop)
        self.context = contextvars.copy_context()  # the caller's: its copies run in it
        self.copies: list[tuple[asyncio.Task[ClientResponse], float]] | None = None
        self.winner: ClientResponse | None = None
        self.settled = False
        self.waiter: asyncio.Future[None] | None = None
        self.base = -1  # the caller's cancelling() count before a copy's win cancelled it
        self.won_by = 0  # the winning copy's number (1 = the first copy)

    def hedge(self, now: float) -> None:
        """Its copy is due (and the race still on): send one more copy if the budget
        covers it, and schedule the next."""
        copies = self.copies if self.copies is not None else []
        self.copies = copies
        loop = self.request.loop
        attempt = len(copies) + 1
        balance = self.policy._balance
        if balance is not None and not balance.withdraw(now):
            _events.emit(
                "hedge_skipped", _KIND, self.key, self.request,
                attempt=attempt, reason="hedge budget exhausted",
            )  # fmt: skip
            return
        self.state.hedged += 1
        _events.emit(
            "hedge_sent", _KIND, self.key, self.request,
            attempt=attempt, reason=f"no response after {now - self.started:.3f}s",
        )  # fmt: skip
        task = loop.create_task(_send(self.handler, self.request), context=self.context)
        copies.append((task, now))
        task.add_done_callback(self._landed)
        if attempt < self.policy._max_hedges:
            self.policy._schedule.add(loop, now + self.delay, self)

    def _landed(self, task: asyncio.Task[ClientResponse]) -> None:
        """A copy ended: the first response wins; anything after the race is released."""
        if task.cancelled():
            self._maybe_all_failed()
            return
        exc = task.exception()
        if exc is not None:
            self._maybe_all_failed()
            return
        resp = task.result()
        if self.settled:
            resp.release()
            return
        self.winner = resp
        self._settle()
        state = self.state
        state.won += 1
        copies = self.copies or []
        number = next(i for i, (t, _) in enumerate(copies) if t is task)
        self.won_by = number + 1
        state.add(_clock.now_for(self.request) - copies[number][1])
        if self.waiter is not None:  # the caller's own attempt failed: it waits for us
            if not self.waiter.done():
                self.waiter.set_result(None)
        elif self.caller is not None:  # interrupt the caller's own attempt
            self.base = self.caller.cancelling()
            self.caller.cancel()

    def _maybe_all_failed(self) -> None:
        """Wake a caller waiting on copies when none is left running."""
        waiter = self.waiter
        if waiter is None or waiter.done() or self.copies is None:
            return
        if all(t.done() for t, _ in self.copies):
            waiter.set_result(None)

    def _settle(self) -> None:
        """The race is over: no more copies; cancel the running ones."""
        self.settled = True
        for task, _ in self.copies or ():
            task.cancel()

    def _won(self, winner: ClientResponse) -> ClientResponse:
        """Hand back a copy's winning response (the caller's attempt was cancelled)."""
        caller = self.caller
        if self.base >= 0 and caller is not None:
            if caller.cancelling() > self.base:
                caller.uncancel()
            if caller.cancelling() > self.base:  # cancelled from outside as well
                winner.release()
                raise asyncio.CancelledError
        _events.emit(
            "hedge_won", _KIND, self.key, self.request,
            attempt=self.won_by, status=winner.status,
        )  # fmt: skip
        return winner

    def own_answered(self, resp: ClientResponse) -> ClientResponse:
        """The caller's own attempt returned a response while copies were out."""
        winner = self.winner
        if winner is not None:  # a copy won first, and the attempt ignored the cancel
            resp.release()
            return self._won(winner)
        self._settle()
        self.state.add(_clock.now_for(self.request) - self.started)
        return resp

    async def own_failed(self, exc: BaseException) -> ClientResponse:
        """The caller's own attempt raised: a copy's win (our cancel), an outside cancel,
        or a failure (then wait for the copies still running)."""
        winner = self.winner
        if winner is not None:
            return self._won(winner)
        copies = self.copies
        if (
            isinstance(exc, asyncio.CancelledError)
            or not isinstance(exc, Exception)
            or copies is None
            or all(t.done() for t, _ in copies)
        ):
            self._settle()
            raise exc
        waiter = self.waiter = self.request.loop.create_future()
        try:
            await waiter
        except BaseException:  # cancelled from outside while the copies ran
            if self.winner is not None:
                self.winner.release()
            self._settle()
            raise
        if self.winner is not None:
            return self._won(self.winner)
        self._settle()
        raise exc
