"""CircuitBreaker: fail fast while a host is down, probe soon, back off while it stays down.

Per key, the outcome of every attempt is counted in a sliding time window (10 buckets
of ``window / 10`` seconds) and in a run of consecutive failures. A key's circuit moves

    closed --(consecutive_failures failures in a row, or >= min_calls calls in the
              window with failures / calls >= failure_ratio)--> open for open_for
    open --(its break elapsed)--> half-open
    half-open --(half_open_probes probes succeeded)--> closed (counts emptied, level 0)
    half-open --(a probe failed)--> open for the next break (level + 1)

The break after ``level`` failed probes (0: the trip from closed) is

    nominal(level) = min(max_open_for, open_for × 2^level)
    break(0) = open_for;  break(level >= 1) = max(open_for, nominal × (0.5 + 0.5 × u))

with ``u`` uniform in [0, 1): doubled with jitter, never below ``open_for``, never above
``max_open_for``. ``mode="adaptive"`` replaces the circuit with Google's client-side
adaptive throttling (see :class:`_Throttled`).

Failures: 5xx responses, aiohttp network errors and timeouts. 429 and other 4xx are
successes (the host is up). A cancellation, or an error that is not an outcome of the
attempt (a ``ResilienceError`` such as ``RateLimited`` from an inner policy), counts as
nothing and frees the half-open probe slot it held.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeGuard

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
    "ADAPTIVE_K",
    "BUCKETS",
    "DEFAULT_CONSECUTIVE_FAILURES",
    "DEFAULT_FAILURE_RATIO",
    "DEFAULT_HALF_OPEN_PROBES",
    "DEFAULT_MAX_OPEN_FOR",
    "DEFAULT_MIN_CALLS",
    "DEFAULT_MODE",
    "DEFAULT_OPEN_FOR",
    "DEFAULT_STORAGE",
    "DEFAULT_WINDOW",
    "CircuitBreaker",
    "Mode",
    "is_failure",
    "next_break",
    "reject_probability",
]

Mode = Literal["circuit", "adaptive"]

DEFAULT_FAILURE_RATIO = 0.5
"""Open when at least half of the calls in the window failed."""
DEFAULT_MIN_CALLS = 10
"""Calls the window must hold before the ratio is trusted."""
DEFAULT_WINDOW = 2.0
"""Seconds of outcomes the window counts (short: an outage shows within it)."""
DEFAULT_CONSECUTIVE_FAILURES = 10
"""Failures in a row that open the circuit whatever the window holds."""
DEFAULT_OPEN_FOR = 0.5
"""Seconds of the first break; the break after a failed probe doubles (with jitter)."""
DEFAULT_MAX_OPEN_FOR = 1.0
"""Longest break, in seconds (``max(DEFAULT_MAX_OPEN_FOR, open_for)`` when not given):
short, so the first success after an outage comes within a second (outage benchmark)."""
DEFAULT_HALF_OPEN_PROBES = 1
"""Trial requests admitted at once while half-open; all must succeed to close."""
DEFAULT_MODE: Mode = "circuit"
DEFAULT_STORAGE = "memory://"
BUCKETS = 10
"""Buckets in the window: it spans between 0.9 × and 1 × ``window`` seconds."""
ADAPTIVE_K = 2.0
"""``mode="adaptive"``: the K of the SRE book's rule (requests may be K × accepts)."""

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
_KIND = "circuit_breaker"
_STATE_NAMES = ("closed", "open", "half_open")
_MODES = ("circuit", "adaptive")
_NEVER = 1 << 62
"""``consecutive_failures=None``: a run no circuit reaches."""


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


def next_break(open_for: float, max_open_for: float, level: int, u: float) -> float:
    """Seconds of the break after ``level`` failed probes, ``u`` uniform in [0, 1).

    ``level == 0``: ``open_for``; else ``max(open_for, nominal × (0.5 + 0.5 × u))`` with
    ``nominal = min(max_open_for, open_for × 2^level)`` (the exponent is capped at 64, so
    no overflow). The Lua script (``storage/lua/breaker.lua``) computes the same.
    """
    if level <= 0:
        return open_for
    nominal = min(max_open_for, open_for * 2.0 ** min(level, 64))
    return max(open_for, nominal * (0.5 + 0.5 * u))


def reject_probability(requests: int, accepts: int, k: float = ADAPTIVE_K) -> float:
    """Google's client-side adaptive throttling (SRE book, "Handling Overload"):
    ``max(0, (requests − k × accepts) / (requests + 1))``."""
    return max(0.0, (requests - k * accepts) / (requests + 1))


@dataclass(frozen=True, slots=True)
class _Settings:
    failure_ratio: float
    min_calls: int
    open_for: float
    half_open_probes: int
    width: float
    consecutive: int = _NEVER
    max_open_for: float = math.inf


class _Circuit(Window):
    """One key's breaker: its outcome window, its run of failures, plus its state.

    ``epoch`` changes on every transition, so an outcome that arrives after the circuit
    moved on (a call admitted before it opened, a probe of an earlier half-open spell)
    is ignored. While open, ``until`` is when it half-opens; while half-open,
    ``admitted`` counts the probes let through (minus those that ended without an
    outcome) and ``until`` is when an unanswered probe is given up on (``open_for``
    after the last admission). ``streak``: failures in a row while closed; ``level``:
    failed probes since the circuit last closed (the break grows with it).
    """

    __slots__ = (
        "admitted",
        "epoch",
        "key",
        "level",
        "settings",
        "state",
        "streak",
        "successes",
        "until",
    )

    def __init__(self, key: str, settings: _Settings) -> None:
        super().__init__(settings.width, BUCKETS)
        self.key = key
        self.settings = settings
        self.state = CLOSED
        self.epoch = 0
        self.until = 0.0
        self.admitted = 0
        self.successes = 0
        self.streak = 0
        self.level = 0

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
        if failed:
            self.streak += 1
            self._trip_if_over(now)
        elif self.streak:
            self.streak = 0

    def _trip_if_over(self, now: float) -> None:
        """Open on ``consecutive`` failures in a row, or when calls >= min_calls and
        fails / calls >= failure_ratio."""
        fails, calls, settings = self.fails, self.calls, self.settings
        if self.streak >= settings.consecutive:
            self._open(now, f"{self.streak} failures in a row")
        elif calls >= settings.min_calls and fails / calls >= settings.failure_ratio:
            self._open(now, f"{fails} of {calls} calls failed")

    def _probe_done(self, now: float, failed: bool) -> None:
        """A failed probe re-opens for a longer break; ``half_open_probes`` successes close."""
        if failed:
            self.level += 1
            self._open(now, "a probe failed")
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

    def _open(self, now: float, why: str) -> None:
        settings = self.settings
        pause = next_break(settings.open_for, settings.max_open_for, self.level, random.random())
        self.state = OPEN
        self.epoch += 1
        self.until = now + pause
        self.streak = 0
        if logger.isEnabledFor(logging.WARNING):
            logger.warning(
                "circuit_breaker: opened on %s (%s); failing fast for %s, half-open at %s",
                self.key,
                why,
                human_duration(pause),
                _clock.wall_after(pause).isoformat(timespec="seconds"),
            )
        _events.emit("circuit_opened", _KIND, self.key, delay=pause, reason=why)

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
        self.admitted = self.successes = self.streak = self.level = 0
        self.clear()
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "circuit_breaker: closed on %s (%d probe(s) succeeded)",
                self.key,
                self.settings.half_open_probes,
            )
        _events.emit("circuit_closed", _KIND, self.key, reason="probes succeeded")


class _Throttled(Window):
    """``mode="adaptive"``: one key's client-side adaptive throttling (SRE book).

    The window counts ``requests`` (``calls``: every call, those rejected here included)
    and the failures among them (``fails``: rejected here, or failed); accepts =
    requests − fails. Once the window holds ``min_calls`` requests, a call is rejected
    locally (``CircuitOpenError``, nothing sent) with probability
    :func:`reject_probability` ``(requests, accepts)``, which is above 0 only while
    requests > K × accepts (more than half of the calls fail, K = 2). ``state`` reads
    ``OPEN`` while that holds (the caller then asks :meth:`admit`), else ``CLOSED``.
    There are no probes and no epochs: every outcome counts.
    """

    __slots__ = ("epoch", "key", "min_calls", "state")

    def __init__(self, key: str, settings: _Settings) -> None:
        super().__init__(settings.width, BUCKETS)
        self.key = key
        self.min_calls = settings.min_calls
        self.state = CLOSED
        self.epoch = 0

    def admit(self, now: float, request: ClientRequest | None = None) -> None:
        """Reject with the SRE book's probability (counted as a request not accepted)."""
        self.advance(now)
        calls = self.calls
        if calls >= self.min_calls:
            p = reject_probability(calls, calls - self.fails)
            if p > 0.0 and random.random() < p:
                self.add(now, True)
                _events.emit(
                    "circuit_rejected", _KIND, self.key, request, delay=0.0, reason="adaptive"
                )
                raise CircuitOpenError(self.key, 0.0)
        self._steer()

    def record(self, now: float, failed: bool, epoch: int, probe: bool) -> None:
        """Count one request's outcome."""
        self.add(now, failed)
        if failed or self.state:
            self._steer()

    def _steer(self) -> None:
        calls = self.calls
        self.state = OPEN if calls - ADAPTIVE_K * (calls - self.fails) > 0.0 else CLOSED

    def release(self, epoch: int) -> None:
        """Nothing is held."""

    def is_idle(self) -> bool:
        return True

    @property
    def until(self) -> float:
        return 0.0

    @property
    def admitted(self) -> int:
        return 0


class CircuitBreaker(Policy):
    """Fail fast with ``CircuitOpenError`` while a key's recent calls fail; probe soon.

    - Opens on whichever comes first: ``consecutive_failures`` >= 1 failures in a row
      (default 10; ``None``: off), or ``min_calls`` >= 1 calls (default 10) in the
      window with failures / calls >= ``failure_ratio`` in (0, 1] (default 0.5).
    - ``window`` seconds (default 2): outcomes older than this slide out (10 buckets,
      so the window spans 0.9 × to 1 × ``window``).
    - ``open_for`` seconds (default 0.5): the first break. While open, requests raise
      ``CircuitOpenError(key, retry_after)`` without touching the network;
      ``retry_after`` is the time left until half-open (a ``Retry`` outside the breaker
      waits out a break of at most its ``circuit_wait``, 1 s by default, and tries the
      call again; nothing was sent). After a failed probe the break
      doubles with jitter up to ``max_open_for`` (default ``max(1, open_for)``):
      ``max(open_for, min(max_open_for, open_for × 2^n) × U[0.5, 1))`` after the n-th
      failed probe in a row; back to ``open_for`` once the circuit closes.
    - ``half_open_probes`` >= 1 (default 1): after the break, at most this many
      trial requests are admitted in one half-open spell (a probe that succeeded keeps
      its slot; one that ended without an outcome gives it back); the rest raise
      ``CircuitOpenError``. The circuit closes (counts emptied) once
      ``half_open_probes`` probes succeeded, and re-opens on the first probe failure.
      A probe unanswered ``open_for`` after it was admitted is given up on and its
      slot reused.
    - ``mode``: ``"circuit"`` (default, the rules above) or ``"adaptive"``: Google's
      client-side adaptive throttling instead of a circuit: once the window holds
      ``min_calls`` requests, each call is rejected locally with probability
      ``max(0, (requests − 2 × accepts) / (requests + 1))`` over the window (requests
      include those rejected; ``failure_ratio``, ``consecutive_failures``, the breaks
      and probes do not apply). In memory only.
    - ``key`` (default :func:`by_host`): one circuit per key. ``max_keys`` (default
      10 000) bounds the map: when full, closed circuits (their counts are soft state)
      and circuits whose open time is up are evicted oldest first.
    - ``storage``: ``"memory://"`` (default), or a Redis URI: one circuit per key for
      every process, same rules (see :mod:`resilient.storage._breaker`; two round trips
      a request). ``on_storage_error``: ``"raise"`` (``StorageError``, nothing sent) or
      ``"allow"`` (an in-memory breaker of this process decides while Redis fails).

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
        "_mode",
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
        consecutive_failures: int | None = DEFAULT_CONSECUTIVE_FAILURES,
        max_open_for: float | None = None,
        mode: Mode = DEFAULT_MODE,
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
        if consecutive_failures is not None:
            _positive_int("consecutive_failures", consecutive_failures, "or None (off)")
        if max_open_for is None:
            max_open_for = max(DEFAULT_MAX_OPEN_FOR, float(open_for))
        elif not _real(max_open_for) or not open_for <= max_open_for < math.inf:
            raise ValueError(
                "CircuitBreaker: max_open_for must be a finite number of seconds >= open_for"
                f" ({open_for!r}), or None, got {max_open_for!r}"
            )
        if mode not in _MODES:
            raise ValueError(f"CircuitBreaker: mode must be 'circuit' or 'adaptive', got {mode!r}")
        if not callable(key):
            raise ValueError(
                f"CircuitBreaker: key must be a callable (request) -> str, got {key!r}"
            )
        storage = check("CircuitBreaker", storage)
        on_error = check_on_storage_error("CircuitBreaker", on_storage_error)
        if mode == "adaptive" and is_shared(storage):
            raise ValueError(
                "CircuitBreaker: mode='adaptive' keeps its counts in memory; storage must be"
                " 'memory://' with it"
            )
        self._settings = settings = _Settings(
            float(failure_ratio),
            min_calls,
            float(open_for),
            half_open_probes,
            window / BUCKETS,
            _NEVER if consecutive_failures is None else consecutive_failures,
            float(max_open_for),
        )
        self._mode: Mode = mode
        self._window = float(window)
        self._key = key
        self._storage = storage
        self._max_keys = max_keys
        state = _Throttled if mode == "adaptive" else _Circuit
        self._circuits: KeyedState[_Circuit | _Throttled] = KeyedState(
            _factory(settings, state), _is_idle, max_keys
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
                consecutive_failures=consecutive_failures,
                max_open_for=max_open_for,
            )
            self._shared = SharedCircuits(
                RedisStore(storage), settings, BUCKETS, fallback, on_error
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
        """``"closed"``, ``"open"`` or ``"half_open"`` (open past its break reads
        half-open: the next request is a probe; ``mode="adaptive"`` reads ``"open"``
        while it may reject). Call it inside the event loop."""
        circuit = self._get(key)
        if circuit is None:
            return "closed"
        return _STATE_NAMES[_state_at(circuit, _clock.now())]

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
    def consecutive_failures(self) -> int | None:
        consecutive = self._settings.consecutive
        return None if consecutive == _NEVER else consecutive

    @property
    def max_open_for(self) -> float:
        return self._settings.max_open_for

    @property
    def mode(self) -> Mode:
        return self._mode

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
            f" half_open_probes={s.half_open_probes},"
            f" consecutive_failures={self.consecutive_failures!r},"
            f" max_open_for={s.max_open_for!r}, mode={self._mode!r}, key={key},"
            f" storage={redact(self._storage)!r}, max_keys={self._max_keys})"
        )


def _is_idle(circuit: _Circuit | _Throttled) -> bool:
    return circuit.is_idle()


def _state_at(circuit: _Circuit | _Throttled, now: float) -> int:
    """``circuit.state``, but open past ``until`` reads half-open (not in adaptive mode)."""
    state = circuit.state
    if state == OPEN and circuit.until <= now and not isinstance(circuit, _Throttled):
        return HALF_OPEN
    return state


def _snapshot(circuit: _Circuit | _Throttled, now: float) -> CircuitStats:
    """``circuit`` at ``now``: open past ``until`` reads half-open, as in ``state()``."""
    state = _state_at(circuit, now)
    circuit.advance(now)  # slide the window to now (what the next outcome would do)
    calls, fails = circuit.calls, circuit.fails
    retry_after = max(0.0, circuit.until - now) if state == OPEN else 0.0
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


def _factory(
    settings: _Settings, state: type[_Circuit] | type[_Throttled]
) -> Callable[[str], _Circuit | _Throttled]:
    def new_circuit(key: str) -> _Circuit | _Throttled:
        return state(key, settings)

    return new_circuit


def _real(value: object) -> TypeGuard[float]:
    """An int or float, not a bool (NaN passes here and fails every range check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(name: str, value: object, alternative: str = "") -> None:
    if type(value) is not int or value < 1:
        alternative = f" {alternative}" if alternative else ""
        raise ValueError(
            f"CircuitBreaker: {name} must be an integer >= 1{alternative}, got {value!r}"
        )


def _positive_seconds(name: str, value: object) -> None:
    if not _real(value) or not 0.0 < value < math.inf:
        raise ValueError(
            f"CircuitBreaker: {name} must be a finite number of seconds > 0, got {value!r}"
        )
