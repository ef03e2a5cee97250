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

from . import _clock
from ._backoff import capped_doubling
from ._deadline import allowance
from ._errors import RateLimited
from ._headers import retry_hint
from ._keys import KeyFunc, by_host
from ._log import log_wait, logger
from ._pause import MAX_PAUSE, PauseGate, PauseTooLong
from ._policy import Policy
from ._replay import body_replayable
from ._state import DEFAULT_MAX_KEYS, KeyedState

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
    ``storage``: ``"memory://"`` (shared storage comes later).
    ``base``, ``cap``: the backoff without a retry time (see :func:`backoff_delay`).
    ``max_keys``: keys remembered at once (idle keys are evicted).
    """

    kind: ClassVar[str] = _KIND
    order: ClassVar[int] = 30

    __slots__ = ("_base", "_cap", "_gates", "_key", "_max_wait")

    def __init__(
        self,
        *,
        max_wait: float = DEFAULT_MAX_WAIT,
        key: KeyFunc = by_host,
        storage: str = MEMORY_STORAGE,
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
        if storage != MEMORY_STORAGE:
            scheme = str(storage).split(":", 1)[0]  # never echo a URI: it may hold a password
            raise ValueError(
                f"RateLimitBackoff: storage must be {MEMORY_STORAGE!r} (shared storage is"
                f" not supported yet), got a {scheme!r} URI"
            )
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

    def __repr__(self) -> str:
        return (
            f"RateLimitBackoff(max_wait={self._max_wait!r}, base={self._base!r},"
            f" cap={self._cap!r}, key={getattr(self._key, '__name__', 'key')})"
        )

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        key = self._key(request)
        gate = self._gates.get(key)
        # Our entry time bounds waits by aiohttp's total timeout; without one it is unused.
        started = _clock.now_for(request) if request.session.timeout.total else 0.0
        if gate is None or not gate.closed:
            resp = await handler(request)
            if resp.status != 429:
                return resp
            return await self._backoff(request, handler, key, started, resp)
        return await self._backoff(request, handler, key, started, None)

    async def _backoff(
        self,
        request: ClientRequest,
        handler: ClientHandlerType,
        key: str,
        started: float,
        resp: ClientResponse | None,
    ) -> ClientResponse:
        """The slow path: ``resp`` is a 429, or None when the key was found paused."""
        strikes, waited, probe = 0, 0.0, False
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
                wait = max(delay, gate.pause(delay, probe=probe))
                probe = False
                if now + wait > latest or not body_replayable(request):
                    return resp
                resp.release()
                log_wait(_KIND, _reason(hint, delay), key, wait)
            elif gate.closed and logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s: %s is paused for %.3fs", _KIND, key, gate.remaining())
            try:
                probe = await gate.wait_turn(latest, hard, front=resp is not None)
            except PauseTooLong as exc:
                raise RateLimited(key, exc.retry_after) from None
            finally:
                waited += _clock.now() - now
            try:
                resp = await handler(request)
            except BaseException:
                if probe:
                    gate.probe_failed()
                raise
            if resp.status != 429:
                if probe:
                    gate.open()
                return resp


def _reason(hint: tuple[float, str] | None, delay: float) -> str:
    """``"429 Retry-After"``; ``"429 backoff"`` without a retry time or above it."""
    if hint is None:
        return "429 backoff"
    if delay > hint[0]:
        return f"429 {hint[1]} (backoff floor)"
    return f"429 {hint[1]}"
