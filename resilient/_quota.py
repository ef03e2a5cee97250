"""Quota windows (``"200/minute;5000/day"``) enforced with ``limits``' moving windows.

Each window allows ``amount`` requests in any ``expiry``-second span (limits'
:class:`~limits.aio.strategies.MovingWindowRateLimiter`). A server counts a request
when it *arrives*, which the client never sees; it only knows that the arrival
``a`` lies between the send and the response ``r``. So a request takes its slot
in the ``limits`` window when its attempt *ends* (response, failure or
cancellation: it may have reached the server), timestamped ``r >= a``; until
then it is counted *in flight*. A key may send when, in every window,

    used + in_flight < amount        (used: the slots in the ``limits`` window now)

and a slot frees ``expiry`` seconds after the response that took it, so the next
request, sent at ``t >= r + expiry``, arrives at ``>= a + expiry``: no window of
arrivals ever holds more than ``amount``, whatever the latencies.

``limits`` runs on the wall clock (``time.time``): a full window frees a slot at
its ``reset_time`` (the oldest slot's time + the window length); a window that is
full of requests still in flight frees nothing before ``expiry`` seconds from now.
"""

from __future__ import annotations

import re

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from . import _clock

__all__ = [
    "MEMORY_STORAGE",
    "MIN_QUOTA_WAIT",
    "NAMESPACE",
    "Quotas",
    "parse_quotas",
]

MEMORY_STORAGE = "memory://"
NAMESPACE = "resilient-throttle"
"""First identifier of every limits key: ``LIMITER/resilient-throttle/<key>/<window>``."""
MIN_QUOTA_WAIT = 0.001
"""Seconds: the shortest wait for a full window (no hot loop on a skewed clock)."""

_ZERO_SPAN = re.compile(r"(?:/|\bper)\s*0+\s*[a-z]", re.IGNORECASE)


def parse_quotas(text: object) -> tuple[RateLimitItem, ...]:
    """``"200/minute;5000/day"`` -> limits items, else ValueError naming ``quotas``.

    Each window needs an amount >= 1 and a span >= 1 unit (limits reads ``per 0
    seconds`` as ``per 1 second``; here it is refused).
    """
    try:
        if not isinstance(text, str) or _ZERO_SPAN.search(text):
            raise ValueError
        items = tuple(parse_many(text))
    except ValueError:
        items = ()
    if not items or any(item.amount < 1 for item in items):
        raise ValueError(
            "Throttle: quotas must be limits' notation, one or more '<amount> per"
            " <n> <unit>' or '<amount>/<unit>' (amount >= 1) separated by ';',"
            f" e.g. '200/minute;5000/day'; got {text!r}"
        )
    return items


class Quotas:
    """The windows of one :class:`~resilient.Throttle`, per key, in this process's memory
    (shared windows: :class:`resilient.storage._quota.SharedQuotas`)."""

    __slots__ = ("_items", "_limiter", "text")

    def __init__(self, text: str) -> None:
        self._items = parse_quotas(text)
        self.text = text
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def room(self, key: str, in_flight: int) -> tuple[float, str]:
        """``(0.0, "")`` if every window of ``key`` has room for one more request, else the
        seconds until the last full one can have room, and its name.

        A window has room when ``used + in_flight < amount``. A full one can have room
        at ``reset_time − wall clock`` if it holds slots, else (every request still in
        flight) no sooner than ``expiry`` seconds from now; the wait is the largest of
        those, at least :data:`MIN_QUOTA_WAIT`.
        """
        wait, name, now = 0.0, "", _clock.wall()
        for item in self._items:
            stats = await self._limiter.get_window_stats(item, NAMESPACE, key)
            used = item.amount - stats.remaining
            if used + in_flight < item.amount:
                continue
            until = stats.reset_time - now if used else float(item.get_expiry())
            until = max(until, MIN_QUOTA_WAIT)
            if until > wait:
                wait, name = until, f"quota {item}"
        return wait, name

    async def record(self, key: str) -> None:
        """Take a slot in every window of ``key``, timestamped now (an attempt has ended).

        A window found full (only another process sharing the storage can fill it)
        is left as it is.
        """
        limiter = self._limiter
        for item in self._items:
            await limiter.hit(item, NAMESPACE, key)

    def __repr__(self) -> str:
        return f"Quotas({self.text!r})"
