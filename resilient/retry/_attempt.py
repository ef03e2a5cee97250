"""The clock of one attempt under ``Retry(attempt_timeout=...)``.

An attempt is one call of Retry's handler: everything inside Retry in the chain, down to
the response headers. Its clock bounds the attempt *as sent*, like Polly's per-attempt
timeout placed innermost or gRPC's per-attempt deadline:

- It **holds while a policy inside Retry waits its turn**: a Throttle token or quota
  window, a ConcurrencyLimit queue, a RateLimitBackoff pause or paced departure (every
  wait a policy reports through :class:`resilient.observe._metrics.waiting`). When such a wait
  ends, the clock **starts afresh**: ``attempt_timeout`` is measured from the moment the
  request leaves the last queue it waited in, so a request that waited 10 s for a token
  still has the whole ``attempt_timeout`` on the wire, and a RateLimitBackoff re-send
  after a 429 (a new request on the wire) gets the whole ``attempt_timeout`` again.
- What it counts: connecting (aiohttp's pool and DNS included), sending, waiting for the
  response headers, and the little the inner policies do besides waiting (a round trip
  to a shared Redis store, bounded by its storage timeout).
- It never runs past the caller's allowance (:func:`resilient.deadline`, the session's
  ``timeout.total``): each (re)start arms it at ``now + min(attempt_timeout,
  allowance)``.

When it fires, the attempt is cancelled the way ``asyncio.timeout`` cancels (the inner
policies and aiohttp see a cancellation: aiohttp closes the connection, a slot or token
held inside is handed back), and Retry gets ``aiohttp.SocketTimeoutError`` (what aiohttp
raises when ``sock_read`` runs out: a read timeout, so it is retried for idempotent
requests only), or ``DeadlineExceeded`` when it was the caller's allowance that ran out.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .. import _clock, _deadline
from .._errors import DeadlineExceeded

__all__ = ["AttemptClock", "current", "timed_out"]

current: ContextVar[AttemptClock | None] = ContextVar("resilient_attempt", default=None)
"""The attempt clock of the Retry attempt this task is in (None outside one)."""


class AttemptClock:
    """One Retry call's attempt clock: :meth:`run` makes one attempt under it.

    ``error``: the ``SocketTimeoutError`` of the last attempt it abandoned (None if the
    last attempt was not abandoned), so Retry can tell its own timeout from aiohttp's.
    """

    __slots__ = ("by_deadline", "depth", "error", "request", "seconds", "started", "task", "timer")

    def __init__(self, request: ClientRequest, started: float, seconds: float) -> None:
        self.request = request
        self.started = started
        self.seconds = seconds
        self.by_deadline = False
        self.depth = 0
        self.error: aiohttp.SocketTimeoutError | None = None
        self.task: asyncio.Task[object] | None = None
        self.timer: asyncio.Timeout | None = None

    def _end(self) -> float:
        """Loop time at which the attempt is abandoned if it started now."""
        left = _deadline.allowance(self.request, self.started)
        self.by_deadline = left < self.seconds
        return _clock.now() + (left if self.by_deadline else self.seconds)

    async def run(self, handler: ClientHandlerType, request: ClientRequest) -> ClientResponse:
        """``await handler(request)``, abandoned when the clock runs out."""
        self.error, self.depth, self.task = None, 0, asyncio.current_task()
        token = current.set(self)
        try:
            async with asyncio.timeout_at(self._end()) as timer:
                self.timer = timer
                return await handler(request)
        except TimeoutError:
            if not timer.expired():
                raise  # aiohttp's own read timeout, or another TimeoutError: not ours
            if self.by_deadline:
                raise DeadlineExceeded(
                    "retry: no response headers before the caller's deadline or the"
                    " session's total timeout (the attempt was abandoned)"
                ) from None
            error = self.error = aiohttp.SocketTimeoutError(
                f"no response headers within attempt_timeout={self.seconds!r}s"
            )
            raise error from None
        finally:
            current.reset(token)
            self.timer = self.task = None

    def hold(self) -> bool:
        """A policy inside the attempt starts waiting: stop the clock. False when the
        wait is not this attempt's (another task: a copy running in a copied context)."""
        if self.task is not asyncio.current_task():
            return False
        self.depth += 1
        timer = self.timer
        if self.depth == 1 and timer is not None and not timer.expired():
            timer.reschedule(None)
        return True

    def resume(self) -> None:
        """The wait is over: the clock starts afresh (the request is on its way)."""
        self.depth -= 1
        timer = self.timer
        if self.depth == 0 and timer is not None and not timer.expired():
            timer.reschedule(self._end())


def timed_out() -> bool:
    """True while the attempt this task is in is being abandoned by its clock (for an
    inner policy that wants to count the cancellation it sees as a read timeout)."""
    attempt = current.get()
    if attempt is None or attempt.task is not asyncio.current_task():
        return False
    timer = attempt.timer
    return timer is not None and timer.expired()
