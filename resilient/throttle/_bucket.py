"""A pure token bucket: no I/O, no event loop; the caller passes the time.

Tokens refill at ``rate`` per second up to ``burst``:

    tokens(now) = min(burst, tokens(last) + (now - last) · rate)

A take succeeds when a whole token is there, or is due within ``GRANT_SLACK``
seconds (the small debt is paid back by the next taker, so the long-run rate is
exact): over any interval of ``t`` seconds a bucket grants at most
``burst + rate · (t + GRANT_SLACK)`` tokens. The slack absorbs float rounding and
timers that fire a clock tick early, so a waiter woken "at" its token never
sleeps again for a nanosecond. A time before ``last`` (another loop's clock)
refills nothing and becomes the new ``last``.
"""

from __future__ import annotations

__all__ = ["GRANT_SLACK", "TokenBucket"]

GRANT_SLACK = 1e-6
"""Seconds: a token due this soon is granted now (see the module docstring)."""


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second (``rate`` may be changed in place)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def refill(self, now: float) -> float:
        """Bring the count up to ``now``; return the tokens available."""
        elapsed = now - self.last
        if elapsed:
            self.last = now
            if elapsed > 0.0:
                tokens = self.tokens + elapsed * self.rate
                self.tokens = tokens if tokens < self.burst else self.burst
        return self.tokens

    def take(self, now: float) -> float:
        """Take a token: ``0.0`` if granted, else the seconds until one is due (nothing taken)."""
        elapsed = now - self.last
        tokens = self.tokens
        if elapsed:
            self.last = now
            if elapsed > 0.0:
                tokens += elapsed * self.rate
                if tokens > self.burst:
                    tokens = self.burst
        missing = 1.0 - tokens
        if missing <= self.rate * GRANT_SLACK:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return missing / self.rate

    def delay(self, now: float) -> float:
        """Seconds until a token is due (``0.0`` if one is there); nothing taken."""
        missing = 1.0 - self.refill(now)
        return 0.0 if missing <= self.rate * GRANT_SLACK else missing / self.rate

    def give_back(self) -> None:
        """Return a token taken by :meth:`take` but not used (capped at ``burst``)."""
        tokens = self.tokens + 1.0
        self.tokens = tokens if tokens < self.burst else self.burst

    def full(self, now: float) -> bool:
        """The bucket holds ``burst`` tokens at ``now``."""
        return self.refill(now) >= self.burst
