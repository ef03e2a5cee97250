"""RateLimitBackoff: 429 handling with one shared pause per key, one probe, and a
learned rate.

On a 429 the key's :class:`~resilient.ratelimit._pause.PauseGate` closes for the server's retry
time (``Retry-After``, ``RateLimit``, ``RateLimit-Reset``, ``X-RateLimit-Reset``), or
for a jittered exponential backoff when no header gives one; successive 429s of the key
(a streak that a success ends) raise that time's floor. No caller of the key sends until
the pause ends; then one probe goes, and the others follow once it is not a 429, one by
one at the key's learned rate (:mod:`resilient.ratelimit._learned`): from its first 429 on, every
request of the key is paced, and each 429 teaches the rate anew.

``proactive=True`` reads the limits a server advertises on every response
(:func:`resilient._headers.parse_advertised`), less the key's requests in flight:
nothing left before the reset pauses the key until the reset (no 429 earned, and the
pause ends any spread); little left (at most :data:`SPREAD_BELOW`, or a tenth of the
limit) spreads what remains over the time to the reset, except that the key's callers
already queued go at once, up to what is left (in this process's memory and for a key
not paced by 429s; with Redis other processes spend the same quota, so it is spread).

A caller waits at most ``max_wait`` seconds for 429s over its call, and never past its
:func:`resilient.deadline` or aiohttp's ``ClientTimeout.total``: when the pause ends
later, it gets the 429 back at once (readable), or :class:`~resilient.RateLimited` if it
has no response (it never sent, or its 429 was already released before the pause grew).

The call is written once against a :class:`~resilient.ratelimit._store.PauseStore` (this
process's memory, or Redis). In a :func:`resilient.chain` a request of a key that may
leave at once (not paused, no probe pending, not paced or its slot due now; with Redis,
known healthy) takes the pipeline's fast path: ``before`` / ``after`` do what
``__call__`` does around its first attempt, and a 429 hands the call to ``resume``,
which goes on as ``__call__`` would (:meth:`RateLimitBackoff._backoff`).
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .. import _clock
from .._deadline import allowance, mark_start
from .._headers import advertises, parse_advertised, retry_hint
from .._keys import KeyFunc, by_host
from .._outcomes import body_replayable
from .._policy import SLOW, Outcome, Policy
from .._state import DEFAULT_MAX_KEYS
from .._validate import integer, number, reject
from ..observe import _events, _metrics
from ..observe._log import logger
from ..observe._stats import PauseStats
from ..retry._backoff import capped_doubling
from ..storage import OnStorageError, check, check_on_storage_error, is_shared, redact
from ._learned import LearnedRate
from ._pause import MAX_PAUSE, PauseGate
from ._store import KIND, MemoryPause, PauseStore, waiting

if TYPE_CHECKING:
    from ._redis import SharedPause

__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_CAP",
    "DEFAULT_MAX_WAIT",
    "MAX_WAIT_LIMIT",
    "SPREAD_BELOW",
    "RateLimitBackoff",
    "backoff_delay",
]

DEFAULT_MAX_WAIT = 86_400.0
"""Seconds a call may spend waiting for 429s in total (24 hours: Sage's longest pause)."""
MAX_WAIT_LIMIT = MAX_PAUSE
"""Largest accepted ``max_wait`` / ``cap`` (7 days); also the longest pause of a key."""
DEFAULT_BASE = 1.0
"""First step of the backoff (seconds) when a 429 gives no usable retry time."""
DEFAULT_CAP = 300.0
"""Largest backoff step (seconds)."""
MEMORY_STORAGE = "memory://"
SPREAD_BELOW = 10
"""An advertised limit with at most this many requests left (or a tenth of the limit,
if larger) spreads them over the time to its reset, the callers already queued going at
once (:meth:`~resilient.ratelimit._pause.PauseGate.spread_over`); with more left,
callers go freely."""

_NAME = "RateLimitBackoff"
_GIVES_UP = " (the pause ends beyond what this caller may wait: its 429 is returned)"


def backoff_delay(server: float | None, strikes: int, *, base: float, cap: float) -> float:
    """Seconds to pause after the ``strikes``-th 429 (``n``, from 1) of a key's streak.

    No usable retry time (``server`` is None): full jitter,
    ``uniform(0, min(cap, base·2^(n−1)))``.
    A server retry time ``d``: ``max(d, floor_n)`` with ``floor_1 = 0`` and
    ``floor_n = min(cap, base·2^(n−2))`` for n >= 2, so the server is trusted the first
    time and ``Retry-After: 0`` repeated backs off base, 2·base, 4·base, ... cap.
    """
    if server is None:
        return random.uniform(0.0, capped_doubling(base, cap, strikes - 1))
    if strikes <= 1:
        return server
    return max(server, capped_doubling(base, cap, strikes - 2))


class _Sent:
    """A request of a key with a gate on the wire: what its answer is judged by (the
    key's ``cuts`` and ``learned`` rate when it left); counted in the gate's ``flying``."""

    __slots__ = ("cuts", "gate", "key", "learned")

    def __init__(self, key: str, gate: PauseGate, cuts: int, learned: LearnedRate | None):
        self.key = key
        self.gate = gate
        self.cuts = cuts
        self.learned = learned


class _Caller:
    """One caller on the slow path: what its rounds carry over (``strikes``: its 429s;
    ``waited``: seconds it waited; ``probe``: it holds the key's probe)."""

    __slots__ = ("key", "probe", "request", "started", "strikes", "waited")

    def __init__(self, request: ClientRequest, key: str, started: float) -> None:
        self.request = request
        self.key = key
        self.started = started
        self.strikes = 0
        self.waited = 0.0
        self.probe = False


class RateLimitBackoff(Policy):
    """Honour 429s with one shared pause per key and a learned rate (module docstring).

    ``max_wait``: seconds a call may wait for 429s in total, in (0, 7 days].
    ``key``: request -> key (default ``by_host``); the pause and the rate are per key.
    ``storage``: ``"memory://"``, or a Redis URI: the pause and its probe are shared
    by every process (see :mod:`resilient.ratelimit._redis`).
    ``on_storage_error``: ``"raise"`` (StorageError) or ``"allow"`` (this process's pause).
    ``base``, ``cap``: the backoff without a retry time (see :func:`backoff_delay`).
    ``proactive``: read advertised limits on every response (default True).
    ``max_keys``: keys remembered at once (idle keys are evicted).
    """

    kind: ClassVar[str] = KIND
    order: ClassVar[int] = 30

    __slots__ = (
        "_base",
        "_cap",
        "_ceiling",
        "_gates",
        "_gates_decide",
        "_key",
        "_max_wait",
        "_proactive",
        "_ready",
        "_shared",
        "_storage",
        "_store",
    )

    def __init__(
        self,
        *,
        max_wait: float = DEFAULT_MAX_WAIT,
        key: KeyFunc = by_host,
        storage: str = MEMORY_STORAGE,
        on_storage_error: OnStorageError = "raise",
        base: float = DEFAULT_BASE,
        cap: float = DEFAULT_CAP,
        proactive: bool = True,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._max_wait = number(_NAME, "max_wait", max_wait, 0.0, MAX_WAIT_LIMIT, low_open=True)
        self._base = number(_NAME, "base", base, 0.0, MAX_WAIT_LIMIT, low_open=True)
        self._cap = number(_NAME, "cap", cap, self._base, MAX_WAIT_LIMIT)
        if not callable(key):
            raise reject(_NAME, "key", "a callable (request) -> str", key)
        if not isinstance(proactive, bool):
            raise reject(_NAME, "proactive", "True or False", proactive)
        self._proactive = proactive
        self._storage = check(_NAME, storage)
        on_error = check_on_storage_error(_NAME, on_storage_error)
        max_keys = integer(_NAME, "max_keys", max_keys, 1)
        self._key = key
        self._ceiling = math.inf
        self._shared: SharedPause | None = None
        """The Redis half of a shared store (None in memory)."""
        self._store: PauseStore = MemoryPause(max_keys)
        if is_shared(self._storage):
            from ..storage._redis import RedisStore
            from ._redis import RedisPause, SharedPause

            self._shared = SharedPause(RedisStore(self._storage), on_error)
            self._store = RedisPause(self._shared, max_keys)
        self._gates = self._store.gates
        self._ready = self._store.ready
        self._gates_decide = self._store.gates_decide

    @property
    def max_wait(self) -> float:
        return self._max_wait

    @property
    def proactive(self) -> bool:
        return self._proactive

    @property
    def key(self) -> KeyFunc:
        """The key function (request -> key)."""
        return self._key

    def cap_rate(self, rate: float) -> None:
        """Never pace a key faster than ``rate`` (a :class:`~resilient.Throttle` in the
        same chain caps the learned rate with its own: :func:`resilient.chain` calls this)."""
        self._ceiling = rate
        for _key, gate in self._gates.items():
            if gate.learned is not None:
                gate.learned.ceiling = rate

    def paused_for(self, key: str) -> float:
        """Seconds until ``key``'s pause ends (0 if not paused or a probe is due)."""
        gate = self._gates.get(key)
        return 0.0 if gate is None else gate.remaining()

    def rate(self, key: str) -> float | None:
        """``key``'s send rate now (requests/s): learned from its 429s, or an advertised
        limit's spread; None while the key is not paced."""
        gate = self._gates.get(key)
        if gate is None or not gate.paced:
            return None
        rate = gate.rate(_clock.now())
        return None if rate == math.inf else rate

    def stats(self) -> dict[str, PauseStats]:
        """A snapshot of every key's pause in this process (call it inside the event loop)."""
        return {key: _snapshot(key, gate) for key, gate in self._gates.items()}

    def __repr__(self) -> str:
        return (
            f"RateLimitBackoff(max_wait={self._max_wait!r}, base={self._base!r},"
            f" cap={self._cap!r}, key={getattr(self._key, '__name__', 'key')},"
            f" storage={redact(self._storage)!r}, proactive={self._proactive!r})"
        )

    # --- the call ------------------------------------------------------------------------

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        key = self._key(request)
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, key, request, handler)
        total = request.session.timeout.total  # _started(request), inlined: the hot path
        started = mark_start(request, _clock.now_for(request)) if total else 0.0
        gate = self._gates.get(key)
        if (gate is not None or not self._gates_decide) and not self._ready(
            key, gate, _clock.now_for(request)
        ):
            bound = self._departure_bound(request, started, _clock.now())
            gate, departed = await self._store.enter(key, gate, self._ceiling, bound)
            if gate is not None and (gate.closed or (gate.paced and not departed)):
                return await self._backoff(request, handler, key, started, None, 0)
        if gate is None:  # the common case: a key never paused nor paced
            resp, cuts = await handler(request), 0
            if resp.status != 429:
                self._heed(key, resp)
        else:
            resp, cuts = await self._send(request, handler, key, gate, False)
        if resp.status == 429:
            return await self._backoff(request, handler, key, started, resp, cuts)
        return resp

    # --- the pipeline's fast path (resilient._policy) ------------------------------------

    def keyed_by(self) -> KeyFunc:
        return self._key

    def before(self, request: ClientRequest, key: str | None, now: float) -> Any:
        """The key's ticket when a request may leave now (see ``PauseStore.ready``): the key
        itself for a key without a gate, else its :class:`_Sent`; SLOW otherwise."""
        if key is None:
            key = self._key(request)
        gate = self._gates.get(key)
        if (gate is not None or not self._gates_decide) and not self._ready(key, gate, now):
            return SLOW
        return key if gate is None else self._leaving(key, gate)

    def after(self, ticket: Any, request: ClientRequest, outcome: Outcome) -> bool:
        """What ``__call__`` does with its first answer: a 429 goes on in :meth:`resume`;
        an exception passes (the request is no longer in flight); any other answer is
        learned from (``_answered``, or the advertised limits of a key without a gate)."""
        if type(ticket) is not _Sent:
            if isinstance(outcome, BaseException):
                return True
            if outcome.status == 429:
                return False
            self._heed(ticket, outcome)
            return True
        ticket.gate.flying -= 1
        if isinstance(outcome, BaseException):
            return True
        if outcome.status == 429:
            return False
        self._answered(ticket, outcome, False)
        return True

    async def resume(
        self, ticket: Any, request: ClientRequest, rest: ClientHandlerType, outcome: Outcome
    ) -> ClientResponse:
        """The first answer was a 429: the slow path, as ``__call__`` goes on with it."""
        assert not isinstance(outcome, BaseException)  # after() hands over only a 429
        key, cuts = (ticket.key, ticket.cuts) if type(ticket) is _Sent else (ticket, 0)
        return await self._backoff(request, rest, key, _started(request), outcome, cuts)

    # --- the slow path: named steps ------------------------------------------------------

    async def _backoff(
        self,
        request: ClientRequest,
        handler: ClientHandlerType,
        key: str,
        started: float,
        resp: ClientResponse | None,
        cuts: int,
    ) -> ClientResponse:
        """The slow path: ``resp`` is a 429 (to a request sent after ``cuts`` cuts), or
        None when the key was found paused or paced. Each round: a 429 pauses the key
        (:meth:`_pause`; or the caller gives up and gets it back), the caller waits its
        turn in the key's queue (:meth:`_wait_turn`; the first of it probes), takes its
        paced departure slot (:meth:`_depart`), and sends (:meth:`_send`, which learns
        from the answer); a 429 starts the next round."""
        caller = _Caller(request, key, started)
        while True:
            gate = self._gates.get_or_create(key)  # not evicted while we wait or probe
            began = _clock.now()
            hard = began + allowance(request, started)
            latest = min(began + self._max_wait - caller.waited, hard)
            if resp is not None:  # a 429: pause the key, then give up or wait our turn
                if await self._pause(caller, gate, resp, cuts, latest):
                    return resp
                resp.release()
            elif gate.closed and logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: %s is paused for %.3fs", KIND, key, gate.remaining())
            front = resp is not None  # our own 429: we probe first
            if gate.closed and not await self._wait_turn(caller, gate, began, latest, hard, front):
                resp = None  # another process probes, or the pause grew: wait again
                continue
            if not caller.probe and gate.paced and not await self._depart(caller, gate):
                resp = None  # a 429 paused the key while we waited for our slot
                continue
            resp, cuts = await self._send(request, handler, key, gate, caller.probe)
            if resp.status != 429:
                return resp

    async def _pause(
        self, caller: _Caller, gate: PauseGate, resp: ClientResponse, cuts: int, latest: float
    ) -> bool:
        """Learn from the 429 (sent after ``cuts`` cuts), and close the key's gate for its
        retry time, floored by the key's streak (every process's, with Redis). True: the
        caller gives up (the pause ends past ``latest``, or its body cannot be sent again)
        and gets this 429 back."""
        caller.strikes += 1
        key, store = caller.key, self._store
        store.learn(key, gate, cuts, self._ceiling)
        now = _clock.now()
        hint = retry_hint(resp.headers, now=_clock.wall())
        server = None if hint is None else hint[0]
        delay = backoff_delay(server, max(gate.streak, 1), base=self._base, cap=self._cap)
        try:
            delay = await store.share(key, gate, delay, caller.probe)
        except BaseException:
            resp.release()
            raise
        wait = max(delay, gate.pause(delay, probe=caller.probe))
        caller.probe = False
        gives_up = now + wait > latest or not body_replayable(caller.request)
        _events.emit(
            "rate_limited", KIND, key, caller.request, attempt=caller.strikes, delay=wait,
            status=429, reason=_reason(hint, delay) + (_GIVES_UP if gives_up else ""),
        )  # fmt: skip
        return gives_up

    async def _wait_turn(
        self,
        caller: _Caller,
        gate: PauseGate,
        began: float,
        latest: float,
        hard: float,
        front: bool,
    ) -> bool:
        """Wait in the paused key's queue until the pause is over (``caller.probe``
        False) or this caller probes (True; with Redis, once its claim wins). False: wait
        again (the pause grew, or another process probes). RateLimited when the pause ends
        beyond what the caller may wait."""
        key = caller.key
        with waiting(key):
            first = await gate.wait_turn(latest, hard, front=front)
        probe = await self._store.claim(key, gate) if first else False
        caller.waited += _clock.now() - began
        caller.probe = probe is True
        if probe is None:
            return False
        if probe:
            _events.emit("pause_probe", KIND, key, caller.request, attempt=caller.strikes)
        return True

    async def _depart(self, caller: _Caller, gate: PauseGate) -> bool:
        """Wait for this caller's departure slot at the key's rate. False: a 429 paused the
        key meanwhile. ``max_wait`` bounds the pause; the departure is bounded on its own."""
        paced_at = _clock.now()
        bound = self._departure_bound(caller.request, caller.started, paced_at)
        await self._store.depart(caller.key, gate, self._ceiling, bound)
        caller.waited += _clock.now() - paced_at
        return not gate.closed

    async def _send(
        self,
        request: ClientRequest,
        handler: ClientHandlerType,
        key: str,
        gate: PauseGate,
        probe: bool,
    ) -> tuple[ClientResponse, int]:
        """One attempt; its response and the cuts it was sent after. A probe's answer
        that is not a 429 opens the gate; an error hands the probe role on."""
        sent = self._leaving(key, gate)
        try:
            resp = await handler(request)
        except BaseException:
            if probe:
                self._store.abandoned(key, gate)
            raise
        finally:
            gate.flying -= 1
        if resp.status != 429:
            self._answered(sent, resp, probe)
        return resp, sent.cuts

    # --- what an answer teaches ----------------------------------------------------------

    def _leaving(self, key: str, gate: PauseGate) -> _Sent:
        """A request of ``key`` leaves now: counted in flight until its answer."""
        gate.flying += 1
        return _Sent(key, gate, self._store.cuts(gate), gate.learned)

    def _answered(self, sent: _Sent, resp: ClientResponse, probe: bool) -> None:
        """An answer that is not a 429: the streak ends; a probe's opens the gate, another's
        counts in the key's rate; its advertised limits are heeded."""
        gate = sent.gate
        gate.streak = 0
        if probe:
            self._store.opened(sent.key, gate)  # sending resumes; the probe's answer counts
        else:
            self._store.answered(sent.key, gate, sent.learned)
        self._heed(sent.key, resp)

    def _heed(self, key: str, resp: ClientResponse) -> None:
        """With ``proactive``, the limit ``resp`` advertises, less the key's requests still
        in flight: none left -> pause until its reset (ending any spread); little left ->
        the callers queued go at once, up to what is left, the rest is spread over the
        time to the reset (see :data:`SPREAD_BELOW`, ``PauseGate.spread_over``)."""
        if not self._proactive or not advertises(resp.headers):
            return  # the common response: no wall-clock read, no parsing
        advertised = parse_advertised(resp.headers, now=_clock.wall())
        if advertised is None:
            return
        reset = advertised.reset
        if reset <= 0.0:
            return
        gate = self._gates.get_or_create(key)
        left = advertised.remaining - gate.flying  # those in flight will spend some
        if left > max(SPREAD_BELOW, (advertised.limit or 0) // 10):
            return
        now = _clock.now()
        if left <= 0:
            if gate.spread_until:
                gate.end_spread(now)  # the pause until the reset replaces it
            if not gate.closed:
                gate.pause(reset, probe=False)
                _events.emit(
                    "rate_limited", KIND, key, None, attempt=0, delay=min(reset, MAX_PAUSE),
                    status=None, reason=f"advertised limit exhausted ({advertised.policy})",
                )  # fmt: skip
            return
        # the queued callers may go at once, unless other processes spend the key's quota
        # too (Redis) or 429s pace it
        burst = self._shared is None and gate.learned is None
        gate.spread_over(left, min(reset, MAX_PAUSE), now, burst=burst)

    def _departure_bound(self, request: ClientRequest, started: float, now: float) -> float:
        """The loop time a paced departure must not pass: ``max_wait`` from now, or the
        caller's allowance (deadline, aiohttp's total timeout)."""
        return min(now + allowance(request, started), now + self._max_wait)


def _started(request: ClientRequest) -> float:
    """The call's start (:func:`mark_start`), which bounds waits by aiohttp's total
    timeout; without a total timeout it is unused (0.0, no contextvar read)."""
    if request.session.timeout.total:
        return mark_start(request, _clock.now_for(request))
    return 0.0


def _snapshot(key: str, gate: PauseGate) -> PauseStats:
    remaining = gate.remaining()
    rate = gate.rate(_clock.now())
    return PauseStats(
        key=key,
        paused=gate.closed,
        remaining=remaining,
        paused_until=_clock.wall_after(remaining) if gate.closed else None,
        probing=gate.probing,
        waiting=gate.waiting(),
        rate=None if rate == math.inf else rate,
    )


def _reason(hint: tuple[float, str] | None, delay: float) -> str:
    """``"429 Retry-After"``; ``"429 backoff"`` without a retry time or above it."""
    if hint is None:
        return "429 backoff"
    if delay > hint[0]:
        return f"429 {hint[1]} (backoff floor)"
    return f"429 {hint[1]}"
