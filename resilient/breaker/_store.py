"""Where a breaker's circuits live: one small interface, a store per backend.

:class:`CircuitStore` is all :class:`~resilient.CircuitBreaker` knows of its state:

- ``admit(key, request)`` before sending: a :class:`~resilient.breaker._circuit.Ticket` (let
  through; a probe's ticket names its half-open slot), ``CircuitOpenError`` (nothing
  sent), or ``None``: the store cannot tell without asking its backend, and
- ``await ask(key, request)`` does so (a ticket, ``CircuitOpenError``, or
  ``StorageError`` when the backend fails);
- ``record(ticket, failed, now)``: the outcome; ``release(ticket)``: the call ended
  without one (cancelled, or an error that is not an outcome), so its slot is freed;
- ``closed``: a dict the breaker reads first, ``key -> ticket`` for keys it may let
  through without asking the store at all (a closed circuit in memory: one dict lookup,
  no call); a store whose answer depends on a clock (Redis's lease) leaves it empty;
- ``opened``: the dict it reads next, ``key -> circuit`` for keys it may refuse without
  asking the store: while the loop's time ``now`` is before the circuit's ``until``,
  ``CircuitOpenError(key, until - now)`` (what ``admit`` raises for an open circuit);
  from ``until`` on, ``admit`` decides (the next call probes). Redis leaves it empty
  (its mirror is read in ``admit``).

Times are the event loop's: the store reads ``request.loop.time()`` when it needs
the time (a closed circuit in memory does not), ``record`` is told it. ``record`` and
``release`` never wait: a remote store sends them in the background.
:class:`MemoryCircuits` (this process; ``admit`` always answers, synchronously) and
:class:`~resilient.breaker._redis.RedisCircuits` (shared) are the two peers. The
events and log lines of a transition are written here, once, for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from .. import _clock
from .._errors import CircuitOpenError
from .._state import KeyedState
from ..observe import _events
from ..observe._log import human_duration, logger
from ._circuit import (
    CLOSED_AGAIN,
    HALF_OPENED_AGAIN,
    OPEN,
    OPENED,
    STATE_NAMES,
    Circuit,
    Settings,
    Throttled,
    Ticket,
)

if TYPE_CHECKING:
    from aiohttp import ClientRequest

    from .._errors import StorageError

__all__ = [
    "KIND",
    "CircuitStore",
    "MemoryCircuits",
    "announce",
    "announce_half_open",
    "refuse",
]

KIND = "circuit_breaker"


class CircuitStore(Protocol):
    """The breaker's state behind one interface (see the module docstring)."""

    closed: dict[str, Ticket]
    opened: dict[str, Circuit]

    def admit(self, key: str, request: ClientRequest) -> Ticket | None:
        """A ticket, ``CircuitOpenError``, or None (ask the backend)."""

    async def ask(self, key: str, request: ClientRequest) -> Ticket:
        """A ticket or ``CircuitOpenError`` from the backend (``StorageError``: it failed;
        whatever it may have admitted is handed back)."""

    def record(self, ticket: Ticket, failed: bool, now: float) -> None:
        """The outcome of the call admitted with ``ticket``."""

    def release(self, ticket: Ticket) -> None:
        """The call admitted with ``ticket`` ended without an outcome."""

    def state(self, key: str) -> int:
        """What this process knows of ``key``'s state now (``CLOSED``, ``OPEN`` or
        ``HALF_OPEN``; inside the event loop)."""

    def warn(self, exc: StorageError) -> None:
        """Log that the backend failed and this process's own circuits decide."""


def refuse(key: str, retry_after: float, reason: str, request: ClientRequest) -> CircuitOpenError:
    """The ``CircuitOpenError`` of a refused call (its ``circuit_rejected`` event sent,
    if anyone listens: a hook, or DEBUG logging)."""
    if _events._hooks or logger.isEnabledFor(logging.DEBUG):  # the fail-fast path: be quick
        _events.emit("circuit_rejected", KIND, key, request, delay=retry_after, reason=reason)
    return CircuitOpenError(key, retry_after)


def announce(
    key: str, change: str, *, pause: float = 0.0, why: str = "", probes: int = 0, where: str = ""
) -> None:
    """Log and emit ``change`` (``"opened"`` for ``pause`` seconds because ``why``, or
    ``"closed"`` after ``probes`` successful probes); ``where``: ``", shared"`` or ``""``."""
    if change == OPENED:
        if logger.isEnabledFor(logging.WARNING):
            logger.warning(
                "circuit_breaker: opened on %s (%s%s); failing fast for %s, half-open at %s",
                key,
                why,
                where,
                human_duration(pause),
                _clock.wall_after(pause).isoformat(timespec="seconds"),
            )
        _events.emit("circuit_opened", KIND, key, delay=pause, reason=why)
    elif change == CLOSED_AGAIN:
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "circuit_breaker: closed on %s (%d probe(s) succeeded%s)", key, probes, where
            )
        _events.emit("circuit_closed", KIND, key, reason="probes succeeded")


def announce_half_open(key: str, change: str, probes: int, where: str = "") -> None:
    """Log and emit the start of a half-open spell (``change``: ``"half_open"``, or
    ``"half_open_again"`` when the probes in flight were overdue)."""
    overdue = change == HALF_OPENED_AGAIN
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "circuit_breaker: half-open on %s%s%s; admitting up to %d probe(s)",
            key,
            " again (the probes in flight are overdue)" if overdue else "",
            where,
            probes,
        )
    reason = "probes overdue" if overdue else "open_for elapsed"
    _events.emit("circuit_half_open", KIND, key, reason=reason)


class MemoryCircuits:
    """Circuits in this process: a :class:`~resilient.breaker._circuit.Circuit` (or, in
    ``mode="adaptive"``, a :class:`~resilient.breaker._circuit.Throttled`) per key, in a bounded
    map (``max_keys``; closed circuits and those whose break is over are evicted first).

    ``admit`` always answers, synchronously, and a closed key's ticket (the one all its
    calls share) is in ``closed`` (not in ``mode="adaptive"``, whose state moves with
    every outcome): the breaker finds it there without calling the store. A key leaves
    ``closed`` when its circuit changes, and with its circuit when that is evicted. An
    open circuit is in ``opened`` from when it opens until its first admission after the
    break (it turns half-open), or its eviction.
    """

    __slots__ = (
        "_adaptive",
        "_get",
        "_probes",
        "_seq",
        "circuits",
        "closed",
        "opened",
        "settings",
    )

    def __init__(self, settings: Settings, adaptive: bool, max_keys: int) -> None:
        self.settings = settings
        self._probes = settings.half_open_probes
        kind: type[Circuit] | type[Throttled] = Throttled if adaptive else Circuit
        self.circuits: KeyedState[Circuit | Throttled] = KeyedState(
            _factory(settings, kind), _is_idle, max_keys
        )
        self._get = self.circuits.get
        self._seq = 0
        self._adaptive = adaptive
        self.closed: dict[str, Ticket] = {}
        self.opened: dict[str, Circuit] = {}

    def admit(self, key: str, request: ClientRequest) -> Ticket:
        circuit = self._get(key) or self._create(key)
        if not circuit.state:
            if not self._adaptive:
                self.closed[key] = circuit.ticket
            return circuit.ticket
        now = request.loop.time()
        left = circuit.refusal(now)
        if left > 0.0:  # open (or every probe slot taken): fail fast, nothing held
            raise refuse(key, left, STATE_NAMES[circuit.state], request)
        return self._probe(circuit, now, request)

    async def ask(self, key: str, request: ClientRequest) -> Ticket:
        return self.admit(key, request)

    def record(self, ticket: Ticket, failed: bool, now: float) -> None:
        circuit = self._get(ticket.key)  # None: evicted meanwhile (it was idle)
        if circuit is not None and circuit.record(now, failed, ticket.epoch, ticket.probe):
            self.closed.pop(ticket.key, None)
            if isinstance(circuit, Circuit) and circuit.state == OPEN:
                self.opened[ticket.key] = circuit
            self._announce(circuit, now)

    def release(self, ticket: Ticket) -> None:
        if ticket.probe:
            circuit = self._get(ticket.key)
            if circuit is not None:
                circuit.release(ticket.token)

    def state(self, key: str) -> int:
        circuit = self._get(key)
        return 0 if circuit is None else circuit.state_at(_clock.now())

    def warn(self, exc: StorageError) -> None:  # pragma: no cover - memory does not fail
        """Memory does not fail."""

    def _create(self, key: str) -> Circuit | Throttled:
        """A new circuit for ``key``; when that evicted idle ones, their keys leave
        ``closed`` and ``opened`` too (amortised: an eviction frees an eighth of
        ``max_keys``)."""
        circuits = self.circuits
        size = len(circuits)
        circuit = circuits.get_or_create(key)
        if len(circuits) <= size:
            for known in (self.closed, self.opened):
                for name in [name for name in known if name not in circuits]:
                    del known[name]
        return circuit

    def _probe(self, circuit: Circuit | Throttled, now: float, request: ClientRequest) -> Ticket:
        self._seq += 1
        token = str(self._seq)
        verdict, seconds, change = circuit.admit(now, token)
        if change:
            self.opened.pop(circuit.key, None)  # half-open: no longer refused outright
            announce_half_open(circuit.key, change, self._probes)
        if verdict > 0:
            return Ticket(circuit.key, circuit.epoch, True, token)
        if verdict == 0:
            return circuit.ticket
        reason = "adaptive" if type(circuit) is Throttled else STATE_NAMES[circuit.state]
        raise refuse(circuit.key, seconds, reason, request)

    def _announce(self, circuit: Circuit | Throttled, now: float) -> None:
        """The circuit just opened or closed (a ``Throttled`` never says so)."""
        if isinstance(circuit, Circuit):
            change = OPENED if circuit.state == OPEN else CLOSED_AGAIN
            pause, why, probes = circuit.until - now, circuit.why, self._probes
            announce(circuit.key, change, pause=pause, why=why, probes=probes)


def _factory(
    settings: Settings, kind: type[Circuit] | type[Throttled]
) -> Callable[[str], Circuit | Throttled]:
    def new_circuit(key: str) -> Circuit | Throttled:
        return kind(key, settings)

    return new_circuit


def _is_idle(circuit: Circuit | Throttled) -> bool:
    return circuit.is_idle(_clock.now())
