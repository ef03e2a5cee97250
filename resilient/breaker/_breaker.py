"""CircuitBreaker: fail fast while a host is down, probe soon, back off while it stays down.

The policy is the call, written once: admit (its store says let through, refuse, or ask
the backend), send, record the outcome (or release what it held). The rules live in
:mod:`resilient.breaker._circuit` (one state machine, mirrored in ``breaker/breaker.lua``);
the state lives in a store (:mod:`resilient.breaker._store`: this process's memory, or
Redis through :mod:`resilient.breaker._redis`). In a pipeline the same call runs as
:meth:`CircuitBreaker.before` (admit, when the store answers without I/O) and
:meth:`CircuitBreaker.after` (record or release), around the pipeline's attempt.

Failures: 5xx responses, aiohttp network errors and timeouts. 429 and other 4xx are
successes (the host is up). A cancellation, or an error that is not an outcome of the
attempt (a ``ResilienceError`` such as ``RateLimited`` from an inner policy), counts as
nothing and frees the half-open probe slot it held.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .. import _clock
from .._errors import StorageError
from .._keys import KeyFunc, by_host
from .._outcomes import is_failure
from .._policy import SLOW, Outcome, Policy
from .._state import DEFAULT_MAX_KEYS
from .._validate import choice, integer, number, optional_number, reject
from ..observe import _metrics
from ..observe._stats import CircuitStats
from ..retry._attempt import timed_out
from ..storage import OnStorageError, check, check_on_storage_error, is_shared, redact
from ._circuit import (
    ADAPTIVE_K,
    BUCKETS,
    HALF_OPEN,
    NEVER,
    OPEN,
    STATE_NAMES,
    Circuit,
    Settings,
    Throttled,
    Ticket,
    next_break,
    reject_probability,
)
from ._store import CircuitStore, MemoryCircuits, refuse

if TYPE_CHECKING:
    from ._redis import RedisCircuits

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

_MODES = ("circuit", "adaptive")
_OWNER = "CircuitBreaker"
_OPEN = STATE_NAMES[OPEN]


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
      every process, same rules (see :mod:`resilient.breaker._redis`: no round trip
      on the caller's path while this process knows the key closed or open, outcomes
      sent in the background). ``on_storage_error``: ``"raise"`` (``StorageError``,
      nothing sent) or ``"allow"`` (this process's own circuits decide while Redis
      fails).

    Failures: 5xx responses, aiohttp network errors and timeouts. 429 and other 4xx are
    successes. Cancellation is not an outcome (it frees a probe slot); note that
    aiohttp's ``ClientTimeout.total`` cancels the whole chain, so count timeouts with
    finite ``sock_read``/``sock_connect`` timeouts (as ``resilient.session()`` sets).
    """

    __slots__ = (
        "_circuits",
        "_closed",
        "_fallback",
        "_key",
        "_max_keys",
        "_memory",
        "_mode",
        "_opened",
        "_settings",
        "_shared",
        "_storage",
        "_store",
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
        ratio = number(_OWNER, "failure_ratio", failure_ratio, 0.0, 1.0, low_open=True)
        integer(_OWNER, "min_calls", min_calls)
        window = _seconds("window", window)
        open_for = _seconds("open_for", open_for)
        integer(_OWNER, "half_open_probes", half_open_probes)
        integer(_OWNER, "max_keys", max_keys)
        consecutive = _optional_count("consecutive_failures", consecutive_failures, "off")
        max_open_for = optional_number(
            _OWNER, "max_open_for", max_open_for, open_for, math.inf,
            high_open=True, none_means="max(1, open_for)",
        )  # fmt: skip
        if max_open_for is None:
            max_open_for = max(DEFAULT_MAX_OPEN_FOR, open_for)
        choice(_OWNER, "mode", mode, _MODES)
        if not callable(key):
            raise reject(_OWNER, "key", "a callable (request) -> str", key)
        storage = check(_OWNER, storage)
        on_error = check_on_storage_error(_OWNER, on_storage_error)
        if mode == "adaptive" and is_shared(storage):
            raise ValueError(
                "CircuitBreaker: mode='adaptive' keeps its counts in memory; storage must be"
                " 'memory://' with it"
            )
        self._settings = settings = Settings(
            ratio,
            min_calls,
            open_for,
            half_open_probes,
            window / BUCKETS,
            NEVER if consecutive is None else consecutive,
            max_open_for,
        )
        self._mode: Mode = mode
        self._window = window
        self._key = key
        self._storage = storage
        self._max_keys = max_keys
        self._memory = MemoryCircuits(settings, mode == "adaptive", max_keys)
        """This process's circuits: the store, or with Redis the one used while it fails."""
        self._circuits = self._memory.circuits
        self._shared: RedisCircuits | None = None
        self._store: CircuitStore = self._memory
        self._fallback: MemoryCircuits | None = None
        """The store that decides while Redis fails (``on_storage_error="allow"``)."""
        if is_shared(storage):
            from ..storage._redis import RedisStore
            from ._redis import RedisCircuits

            self._store = self._shared = RedisCircuits(RedisStore(storage), settings, BUCKETS)
            self._fallback = self._memory if on_error == "allow" else None
        self._closed = self._store.closed
        """Keys let through without calling the store (see ``CircuitStore.closed``)."""
        self._opened = self._store.opened
        """Keys refused without calling the store (see ``CircuitStore.opened``)."""

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        key = self._key(request)
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, key, request, handler)
        store = self._store
        ticket = self._closed.get(key) or store.admit(key, request)  # or CircuitOpenError
        if ticket is None:  # the store must ask its backend
            store, ticket = await self._ask(key, request)
        try:
            resp = await handler(request)
        except BaseException as exc:
            _ended(store, ticket, request, exc)
            raise
        store.record(ticket, resp.status >= 500, request.loop.time())
        return resp

    def keyed_by(self) -> KeyFunc:
        return self._key

    def before(self, request: ClientRequest, key: str | None, now: float) -> Any:
        """``__call__``'s admission when the store answers without I/O: the key's
        closed ticket (one dict lookup), a probe's ticket, or ``CircuitOpenError`` (the
        same event, nothing held; an open circuit's from ``opened``, before its break
        ends); :data:`SLOW` when the store must ask its backend."""
        if key is None:
            key = self._key(request)
        ticket = self._closed.get(key)
        if ticket is not None:
            return ticket
        circuit = self._opened.get(key)
        if circuit is not None and now < circuit.until:
            raise refuse(key, circuit.until - now, _OPEN, request)
        return self._store.admit(key, request) or SLOW

    def after(self, ticket: Ticket, request: ClientRequest, outcome: Outcome) -> bool:
        """Record ``outcome`` as ``__call__`` does (a 5xx, a failure, an attempt abandoned
        by ``attempt_timeout``), or release the ticket; the outcome always stands."""
        if isinstance(outcome, BaseException):
            _ended(self._store, ticket, request, outcome)
        else:
            self._store.record(ticket, outcome.status >= 500, request.loop.time())
        return True

    async def _ask(self, key: str, request: ClientRequest) -> tuple[CircuitStore, Ticket]:
        """The backend's answer; when it fails, ``StorageError``, or with
        ``on_storage_error="allow"`` a warning and this process's own circuit's answer."""
        store = self._store
        try:
            return store, await store.ask(key, request)
        except StorageError as exc:
            fallback = self._fallback
            if fallback is None:
                raise
            store.warn(exc)
            return fallback, fallback.admit(key, request)

    def stats(self) -> dict[str, CircuitStats]:
        """A snapshot of every key's circuit (call it inside the event loop); with a Redis
        storage, of this process's own circuits (those used while Redis fails)."""
        now = _clock.now()
        return {key: _snapshot(circuit, now) for key, circuit in self._circuits.items()}

    def state(self, key: str) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (open past its break reads
        half-open: the next request is a probe; ``mode="adaptive"`` reads ``"open"``
        while it may reject); with a Redis storage, what this process knows now (its
        mirror of the shared circuit: closed when it knows nothing). Call it inside the
        event loop."""
        return STATE_NAMES[self._store.state(key)]

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
        return None if consecutive == NEVER else consecutive

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


def _ended(store: CircuitStore, ticket: Ticket, request: ClientRequest, exc: BaseException) -> None:
    """The attempt admitted with ``ticket`` raised ``exc``: a failure (an attempt abandoned
    by Retry's ``attempt_timeout`` is a read timeout: one too), else nothing learnt
    (cancelled, or not an outcome of this attempt): its slot is released."""
    if is_failure(exc) or (isinstance(exc, asyncio.CancelledError) and timed_out()):
        store.record(ticket, True, request.loop.time())
    else:
        store.release(ticket)


def _snapshot(circuit: Circuit | Throttled, now: float) -> CircuitStats:
    """``circuit`` at ``now``: open past ``until`` reads half-open, as in ``state()``."""
    state = circuit.state_at(now)
    circuit.advance(now)  # slide the window to now (what the next outcome would do)
    calls, fails = circuit.calls, circuit.fails
    retry_after = max(0.0, circuit.until - now) if state == OPEN else 0.0
    return CircuitStats(
        key=circuit.key,
        state=STATE_NAMES[state],
        calls=calls,
        failures=fails,
        failure_ratio=fails / calls if calls else 0.0,
        retry_after=retry_after,
        open_until=_clock.wall_after(retry_after) if state == OPEN else None,
        probes=circuit.admitted if circuit.state == HALF_OPEN else 0,
    )


def _seconds(name: str, value: object) -> float:
    """A finite number of seconds > 0."""
    return number(_OWNER, name, value, 0.0, math.inf, low_open=True, high_open=True)


def _optional_count(name: str, value: object, none_means: str) -> int | None:
    """``None``, or an int >= 1 (:func:`~resilient._validate.integer`)."""
    if value is None:
        return None
    try:
        return integer(_OWNER, name, value)
    except ValueError:
        raise reject(_OWNER, name, f"None ({none_means}) or an int >= 1", value) from None
