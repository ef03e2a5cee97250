"""CircuitBreaker: fail fast while a host is down.

Per key, the outcome of every attempt is counted in a sliding time window (10 buckets
of ``window / 10`` seconds). A key's circuit moves

    closed --(>= min_calls calls, failures / calls >= failure_ratio)--> open
    open --(open_for elapsed)--> half-open
    half-open --(half_open_probes probes succeeded)--> closed (window emptied)
    half-open --(a probe failed)--> open (for another open_for)

Failures: 5xx responses, aiohttp network errors and timeouts. 429 and other 4xx are
successes (the host is up). A cancellation, or an error that is not an outcome of the
attempt (a ``ResilienceError`` such as ``RateLimited`` from an inner policy), counts as
nothing and frees the half-open probe slot it held.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from . import _clock, _events, _metrics
from ._errors import CircuitOpenError, ResilienceError
from ._keys import KeyFunc, by_host
from ._log import human_duration, logger
from ._policy import Policy
from ._state import DEFAULT_MAX_KEYS, KeyedState
from ._stats import CircuitStats
from ._window import Window
from .storage import OnStorageError, check, check_on_storage_error, is_shared, redact

__all__ = [
    "BUCKETS",
    "DEFAULT_FAILURE_RATIO",
    "DEFAULT_HALF_OPEN_PROBES",
    "DEFAULT_MIN_CALLS",
    "DEFAULT_OPEN_FOR",
    "DEFAULT_STORAGE",
    "DEFAULT_WINDOW",
    "CircuitBreaker",
    "is_failure",
]

DEFAULT_FAILURE_RATIO = 0.5
"""Open when at least half of the calls in the window failed."""
DEFAULT_MIN_CALLS = 10
"""Calls the window must hold before the ratio is trusted."""
DEFAULT_WINDOW = 30.0
"""Seconds of outcomes the window counts."""
DEFAULT_OPEN_FOR = 30.0
"""Seconds the circuit stays open before it admits a probe."""
DEFAULT_HALF_OPEN_PROBES = 1
"""Trial requests admitted at once while half-open; all must succeed to close."""
DEFAULT_STORAGE = "memory://"
BUCKETS = 10
"""Buckets in the window: it spans between 0.9 × and 1 × ``window`` seconds."""

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
_KIND = "circuit_breaker"
_STATE_NAMES = ("closed", "open", "half_open")


def is_failure(exc: BaseException) -> bool:
    """A network error or timeout of the attempt, or a 5xx raised as an exception.

    Not failures: ``ResilienceError`` (an inner policy's verdict, nothing was learnt
    about the host), a ``ClientResponseError`` below 500 (the host answered), and
    anything that is not an aiohttp error or a timeout (cancellation, bugs).
    """
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status >= 500
    return isinstance(exc, (aiohttp.ClientError, TimeoutError)) and not isinstance(
        exc, ResilienceError
    )


@dataclass(frozen=True, slots=True)
class _Settings:
    failure_ratio: float
    min_calls: int
    open_for: float
    half_open_probes: int
    width: float


class _Circuit(Window):
    """One key's breaker: its outcome window plus its state.

    ``epoch`` changes on every transition, so an outcome that arrives after the circuit
    moved on (a call admitted before it opened, a probe of an earlier half-open spell)
    is ignored. While open, ``until`` is when it half-opens; while half-open,
    ``admitted`` counts the probes let through (minus those that ended without an
    outcome) and ``until`` is when an unanswered probe is given up on (``open_for``
    after the last admission).
    """

    __slots__ = ("admitted", "epoch", "key", "settings", "state", "successes", "until")

    def __init__(self, key: str, settings: _Settings) -> None:
        super().__init__(settings.width, BUCKETS)
        self.key = key
        self.settings = settings
        self.state = CLOSED
        self.epoch = 0
        self.until = 0.0
        self.admitted = 0
        self.successes = 0

    def admit(self, now: float, request: ClientRequest | None = None) -> None:
        """Let one probe through (the circuit is not closed), or raise ``CircuitOpenError``."""
        if self.state == OPEN or self.admitted >= self.settings.half_open_probes:
            if now < self.until:
                _events.emit(
                    "circuit_rejected", _KIND, self.key, request,
                    delay=self.until - now, reason=_STATE_NAMES[self.state],
                )  # fmt: skip
                raise CircuitOpenError(self.key, self.until - now)
            self._half_open(overdue=self.state == HALF_OPEN)
        self.admitted += 1
        self.until = now + self.settings.open_for

    def record(self, now: float, failed: bool, epoch: int, probe: bool) -> None:
        """Count the outcome of a call admitted in ``epoch``; open or close as it says."""
        if epoch != self.epoch:
            return
        if probe:
            self._probe_done(now, failed)
            return
        self.add(now, failed)
        if self.fails:
            self._trip_if_over(now)

    def _trip_if_over(self, now: float) -> None:
        """Open when calls >= min_calls and fails / calls >= failure_ratio."""
        fails, calls, settings = self.fails, self.calls, self.settings
        if calls >= settings.min_calls and fails / calls >= settings.failure_ratio:
            self._open(now, fails, calls)

    def _probe_done(self, now: float, failed: bool) -> None:
        """A failed probe re-opens; ``half_open_probes`` successes close."""
        if failed:
            self._open(now, 0, 0)
        else:
            self.successes += 1
            if self.successes >= self.settings.half_open_probes:
                self._close()

    def release(self, epoch: int) -> None:
        """Give back the probe slot of a call that ended without an outcome."""
        if epoch == self.epoch:
            self.admitted -= 1

    def is_idle(self) -> bool:
        """Nothing to remember beyond soft counts: closed, or its open/probe time is up."""
        return self.state == CLOSED or self.until <= _clock.now()

    def _open(self, now: float, fails: int, calls: int) -> None:
        self.state = OPEN
        self.epoch += 1
        self.until = now + self.settings.open_for
        if logger.isEnabledFor(logging.WARNING):
            open_for = self.settings.open_for
            why = f"{fails} of {calls} calls failed" if calls else "a probe failed"
            logger.warning(
                "circuit_breaker: opened on %s (%s); failing fast for %s, half-open at %s",
                self.key,
                why,
                human_duration(open_for),
                _clock.wall_after(open_for).isoformat(timespec="seconds"),
            )
        reason = f"{fails} of {calls} calls failed" if calls else "a probe failed"
        _events.emit("circuit_opened", _KIND, self.key, delay=self.settings.open_for, reason=reason)

    def _half_open(self, *, overdue: bool) -> None:
        self.state = HALF_OPEN
        self.epoch += 1
        self.admitted = self.successes = 0
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "circuit_breaker: half-open on %s%s; admitting up to %d probe(s)",
                self.key,
                " again (the probes in flight are overdue)" if overdue else "",
                self.settings.half_open_probes,
            )
        reason = "probes overdue" if overdue else "open_for elapsed"
        _events.emit("circuit_half_open", _KIND, self.key, reason=reason)

    def _close(self) -> None:
        self.state = CLOSED
        self.epoch += 1
        self.admitted = self.successes = 0
        self.clear()
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "circuit_breaker: closed on %s (%d probe(s) succeeded)",
                self.key,
                self.settings.half_open_probes,
            )
        _events.emit("circuit_closed", _KIND, self.key, reason="probes succeeded")


class CircuitBreaker(Policy):
    """Fail fast with ``CircuitOpenError`` while a key's recent calls mostly failed.

    - ``failure_ratio`` in (0, 1] (default 0.5) and ``min_calls`` >= 1 (default 10):
      open when the window holds at least ``min_calls`` calls and
      failures / calls >= ``failure_ratio``.
    - ``window`` seconds (default 30): outcomes older than this slide out (10 buckets,
      so the window spans 0.9 × to 1 × ``window``).
    - ``open_for`` seconds (default 30): while open, requests raise
      ``CircuitOpenError(key, retry_after)`` without touching the network;
      ``retry_after`` is the time left until half-open.
    - ``half_open_probes`` >= 1 (default 1): after ``open_for``, at most this many
      trial requests are admitted in one half-open spell (a probe that succeeded keeps
      its slot; one that ended without an outcome gives it back); the rest raise
      ``CircuitOpenError``. The circuit closes (window emptied) once
      ``half_open_probes`` probes succeeded, and
      re-opens for another ``open_for`` on the first probe failure. A probe unanswered
      ``open_for`` after it was admitted is given up on and its slot reused.
    - ``key`` (default :func:`by_host`): one circuit per key. ``max_keys`` (default
      10 000) bounds the map: when full, closed circuits (their counts are soft state)
      and circuits whose open time is up are evicted oldest first.
    - ``storage``: ``"memory://"`` (default), or a Redis URI: one circuit per key for
      every process (see :mod:`resilient.storage._breaker`; two round trips a request).
      ``on_storage_error``: ``"raise"`` (``StorageError``, nothing sent) or ``"allow"``
      (an in-memory breaker of this process decides while Redis fails).

    Failures: 5xx responses, aiohttp network errors and timeouts. 429 and other 4xx are
    successes. Cancellation is not an outcome (it frees a probe slot); note that
    aiohttp's ``ClientTimeout.total`` cancels the whole chain, so count timeouts with
    finite ``sock_read``/``sock_connect`` timeouts (as ``resilient.session()`` sets).
    """

    __slots__ = (
        "_circuits",
        "_get",
        "_key",
        "_max_keys",
        "_settings",
        "_shared",
        "_storage",
        "_window",
    )

    kind = "circuit_breaker"
    order = 20

    def __init__(
        self,
        *,
        failure_ratio: float = DEFAULT_FAILURE_RATIO,
        min_calls: int = DEFAULT_MIN_CALLS,
        window: float = DEFAULT_WINDOW,
        open_for: float = DEFAULT_OPEN_FOR,
        half_open_probes: int = DEFAULT_HALF_OPEN_PROBES,
        key: KeyFunc = by_host,
        storage: str = DEFAULT_STORAGE,
        max_keys: int = DEFAULT_MAX_KEYS,
        on_storage_error: OnStorageError = "raise",
    ) -> None:
        if not _real(failure_ratio) or not 0.0 < failure_ratio <= 1.0:
            raise ValueError(
                f"CircuitBreaker: failure_ratio must be in (0, 1], got {failure_ratio!r}"
            )
        _positive_int("min_calls", min_calls)
        _positive_seconds("window", window)
        _positive_seconds("open_for", open_for)
        _positive_int("half_open_probes", half_open_probes)
        _positive_int("max_keys", max_keys)
        if not callable(key):
            raise ValueError(
                f"CircuitBreaker: key must be a callable (request) -> str, got {key!r}"
            )
        storage = check("CircuitBreaker", storage)
        on_error = check_on_storage_error("CircuitBreaker", on_storage_error)
        self._settings = settings = _Settings(
            float(failure_ratio), min_calls, float(open_for), half_open_probes, window / BUCKETS
        )
        self._window = float(window)
        self._key = key
        self._storage = storage
        self._max_keys = max_keys
        self._circuits: KeyedState[_Circuit] = KeyedState(
            _factory(settings), _Circuit.is_idle, max_keys
        )
        self._get = self._circuits.get
        self._shared = None
        if is_shared(storage):
            from .storage._breaker import SharedCircuits
            from .storage._redis import RedisStore

            fallback = CircuitBreaker(
                failure_ratio=failure_ratio,
                min_calls=min_calls,
                window=window,
                open_for=open_for,
                half_open_probes=half_open_probes,
                key=key,
                max_keys=max_keys,
            )
            shared = (settings.failure_ratio, min_calls, settings.open_for, half_open_probes)
            self._shared = SharedCircuits(
                RedisStore(storage), (*shared, settings.width, BUCKETS), fallback, on_error
            )

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        key = self._key(request)
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, key, request, handler)
        if self._shared is not None:
            return await self._shared.call(key, request, handler)
        circuit = self._get(key) or self._circuits.get_or_create(key)
        probe = circuit.state != CLOSED
        if probe:
            circuit.admit(_clock.now_for(request), request)  # CircuitOpenError while open
        epoch = circuit.epoch
        try:
            resp = await handler(request)
        except BaseException as exc:
            if is_failure(exc):
                circuit.record(_clock.now_for(request), True, epoch, probe)
            elif probe:  # cancelled, or not an outcome of this attempt
                circuit.release(epoch)
            raise
        circuit.record(_clock.now_for(request), resp.status >= 500, epoch, probe)
        return resp

    def stats(self) -> dict[str, CircuitStats]:
        """A snapshot of every key's circuit (call it inside the event loop); with a Redis
        storage, of the in-memory fallback's circuits."""
        if self._shared is not None:
            return self._shared.fallback.stats()
        now = _clock.now()
        return {key: _snapshot(circuit, now) for key, circuit in self._circuits.items()}

    def state(self, key: str) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (open past ``open_for`` reads
        half-open: the next request is a probe). Call it inside the event loop."""
        circuit = self._get(key)
        if circuit is None:
            return "closed"
        if circuit.state == OPEN and circuit.until <= _clock.now():
            return "half_open"
        return _STATE_NAMES[circuit.state]

    @property
    def failure_ratio(self) -> float:
        return self._settings.failure_ratio

    @property
    def min_calls(self) -> int:
        return self._settings.min_calls

    @property
    def window(self) -> float:
        return self._window

    @property
    def open_for(self) -> float:
        return self._settings.open_for

    @property
    def half_open_probes(self) -> int:
        return self._settings.half_open_probes

    @property
    def key(self) -> KeyFunc:
        return self._key

    @property
    def storage(self) -> str:
        return self._storage

    @property
    def max_keys(self) -> int:
        return self._max_keys

    def __repr__(self) -> str:
        s = self._settings
        key = getattr(self._key, "__qualname__", None) or repr(self._key)
        return (
            f"CircuitBreaker(failure_ratio={s.failure_ratio!r}, min_calls={s.min_calls},"
            f" window={self._window!r}, open_for={s.open_for!r},"
            f" half_open_probes={s.half_open_probes}, key={key},"
            f" storage={redact(self._storage)!r}, max_keys={self._max_keys})"
        )


def _snapshot(circuit: _Circuit, now: float) -> CircuitStats:
    """``circuit`` at ``now``: open past ``until`` reads half-open, as in ``state()``."""
    state = circuit.state
    if state == OPEN and circuit.until <= now:
        state = HALF_OPEN
    circuit.advance(now)  # slide the window to now (what the next outcome would do)
    calls, fails = circuit.calls, circuit.fails
    retry_after = circuit.until - now if state == OPEN else 0.0
    return CircuitStats(
        key=circuit.key,
        state=_STATE_NAMES[state],
        calls=calls,
        failures=fails,
        failure_ratio=fails / calls if calls else 0.0,
        retry_after=retry_after,
        open_until=_clock.wall_after(retry_after) if state == OPEN else None,
        probes=max(circuit.admitted, 0) if circuit.state == HALF_OPEN else 0,
    )


def _factory(settings: _Settings) -> Callable[[str], _Circuit]:
    def new_circuit(key: str) -> _Circuit:
        return _Circuit(key, settings)

    return new_circuit


def _real(value: object) -> TypeGuard[float]:
    """An int or float, not a bool (NaN passes here and fails every range check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(name: str, value: object) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"CircuitBreaker: {name} must be an integer >= 1, got {value!r}")


def _positive_seconds(name: str, value: object) -> None:
    if not _real(value) or not 0.0 < value < math.inf:
        raise ValueError(
            f"CircuitBreaker: {name} must be a finite number of seconds > 0, got {value!r}"
        )
