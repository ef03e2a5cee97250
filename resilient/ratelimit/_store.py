"""Where a RateLimitBackoff's pauses and rates live: one small interface, a store per
backend.

:class:`PauseStore` is all :class:`~resilient.RateLimitBackoff` knows of its state. Every
store keeps this process's :class:`~resilient.ratelimit._pause.PauseGate` per key in
``gates`` (its queue of callers, its local probe, its departure queue); a store says
what the backend adds to it:

- ``ready(key, gate, request)``: a request of ``key`` may leave now, without waiting or
  asking the backend (synchronous: the fast path). A paced key's departure slot, if it
  is due, is taken;
- ``await enter(...)`` otherwise, before the first send: the backend's word (a pause
  found there closes the gate; a departure slot reserved there is waited for);
- ``await depart(...)``: a paced departure (after a pause, or when the slot was not due);
- ``await share(...)``: a 429's pause, as long as the backend's (the seconds it lasts);
- ``await claim(...)``: the local probe asks the backend whether it probes;
- ``cuts(gate)``: what a request leaving now remembers (see ``learn``);
- ``learn(...)``: a 429, to a request sent after ``cuts`` cuts: cut the rate if it is
  news; ``answered(...)``: an answer that was not a 429; ``opened(...)``: the probe's
  answer was not a 429 (sending resumes); ``abandoned(...)``: the probe ended without
  an answer (its role, and any claim it holds, are handed back).

``learn``, ``answered``, ``opened`` and ``abandoned`` never wait: a remote store sends
them in the background. Times are the event loop's. :class:`MemoryPause` (this
process: the key's :class:`~resilient.ratelimit._learned.LearnedRate` paces it, the
backend adds nothing) and :class:`~resilient.ratelimit._redis.RedisPause` (shared
through Redis) are the two peers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from .. import _clock
from .._errors import RateLimited
from .._state import KeyedState
from ..observe import _metrics
from ._pause import PauseGate, PauseTooLong

if TYPE_CHECKING:
    from ._learned import LearnedRate

__all__ = ["KIND", "MemoryPause", "PauseStore", "new_gates", "waiting"]

KIND = "rate_limit_backoff"


class PauseStore(Protocol):
    """A RateLimitBackoff's state behind one interface (see the module docstring)."""

    gates: KeyedState[PauseGate]
    gates_decide: bool
    """True when the gates alone decide (memory): a key without a gate is ``ready``
    without asking (the policy does not call the store for it)."""

    def ready(self, key: str, gate: PauseGate | None, now: float) -> bool:
        """True: a request of ``key`` leaves at loop time ``now`` (nothing to wait for,
        nothing to ask)."""

    async def enter(
        self, key: str, gate: PauseGate | None, ceiling: float, bound: float
    ) -> tuple[PauseGate | None, bool]:
        """Before the first send of a call that was not ``ready``: the key's gate (None:
        it has none) and whether the caller has departed (a slot reserved by the backend
        was waited for). ``bound``: the loop time a departure must not pass
        (``RateLimited``, nothing sent)."""

    async def depart(self, key: str, gate: PauseGate, ceiling: float, bound: float) -> None:
        """Wait for this caller's departure slot of paced ``key`` (``RateLimited`` if it
        comes after loop time ``bound``: nothing sent)."""

    async def share(self, key: str, gate: PauseGate, delay: float, probe: bool) -> float:
        """A 429 pauses ``key`` for ``delay`` seconds: the seconds the pause lasts for
        every process (at least ``delay``). ``probe``: the 429 answered our probe. When
        the backend fails, the key is paused here before the error."""

    async def claim(self, key: str, gate: PauseGate) -> bool | None:
        """This process's probe of ``key`` asks the backend: True (it probes), False (the
        pause is over: the gate opened), None (wait again)."""

    def cuts(self, gate: PauseGate) -> int:
        """The key's cuts as a request leaving now sees them (see :meth:`learn`)."""

    def learn(self, key: str, gate: PauseGate, cuts: int, ceiling: float) -> None:
        """A 429 to a request sent after ``cuts`` cuts: cut the rate and lengthen the key's
        streak, if it is news (a 429 to a request sent before the last cut is not)."""

    def answered(self, key: str, gate: PauseGate, learned: LearnedRate | None) -> None:
        """A request's answer was not a 429 (``learned``: the key's rate when it left)."""

    def opened(self, key: str, gate: PauseGate) -> None:
        """The probe's answer was not a 429: sending resumes."""

    def abandoned(self, key: str, gate: PauseGate) -> None:
        """The probe raised or was cancelled: the next waiter probes instead."""


class MemoryPause:
    """Every key's pause and learned rate in this process (the gate holds them all)."""

    __slots__ = ("gates",)

    gates_decide = True

    def __init__(self, max_keys: int) -> None:
        self.gates = new_gates(max_keys)

    def ready(self, key: str, gate: PauseGate | None, now: float) -> bool:
        if gate is None:
            return True
        if gate.closed:
            return False
        if not gate.paced:
            return True
        if not gate.slot_free(now):
            return False
        with waiting(key):  # a departure, if one that does not wait
            gate.leave(now)
        return True

    async def enter(
        self, key: str, gate: PauseGate | None, ceiling: float, bound: float
    ) -> tuple[PauseGate | None, bool]:
        return gate, False  # the gate decides: paused, or paced

    async def depart(self, key: str, gate: PauseGate, ceiling: float, bound: float) -> None:
        with waiting(key):
            await gate.depart(bound)

    async def share(self, key: str, gate: PauseGate, delay: float, probe: bool) -> float:
        return delay

    async def claim(self, key: str, gate: PauseGate) -> bool | None:
        return True

    def cuts(self, gate: PauseGate) -> int:
        learned = gate.learned
        return 0 if learned is None else learned.cuts

    def learn(self, key: str, gate: PauseGate, cuts: int, ceiling: float) -> None:
        now = _clock.now()
        learned = gate.learn(now, ceiling)
        if learned.counts(cuts):
            learned.cut(now)
            gate.streak += 1

    def answered(self, key: str, gate: PauseGate, learned: LearnedRate | None) -> None:
        if learned is not None:
            learned.accepted(_clock.now())

    def opened(self, key: str, gate: PauseGate) -> None:
        gate.open()

    def abandoned(self, key: str, gate: PauseGate) -> None:
        gate.probe_failed()


def new_gates(max_keys: int) -> KeyedState[PauseGate]:
    """A bounded map of gates (idle keys are evicted, see :class:`KeyedState`)."""
    return KeyedState(lambda _key: PauseGate(), PauseGate.is_idle, max_keys)


@contextmanager
def waiting(key: str) -> Iterator[None]:
    """A wait for ``key`` (the pause, or a paced departure), counted in the metrics;
    :class:`PauseTooLong` becomes :class:`~resilient.RateLimited` (nothing was sent)."""
    try:
        with _metrics.waiting(KIND, key, 429):
            yield
    except PauseTooLong as exc:
        raise RateLimited(key, exc.retry_after) from None
