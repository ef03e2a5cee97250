"""The circuit breaker's state machine, once: pure rules on explicit times.

:class:`Circuit` is one key's circuit. It reads no clock and does no I/O: every step
takes ``now`` (seconds on some monotonic clock) and returns what changed, so the memory
store (:mod:`resilient.breaker._store`) runs it on the event loop's clock, tests run it
on made-up times, and ``breaker/breaker.lua`` mirrors it step for step on Redis's
clock (same fields, same replies). The rules:

    closed --(consecutive failures in a row, or >= min_calls calls in the window with
              failures / calls >= failure_ratio)--> open for break(level)
    open --(its break elapsed; the next admission)--> half-open (a new spell)
    half-open --(half_open_probes probes succeeded)--> closed (counts emptied, level 0)
    half-open --(a probe failed)--> open for break(level + 1)
    half-open, all slots taken --(open_for after the last admission)--> half-open again

    break(0) = open_for
    break(level >= 1) = max(open_for, min(max_open_for, open_for × 2^level) × (0.5 + 0.5 u))

with ``u`` uniform in [0, 1) (:func:`next_break`). ``epoch`` changes on every
transition: an outcome carries the epoch it was admitted in and is ignored once the
circuit moved on. A half-open spell has ``half_open_probes`` slots, each named by the
token of the admission that took it; a release names its token, so it frees that slot
and never another's, and a release that arrives before its admission (a reordered
network) is remembered in ``gone`` so that admission takes nothing.

:class:`Throttled` is ``mode="adaptive"``: Google's client-side adaptive throttling,
with the same steps (it holds no slots and has no epochs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .._clock import DUE_SLACK
from ._window import Window

__all__ = [
    "ADAPTIVE_K",
    "BUCKETS",
    "CLOSED",
    "GONE",
    "HALF_OPEN",
    "NEVER",
    "OPEN",
    "STATE_NAMES",
    "Circuit",
    "Settings",
    "Throttled",
    "Ticket",
    "next_break",
    "reject_probability",
]

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = ("closed", "open", "half_open")
BUCKETS = 10
"""Buckets in the window: it spans between 0.9 × and 1 × ``window`` seconds."""
ADAPTIVE_K = 2.0
"""``mode="adaptive"``: the K of the SRE book's rule (requests may be K × accepts)."""
NEVER = 1 << 62
"""``consecutive_failures=None``: a run no circuit reaches."""
GONE = 8
"""Tokens remembered as released before their admission arrived."""

# What a step changed (the Lua script returns the same words).
OPENED, CLOSED_AGAIN = "opened", "closed"
HALF_OPENED, HALF_OPENED_AGAIN = "half_open", "half_open_again"


def next_break(open_for: float, max_open_for: float, level: int, u: float) -> float:
    """Seconds of the break after ``level`` failed probes, ``u`` uniform in [0, 1).

    ``level == 0``: ``open_for``; else ``max(open_for, nominal × (0.5 + 0.5 × u))`` with
    ``nominal = min(max_open_for, open_for × 2^level)`` (the exponent is capped at 64, so
    no overflow). The Lua script (``breaker/breaker.lua``) computes the same.
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
class Settings:
    """A breaker's rules. ``width``: seconds per window bucket (``window / BUCKETS``);
    ``consecutive``: :data:`NEVER` when off; ``jitter``: the source of ``u``."""

    failure_ratio: float
    min_calls: int
    open_for: float
    half_open_probes: int
    width: float
    consecutive: int = NEVER
    max_open_for: float = math.inf
    jitter: Callable[[], float] = field(default=random.random, compare=False)


class Ticket:
    """What an admission hands out and its outcome (or release) hands back: the key, the
    epoch it was admitted in, whether it holds a half-open slot (``probe``) and the
    token naming that slot (``""`` when it holds none)."""

    __slots__ = ("epoch", "key", "probe", "token")

    def __init__(self, key: str, epoch: int, probe: bool = False, token: str = "") -> None:
        self.key = key
        self.epoch = epoch
        self.probe = probe
        self.token = token

    def __repr__(self) -> str:
        probe = f", probe {self.token!r}" if self.probe else ""
        return f"<Ticket {self.key!r} epoch {self.epoch}{probe}>"


class Circuit(Window):
    """One key's circuit (see the module docstring). Fields, as in the Lua hash:

    ``state``, ``epoch``; ``until``: open: when the break ends; half-open: when the
    probes in flight are given up (``open_for`` after the last admission). ``slots``:
    the tokens of this spell's probes (in flight, or succeeded: closing takes
    ``half_open_probes`` successes); ``successes``; ``streak``: failures in a row while
    closed; ``level``: failed probes since the circuit last closed; ``gone``: tokens
    released before their admission. The window's ``calls`` and ``fails`` count the
    outcomes of calls admitted while closed. ``ticket``: the one ticket every call
    admitted while closed shares; ``why``: the reason of the last opening.
    """

    __slots__ = (
        "epoch",
        "gone",
        "key",
        "level",
        "settings",
        "slots",
        "state",
        "streak",
        "successes",
        "ticket",
        "until",
        "why",
    )

    def __init__(self, key: str, settings: Settings) -> None:
        super().__init__(settings.width, BUCKETS)
        self.key = key
        self.settings = settings
        self.state = CLOSED
        self.epoch = 0
        self.until = 0.0
        self.slots: list[str] = []
        self.gone: list[str] = []
        self.successes = 0
        self.streak = 0
        self.level = 0
        self.why = ""
        self.ticket = Ticket(key, 0)

    @property
    def admitted(self) -> int:
        """Probe slots taken in this half-open spell."""
        return len(self.slots)

    def admit(self, now: float, token: str) -> tuple[int, float, str]:
        """``(verdict, seconds, transition)``: verdict ``0`` closed (nothing held), ``1`` a
        probe (its slot named ``token``), ``-1`` refused for ``seconds`` (until the break
        ends, or the probes in flight are given up). ``transition``: ``"half_open"`` or
        ``"half_open_again"`` (probes overdue) when this admission began a spell."""
        state = self.state
        if state == CLOSED:
            return 0, 0.0, ""
        if state == HALF_OPEN and token in self.slots:
            return 1, 0.0, ""  # the same admission again (a re-sent command)
        if token in self.gone:
            return -1, max(0.0, self.until - now), ""
        transition = ""
        if state == OPEN or len(self.slots) >= self.settings.half_open_probes:
            if now + DUE_SLACK < self.until:
                return -1, self.until - now, ""
            transition = HALF_OPENED_AGAIN if state == HALF_OPEN else HALF_OPENED
            self.state = HALF_OPEN
            self.epoch += 1
            self.slots = []
            self.successes = 0
        self.slots.append(token)
        self.until = now + self.settings.open_for
        return 1, 0.0, transition

    def refusal(self, now: float) -> float:
        """Seconds a new admission is refused for at ``now`` (0.0: :meth:`admit` would let
        it through): the break, or the probes in flight while every slot is taken."""
        state = self.state
        if state == OPEN or (
            state == HALF_OPEN and len(self.slots) >= self.settings.half_open_probes
        ):
            return self.until - now if now + DUE_SLACK < self.until else 0.0
        return 0.0

    def record(self, now: float, failed: bool, epoch: int, probe: bool) -> str:
        """Count the outcome of a call admitted in ``epoch``; ``"opened"``, ``"closed"``
        or ``""`` (nothing changed, or the outcome is stale)."""
        if epoch != self.epoch:
            return ""
        if probe:
            return self._probe_done(now, failed)
        if not self._start <= now < self._end:  # Window.add, inlined: the hot path
            self.advance(now)
        slot = self._slot
        self._calls[slot] += 1
        self.calls += 1
        if failed:
            self._fails[slot] += 1
            self.fails += 1
            self.streak += 1
            return self._trip_if_over(now)
        if self.streak:
            self.streak = 0
        return ""

    def _probe_done(self, now: float, failed: bool) -> str:
        """A probe's outcome: a failure re-opens, ``half_open_probes`` successes close."""
        if self.state != HALF_OPEN:
            return ""
        if failed:
            self.level += 1
            return self._open(now, "a probe failed")
        self.successes += 1
        if self.successes >= self.settings.half_open_probes:
            return self._close()
        return ""

    def record_runs(self, now: float, epoch: int, runs: list[int]) -> list[str]:
        """Outcomes of calls admitted while closed in ``epoch``, in order, as run lengths:
        ``runs[0]`` successes, ``runs[1]`` failures, ``runs[2]`` successes, ... Exactly
        :meth:`record` of each in turn (what a batch sent to Redis means)."""
        changes: list[str] = []
        for i, count in enumerate(runs):
            for _ in range(count):
                if epoch != self.epoch:
                    return changes
                change = self.record(now, i % 2 == 1, epoch, False)
                if change:
                    changes.append(change)
        return changes

    def release(self, token: str) -> None:
        """The admission named ``token`` ended without an outcome: free its slot (if it
        holds one in this spell), else remember it as gone (it may not have arrived)."""
        if self.state == HALF_OPEN and token in self.slots:
            self.slots.remove(token)
        else:
            self.gone = [*self.gone, token][-GONE:]

    def state_at(self, now: float) -> int:
        """``state``, but open past its break reads half-open (the next call probes)."""
        state = self.state
        return HALF_OPEN if state == OPEN and self.until <= now + DUE_SLACK else state

    def is_idle(self, now: float) -> bool:
        """Nothing to remember beyond soft counts: closed, or its open/probe time is up."""
        return self.state == CLOSED or self.until <= now + DUE_SLACK

    def _trip_if_over(self, now: float) -> str:
        """Open on ``consecutive`` failures in a row, or when calls >= min_calls and
        fails / calls >= failure_ratio."""
        if self.state != CLOSED:
            return ""
        fails, calls, settings = self.fails, self.calls, self.settings
        if self.streak >= settings.consecutive:
            return self._open(now, f"{self.streak} failures in a row")
        if calls >= settings.min_calls and fails / calls >= settings.failure_ratio:
            return self._open(now, f"{fails} of {calls} calls failed")
        return ""

    def _open(self, now: float, why: str) -> str:
        s = self.settings
        pause = next_break(s.open_for, s.max_open_for, self.level, s.jitter())
        self.state = OPEN
        self.epoch += 1
        self.until = now + pause
        self.slots = []
        self.successes = self.streak = 0
        self.why = why
        return OPENED

    def _close(self) -> str:
        self.state = CLOSED
        self.epoch += 1
        self.slots = []
        self.successes = self.streak = self.level = 0
        self.clear()
        self.ticket = Ticket(self.key, self.epoch)
        return CLOSED_AGAIN


class Throttled(Window):
    """``mode="adaptive"``: one key's client-side adaptive throttling (SRE book).

    The window counts ``requests`` (``calls``: every call, those rejected here included)
    and the failures among them (``fails``: rejected here, or failed); accepts =
    requests − fails. Once the window holds ``min_calls`` requests, a call is rejected
    locally with probability :func:`reject_probability` ``(requests, accepts)``, which is
    above 0 only while requests > K × accepts (more than half of the calls fail, K = 2).
    ``state`` reads ``OPEN`` while that holds (the store then asks :meth:`admit`), else
    ``CLOSED``. No probes, no epochs: every outcome counts.
    """

    __slots__ = ("epoch", "jitter", "key", "min_calls", "slots", "state", "ticket", "until")

    def __init__(self, key: str, settings: Settings) -> None:
        super().__init__(settings.width, BUCKETS)
        self.key = key
        self.min_calls = settings.min_calls
        self.jitter = settings.jitter
        self.state = CLOSED
        self.epoch = 0
        self.until = 0.0
        self.slots: list[str] = []
        self.ticket = Ticket(key, 0)

    @property
    def admitted(self) -> int:
        return 0

    def admit(self, now: float, token: str) -> tuple[int, float, str]:
        """Reject with the SRE book's probability (counted as a request not accepted)."""
        self.advance(now)
        calls = self.calls
        if calls >= self.min_calls:
            p = reject_probability(calls, calls - self.fails)
            if p > 0.0 and self.jitter() < p:
                self.add(now, True)
                return -1, 0.0, ""
        self._steer()
        return 0, 0.0, ""

    def refusal(self, now: float) -> float:
        """No breaks: a rejection is a draw in :meth:`admit`."""
        return 0.0

    def record(self, now: float, failed: bool, epoch: int, probe: bool) -> str:
        """Count one request's outcome."""
        self.add(now, failed)
        if failed or self.state:
            self._steer()
        return ""

    def release(self, token: str) -> None:
        """Nothing is held."""

    def state_at(self, now: float) -> int:
        return self.state

    def is_idle(self, now: float) -> bool:
        return True

    def _steer(self) -> None:
        calls = self.calls
        self.state = OPEN if calls - ADAPTIVE_K * (calls - self.fails) > 0.0 else CLOSED
