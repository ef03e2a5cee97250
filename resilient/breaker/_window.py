"""A time-based sliding window of call outcomes, split into buckets.

The window holds ``buckets`` buckets of ``width`` seconds on the event loop's clock;
bucket ``tick = floor(now / width)`` lives in slot ``tick % buckets``. The window is
the current bucket plus the ``buckets - 1`` before it, so it spans between
``(buckets - 1) × width`` and ``buckets × width`` seconds. Running totals make
``calls`` and ``fails`` O(1); moving on clears the buckets that left the window
(at most ``buckets`` of them, whatever the gap).
"""

from __future__ import annotations

import math

__all__ = ["Window"]


class Window:
    """Outcome counts over the last ``buckets × width`` seconds (give or take one bucket).

    ``add(now, failed)`` counts one call at loop time ``now``; ``calls`` and ``fails``
    are the totals in the window as of the last ``add`` (or ``advance``). Time is
    expected to move forward; a ``now`` before the current bucket (another loop's
    clock) empties the window.
    """

    __slots__ = (
        "_calls",
        "_end",
        "_fails",
        "_n",
        "_slot",
        "_start",
        "_tick",
        "_width",
        "calls",
        "fails",
    )

    def __init__(self, width: float, buckets: int) -> None:
        if not (width > 0.0 and math.isfinite(width)):
            raise ValueError(f"Window: width must be a finite number > 0, got {width!r}")
        if type(buckets) is not int or buckets < 1:
            raise ValueError(f"Window: buckets must be an integer >= 1, got {buckets!r}")
        self._width = width
        self._n = buckets
        self._calls = [0] * buckets
        self._fails = [0] * buckets
        self.calls = 0
        self.fails = 0
        self._tick = 0
        self._slot = 0
        self._start = 0.0
        self._end = width

    def add(self, now: float, failed: bool) -> None:
        """Count one call (a failure if ``failed``) in the bucket holding ``now``."""
        if not self._start <= now < self._end:
            self.advance(now)
        slot = self._slot
        self._calls[slot] += 1
        self.calls += 1
        if failed:
            self._fails[slot] += 1
            self.fails += 1

    def advance(self, now: float) -> None:
        """Make the bucket holding ``now`` current, dropping buckets that left the window."""
        width = self._width
        try:
            tick = math.floor(now / width)
        except (OverflowError, ValueError):  # a width below the clock's resolution
            self.clear()
            return
        if tick * width > now:  # float rounding put ``now`` one bucket too far
            tick -= 1
        elif (tick + 1) * width <= now:
            tick += 1
        steps = tick - self._tick
        if steps < 0 or steps >= self._n:
            self.clear()
        else:
            calls, fails, n = self._calls, self._fails, self._n
            for step in range(1, steps + 1):
                slot = (self._tick + step) % n
                self.calls -= calls[slot]
                self.fails -= fails[slot]
                calls[slot] = fails[slot] = 0
        self._tick = tick
        self._slot = tick % self._n
        self._start = tick * width
        self._end = (tick + 1) * width

    def clear(self) -> None:
        """Forget every outcome."""
        n = self._n
        self._calls = [0] * n
        self._fails = [0] * n
        self.calls = self.fails = 0

    def buckets(self) -> list[tuple[int, int]]:
        """``(calls, fails)`` per slot (for tests and stats; not on the hot path)."""
        return list(zip(self._calls, self._fails, strict=True))

    def __repr__(self) -> str:
        return f"<Window {self.fails} failed of {self.calls} calls>"
