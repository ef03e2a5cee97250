"""The per-key pause gate: one shared 429 pause, then exactly one probe.

After a 429 the gate of the key *closes*: no caller may send until the pause ends
(``until``, loop time). Callers wait in one FIFO queue. When the pause ends, the
caller at the head of the queue becomes the **probe** and sends; everyone else
keeps waiting until the probe's answer is known:

- not a 429   -> :meth:`PauseGate.open`: every waiter is released at once;
- a 429       -> :meth:`PauseGate.pause` again: a new (longer) pause, same queue;
- an error, or the probing caller is cancelled -> :meth:`PauseGate.probe_failed`:
  the head of the queue becomes the probe at once.

A caller that leaves the queue (cancelled, or its wait grew too long) wakes the
others, so no role is orphaned and the key never stays blocked.

The gate also holds the key's closed loop (see :mod:`resilient.ratelimit._learned`): its learned
rate, its streak of 429s (the backoff floor belongs to the key: a success ends the
streak), and its departure queue. Once a key is paced, callers leave one by one
(:meth:`PauseGate.depart`), ``1/r`` seconds apart, so the waiters released by a probe
go at the learned rate, never all at once. An advertised limit with little left paces
the key the same way, at what is left over the time to its reset, once its queued
callers have gone at once (:meth:`PauseGate.spread_over`). Every state change
wakes every waiter, and each re-reads the state; waiters sleep only on their own
future (with a timer for the pause end or the caller's limit), never on a lock.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from .. import _clock
from .._clock import DUE_SLACK
from ._learned import LearnedRate

__all__ = ["MAX_PAUSE", "PauseGate", "PauseTooLong"]

MAX_PAUSE = 7 * 86_400.0
"""No key is paused longer than this (seconds), whatever a server says; a longer or
infinite retry time still makes every caller give up at once (it exceeds any wait)."""

_EPSILON = 1e-3
"""A caller with less than this many seconds left of its limit stops waiting."""


class PauseTooLong(Exception):
    """The key stays paused beyond the caller's limit; ``retry_after`` seconds remain."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class _Waiter:
    """One caller in the queue: a future to wake it, re-created for every wait."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def wake(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Until :meth:`wake`, or for ``seconds`` (``inf``: no timer)."""
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        timer = loop.call_later(max(seconds, 0.0), self.wake) if seconds < math.inf else None
        try:
            await future
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()


class PauseGate:
    """The pause state of one key. ``closed`` is the hot-path check (no clock read).

    ``closed``: True from a 429 until a probe's answer is not a 429.
    ``until``: loop time the current pause ends (a later 429 only extends it).
    ``probing``: a probe is on the wire.
    ``learned``: the key's learned rate (None until its first 429 or advertised limit).
    ``streak``: the key's 429s since its last success (the backoff floor's exponent).
    ``next_slot``: loop time the next paced departure is due (see :meth:`depart`).
    With shared storage the rate and the departures live in Redis: ``shared_rate`` is
    the key's rate there as last heard (0.0: not paced), ``cuts_seen`` its cuts.
    """

    __slots__ = (
        "_departures",
        "_waiters",
        "burst",
        "closed",
        "cuts_seen",
        "flying",
        "learned",
        "next_slot",
        "probing",
        "shared_rate",
        "spare",
        "spread",
        "spread_until",
        "streak",
        "until",
    )

    def __init__(self) -> None:
        self.closed = False
        self.probing = False
        self.until = 0.0
        self.learned: LearnedRate | None = None
        self.streak = 0
        self.flying = 0
        """Requests of the key on the wire (counted once the key has a gate)."""
        self.next_slot = 0.0
        self.spread = math.inf
        """An advertised limit's rate (remaining / seconds to its reset) ..."""
        self.spread_until = 0.0
        """... until this loop time (its reset)."""
        self.burst = 0
        """Queued callers that may leave at once, before the spread's spacing ..."""
        self.spare = 0
        """... and what the spread's first reading left for them (:meth:`spread_over`)."""
        self.shared_rate = 0.0
        self.cuts_seen = 0
        self._waiters: deque[_Waiter] = deque()
        self._departures: deque[_Waiter] | None = None  # created by the first queued caller

    @property
    def paced(self) -> bool:
        """Callers take departure slots (a learned rate, here or in Redis, or an
        advertised spread)."""
        return self.learned is not None or self.spread_until > 0.0 or self.shared_rate > 0.0

    def learn(self, now: float, ceiling: float = math.inf) -> LearnedRate:
        """The key's learned rate, created on first use."""
        learned = self.learned
        if learned is None:
            learned = self.learned = LearnedRate(now, ceiling)
        return learned

    def rate(self, now: float) -> float:
        """The key's send rate now: the learned rate, or the advertised spread if lower
        (``inf``: not paced)."""
        learned = self.learned
        rate = math.inf if learned is None else learned.rate(now)
        if self.shared_rate:
            rate = self.shared_rate
        if self.spread_until:
            if now >= self.spread_until:  # the advertised reset: one probe reads the rest
                self.spread, self.spread_until, self.burst = math.inf, 0.0, 0
                self._probe_first(now)
            elif self.spread < rate:
                rate = self.spread
        return rate

    def slot_free(self, now: float) -> bool:
        """Whether a caller may leave at ``now`` without waiting: nobody queued for a
        departure, the next slot due, and no advertised reset due (whose probe goes first,
        see :meth:`rate`)."""
        return (
            not self._departures
            and self.next_slot <= now + DUE_SLACK
            and (not self.spread_until or now < self.spread_until)
        )

    def leave(self, now: float) -> None:
        """A caller leaves at ``now`` (its slot was due): the next slot is ``1/r(now)`` later,
        or still due while a burst of :meth:`spread_over` lasts."""
        rate = self.rate(now)
        if self.burst:
            self.burst -= 1
            self.spare -= 1
            if self.burst:
                return
        self.next_slot = now + 1.0 / rate

    def queued(self) -> int:
        """Callers of the key waiting to send: in the pause's queue or for a departure."""
        return len(self._waiters) + (len(self._departures) if self._departures else 0)

    def spread_over(self, left: int, seconds: float, now: float, *, burst: bool) -> None:
        """An advertised limit leaves ``left`` (> 0) requests for the next ``seconds``: they
        go at ``left / seconds`` until then. ``burst``: the callers already queued go at
        once instead, up to ``left`` and, over one spread, up to what its first reading
        left (``spare``: a reading that never counts down frees no more); the spacing
        resumes after them. Spacing them would only make them wait: the callers who come
        later queue behind them either way."""
        if self.spread_until <= now:  # no spread running: this reading starts one
            self.spare = left
        self.spread = left / seconds
        self.spread_until = now + seconds
        self.burst = min(left, self.queued(), self.spare) if burst and not self.closed else 0
        if not self.burst:
            self.next_slot = max(self.next_slot, now + 1.0 / self.spread)
        elif self.next_slot > now:
            self.next_slot = now
            if self._departures:
                self._departures[0].wake()  # the head sleeps until the old slot

    def end_spread(self, now: float) -> None:
        """The advertised limit is spent: its spread ends (a pause until its reset takes
        over), and callers asleep until a spread slot wake to wait for the pause instead
        (its probe's answer sets the next slot, :meth:`open`)."""
        self.spread, self.spread_until, self.burst = math.inf, 0.0, 0
        slot = now + 1.0 / self.rate(now)
        if self.next_slot > slot:
            self.next_slot = slot
            if self._departures:
                self._departures[0].wake()

    async def depart(self, latest: float) -> None:
        """Wait for this caller's departure at the key's rate, first come first served.

        Only the head of the departure queue sleeps, until ``next_slot``; when it leaves,
        ``next_slot = now + 1/r(now)``, so the rate is read at each departure (a rate that
        grows, or an advertised spread, applies at once). :class:`PauseTooLong` as soon as
        the departure would come after ``latest`` (the caller has sent nothing)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        queue = self._departures
        if not queue and self.next_slot <= now + DUE_SLACK:
            self.leave(now)
            return
        if queue is None:
            queue = self._departures = deque()
        waiter = _Waiter()
        queue.append(waiter)
        try:
            while True:
                now = loop.time()
                if queue[0] is waiter:
                    wait = self.next_slot - now
                    if wait <= DUE_SLACK:
                        break
                    if self.next_slot > latest:
                        raise PauseTooLong(wait)
                    await waiter.wait(wait)
                else:
                    if latest - now < _EPSILON:
                        raise PauseTooLong(max(0.0, self.next_slot - now))
                    await waiter.wait(latest - now)
            self.leave(now)
        finally:
            head = queue[0] is waiter
            queue.remove(waiter)
            if head and queue:
                queue[0].wake()

    def remaining(self) -> float:
        """Seconds until the pause ends (0 if open or already due)."""
        return max(0.0, self.until - _clock.now()) if self.closed else 0.0

    def waiting(self) -> int:
        """How many callers wait in the queue (the probe on the wire not included)."""
        return len(self._waiters)

    def is_idle(self) -> bool:
        """Nothing to remember: no waiter, no probe, nothing in flight, no pause still
        running and no departure still due (a learned rate is evicted with its key)."""
        now = _clock.now()
        return (
            not self._waiters
            and not self._departures
            and not self.flying
            and not self.probing
            and (not self.closed or self.until <= now)
            and (not self.paced or self.next_slot <= now)
        )

    def pause(self, delay: float, *, probe: bool) -> float:
        """A 429 asked for ``delay`` seconds: close the gate until at least
        ``now + min(delay, MAX_PAUSE)``; ``probe``: the 429 answered the probe.
        Returns the seconds the pause still lasts."""
        now = _clock.now()
        self.closed = True
        self.until = max(self.until, now + min(delay, MAX_PAUSE))
        self.burst = 0
        if probe:
            self.probing = False
        self._wake_all()
        return self.until - now

    def _probe_first(self, now: float) -> None:
        """An advertised reset has come: close the gate for a zero-length pause, so one
        probe goes first and its answer tells how much the reset freed (all of a fixed
        window, one slot of a moving one), instead of every waiter going at once."""
        if not self.closed:
            self.closed = True
            self.until = now

    def open(self) -> None:
        """The probe's answer was not a 429 (the first accepted response sending resumes
        with): every waiter may go (through :meth:`depart`, so a paced key releases them
        one by one); the streak ends."""
        self.closed = False
        self.probing = False
        self.streak = 0
        now = _clock.now()
        if self.learned is not None:
            self.learned.resume(now)
            self.learned.accepted(now)  # the probe's answer
        self.next_slot = now + 1.0 / self.rate(now)  # the probe just left
        self._wake_all()

    def probe_failed(self) -> None:
        """The probe raised or was cancelled: the head of the queue probes instead."""
        self.probing = False
        self._wake_all()

    async def wait_turn(
        self, latest: float, hard: float | None = None, *, front: bool = False
    ) -> bool:
        """Wait until this caller may send: ``True`` as the probe, ``False`` when open.

        ``latest``: the pause must end by this loop time (``max_wait`` and the caller's
        allowance); :class:`PauseTooLong` is raised as soon as it would end later.
        ``hard``: the loop time the caller must stop waiting altogether (its deadline or
        aiohttp's total timeout; default ``latest``): a pause that ended in time may
        overrun ``latest`` by the probe's round trip, never ``hard``. ``front``: queue at
        the head (a caller whose own request just got the 429 probes first).
        """
        if hard is None:
            hard = latest
        waiter = _Waiter()
        if front:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            while self.closed:
                now = _clock.now()
                head = self._waiters[0] is waiter and not self.probing
                if head and self.until <= now + DUE_SLACK:
                    self.probing = True
                    return True
                if self.until > latest or hard - now < _EPSILON:
                    raise PauseTooLong(max(0.0, self.until - now))
                await waiter.wait((self.until if head else hard) - now)
            return False
        finally:
            self._waiters.remove(waiter)
            if self.closed and not self.probing:
                self._wake_all()  # a new head may have to take over

    def _wake_all(self) -> None:
        for waiter in self._waiters:
            waiter.wake()
