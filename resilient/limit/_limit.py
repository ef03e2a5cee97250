"""ConcurrencyLimit: at most N requests of a key in flight; the rest queue, first come
first served, or are refused at once.

The rule:

- A request *holds a slot* from when it is admitted until its attempt's handler returns:
  the response headers arrived (aiohttp returns the response then), or the attempt
  raised, or it was cancelled. The response body is not counted: a slot is not held
  while the caller reads it, however long that takes (see :class:`ConcurrencyLimit`).
- A request that finds a free slot and nobody queued takes it. Otherwise it queues; a
  freed slot goes to the head of the queue (handed over, never up for grabs), so
  waiters leave strictly first come, first served.
- Refused at once with :class:`~resilient.LimitExceeded`, nothing sent: a caller that
  finds ``max_queue`` callers already queued (``"queue full"``), or that could not be
  answered within what it may wait (``"deadline"``: :func:`resilient.deadline`,
  aiohttp's ``ClientTimeout.total``): its expected turn, ``(ahead + 1) × hold /
  limit``, plus one ``hold``, lies beyond its allowance; ``hold`` is the key's smoothed
  slot-holding time (EWMA, weight :data:`HOLD_WEIGHT`; 0 before the first release). A
  queued caller whose turn has not come when only ``hold`` of its allowance is left
  leaves the queue then, with ``LimitExceeded("deadline")``: sent so late, it would
  time out on the wire, after the server did the work.
- A waiter that is cancelled (or gives up) leaves no trace: it leaves the queue, and a
  slot handed to it in the same instant goes on to the next waiter.

In a pipeline a request that finds a free slot and nobody queued takes it in
:meth:`ConcurrencyLimit.before` and hands it back in :meth:`ConcurrencyLimit.after`
(whatever the outcome); one that must queue or be refused runs the policy whole.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any, ClassVar, NoReturn

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .. import _clock, _deadline
from .._errors import LimitExceeded
from .._keys import KeyFunc, by_host
from .._policy import SLOW, Outcome, Policy
from .._state import DEFAULT_MAX_KEYS, KeyedState
from .._validate import integer, reject
from ..observe import _events, _metrics
from ..observe._stats import LimitStats

__all__ = ["HOLD_WEIGHT", "MAX_CONCURRENT", "ConcurrencyLimit"]

MAX_CONCURRENT = 1_000_000
"""Largest accepted ``max_concurrent``."""
HOLD_WEIGHT = 0.1
"""Weight of the newest sample in the key's smoothed slot-holding time."""

_KIND = "concurrency_limit"
_OWNER = "ConcurrencyLimit"


class _Slots:
    """One key: slots held, the queue (futures, the head first), the smoothed hold time."""

    __slots__ = ("flying", "hold", "limit", "rejected", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.flying = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.hold = -1.0  # < 0: no sample yet
        self.rejected = 0

    def release(self, held: float) -> None:
        """A slot held ``held`` seconds is free: hand it to the first live waiter."""
        hold = self.hold
        self.hold = held if hold < 0.0 else hold + HOLD_WEIGHT * (held - hold)
        self.flying -= 1
        self.admit()

    def admit(self) -> None:
        """Hand free slots to the head of the queue (the slot moves with the hand-over:
        ``flying`` counts it at once, so no newcomer can take it first)."""
        waiters = self.waiters
        while waiters and self.flying < self.limit:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self.flying += 1


def _idle(state: _Slots) -> bool:
    """Nothing to remember: no slot held, nobody queued (the hold estimate is a cache)."""
    return not state.flying and not state.waiters


class ConcurrencyLimit(Policy):
    """At most ``max_concurrent`` requests of a key in flight (see the module docstring).

    ``max_concurrent``: an int in [1, 1e6]. ``max_queue``: callers that may wait for a
    slot, an int >= 0 (0: never wait), or ``None`` (default: any number; the caller's
    deadline still bounds each wait). ``key``: request -> key (default ``by_host``).
    ``max_keys``: keys remembered at once.

    In a :func:`resilient.chain` it sits inside ``Retry``, ``CircuitBreaker`` and
    ``RateLimitBackoff`` and outside ``Throttle``: each wire attempt (a retry included)
    holds a slot; a request waiting for its Throttle token already holds one.
    ``LimitExceeded`` is not retried by ``Retry`` and not a failure for the breaker.

    Why the body is not counted: aiohttp hands the response back when its headers
    arrive, and the server has done its work by then for most APIs (the body of a JSON
    answer is written with the headers). Holding the slot until the caller has read the
    body would let one caller that keeps a response open (a nested request, a response
    never read) block its key, and with ``max_concurrent=1`` deadlock itself. This is
    the rule of tower's ``ConcurrencyLimit`` and Polly's concurrency limiter too. To
    bound long streaming downloads, hold your own ``asyncio.Semaphore`` around the
    ``async with session.get(...)`` block.
    """

    __slots__ = ("_get", "_key", "_max_concurrent", "_max_queue", "_states")

    kind: ClassVar[str] = _KIND
    order: ClassVar[int] = 35

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_queue: int | None = None,
        key: KeyFunc = by_host,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._max_concurrent = integer(_OWNER, "max_concurrent", max_concurrent, 1, MAX_CONCURRENT)
        self._max_queue = None if max_queue is None else integer(_OWNER, "max_queue", max_queue, 0)
        if not callable(key):
            raise reject(_OWNER, "key", "a callable (request) -> str", key)
        self._key = key
        limit = self._max_concurrent
        self._states: KeyedState[_Slots] = KeyedState(
            lambda _key: _Slots(limit), _idle, integer(_OWNER, "max_keys", max_keys)
        )
        self._get = self._states.get

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @property
    def max_queue(self) -> int | None:
        return self._max_queue

    def in_flight(self, key: str) -> int:
        """Requests of ``key`` holding a slot now."""
        state = self._states.get(key)
        return 0 if state is None else state.flying

    def waiting(self, key: str) -> int:
        """Callers queued for a slot of ``key``."""
        state = self._states.get(key)
        return 0 if state is None else len(state.waiters)

    def stats(self) -> dict[str, LimitStats]:
        """A snapshot of every key (call it inside the event loop)."""
        return {
            key: LimitStats(
                key=key,
                limit=state.limit,
                in_flight=state.flying,
                waiting=len(state.waiters),
                rejected=state.rejected,
                hold=None if state.hold < 0.0 else state.hold,
            )
            for key, state in self._states.items()
        }

    def __repr__(self) -> str:
        return (
            f"ConcurrencyLimit({self._max_concurrent!r}, max_queue={self._max_queue!r},"
            f" key={getattr(self._key, '__name__', 'key')})"
        )

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        key = self._key(request)
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, key, request, handler)
        state = self._get(key) or self._states.get_or_create(key)
        if state.flying < state.limit and not state.waiters:
            state.flying += 1
        else:
            await self._queue(request, key, state)
        started = _clock.now_for(request)
        try:
            return await handler(request)
        finally:
            state.release(_clock.now_for(request) - started)

    def keyed_by(self) -> KeyFunc:
        return self._key

    def before(self, request: ClientRequest, key: str | None, now: float) -> Any:
        """``__call__``'s admission when a slot is free and nobody queues: the ticket is
        ``(the key's slots, loop time taken)``; else :data:`SLOW` (queue or refuse)."""
        if key is None:
            key = self._key(request)
        state = self._get(key) or self._states.get_or_create(key)
        if state.flying < state.limit and not state.waiters:
            state.flying += 1
            return state, now
        return SLOW

    def after(self, ticket: tuple[_Slots, float], request: ClientRequest, outcome: Outcome) -> bool:
        """Hand the slot back, whatever the outcome (a cancellation too); it stands."""
        state, started = ticket
        state.release(request.loop.time() - started)
        return True

    async def _queue(self, request: ClientRequest, key: str, state: _Slots) -> None:
        """The slow path: refuse at once, or wait first come, first served for a slot
        (handed over by :meth:`_Slots.admit`, already counted in ``flying``)."""
        ahead = len(state.waiters)
        if self._max_queue is not None and ahead >= self._max_queue:
            self._refuse(request, key, state, "queue full", f"max_queue={ahead} waiting")
        now = _clock.now_for(request)
        allowed = _deadline.allowance(request, _deadline.mark_start(request, now))
        hold = state.hold if state.hold >= 0.0 else 0.0
        turn = (ahead + 1) * hold / state.limit
        if allowed <= 0.0 or turn + hold > allowed:
            self._refuse(
                request, key, state, "deadline",
                f"turn expected in {turn:.3f}s + {hold:.3f}s held, {max(allowed, 0.0):.3f}s left",
            )  # fmt: skip
        allowed -= hold  # past this, the turn would come too late to be answered in time
        fut: asyncio.Future[None] = request.loop.create_future()
        state.waiters.append(fut)
        try:
            with _metrics.waiting(_KIND, key):
                if allowed == math.inf:
                    await fut
                else:
                    async with asyncio.timeout(allowed):
                        await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():  # a slot came with the cancel: pass it on
                state.flying -= 1
                state.admit()
            else:
                fut.cancel()
                _forget(state, fut)
            if isinstance(exc, TimeoutError):  # our allowance ran out in the queue
                detail = f"still queued after {allowed:.3f}s, {hold:.3f}s held"
                self._refuse(request, key, state, "deadline", detail)
            raise

    def _refuse(
        self, request: ClientRequest, key: str, state: _Slots, reason: str, detail: str
    ) -> NoReturn:
        state.rejected += 1
        _events.emit("limit_rejected", _KIND, key, request, reason=f"{reason} ({detail})")
        raise LimitExceeded(key, reason)


def _forget(state: _Slots, fut: asyncio.Future[None]) -> None:
    """Take a waiter that leaves out of the queue."""
    if fut in state.waiters:  # a handed-over waiter was already taken out
        state.waiters.remove(fut)
