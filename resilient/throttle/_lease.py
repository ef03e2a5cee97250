"""One key's leased quota places in this process, and how many to ask for next.

A process that sends often to a key boards several requests at once, in one Redis call
(a *lease*): each place is a ticket counted in flight in Redis, exactly as the ticket
of a request boarded alone, so the quota rule (``used + in_flight < amount`` in every
window, a slot stamped when its attempt ends) holds as it does for single boardings.
Its requests then take their tickets here, without a round trip; the tickets left
unused :data:`LEASE` seconds after the last lease are handed back, by name.

How many: the key's *demand* is the most requests it boarded in one period of
:data:`LEASE` seconds (the current period or the previous one). A caller asks for
``demand + 1`` places (itself included), at most :data:`MAX_LEASE`; Redis grants the
largest ``k`` of ``want, want/2, want/4, ...`` for which every window holds
``room >= SPREAD · k`` (``room = amount − used − in_flight``), else exactly one place if
there is room for one (a board as without leases), else the wait. So a lease takes at
most ``1/SPREAD`` of the room left, and near the limit every request boards alone.

Renewal: once a spare is taken and the spares left are at most half the demand (and
the demand is at least 2), ``demand`` more places are asked for in the background, so a
steadily busy key finds its next places here and its callers never wait for Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

__all__ = ["LEASE", "MAX_LEASE", "SPREAD", "Lease"]

LEASE = 0.1
"""Seconds leased places are kept unused before they are handed back; also the period
over which demand is counted."""
SPREAD = 4
"""A lease of ``k`` places needs room for ``SPREAD · k`` in every window: it takes at most
a quarter of the room left, so processes cannot starve each other."""
MAX_LEASE = 128
"""Most places asked for in one call."""


class Lease:
    """One key's spare tickets (boarded in Redis, not yet used), the loop time ``until``
    which they are kept, the timer that hands them back, whether a lease call is on its
    way (``asking``), and the demand count (see the module docstring)."""

    __slots__ = ("asking", "current", "previous", "spare", "start", "timer", "until")

    def __init__(self, now: float) -> None:
        self.spare: list[str] = []
        self.until = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.asking = False
        self.start = now
        self.current = 0
        self.previous = 0

    def demand(self, now: float) -> int:
        """The most requests boarded in one period: the current one or the last."""
        elapsed = now - self.start
        if elapsed >= LEASE:  # a new period: the last one is the previous (if adjacent)
            self.previous = self.current if elapsed < 2 * LEASE else 0
            self.current = 0
            self.start = now
        elif elapsed < 0.0:  # another loop's clock: start counting afresh
            self.start, self.current, self.previous = now, 0, 0
        return self.current if self.current > self.previous else self.previous

    def count(self, now: float) -> None:
        """One more request of the key boarded at ``now``."""
        self.demand(now)
        self.current += 1

    def want(self, now: float) -> int:
        """Places a caller asks for: ``demand + 1`` (itself included), at most
        :data:`MAX_LEASE`; 1 while another lease call is on its way (no double lease)."""
        if self.asking:
            return 1
        want = self.demand(now) + 1
        return want if want < MAX_LEASE else MAX_LEASE

    def renewal(self, now: float) -> int:
        """Places to ask for in the background now: ``demand`` once the spares are at most
        half of it (and it is at least 2), else 0; 0 while a lease call is on its way."""
        if self.asking:
            return 0
        demand = self.demand(now)
        if demand < 2 or 2 * len(self.spare) > demand:
            return 0
        return demand if demand < MAX_LEASE else MAX_LEASE

    def idle(self) -> bool:
        """Nothing held and nothing on its way: forgetting it loses only the demand count."""
        return not self.spare and not self.asking
