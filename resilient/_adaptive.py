"""Adaptive rate: AIMD (additive increase, multiplicative decrease), O(1) per response.

With ``r`` the key's current rate, ``R`` the configured rate and ``m`` the floor:

    on a 429:      r <- max(m, r · DECREASE)            (DECREASE = 0.5)
    on a success:  r <- min(R, r + R · INCREASE)        (INCREASE = 0.02)

so one halving is undone by ``0.5 / INCREASE = 25`` successes, and the rate never
exceeds ``R``. A 429 answering a request sent before the latest cut does not cut
again: a burst of in-flight requests rejected together counts as one signal (as
TCP cuts its window once per round trip).
"""

from __future__ import annotations

__all__ = ["DECREASE", "DEFAULT_MIN_RATE_DIVISOR", "INCREASE", "decreased", "increased"]

DECREASE = 0.5
"""Factor applied to the rate on a 429."""
INCREASE = 0.02
"""Fraction of the configured rate added back per success."""
DEFAULT_MIN_RATE_DIVISOR = 20
"""Default floor of the adaptive rate: the configured rate / 20."""


def decreased(rate: float, floor: float) -> float:
    """``max(floor, rate · DECREASE)``."""
    cut = rate * DECREASE
    return cut if cut > floor else floor


def increased(rate: float, ceiling: float) -> float:
    """``min(ceiling, rate + ceiling · INCREASE)``."""
    grown = rate + ceiling * INCREASE
    return grown if grown < ceiling else ceiling
