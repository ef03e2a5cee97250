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
(:func:`resilient._headers.parse_advertised`): nothing left before the reset pauses the
key until the reset (no 429 earned); little left (at most :data:`SPREAD_BELOW`, or a
tenth of the limit) spreads what remains over the time to the reset.

A caller waits at most ``max_wait`` seconds for 429s over its call, and never past its
:func:`resilient.deadline` or aiohttp's ``ClientTimeout.total``: when the pause ends
later, it gets the 429 back at once (readable), or :class:`~resilient.RateLimited` if it
has no response (it never sent, or its 429 was already released before the pause grew).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .. import _clock
from .._deadline import allowance, mark_start
from .._errors import RateLimited
from .._headers import advertises, parse_advertised, retry_hint
from .._keys import KeyFunc, by_host
from .._outcomes import body_replayable
from .._policy import Policy
from .._state import DEFAULT_MAX_KEYS, KeyedState
from ..observe import _events, _metrics
from ..observe._log import logger
from ..observe._stats import PauseStats
from ..retry._backoff import capped_doubling
from ..storage import OnStorageError, check, check_on_storage_error, is_shared, redact
from ._learned import SLOW_START_MIN
from ._pause import DUE_SLACK, MAX_PAUSE, PauseGate, PauseTooLong
from ._redis import PROBE_POLL, Admission, SharedPause

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
if larger) spreads them over the time to its reset; with more left, callers go freely."""

_KIND = "rate_limit_backoff"
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


def _number(name: str, value: object, low: float, high: float, *, low_open: bool) -> float:
    """``value`` as float if it lies in the range, else ValueError naming ``name``."""
    inside = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (low < value if low_open else low <= value)
        and value <= high
    )
    if not inside:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"RateLimitBackoff: {name} must be a number in {bracket}{low:g}, {high:g}],"
            f" got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


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

    kind: ClassVar[str] = _KIND
    order: ClassVar[int] = 30

    __slots__ = (
        "_base",
        "_cap",
        "_ceiling",
        "_gates",
        "_key",
        "_max_wait",
        "_proactive",
        "_shared",
        "_storage",
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
        self._max_wait = _number("max_wait", max_wait, 0.0, MAX_WAIT_LIMIT, low_open=True)
        self._base = _number("base", base, 0.0, MAX_WAIT_LIMIT, low_open=True)
        self._cap = _number("cap", cap, self._base, MAX_WAIT_LIMIT, low_open=False)
        if not callable(key):
            raise ValueError(
                f"RateLimitBackoff: key must be a callable (request) -> str,"
                f" got {type(key).__name__}"
            )
        if not isinstance(proactive, bool):
            raise ValueError(
                f"RateLimitBackoff: proactive must be True or False, got {proactive!r}"
            )
        self._proactive = proactive
        self._storage = check("RateLimitBackoff", storage)
        on_error = check_on_storage_error("RateLimitBackoff", on_storage_error)
        self._shared = _shared(self._storage, on_error)
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"RateLimitBackoff: max_keys must be an int >= 1, got {max_keys!r}")
        self._key = key
        self._ceiling = math.inf
        self._gates: KeyedState[PauseGate] = KeyedState(
            lambda _key: PauseGate(), PauseGate.is_idle, max_keys
        )

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

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        key = self._key(request)
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, key, request, handler)
        gate = self._gates.get(key)
        # The call's start bounds waits by aiohttp's total timeout; without one it is unused.
        total = request.session.timeout.total
        started = mark_start(request, _clock.now_for(request)) if total else 0.0
        departed = False
        if self._shared is not None and (gate is None or not gate.closed):
            gate, departed = await self._admit(request, key, gate, started)
        if gate is not None and (gate.closed or (gate.paced and not departed)):
            return await self._backoff(request, handler, key, started, None, 0)
        if gate is None:
            resp, cuts = await handler(request), 0
            if resp.status != 429:
                self._heed(key, resp)
        else:  # the key has a gate: count the request in flight (see _send)
            resp, cuts = await self._send(request, handler, key, gate, False)
        if resp.status == 429:
            return await self._backoff(request, handler, key, started, resp, cuts)
        return resp

    async def _admit(
        self, request: ClientRequest, key: str, gate: PauseGate | None, started: float
    ) -> tuple[PauseGate | None, bool]:
        """One round trip to Redis before a request of ``key`` (not paused here): close
        the local gate if another process paused the key; if the key is paced there, wait
        for the departure slot Redis gave us (True: departed; RateLimited if it lies
        beyond what the caller may wait, nothing sent)."""
        assert self._shared is not None
        now = _clock.now()
        bound = self._departure_bound(request, started, now)
        admission = await self._shared.admit(key, self._ceiling, bound - now)
        if admission.verdict == "open":
            if gate is not None:
                gate.shared_rate = 0.0
            return gate, False
        gate = self._gates.get_or_create(key)
        if admission.verdict == "paused":
            gate.pause(admission.seconds, probe=False)
            return gate, False
        await self._leave(key, gate, admission)
        return gate, True

    async def _shared_departure(self, key: str, gate: PauseGate, bound: float) -> None:
        """A paced departure after a pause, its slot reserved in Redis (one round trip);
        an advertised spread (this process's) still applies when Redis does not pace."""
        assert self._shared is not None
        admission = await self._shared.depart(key, self._ceiling, bound - _clock.now())
        if admission.verdict == "open":
            gate.shared_rate = 0.0
            if gate.paced:  # an advertised spread
                with _waiting(key):
                    await gate.depart(bound)
            return
        await self._leave(key, gate, admission)

    @staticmethod
    async def _leave(key: str, gate: PauseGate, admission: Admission) -> None:
        """Wait for the departure slot ``admission`` reserved (``go``), or RateLimited
        (``late``: nothing was reserved, nothing is sent)."""
        gate.shared_rate, gate.cuts_seen = admission.rate, admission.cuts
        if admission.verdict == "late":
            raise RateLimited(key, admission.seconds)
        if admission.seconds > DUE_SLACK:
            with _waiting(key):
                await _clock.sleep(admission.seconds)

    def _departure_bound(self, request: ClientRequest, started: float, now: float) -> float:
        """The loop time a paced departure must not pass: ``max_wait`` from now, or the
        caller's allowance (deadline, aiohttp's total timeout)."""
        return min(now + allowance(request, started), now + self._max_wait)

    async def _share_pause(
        self, key: str, gate: PauseGate, delay: float, resp: ClientResponse, probe: bool
    ) -> float:
        """Pause ``key`` in Redis; if that fails (or the caller is cancelled), the key is
        paused here (a probe's role handed back) and the 429 released before the error."""
        assert self._shared is not None
        try:
            return await self._shared.pause(key, delay, probe=probe)
        except BaseException:
            gate.pause(delay, probe=probe)
            resp.release()
            raise

    async def _claim(self, key: str, gate: PauseGate) -> bool | None:
        """Our local probe asks Redis: True (we probe), False (the pause is over: the
        gate opens), None (wait again: the pause grew, or another process probes)."""
        assert self._shared is not None
        try:
            verdict, seconds = await self._shared.claim(key)
        except BaseException:  # StorageError or cancelled: a local waiter probes instead
            gate.probe_failed()
            raise
        if verdict == "probe":
            return True
        if verdict == "open":
            gate.open()
            return False
        gate.pause(seconds if verdict == "paused" else min(seconds, PROBE_POLL), probe=True)
        return None

    def _heed(self, key: str, resp: ClientResponse) -> None:
        """With ``proactive``, the limit ``resp`` advertises, less the key's requests still
        in flight: none left -> pause until its reset; little left -> spread it over the
        time to the reset (see :data:`SPREAD_BELOW`)."""
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
            if not gate.closed:
                gate.pause(reset, probe=False)
                _events.emit(
                    "rate_limited", _KIND, key, None, attempt=0, delay=min(reset, MAX_PAUSE),
                    status=None, reason=f"advertised limit exhausted ({advertised.policy})",
                )  # fmt: skip
            return
        gate.spread = left / reset
        gate.spread_until = now + min(reset, MAX_PAUSE)
        gate.next_slot = max(gate.next_slot, now + 1.0 / gate.spread)

    def _learn(self, key: str, gate: PauseGate, cuts: int) -> None:
        """A 429 to a request sent after ``cuts`` cuts: if it is news, cut the key's rate
        and lengthen its streak. Shared: Redis cuts (in the background, if it is news
        there); the key is paced from now on."""
        if self._shared is not None:
            if cuts == gate.cuts_seen:
                gate.cuts_seen += 1
                gate.streak += 1
            gate.shared_rate = gate.shared_rate or SLOW_START_MIN
            self._shared.cut(key, cuts, self._ceiling)
            return
        now = _clock.now()
        learned = gate.learn(now, self._ceiling)
        if learned.counts(cuts):
            learned.cut(now)
            gate.streak += 1

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
        None when the key was found paused or paced. Each turn: a 429 pauses the key (or
        the caller gives up), the caller waits its turn (the probe, or after the probe),
        takes its departure slot, and sends."""
        strikes, waited, probe = 0, 0.0, False
        while True:
            gate = self._gates.get_or_create(key)  # not evicted while we wait or probe
            now = _clock.now()
            hard = now + allowance(request, started)
            latest = min(now + self._max_wait - waited, hard)
            front = False
            if resp is not None:  # a 429: pause the key, then give up or wait our turn
                strikes += 1
                self._learn(key, gate, cuts)
                if await self._pause(request, key, gate, resp, probe, latest, strikes):
                    return resp
                probe = False
                resp.release()
                front = True
            elif gate.closed and logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: %s is paused for %.3fs", _KIND, key, gate.remaining())
            if gate.closed:
                turn = await self._turn(request, key, gate, latest, hard, front, strikes)
                waited += _clock.now() - now
                if turn is None:  # another process probes, or paused again: wait again
                    resp, probe = None, False
                    continue
                probe = turn
            if not probe and gate.paced:
                paced_at = _clock.now()
                # max_wait bounds the pause; the departure after it is bounded on its own
                bound = self._departure_bound(request, started, paced_at)
                if self._shared is not None:
                    await self._shared_departure(key, gate, bound)
                else:
                    with _waiting(key):
                        await gate.depart(bound)
                waited += _clock.now() - paced_at
                if gate.closed:  # a 429 paused the key while we waited for our slot
                    resp = None
                    continue
            resp, cuts = await self._send(request, handler, key, gate, probe)
            if resp.status != 429:
                return resp

    async def _pause(
        self,
        request: ClientRequest,
        key: str,
        gate: PauseGate,
        resp: ClientResponse,
        probe: bool,
        latest: float,
        strikes: int,
    ) -> bool:
        """Close the key's gate for the 429's retry time, floored by the key's streak.
        True: the caller gives up (the pause ends past ``latest``, or its body cannot be
        sent again) and gets this 429 back."""
        now = _clock.now()
        hint = retry_hint(resp.headers, now=_clock.wall())
        server = None if hint is None else hint[0]
        delay = backoff_delay(server, max(gate.streak, 1), base=self._base, cap=self._cap)
        if self._shared is not None:  # every process pauses: the end is Redis's
            delay = max(delay, await self._share_pause(key, gate, delay, resp, probe))
        wait = max(delay, gate.pause(delay, probe=probe))
        gives_up = now + wait > latest or not body_replayable(request)
        _events.emit(
            "rate_limited", _KIND, key, request, attempt=strikes, delay=wait, status=429,
            reason=_reason(hint, delay) + (_GIVES_UP if gives_up else ""),
        )  # fmt: skip
        return gives_up

    async def _turn(
        self,
        request: ClientRequest,
        key: str,
        gate: PauseGate,
        latest: float,
        hard: float,
        front: bool,
        strikes: int,
    ) -> bool | None:
        """Wait in the key's queue: True (we probe), False (the pause is over), None (wait
        again). RateLimited when the pause ends beyond what the caller may wait."""
        with _waiting(key):
            probe = await gate.wait_turn(latest, hard, front=front)
        if probe and self._shared is not None:
            claimed = await self._claim(key, gate)
            if claimed is None:
                return None
            probe = claimed
        if probe:
            _events.emit("pause_probe", _KIND, key, request, attempt=strikes)
        return probe

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
        learned = gate.learned
        if self._shared is not None:
            cuts = gate.cuts_seen
        else:
            cuts = 0 if learned is None else learned.cuts
        gate.flying += 1
        try:
            resp = await handler(request)
        except BaseException:
            if probe:
                gate.probe_failed()
                if self._shared is not None:
                    self._shared.release(key)
            raise
        finally:
            gate.flying -= 1
        if resp.status == 429:
            return resp, cuts
        gate.streak = 0
        if probe:
            gate.open()  # sending resumes; the probe's answer is the first it counts
            if self._shared is not None:
                self._shared.opened(key)  # in the background, with the shared rate
        elif learned is not None:
            learned.accepted(_clock.now())
        elif gate.shared_rate and self._shared is not None:
            self._shared.accepted(key)  # counted in the next batch
        self._heed(key, resp)
        return resp, cuts


@contextmanager
def _waiting(key: str) -> Iterator[None]:
    """A wait for ``key`` (the pause, or a paced departure), counted in the metrics;
    :class:`PauseTooLong` becomes :class:`~resilient.RateLimited` (nothing was sent)."""
    try:
        with _metrics.waiting(_KIND, key, 429):
            yield
    except PauseTooLong as exc:
        raise RateLimited(key, exc.retry_after) from None


def _shared(storage: str, on_error: OnStorageError) -> SharedPause | None:
    if not is_shared(storage):
        return None
    from ..storage._redis import RedisStore

    return SharedPause(RedisStore(storage), on_error)


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
