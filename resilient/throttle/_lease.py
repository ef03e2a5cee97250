"""One key's leased quota places in this process, and how many to ask for next.

A process that sends often to a key boards several requests at once, in one Redis call
(a *lease*): each place is a ticket counted in flight in Redis, exactly as the ticket
of a request boarded alone, so the quota rule (``used + in_flight < amount`` in every
window, a slot stamped when its attempt ends) holds as it does for single boardings.
Its requests then take their tickets here, oldest first, without a round trip.

**How many.** The key's *demand* is the most requests it boarded in one period of
:data:`LEASE` seconds (the current period or the previous one). A caller asks for
``demand + 1`` places (itself included), at most :data:`MAX_LEASE`; Redis grants the
largest ``k`` of ``want, want/2, want/4, ...`` that leaves the process holding at most
``1/SPREAD`` of the room it finds (:func:`granted`), else exactly one place if there is
room for one (a board as without leases), else the wait. So processes cannot starve
each other, and near the limit every request boards alone.

**Renewal.** Once a spare is taken and the spares left are at most half the demand (and
the demand is at least 2), ``demand`` more places are asked for in the background (none
granted near the limit), so a steadily busy key finds its next places here and its
callers never wait for Redis.

**How long.** A spare is used at most :data:`LEASE` seconds after its lease was asked
for (this process's clock, read before the call: never later than Redis's); then it is
handed back by name. Redis keeps an unused spare :data:`SPARE_TTL` seconds and drops it
by itself after that (a process that exits or dies with spares holds them no longer).
A spare taken into use is a request in flight: unless it has landed by then, it is
re-leased in Redis for as long as a request boarded alone, :data:`USED_FLUSH` seconds
after, in a background send that reaches Redis within ``SPARE_TTL``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ..storage._redis import STORAGE_TIMEOUT

if TYPE_CHECKING:
    import asyncio

__all__ = ["LEASE", "MAX_LEASE", "SPARE_TTL", "SPREAD", "USED_FLUSH", "Lease", "granted"]

LEASE = 0.1
"""Seconds a leased place may wait here unused (then it is handed back); also the period
over which demand is counted."""
SPREAD = 4
"""A lease of ``k`` places needs room for ``SPREAD · k`` in every window: it takes at most
a quarter of the room left, so processes cannot starve each other."""
MAX_LEASE = 128
"""Most places asked for in one call."""
USED_FLUSH = 1.0
"""Seconds after a spare is taken into use before its re-lease is sent (a request that
lands sooner needs none: its landing takes its ticket out)."""
SPARE_TTL = LEASE + USED_FLUSH + 2 * STORAGE_TIMEOUT + 1.0
"""Seconds Redis keeps a leased place nobody took into use: past its use here
(:data:`LEASE`), the wait for its re-lease (:data:`USED_FLUSH`) and two background sends
(the one on its way, then the one re-leasing it), each bounded by the storage timeout,
with a second to spare."""


def granted(want: int, room: int, held: int = 0, used: int = 1) -> int:
    """Places a call asking for ``want`` is granted. ``room``: the least room of the
    windows (``amount − used slots − in_flight``, the asking process's spares counted in
    flight); ``held``: those spares; ``used``: 1 for a caller that needs its own place
    now, 0 for a lease asked ahead. The largest ``k`` of ``want, want/2, want/4, ...``
    (``k >= 2``) with ``SPREAD · (held + k) <= room + held`` (the process then holds at
    most ``1/SPREAD`` of the room it finds, its own spares counted as room), else
    ``used`` if ``room >= 1``, else 0 (a caller then waits). ``quota_board.lua`` applies
    this rule; a test checks it does."""
    k = want
    while k >= 2:
        if SPREAD * (held + k) <= room + held:
            return k
        k //= 2
    return used if room >= 1 else 0


class Lease:
    """One key's spares (tickets boarded in Redis, not yet used, each with the loop time
    until which it may be used), the timer that hands back those past it, whether a lease
    call is on its way (``asking``), and the demand count (see the module docstring)."""

    __slots__ = ("asking", "current", "previous", "spare", "start", "timer")

    def __init__(self, now: float) -> None:
        self.spare: deque[tuple[str, float]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.asking = False
        self.start = now
        self.current = 0
        self.previous = 0

    def keep(self, tickets: list[str], asked: float) -> None:
        """Hold ``tickets``, leased by a call made at ``asked``, until ``asked + LEASE``."""
        until = asked + LEASE
        self.spare.extend((ticket, until) for ticket in tickets)

    def take(self, now: float) -> str | None:
        """The oldest spare still usable at ``now`` (those past it stay, for :meth:`stale`)."""
        spare = self.spare
        if spare and now < spare[0][1]:
            return spare.popleft()[0]
        return None

    def stale(self, now: float) -> list[str]:
        """Take out the spares no longer usable at ``now`` (to be handed back)."""
        spare, gone = self.spare, []
        while spare and spare[0][1] <= now:
            gone.append(spare.popleft()[0])
        return gone

    def clear(self) -> list[str]:
        """Take out every spare (to be handed back)."""
        gone = [ticket for ticket, _ in self.spare]
        self.spare.clear()
        return gone

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
