"""Throttle: a client-side token bucket per key, plus optional quota windows.

Every wire attempt (it sits innermost in :func:`resilient.chain`, so retries too)
takes one token from its key's bucket: ``rate`` tokens per second, at most
``burst`` at once, on the event loop's clock. A caller that finds no token, or
other callers already waiting, joins the key's queue: waiters leave strictly
first come, first served, and no departure time is fixed in advance, so a
waiter that is cancelled (or gives up) hands its place to the ones behind it.
Only the head of the queue sleeps, until its token is due.

``quotas`` adds moving windows in ``limits``' notation (``"200/minute;5000/day"``):
once it has its token, a request goes only if every window has room for it, counting
the key's requests still in flight, and takes its slot when its attempt ends, so a
window of server arrivals is never exceeded (see :mod:`resilient.throttle._quota`). Else it
stays at the head of the queue until the windows' reset time, or until an
in-flight request of the key ends (then it looks again). In memory the windows are
read and written synchronously (no await); shared ones through Redis are awaited only
when this process holds no leased place for the key (see :mod:`resilient.throttle._store`
and :mod:`resilient.throttle._redis`).

A wait that would end past what the caller may wait (:func:`resilient.deadline`,
aiohttp's ``ClientTimeout.total``) is not started: :class:`~resilient.DeadlineExceeded`.
``adaptive=True`` steers a key's rate by its 429s with the learned-rate law of
:mod:`resilient.ratelimit._learned` (cut to ``BETA`` × the rate the server accepted, then a CUBIC
climb back), capped by ``rate`` and floored by ``min_rate``. In a :func:`resilient.chain`
with a :class:`~resilient.RateLimitBackoff` keyed alike, the key has one estimate: the
backoff learns and paces, capped by this ``rate``, and :meth:`Throttle.current_rate`
reads it.

In a :func:`resilient.chain`, ``before`` takes the token (and the quota place, from
memory or from a leased ticket) when it is there now, with no waiter ahead, and ``after``
does what ``__call__`` does once the attempt has ended (the adaptive rate's update, the
quota landing); anything else (a wait, a round trip) runs ``__call__`` whole.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .. import _clock
from .._deadline import allowance, mark_start
from .._errors import DeadlineExceeded, StorageError
from .._keys import KeyFunc, by_host
from .._policy import SLOW, Outcome, Policy
from .._state import DEFAULT_MAX_KEYS, KeyedState
from .._validate import integer, number, reject
from ..observe import _events, _metrics
from ..observe._log import log_wait
from ..observe._stats import ThrottleStats
from ..ratelimit._learned import LearnedRate
from ..storage import OnStorageError, check, check_on_storage_error, is_shared, redact
from ._bucket import TokenBucket
from ._quota import MEMORY_STORAGE, Quotas
from ._store import Boarding, QuotaStore

__all__ = ["DEFAULT_BURST", "DEFAULT_MIN_RATE_DIVISOR", "DEFAULT_STORAGE", "MAX_RATE", "Throttle"]

DEFAULT_BURST = 1
"""Tokens a key may spend at once (1: requests are evenly spaced)."""
DEFAULT_STORAGE = MEMORY_STORAGE
"""Where quota windows live: in this process."""
MAX_RATE = 1e9
"""Largest accepted ``rate`` (tokens per second)."""
DEFAULT_MIN_RATE_DIVISOR = 20
"""Default floor of the adaptive rate: the configured rate / 20."""

_KIND = "throttle"
_OWNER = "Throttle"
THROTTLED_EVENT_MIN = 0.001
"""Seconds: a wait at least this long emits a ``throttled`` event (shorter: a DEBUG line)."""


class _Key(TokenBucket):
    """One key's bucket, its queue of waiters (the head first), its learned rate (adaptive),
    and, with quotas, its requests in flight and the head's wake-up call for when one ends."""

    __slots__ = ("flying", "landed", "learned", "waiters")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        super().__init__(rate, burst, now)
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.learned: LearnedRate | None = None
        self.flying = 0
        self.landed: asyncio.Future[None] | None = None

    def steer(self, now: float, floor: float) -> None:
        """Refill at the old rate up to ``now``, then take the learned rate (at least
        ``floor``; the learned rate's ceiling is the configured rate)."""
        learned = self.learned
        if learned is not None and learned.paced:
            self.refill(now)
            rate = learned.rate(now)
            self.rate = rate if rate > floor else floor


def _leave(state: _Key, fut: asyncio.Future[None]) -> None:
    """Take ``fut`` out of the queue; if it was the head, wake the next one."""
    waiters = state.waiters
    if waiters[0] is fut:
        waiters.popleft()
        if waiters and not waiters[0].done():
            waiters[0].set_result(None)
    else:
        waiters.remove(fut)


class Throttle(Policy):
    """A token bucket per key (see the module docstring).

    ``rate``: tokens per second, in (0, 1e9]. ``burst``: bucket size, an int >= 1.
    ``quotas``: limits' notation (``"200/minute;5000/day"``) or None.
    ``key``: request -> key (default ``by_host``).
    ``storage``: where quota windows live, ``"memory://"`` or a Redis URI (shared by
    every process: see :mod:`resilient.storage`); the token bucket is per process.
    ``on_storage_error``: ``"raise"`` (StorageError) or ``"allow"`` (local windows).
    ``adaptive``: steer the rate by 429s (the learned-rate law, see the module
    docstring); ``min_rate``: its floor, in (0, rate] (default ``rate / 20``).
    ``max_keys``: keys remembered at once.
    """

    kind: ClassVar[str] = _KIND
    order: ClassVar[int] = 40

    __slots__ = (
        "_adaptive",
        "_burst",
        "_fallback",
        "_follows",
        "_get",
        "_key",
        "_min_rate",
        "_quotas",
        "_rate",
        "_states",
        "_storage",
    )

    def __init__(
        self,
        rate: float,
        *,
        burst: int = DEFAULT_BURST,
        quotas: str | None = None,
        key: KeyFunc = by_host,
        storage: str = DEFAULT_STORAGE,
        on_storage_error: OnStorageError = "raise",
        adaptive: bool = False,
        min_rate: float | None = None,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._rate = number(_OWNER, "rate", rate, 0.0, MAX_RATE, low_open=True)
        self._burst = integer(_OWNER, "burst", burst)
        floor = self._rate / DEFAULT_MIN_RATE_DIVISOR if min_rate is None else min_rate
        self._min_rate = number(_OWNER, "min_rate", floor, 0.0, self._rate, low_open=True)
        if not isinstance(adaptive, bool):
            raise reject(_OWNER, "adaptive", "True or False", adaptive)
        self._adaptive = adaptive
        self._follows: Callable[[str], float | None] | None = None
        if not callable(key):
            raise reject(_OWNER, "key", "a callable (request) -> str", key)
        self._key = key
        self._storage = check(_OWNER, storage)
        on_error = check_on_storage_error(_OWNER, on_storage_error)
        self._quotas: QuotaStore | None = None
        """Where the quota windows live (None: no quotas)."""
        self._fallback: Quotas | None = None
        """The windows that decide while Redis fails (``on_storage_error="allow"``)."""
        if quotas is not None:
            self._quotas, self._fallback = _stores(quotas, self._storage, on_error)
        self._states: KeyedState[_Key] = KeyedState(
            lambda _key: _Key(self._rate, self._burst, _clock.now()),
            self._idle,
            integer(_OWNER, "max_keys", max_keys),
        )
        self._get = self._states.get

    def _idle(self, state: _Key) -> bool:
        """Nothing to remember: no waiters, none in flight, a full bucket, the configured
        rate (a learned rate below it is remembered)."""
        now = _clock.now()
        learned = state.learned
        return (
            not state.waiters
            and not state.flying
            and (learned is None or learned.rate(now) >= self._rate)
            and state.full(now)
        )

    def follow(self, learned_rate: Callable[[str], float | None], key: KeyFunc) -> None:
        """Read ``learned_rate(key)`` (a :class:`~resilient.RateLimitBackoff`'s, which
        learns and paces) instead of learning here, when ``key`` is this Throttle's key
        function: one estimate per key. :func:`resilient.chain` calls this."""
        if key is self._key:
            self._follows = learned_rate

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def current_rate(self, key: str) -> float:
        """``key``'s rate now (below ``rate`` after 429s when adaptive)."""
        if self._follows is not None and self._adaptive:
            learned = self._follows(key)
            return self._rate if learned is None else min(self._rate, learned)
        state = self._states.get(key)
        if state is None:
            return self._rate
        state.steer(_clock.now(), self._min_rate)
        return state.rate

    def waiting(self, key: str) -> int:
        """Callers queued for ``key``'s next tokens."""
        state = self._states.get(key)
        return 0 if state is None else len(state.waiters)

    def stats(self) -> dict[str, ThrottleStats]:
        """A snapshot of every key's bucket (call it inside the event loop)."""
        now = _clock.now()
        return {key: _snapshot(key, state, now) for key, state in self._states.items()}

    def __repr__(self) -> str:
        quotas = "" if self._quotas is None else f", quotas={self._quotas.text!r}"
        adaptive = f", adaptive=True, min_rate={self._min_rate!r}" if self._adaptive else ""
        return (
            f"Throttle(rate={self._rate!r}, burst={self._burst!r}{quotas},"
            f" key={getattr(self._key, '__name__', 'key')}, storage={redact(self._storage)!r}"
            f"{adaptive})"
        )

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        key = self._key(request)
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, key, request, handler)
        state = self._get(key) or self._states.get_or_create(key)
        now = _clock.now_for(request)
        mark_start(request, now)  # the call's start, unless an outer policy marked it
        if state.learned is not None:
            state.steer(now, self._min_rate)
        quotas = store = self._quotas
        ticket = ""
        if state.waiters or state.take(now):
            store, ticket = await self._wait(request, key, state, now)
        elif quotas is not None:
            boarded = quotas.board(key, state.flying, now)
            if boarded is None:  # the store must ask its backend (we hold the token)
                store, boarded = await self._first_ask(quotas, key, state)
            if boarded[0]:
                state.give_back()  # the head of the queue takes it when the window has room
                store, ticket = await self._wait(request, key, state, now)
            else:
                state.flying += 1
                ticket = boarded[1]
        # With quotas the request is now counted in flight, boarded in ``store`` under
        # ``ticket``: when the attempt ends (whatever the outcome: it may have reached the
        # server), it lands (takes its slot in every window), then lets the head of the
        # queue look again.
        try:
            if not self._adaptive or self._follows is not None:
                return await handler(request)
            learned = state.learned or self._learn(state)
            cuts = learned.cuts
            resp = await handler(request)
            self._adapt(state, learned, cuts, resp.status)
            return resp
        finally:
            if store is not None:
                try:
                    store.land(key, _clock.now_for(request), ticket)
                finally:
                    _land(state)

    # --- the pipeline's fast path ---------------------------------------------------

    def keyed_by(self) -> KeyFunc:
        return self._key

    def before(self, request: ClientRequest, key: str | None, now: float) -> Any:
        """The token and the quota place when both are there now (no waiter ahead, no
        round trip), else :data:`~resilient._policy.SLOW` with nothing taken. The ticket:
        None (nothing to do after the attempt: ``after`` is not called), or ``(key,
        state, quota ticket, learned rate or None, its cuts)``."""
        if key is None:
            key = self._key(request)
        state = self._get(key) or self._states.get_or_create(key)
        if state.learned is not None:
            state.steer(now, self._min_rate)
        if state.waiters or state.take(now):
            return SLOW
        quotas = self._quotas
        ticket = ""
        if quotas is not None:
            boarded = quotas.board(key, state.flying, now)
            if boarded is None or boarded[0]:
                state.give_back()
                return SLOW
            state.flying += 1
            ticket = boarded[1]
        if self._adaptive and self._follows is None:
            learned = state.learned or self._learn(state)
            return key, state, ticket, learned, learned.cuts
        if quotas is None:
            return None
        return key, state, ticket, None, 0

    def after(self, ticket: Any, request: ClientRequest, outcome: Outcome) -> bool:
        """What ``__call__`` does once its attempt has ended: the adaptive rate learns
        from a response, the request lands. The outcome always stands (``True``)."""
        key, state, boarded, learned, cuts = ticket
        if learned is not None and isinstance(outcome, ClientResponse):
            self._adapt(state, learned, cuts, outcome.status)
        quotas = self._quotas
        if quotas is not None:
            try:
                quotas.land(key, _clock.now_for(request), boarded)
            finally:
                _land(state)
        return True

    # --- the slow path --------------------------------------------------------------

    async def _first_ask(
        self, quotas: QuotaStore, key: str, state: _Key
    ) -> tuple[QuotaStore, Boarding]:
        """:meth:`_ask` on the no-wait path, holding a token: it goes back on failure."""
        try:
            return await self._ask(quotas, key, state)
        except BaseException:
            state.give_back()
            raise

    async def _ask(self, quotas: QuotaStore, key: str, state: _Key) -> tuple[QuotaStore, Boarding]:
        """The backend's answer and the store it boarded in; when the backend fails,
        ``StorageError``, or with ``on_storage_error="allow"`` a warning and this
        process's own windows' answer.

        The request counts in flight while it asks, so callers asking at the same time
        count each other (in this process's windows): fewer sends, never more.
        """
        state.flying += 1
        try:
            return quotas, await quotas.ask(key, state.flying - 1)
        except StorageError as exc:
            fallback = self._fallback
            if fallback is None:
                raise
            quotas.warn(exc)
            return fallback, fallback.board(key, state.flying - 1, _clock.now())
        finally:
            state.flying -= 1

    def _learn(self, state: _Key) -> LearnedRate:
        """The key's learned rate, measuring from its first request on (so its first 429
        finds a measured rate to cut from); the configured rate is its ceiling."""
        learned = state.learned = LearnedRate(_clock.now(), self._rate)
        return learned

    def _adapt(self, state: _Key, learned: LearnedRate, cuts: int, status: int) -> None:
        """A 429 cuts the rate (once per round: one sent after ``cuts`` cuts); any other
        answer counts as accepted. The bucket then runs at the learned rate."""
        now = _clock.now()
        if status != 429:
            learned.accepted(now)
        elif learned.counts(cuts):
            learned.cut(now)
        state.steer(now, self._min_rate)

    async def _wait(
        self, request: ClientRequest, key: str, state: _Key, started: float
    ) -> tuple[QuotaStore | None, str]:
        """The slow path: queue behind the waiters of ``key`` and leave with a token (and,
        with quotas, boarded: the store and the ticket).

        The wait is estimated at the current rate: one token for each waiter ahead
        and one for us, ``(ahead + 1 − tokens) / rate``.
        """
        ahead = len(state.waiters)
        wait = (ahead + 1 - state.refill(started)) / state.rate
        allowed = _allowed(request, started, key, wait, "rate limit")
        if wait > 0.0:
            _throttled(request, key, wait, "rate limit")
        fut = asyncio.get_running_loop().create_future()
        state.waiters.append(fut)
        try:
            with _metrics.waiting(_KIND, key):
                if state.waiters[0] is not fut:
                    await _turn(fut, key, allowed)
                return await self._head(request, key, state, started)
        finally:
            _leave(state, fut)

    async def _head(
        self, request: ClientRequest, key: str, state: _Key, started: float
    ) -> tuple[QuotaStore | None, str]:
        """At the head of the queue: sleep until the token (and a place in every quota) is
        due; then take it (and board: the store and the ticket).

        Only the head takes tokens while there are waiters, so a token it saw stays there.
        """
        quotas = self._quotas
        while True:
            now = _clock.now()
            delay = state.delay(now)
            if delay > 0.0:
                _allowed(request, started, key, delay, "rate limit")
                await _clock.sleep(delay)
                continue
            if quotas is None:
                state.take(now)
                return None, ""
            store: QuotaStore = quotas
            boarded = quotas.board(key, state.flying, now)
            if boarded is None:
                store, boarded = await self._ask(quotas, key, state)
            delay, reason = boarded
            if not delay:
                state.flying += 1
                state.take(_clock.now())
                return store, reason
            _allowed(request, started, key, delay, reason)
            _throttled(request, key, delay, reason)
            await _sleep_or_landing(state, delay)


def _throttled(request: ClientRequest, key: str, delay: float, reason: str) -> None:
    """Announce a wait: a ``throttled`` event from 1 ms up, else a DEBUG line."""
    if delay >= THROTTLED_EVENT_MIN:
        _events.emit("throttled", _KIND, key, request, delay=delay, reason=reason)
    else:
        log_wait(_KIND, reason, key, delay)


def _snapshot(key: str, state: _Key, now: float) -> ThrottleStats:
    """``state`` at ``now``, read without changing it."""
    elapsed = now - state.last
    tokens = state.tokens + elapsed * state.rate if elapsed > 0.0 else state.tokens
    return ThrottleStats(
        key=key,
        tokens=min(tokens, state.burst),
        rate=state.rate,
        burst=int(state.burst),
        waiting=len(state.waiters),
        in_flight=state.flying,
    )


def _stores(text: str, storage: str, on_error: OnStorageError) -> tuple[QuotaStore, Quotas | None]:
    """The quota store (this process's windows, or Redis's) and the windows that decide
    while Redis fails (``on_storage_error="allow"``)."""
    if not is_shared(storage):
        return Quotas(text), None
    from ..storage._redis import RedisStore
    from ._redis import RedisQuotas

    fallback = Quotas(text) if on_error == "allow" else None
    return RedisQuotas(text, RedisStore(storage), fallback), fallback


def _land(state: _Key) -> None:
    """A request of ``state`` is no longer in flight: wake the head if it waits for that."""
    state.flying -= 1
    landed = state.landed
    if landed is not None and not landed.done():
        landed.set_result(None)


async def _sleep_or_landing(state: _Key, delay: float) -> None:
    """Sleep ``delay`` seconds, or less if a request of ``state`` lands first."""
    loop = asyncio.get_running_loop()
    landed = state.landed = loop.create_future()
    timer = loop.call_later(delay, _settle, landed)
    try:
        await landed
    finally:
        timer.cancel()
        state.landed = None


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _allowed(request: ClientRequest, started: float, key: str, wait: float, reason: str) -> float:
    """The caller's allowance, or DeadlineExceeded if ``wait`` is beyond it."""
    allowed = allowance(request, started)
    if wait > allowed:
        raise DeadlineExceeded(
            f"throttle: {reason} on {key} for {wait:.3f}s, beyond the {allowed:.3f}s"
            " the caller may wait"
        )
    return allowed


async def _turn(fut: asyncio.Future[None], key: str, allowed: float) -> None:
    """Wait until ``fut`` (our place in the queue) reaches the head, at most ``allowed`` s."""
    if allowed == math.inf:
        await fut
        return
    try:
        async with asyncio.timeout(allowed):
            await fut
    except TimeoutError:
        raise DeadlineExceeded(
            f"throttle: still queued for {key} after the {allowed:.3f}s the caller may wait"
        ) from None
