"""Snapshots returned by each policy's ``stats()``: frozen values, one per key.

A snapshot is read inside the event loop at one instant and never changes; times in
the future are given both as seconds from now and as a UTC datetime.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "CircuitStats",
    "HedgeStats",
    "LimitStats",
    "PauseStats",
    "RetryStats",
    "ThrottleStats",
]


@dataclass(frozen=True, slots=True)
class ThrottleStats:
    """One key of a ``Throttle``.

    ``tokens``: tokens in the bucket now (may dip a hair below 0: a token granted
    early is paid back by the next). ``rate``: tokens per second now (below the
    configured rate after adaptive cuts). ``burst``: the bucket size. ``waiting``:
    callers queued for a token. ``in_flight``: requests counted in flight (with quotas).
    """

    key: str
    tokens: float
    rate: float
    burst: int
    waiting: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class PauseStats:
    """One key of a ``RateLimitBackoff``.

    ``paused``: no caller may send (from a 429 until a probe's answer is not a 429).
    ``remaining``: seconds until the pause ends (0 when open, or when the probe is due).
    ``paused_until``: the UTC end of the pause, None when not paused. ``probing``: the
    probe is on the wire. ``waiting``: callers queued for the pause to end. ``rate``: the
    key's send rate now (learned from its 429s, or an advertised limit's spread), None
    while the key is not paced.
    """

    key: str
    paused: bool
    remaining: float
    paused_until: datetime | None
    probing: bool
    waiting: int
    rate: float | None = None


@dataclass(frozen=True, slots=True)
class CircuitStats:
    """One key of a ``CircuitBreaker``.

    ``state``: ``"closed"``, ``"open"`` or ``"half_open"`` (open past ``open_for``
    reads half-open). ``calls``, ``failures``: outcomes in the sliding window;
    ``failure_ratio`` = failures / calls (0 without calls). ``retry_after``: seconds
    until half-open while open (else 0); ``open_until``: that time in UTC, None unless
    open. ``probes``: trial requests in flight while half-open.
    """

    key: str
    state: str
    calls: int
    failures: int
    failure_ratio: float
    retry_after: float
    open_until: datetime | None
    probes: int


@dataclass(frozen=True, slots=True)
class RetryStats:
    """A ``Retry``'s budget (one per policy, not per key) over its 10-second window.

    ``first_attempts``, ``retries``: counted in the window. ``retries_left``: retries
    the budget allows now (ratio × first attempts + reserve − retries, floored at 0);
    None without a budget.
    """

    first_attempts: int
    retries: int
    retries_left: float | None


@dataclass(frozen=True, slots=True)
class HedgeStats:
    """One key of a ``Hedge``.

    ``delay``: seconds a call of the key waits for its response before a copy goes (the
    configured ``delay``, or the learned p95, or the warm-up delay). ``samples``: latencies
    in the key's window (at most its size). ``p95``: the learned p95, None before enough
    samples. ``hedged``: copies sent; ``won``: calls a copy answered first (both since the
    key was created).
    """

    key: str
    delay: float
    samples: int
    p95: float | None
    hedged: int
    won: int


@dataclass(frozen=True, slots=True)
class LimitStats:
    """One key of a ``ConcurrencyLimit``.

    ``limit``: requests the key may have in flight. ``in_flight``: holding a slot now.
    ``waiting``: queued for a slot. ``rejected``: callers refused with ``LimitExceeded``
    since the key was created. ``hold``: the smoothed seconds a slot is held (None before
    the first release), from which a queued caller's wait is estimated.
    """

    key: str
    limit: int
    in_flight: int
    waiting: int
    rejected: int
    hold: float | None
