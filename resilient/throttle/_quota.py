"""Quota windows (``"200/minute;5000/day"``): moving windows in limits' notation.

``limits`` parses the quotas (:func:`parse_quotas`) and keeps the windows shared through
Redis (:mod:`resilient.throttle._redis`); in memory each window is a :class:`MovingWindow`
of this module, with the semantics of ``limits``' moving window
(:class:`~limits.aio.strategies.MovingWindowRateLimiter`) at a fraction of its cost.

Each window allows ``amount`` requests in any ``expiry``-second span. A server counts a
request when it *arrives*, which the client never sees; it only knows that the arrival
``a`` lies between the send and the response ``r``. So a request takes its slot in the
window when its attempt *ends* (response, failure or cancellation: it may have reached
the server), timestamped ``r >= a``; until then it is counted *in flight*. A key may
send when, in every window,

    used + in_flight < amount        (used: the slots in the window now)

and a slot frees ``expiry`` seconds after the response that took it, so the next
request, sent at ``t >= r + expiry``, arrives at ``>= a + expiry``: no window of
arrivals ever holds more than ``amount``, whatever the latencies.

In memory the windows run on the event loop's clock (:mod:`resilient._clock`, so
``looptime`` tests fill them in virtual time); shared ones on Redis's clock. A full
window frees a slot at its oldest slot's time + ``expiry``; a window that is full of
requests still in flight frees nothing before ``expiry`` seconds from now. A slot is
in the window while ``now - expiry < slot``: at ``slot + expiry`` it has left.
"""

from __future__ import annotations

import re
from collections import deque
from typing import TYPE_CHECKING

from limits import RateLimitItem, parse_many

from .. import _clock

if TYPE_CHECKING:
    from .._errors import StorageError

__all__ = [
    "MEMORY_STORAGE",
    "MIN_QUOTA_WAIT",
    "NAMESPACE",
    "SWEEP_MIN",
    "MovingWindow",
    "Quotas",
    "parse_quotas",
]

MEMORY_STORAGE = "memory://"
NAMESPACE = "resilient-throttle"
"""First identifier of every limits key: ``LIMITER/resilient-throttle/<key>/<window>``."""
MIN_QUOTA_WAIT = 0.001
"""Seconds: the shortest wait for a full window (no hot loop on a skewed clock)."""
SWEEP_MIN = 1024
"""Keys held before the first sweep of keys whose windows are empty (then twice the
keys left after each sweep: amortised O(1) per new key)."""

_ROOM = (0.0, "")
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


class MovingWindow:
    """One window of one key: at most ``amount`` slots in any ``expiry``-second span.

    ``slots``: the times of the slots taken, oldest first, never more than ``amount``
    (those that have left the window are dropped when it is next read). Every method
    takes ``now``, which never goes back: the window is pure, and tests drive it on
    fake time. ``name`` is what a wait for it is called (``"quota 200 per 1 minute"``).
    """

    __slots__ = ("amount", "expiry", "name", "slots")

    def __init__(self, amount: int, expiry: float, name: str = "") -> None:
        self.amount = amount
        self.expiry = expiry
        self.name = name
        self.slots: deque[float] = deque()

    def used(self, now: float) -> int:
        """The slots in the window at ``now``: those with ``now - expiry < slot``."""
        slots = self.slots
        cutoff = now - self.expiry
        while slots and slots[0] <= cutoff:
            slots.popleft()
        return len(slots)

    def record(self, now: float) -> bool:
        """Take a slot at ``now``; False (nothing taken) if the window is full."""
        slots = self.slots
        if len(slots) >= self.amount and self.used(now) >= self.amount:
            return False
        slots.append(now)
        return True

    def idle(self, now: float) -> bool:
        """No slot in the window at ``now``: forgetting it changes nothing."""
        slots = self.slots
        return not slots or slots[-1] <= now - self.expiry

    def __repr__(self) -> str:
        return f"MovingWindow({self.amount!r}, {self.expiry!r}, slots={len(self.slots)})"


class Quotas:
    """The windows of one :class:`~resilient.Throttle`, per key, in this process's memory:
    the memory peer of the :class:`~resilient.throttle._store.QuotaStore` interface
    (shared windows: :class:`resilient.throttle._redis.RedisQuotas`).

    ``board`` is :meth:`room_at` (it always answers, synchronously; the caller counts
    itself in flight) and every ticket is ``""``; ``land`` is :meth:`record_at`.
    :meth:`room` and :meth:`record` read and write the windows on the event loop's clock.
    A key's windows are dropped once none holds a slot (swept when new keys come).
    """

    __slots__ = ("_items", "_specs", "_sweep_at", "_windows", "board", "text")

    def __init__(self, text: str) -> None:
        self._items = parse_quotas(text)
        self.text = text
        self._specs = tuple(
            (item.amount, float(item.get_expiry()), f"quota {item}") for item in self._items
        )
        self._windows: dict[str, tuple[MovingWindow, ...]] = {}
        self._sweep_at = SWEEP_MIN
        self.board = self.room_at
        """The store's ``board``: :meth:`room_at` itself (memory always answers), so the
        hot path pays no call of its own for it."""

    def room_at(self, key: str, in_flight: int, now: float) -> tuple[float, str]:
        """``(0.0, "")`` if every window of ``key`` has room for one more request at ``now``
        (``used + in_flight < amount``), else the seconds until the last full one can have
        room, and its name: until its oldest slot leaves it, or ``expiry`` if it holds
        none (every request still in flight); at least :data:`MIN_QUOTA_WAIT`."""
        windows = self._windows.get(key)
        if windows is None:
            windows = self._add(key, now)
        wait, name = 0.0, ""
        for window in windows:  # MovingWindow.used inlined: this is the hot path
            slots = window.slots
            cutoff = now - window.expiry
            while slots and slots[0] <= cutoff:
                slots.popleft()
            if len(slots) + in_flight >= window.amount:
                until = slots[0] - cutoff if slots else window.expiry
                if until < MIN_QUOTA_WAIT:
                    until = MIN_QUOTA_WAIT
                if until > wait:
                    wait, name = until, window.name
        return (wait, name) if wait else _ROOM

    def record_at(self, key: str, now: float, ticket: str = "") -> None:
        """Take a slot in every window of ``key`` at ``now`` (an attempt has ended). A full
        window (only requests not counted in flight can fill it) is left as it is.
        ``ticket``: the store's (memory tickets are all ``""``)."""
        windows = self._windows.get(key)
        if windows is None:
            windows = self._add(key, now)
        for window in windows:
            slots = window.slots
            if len(slots) < window.amount:
                slots.append(now)
            else:
                window.record(now)

    async def room(self, key: str, in_flight: int) -> tuple[float, str]:
        """:meth:`room_at` now (the event loop's clock)."""
        return self.room_at(key, in_flight, _clock.now())

    async def record(self, key: str) -> None:
        """:meth:`record_at` now (the event loop's clock)."""
        self.record_at(key, _clock.now())

    # --- the QuotaStore interface ------------------------------------------------------

    async def ask(self, key: str, in_flight: int) -> tuple[float, str]:
        """:meth:`board` now (memory has no backend to ask)."""
        return self.room_at(key, in_flight, _clock.now())

    land = record_at
    """The store's ``land``: :meth:`record_at` itself."""

    def warn(self, exc: StorageError) -> None:  # pragma: no cover - memory does not fail
        """Memory does not fail."""

    def __len__(self) -> int:
        """Keys whose windows are held (some may be empty until the next sweep)."""
        return len(self._windows)

    def _add(self, key: str, now: float) -> tuple[MovingWindow, ...]:
        """New, empty windows for ``key``; first, when many keys are held, forget those
        whose windows are all empty."""
        held = self._windows
        if len(held) >= self._sweep_at:
            for old in [k for k, ws in held.items() if all(w.idle(now) for w in ws)]:
                del held[old]
            self._sweep_at = max(SWEEP_MIN, 2 * len(held))
        windows = held[key] = tuple(MovingWindow(*spec) for spec in self._specs)
        return windows

    def __repr__(self) -> str:
        return f"Quotas({self.text!r})"
