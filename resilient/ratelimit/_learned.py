"""The rate a key's server accepts, learned from its 429s: a measured-rate CUBIC law.

A key has no learned rate (it is not paced) until its first 429. From then on its callers
leave at :meth:`LearnedRate.rate`, a function of the time ``t`` since sending resumed
after the last cut (the pause after a 429 does not count: nothing was learned in it):

- **measure**: ``m`` = accepted (non-429) responses per second over the last
  :data:`SPAN` seconds of sending; known once at least :data:`MIN_SPAN` seconds of
  sending lie behind (a burst right after a pause says nothing about the rate).
- **cut**, on a 429 (once per round: a 429 answering a request sent before the last cut
  is the same signal): ``a = m`` if known (what the server demonstrably accepted; in
  slow start at least half the rate we had doubled to), else the previous ``a`` (a 429
  after too little sending to measure restarts the climb but teaches nothing, so random
  429s do not compound), else, on a key's very first 429, ``a = SLOW_START_MIN / β``
  and the key is in *slow start* (nothing was measured while it was not paced). Then
  ``r₀ = β·a`` and the plateau ``W = P·a`` (``β = BETA``, ``P = PLATEAU``: the plateau
  sits just below what the server accepted).
- **grow**, while sending: ``r(t) = W·(1 + C·(t − K)³)``, ``K = ∛((1 − β/P)/C)``, so
  the rate climbs back to ``W`` in ``K`` seconds, stays near it, then probes above it
  ever faster (CUBIC, as the AWS SDKs' adaptive retry mode, with ``C`` relative to ``W``
  so the shape does not depend on the rate's scale). In slow start (nothing measured)
  the rate grows with what the server accepts, not with time (as TCP's window grows per
  acknowledgement): ``r = r₀ + n·ln 2 / DOUBLING`` after ``n`` accepted responses, which
  doubles the rate every ``DOUBLING`` seconds while callers send at it and stands still
  while they do not (a gap between calls is no evidence), until the next 429 measures it.
- bounds: ``MIN_RATE ≤ r ≤ ceiling`` (a :class:`~resilient.Throttle`'s rate caps it).

Invariants (property-tested): ``r`` is never above the ceiling nor below ``MIN_RATE``;
after a measured cut ``r(0) = β·m``; ``r`` is non-decreasing in ``t`` and in ``n``
between cuts;
``r(K) = W = P·m``.
"""

from __future__ import annotations

import math

__all__ = [
    "BETA",
    "BUCKETS",
    "CUBIC_C",
    "DOUBLING",
    "MIN_RATE",
    "MIN_SPAN",
    "PLATEAU",
    "SLOW_START_MIN",
    "SPAN",
    "LearnedRate",
]

BETA = 0.9
"""Multiplicative cut: after a 429 the key sends at ``BETA`` × the accepted rate."""
CUBIC_C = 0.0001
"""CUBIC's scale (per s³, relative to ``W``): ``K = ∛((1 − BETA/PLATEAU)/C)`` ≈ 9.3 s.
Small on purpose: every 429 costs a whole pause, so the rate probes above its plateau
slowly (tuned on a leaky bucket with ``Retry-After: 1``; see the ``unknown`` benchmark)."""
DOUBLING = 0.25
"""Seconds per doubling of the rate in slow start, while callers send at it."""
_SLOW_GAIN = math.log(2.0) / DOUBLING
"""Requests per second added per accepted response in slow start."""
SPAN = 1.0
"""Seconds of sending over which the accepted rate is measured."""
MIN_SPAN = 0.25
"""Seconds of sending needed before the measurement counts."""
MIN_RATE = 0.01
"""Requests per second: no key is paced slower than this (one per 100 s)."""
SLOW_START_MIN = 1.0
"""Requests per second: slow start begins at this rate (a key's first 429 comes before
anything was measured)."""
BUCKETS = 4
"""Buckets of the ring the accepted rate is measured in (``SPAN`` / ``BUCKETS`` s each)."""
_BUCKETS = BUCKETS
_WIDTH = SPAN / _BUCKETS
PLATEAU = 0.98
"""CUBIC's plateau ``W`` is ``PLATEAU`` × the accepted rate (just below it)."""
_K = ((1.0 - BETA / PLATEAU) / CUBIC_C) ** (1.0 / 3.0)
"""``K``: seconds the climb takes back to the plateau."""


class LearnedRate:
    """One key's learned rate (see the module docstring); the caller passes the time."""

    __slots__ = (
        "_bucket",
        "_counts",
        "accepted_rate",
        "ceiling",
        "count",
        "cuts",
        "peak",
        "since",
        "slow",
        "start",
    )

    def __init__(self, now: float, ceiling: float = math.inf) -> None:
        self.ceiling = ceiling
        self.start: float | None = None
        """``r₀``: the rate right after the last cut; None: not paced (no 429 yet)."""
        self.peak = 0.0
        """``W``: the plateau, ``PLATEAU`` × :attr:`accepted_rate`."""
        self.accepted_rate = 0.0
        """``a``: the accepted rate the last cut went by."""
        self.slow = False
        self.since = now
        """Loop time sending (re)started: the origin of ``t`` and of the measurement."""
        self.cuts = 0
        """Cuts so far: a request remembers it at send time (see :meth:`counts`)."""
        self.count = 0
        """Responses accepted since :attr:`since` (slow start grows with it)."""
        self._counts = [0] * _BUCKETS
        self._bucket = 0

    @property
    def paced(self) -> bool:
        return self.start is not None

    def rate(self, now: float) -> float:
        """``r(t)`` (``inf`` while not paced)."""
        start = self.start
        if start is None:
            return math.inf
        if self.slow:
            grown = start + self.count * _SLOW_GAIN
        else:
            t = now - self.since
            x = (t if t > 0.0 else 0.0) - _K
            grown = self.peak * (1.0 + CUBIC_C * x * x * x)
        if grown < MIN_RATE:
            grown = MIN_RATE
        return grown if grown < self.ceiling else self.ceiling

    def accepted(self, now: float) -> None:
        """A response that was not a 429 arrived at ``now``."""
        index = int((now - self.since) / _WIDTH)
        if index < 0:
            index = 0
        self._roll(index)
        self._counts[index % _BUCKETS] += 1
        self.count += 1

    def measured(self, now: float) -> float | None:
        """``m``: accepted per second over the last :data:`SPAN` of sending, or None."""
        sending = now - self.since
        if sending < MIN_SPAN:
            return None
        index = int(sending / _WIDTH)
        self._roll(index)
        # the ring holds the current (partial) bucket and the full ones before it
        covered = min(sending, (_BUCKETS - 1) * _WIDTH + (sending - index * _WIDTH))
        return sum(self._counts) / covered

    def counts(self, cuts: int) -> bool:
        """Whether a 429 to a request sent when :attr:`cuts` was ``cuts`` is news."""
        return cuts == self.cuts

    def cut(self, now: float) -> float:
        """A 429 that :meth:`counts`: lower the rate (see the module docstring)."""
        measured = self.measured(now)
        if measured is not None and measured > 0.0:
            peak, slow = measured, False
            if self.slow and self.start is not None:  # overshot while doubling: half-way
                peak = max(peak, self.rate(now) / 2.0)
        elif self.start is not None:  # too little sending to measure: keep what we know
            peak, slow = self.accepted_rate, self.slow
        else:  # the key's first 429: nothing was measured before it (it was not paced)
            peak, slow = SLOW_START_MIN / BETA, True
        self.accepted_rate = peak
        self.peak = max(PLATEAU * peak, MIN_RATE)
        self.start = max(min(BETA * peak, self.ceiling), MIN_RATE)
        self.slow = slow
        self.cuts += 1
        self.resume(now)
        return self.start

    def resume(self, now: float) -> None:
        """Sending (re)starts at ``now`` (a cut, or the end of a pause): the law's clock
        and the measurement start over."""
        self.since = now
        self.count = 0
        self._counts = [0] * _BUCKETS
        self._bucket = 0

    def _roll(self, index: int) -> None:
        """Empty the buckets between the last one written and ``index``."""
        last = self._bucket
        if index <= last:
            return
        counts = self._counts
        for i in range(last + 1, min(index, last + _BUCKETS) + 1):
            counts[i % _BUCKETS] = 0
        self._bucket = index
