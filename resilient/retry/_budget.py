"""Retry budget: retries may not amplify an outage (Finagle's ``RetryBudget``).

Rule: in any 10-second window,

    retries <= ratio × first attempts + min_per_second × 10

:class:`RetryBudget` is the immutable configuration; the balance is a :class:`Balance`
owned by the ``Retry`` instance. The window is ten one-second buckets on the event
loop's clock (so it spans between 9 and 10 seconds); every operation is O(1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._validate import number

__all__ = [
    "BUCKETS",
    "DEFAULT_MIN_PER_SECOND",
    "DEFAULT_RATIO",
    "MAX_RATIO",
    "WINDOW",
    "Balance",
    "RetryBudget",
]

DEFAULT_RATIO = 0.2
"""Retries allowed per first attempt (0.2: at most one retry per five calls)."""
DEFAULT_MIN_PER_SECOND = 10.0
"""Retries per second allowed regardless of traffic (so rare calls can still retry)."""
MAX_RATIO = 1000.0
"""Largest accepted ``ratio``."""
WINDOW = 10
"""Seconds in the budget window."""
BUCKETS = WINDOW
"""One-second buckets in the window."""


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """In any 10 s window: retries <= ratio × first attempts + min_per_second × 10.

    ``ratio`` in [0, 1000], ``min_per_second`` >= 0 (both finite). A retry the budget
    does not cover is not made: ``Retry`` hands back the last response (or re-raises
    the last exception). ``Retry(budget=None)`` disables the budget.
    """

    ratio: float = DEFAULT_RATIO
    min_per_second: float = DEFAULT_MIN_PER_SECOND

    def __post_init__(self) -> None:
        ratio = number("RetryBudget", "ratio", self.ratio, 0.0, MAX_RATIO)
        floor = number(
            "RetryBudget", "min_per_second", self.min_per_second, 0.0, math.inf, high_open=True
        )
        object.__setattr__(self, "ratio", ratio)
        object.__setattr__(self, "min_per_second", floor)


class Balance:
    """The live balance of one :class:`RetryBudget` (per ``Retry`` instance).

    ``deposit(now)`` counts a first attempt; ``withdraw(now)`` counts a retry if the
    rule allows it. The current second is counted in two plain counters (the hot
    path is one float comparison and one increment); past seconds sit in a ring of
    buckets with running totals, so moving on is O(1) (at most ten buckets cleared).
    """

    __slots__ = (
        "_end",
        "_firsts",
        "_firsts_now",
        "_past_firsts",
        "_past_retries",
        "_ratio",
        "_reserve",
        "_retries",
        "_retries_now",
        "_tick",
    )

    def __init__(self, budget: RetryBudget) -> None:
        self._ratio = budget.ratio
        self._reserve = budget.min_per_second * WINDOW
        self._tick = 0  # the current one-second bucket: [tick, tick + 1) on the loop clock
        self._end = 1.0
        self._firsts_now = self._retries_now = 0
        self._firsts = [0] * BUCKETS  # past buckets, indexed by tick % BUCKETS
        self._retries = [0] * BUCKETS
        self._past_firsts = self._past_retries = 0

    def deposit(self, now: float) -> None:
        """Count one first attempt at loop time ``now``."""
        if now >= self._end:
            self._advance(now)
        self._firsts_now += 1

    def withdraw(self, now: float) -> bool:
        """Count one retry at ``now`` if retries + 1 <= ratio × firsts + reserve."""
        if not self._tick <= now < self._end:
            self._advance(now)
        retries = self._past_retries + self._retries_now
        firsts = self._past_firsts + self._firsts_now
        if retries + 1 > self._ratio * firsts + self._reserve:
            return False
        self._retries_now += 1
        return True

    def totals(self, now: float) -> tuple[int, int, float]:
        """``(first attempts, retries, retries left)`` in the window at ``now``;
        left = max(0, ratio × firsts + reserve − retries)."""
        if not self._tick <= now < self._end:
            self._advance(now)
        firsts = self._past_firsts + self._firsts_now
        retries = self._past_retries + self._retries_now
        return firsts, retries, max(0.0, self._ratio * firsts + self._reserve - retries)

    def refund(self, then: float) -> None:
        """Un-count one retry that :meth:`withdraw` counted at loop time ``then`` but that
        was never sent (its caller was cancelled during the wait); a no-op once ``then``
        has left the window."""
        tick = math.floor(then)
        steps = self._tick - tick
        if steps == 0 and self._retries_now > 0:
            self._retries_now -= 1
        elif 0 < steps < BUCKETS and self._retries[tick % BUCKETS] > 0:
            self._retries[tick % BUCKETS] -= 1
            self._past_retries -= 1

    def _advance(self, now: float) -> None:
        """Close the current bucket and open the one holding ``now``."""
        tick = math.floor(now)
        steps = tick - self._tick
        if steps < 0 or steps >= BUCKETS:  # another loop's clock, or a quiet window
            self._firsts = [0] * BUCKETS
            self._retries = [0] * BUCKETS
            self._past_firsts = self._past_retries = 0
        elif steps > 0:
            slot = self._tick % BUCKETS
            self._firsts[slot] = self._firsts_now
            self._retries[slot] = self._retries_now
            self._past_firsts += self._firsts_now
            self._past_retries += self._retries_now
            for step in range(1, steps + 1):  # buckets that left the window
                slot = (self._tick + step) % BUCKETS
                self._past_firsts -= self._firsts[slot]
                self._past_retries -= self._retries[slot]
                self._firsts[slot] = self._retries[slot] = 0
        if steps != 0:
            self._firsts_now = self._retries_now = 0
        self._tick = tick
        self._end = tick + 1.0

    def __repr__(self) -> str:
        return (
            f"<retry budget balance: {self._past_retries + self._retries_now} retries,"
            f" {self._past_firsts + self._firsts_now} first attempts in the window>"
        )
