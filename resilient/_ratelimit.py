"""RateLimitBackoff: 429 handling with one shared pause per key and one probe.

On a 429 the key's :class:`~resilient._pause.PauseGate` closes for the server's retry
time (``Retry-After``, ``RateLimit``, ``RateLimit-Reset``, ``X-RateLimit-Reset``), or
for a jittered exponential backoff when no header gives one. No caller of the key
sends until the pause ends; then one probe goes, and the others follow once it is
not a 429. A caller waits at most ``max_wait`` seconds for 429s over its call, and
never past its :func:`resilient.deadline` or aiohttp's ``ClientTimeout.total``: when
the pause ends later, it gets the 429 back at once (readable), or
:class:`~resilient.RateLimited` if it has no response (it never sent, or its 429 was
already released before the pause grew).
"""

from __future__ import annotations

import logging
import random
from typing import ClassVar

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from . import _clock, _events, _metrics
from ._backoff import capped_doubling
from ._deadline import allowance
from ._errors import RateLimited
from ._headers import retry_hint
from ._keys import KeyFunc, by_host
from ._log import logger
from ._pause import MAX_PAUSE, PauseGate, PauseTooLong
from ._policy import Policy
from ._replay import body_replayable
from ._state import DEFAULT_MAX_KEYS, KeyedState
from ._stats import PauseStats
from .storage import OnStorageError, check, check_on_storage_error, is_shared, redact
from .storage._pause import PROBE_POLL, SharedPause

__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_CAP",
    "DEFAULT_MAX_WAIT",
    "MAX_WAIT_LIMIT",
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

_KIND = "rate_limit_backoff"
_GIVES_UP = " (the pause ends beyond what this caller may wait: its 429 is returned)"


def backoff_delay(server: float | None, strikes: int, *, base: float, cap: float) -> float:
    """Seconds to pause after the ``strikes``-th 429 (``n``, from 1) of one call.

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
    """Honour 429s with one shared pause per key (see the module docstring).

    ``max_wait``: seconds a call may wait for 429s in total, in (0, 7 days].
    ``key``: request -> key (default ``by_host``); the pause is per key.
    ``storage``: ``"memory://"``, or a Redis URI: the pause and its probe are shared
    by every process (see :mod:`resilient.storage._pause`).
    ``on_storage_error``: ``"raise"`` (StorageError) or ``"allow"`` (this process's pause).
    ``base``, ``cap``: the backoff without a retry time (see :func:`backoff_delay`).
    ``max_keys``: keys remembered at once (idle keys are evicted).
    """

    kind: ClassVar[str] = _KIND
    order: ClassVar[int] = 30

    __slots__ = ("_base", "_cap", "_gates", "_key", "_max_wait", "_shared", "_storage")

    def __init__(
        self,
        *,
        max_wait: float = DEFAULT_MAX_WAIT,
        key: KeyFunc = by_host,
        storage: str = MEMORY_STORAGE,
        on_storage_error: OnStorageError = "raise",
        base: float = DEFAULT_BASE,
        cap: float = DEFAULT_CAP,
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
        self._storage = check("RateLimitBackoff", storage)
        on_error = check_on_storage_error("RateLimitBackoff", on_storage_error)
        self._shared = _shared(self._storage, on_error)
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"RateLimitBackoff: max_keys must be an int >= 1, got {max_keys!r}")
        self._key = key
        self._gates: KeyedState[PauseGate] = KeyedState(
            lambda _key: PauseGate(), PauseGate.is_idle, max_keys
        )

    @property
    def max_wait(self) -> float:
        return self._max_wait

    def paused_for(self, key: str) -> float:
        """Seconds until ``key``'s pause ends (0 if not paused or a probe is due)."""
        gate = self._gates.get(key)
        return 0.0 if gate is None else gate.remaining()

    def stats(self) -> dict[str, PauseStats]:
        """A snapshot of every key's pause in this process (call it inside the event loop)."""
        return {key: _snapshot(key, gate) for key, gate in self._gates.items()}

    def __repr__(self) -> str:
        return (
            f"RateLimitBackoff(max_wait={self._max_wait!r}, base={self._base!r},"
            f" cap={self._cap!r}, key={getattr(self._key, '__name__', 'key')},"
            f" storage={redact(self._storage)!r})"
        )

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        key = self._key(request)
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, key, request, handler)
        gate = self._gates.get(key)
        # Our entry time bounds waits by aiohttp's total timeout; without one it is unused.
        started = _clock.now_for(request) if request.session.timeout.total else 0.0
        if self._shared is not None and (gate is None or not gate.closed):
            gate = await self._adopt(key, gate)
        if gate is None or not gate.closed:
            resp = await handler(request)
            if resp.status != 429:
                return resp
            return await self._backoff(request, handler, key, started, resp)
        return await self._backoff(request, handler, key, started, None)

    async def _adopt(self, key: str, gate: PauseGate | None) -> PauseGate | None:
        """Close ``key``'s local gate if another process paused it (one round trip)."""
        assert self._shared is not None
        left = await self._shared.check(key)
        if left is None:
            return gate
        gate = self._gates.get_or_create(key)
        gate.pause(left, probe=False)
        return gate

    async def _share_pause(self, key: str, delay: float, resp: ClientResponse) -> float:
        """Pause ``key`` in Redis; if that fails, the 429 is released before the error."""
        assert self._shared is not None
        try:
            return await self._shared.pause(key, delay)
        except BaseException:
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

    async def _backoff(
        self,
        request: ClientRequest,
        handler: ClientHandlerType,
        key: str,
        started: float,
        resp: ClientResponse | None,
    ) -> ClientResponse:
        """The slow path: ``resp`` is a 429, or None when the key was found paused."""
        strikes, waited, probe, front = 0, 0.0, False, False
        while True:
            gate = self._gates.get_or_create(key)  # not evicted while we wait or probe
            now = _clock.now()
            hard = now + allowance(request, started)
            latest = min(now + self._max_wait - waited, hard)
            if resp is not None:  # a 429: pause the key, then give up or wait our turn
                strikes += 1
                hint = retry_hint(resp.headers, now=_clock.wall())
                server = None if hint is None else hint[0]
                delay = backoff_delay(server, strikes, base=self._base, cap=self._cap)
                if self._shared is not None:  # every process pauses: the end is Redis's
                    delay = max(delay, await self._share_pause(key, delay, resp))
                wait = max(delay, gate.pause(delay, probe=probe))
                probe = False
                gives_up = now + wait > latest or not body_replayable(request)
                _events.emit(
                    "rate_limited", _KIND, key, request, attempt=strikes, delay=wait,
                    status=429, reason=_reason(hint, delay) + (_GIVES_UP if gives_up else ""),
                )  # fmt: skip
                if gives_up:
                    return resp
                resp.release()
            elif gate.closed and logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: %s is paused for %.3fs", _KIND, key, gate.remaining())
            try:
                with _metrics.waiting(_KIND, key, 429):
                    probe = await gate.wait_turn(latest, hard, front=front or resp is not None)
            except PauseTooLong as exc:
                raise RateLimited(key, exc.retry_after) from None
            finally:
                waited += _clock.now() - now
            front = False
            if probe and self._shared is not None:
                claimed = await self._claim(key, gate)
                if claimed is None:  # another process probes, or paused again: wait again
                    resp, front = None, True
                    continue
                probe = claimed
            if probe:
                _events.emit("pause_probe", _KIND, key, request, attempt=strikes)
            try:
                resp = await handler(request)
            except BaseException:
                if probe:
                    gate.probe_failed()
                    if self._shared is not None:
                        self._shared.release(key)
                raise
            if resp.status != 429:
                if probe:
                    gate.open()
                    if self._shared is not None:
                        await self._shared.open(key)
                return resp


def _shared(storage: str, on_error: OnStorageError) -> SharedPause | None:
    if not is_shared(storage):
        return None
    from .storage._redis import RedisStore

    return SharedPause(RedisStore(storage), on_error)


def _snapshot(key: str, gate: PauseGate) -> PauseStats:
    remaining = gate.remaining()
    return PauseStats(
        key=key,
        paused=gate.closed,
        remaining=remaining,
        paused_until=_clock.wall_after(remaining) if gate.closed else None,
        probing=gate.probing,
        waiting=gate.waiting(),
    )


def _reason(hint: tuple[float, str] | None, delay: float) -> str:
    """``"429 Retry-After"``; ``"429 backoff"`` without a retry time or above it."""
    if hint is None:
        return "429 backoff"
    if delay > hint[0]:
        return f"429 {hint[1]} (backoff floor)"
    return f"429 {hint[1]}"
