"""Retry: re-send on transient statuses and network failures, with jitter and a budget.

Safe for APIs where a repeated POST creates a second record: a non-idempotent request
is re-sent only when the outcome proves the server did not process it.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterable
from typing import Any, NamedTuple

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .. import _clock, _deadline
from .._errors import BodyNotReplayable, CircuitOpenError, DeadlineExceeded
from .._headers import parse_retry_after
from .._keys import by_host
from .._outcomes import (
    IDEMPOTENT_METHODS,
    body_replayable,
    failure_reason,
    is_idempotent,
)
from .._policy import SLOW, Outcome, Policy
from .._validate import integer, number, optional_number, reject
from ..observe import _events, _metrics
from ..observe._stats import RetryStats
from ._attempt import AttemptClock
from ._backoff import Backoff, BackoffLike, DecorrelatedJitter, FullJitter, per_call_factory
from ._budget import Balance, RetryBudget

__all__ = [
    "ATTEMPT_TIMEOUT_REASON",
    "DEFAULT_ATTEMPTS",
    "DEFAULT_BACKOFF",
    "DEFAULT_BUDGET",
    "DEFAULT_CIRCUIT_WAIT",
    "DEFAULT_MAX_DELAY",
    "DEFAULT_STATUSES",
    "IDEMPOTENT_METHODS",
    "DecorrelatedJitter",
    "FullJitter",
    "Retry",
    "RetryBudget",
]

DEFAULT_ATTEMPTS = 4
"""Tries in total, the first included."""
DEFAULT_STATUSES = frozenset({502, 503, 504})
"""Statuses retried by default. 500 is not: it is a server bug, not a transient state."""
DEFAULT_BACKOFF = FullJitter(0.5, 30.0)
DEFAULT_BUDGET = RetryBudget(0.2, 10.0)
DEFAULT_MAX_DELAY = 300.0
"""Seconds: a server asking for a longer wait (``Retry-After``) gets its response back."""
DEFAULT_CIRCUIT_WAIT = 1.0
"""Seconds: a ``CircuitOpenError`` whose ``retry_after`` is at most this (a short break,
such as the default breaker's) is waited out and the call tried again; a longer break
fails fast. As long as the default ``CircuitBreaker(max_open_for=1)``."""
CIRCUIT_SPREAD = 0.5
"""The wait for a break to end is ``retry_after × (1 + CIRCUIT_SPREAD × U[0, 1))``: the
callers a break refused come back spread over half a break after it ends (its probe has
usually answered by then), not all at one loop instant. Outage benchmark, 100 calls/s:
with 0.1 the held calls reached the recovered server at 21× the call rate for 100 ms,
with 0.5 at 9× (first success and calls ok alike)."""

ATTEMPT_TIMEOUT_REASON = "attempt_timeout"
"""The ``reason`` of a ``retry_scheduled`` event (and the cause in a ``retry_gave_up``
reason) when the attempt was abandoned by ``attempt_timeout``."""

_NOT_PROCESSED_STATUSES = frozenset({429, 503})
"""Statuses that prove the server did not act on the request."""
_RETRY_AFTER_STATUSES = frozenset({429, 503})


def _statuses(value: Iterable[int]) -> frozenset[int]:
    """``value`` as a frozenset of plain ints (``HTTPStatus`` members accepted)."""
    try:
        items = list(value)
    except TypeError:
        items = [-1]
    if not all(isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in items):
        raise reject("Retry", "statuses", "HTTP status codes 100..599", value)
    return frozenset(int(s) for s in items)


class Retry(Policy):
    """Retry ``statuses`` and transient network failures with backoff, within a budget.

    - ``attempts`` (default 4) counts the first try; ``attempts=1`` never retries.
    - ``statuses`` (default 502, 503, 504) are retried; 500 is not by default.
    - ``backoff``: :class:`FullJitter` (default), :class:`DecorrelatedJitter`, a tenacity
      wait strategy, or an ``(attempt) -> seconds`` callable; waits above ``max_delay``
      are clamped to it.
    - ``Retry-After`` on 429/503 (seconds or HTTP-date) is honoured: wait
      max(server delay, backoff). A server delay above ``max_delay`` (default 300 s) or
      beyond the caller's allowance returns the response at once.
    - ``budget``: a :class:`RetryBudget` (default ratio 0.2, 10/s); ``None`` disables it.
      A retry the budget does not cover is not made.
    - ``circuit_wait`` (default 1 s; ``0``: never): a ``CircuitOpenError`` from an inner
      ``CircuitBreaker`` whose break ends within ``0 < retry_after <= circuit_wait`` is
      waited out, then the call is tried again (see "Short breaks" below).
    - ``attempt_timeout`` (default ``None``: no bound of Retry's own): seconds one attempt
      may take to deliver its response headers (see "Attempt timeout" below).

    Idempotency: GET, HEAD, OPTIONS, TRACE, PUT, DELETE, and any request carrying an
    ``Idempotency-Key`` header, are retried on every listed status and on transient
    network failures. Other requests (POST, PATCH) are re-sent only when the outcome
    proves they were not processed: 429, 503, or a failure to connect before anything
    was sent; never after a read timeout, a dropped connection, 500, 502 or 504.

    Short breaks: a call refused by an open circuit sent nothing, so any method may be
    tried again. When ``retry_after`` is at most ``circuit_wait`` and the wait,
    ``retry_after × (1 + U[0, 0.5))`` (jittered so the refused callers do not all come
    back at the instant the break ends), fits within ``max_delay`` and the caller's
    allowance, Retry waits it out and tries again; otherwise (a long break, a
    ``retry_after`` of 0 as ``mode="adaptive"`` gives, no time left) the
    ``CircuitOpenError`` propagates at once. Each refusal uses one of the ``attempts``,
    so a long outage still fails a call after at most ``attempts - 1`` breaks. The
    budget is spent only by requests that may reach the wire a second time: the attempt
    after a break costs nothing while the call has sent nothing yet, and a retry the
    breaker refuses again is given back to the budget. TLS errors and other
    ``ResilienceError`` are never retried.

    Attempt timeout: an attempt that has not delivered its response headers
    ``attempt_timeout`` seconds after it was sent is abandoned (cancelled; aiohttp closes
    its connection) and counts as a read timeout: ``aiohttp.SocketTimeoutError``, what
    aiohttp raises when ``sock_read`` runs out, retried for idempotent requests only (a
    POST without ``Idempotency-Key`` is never sent again; the caller gets the error).
    The clock measures the attempt as sent: it holds while a policy inside Retry waits
    its turn (Throttle, ConcurrencyLimit, a RateLimitBackoff pause) and starts afresh
    when the wait ends (details in :mod:`resilient.retry._attempt`). It never runs past the
    caller's allowance: an attempt still without headers when the deadline or the
    session's total timeout comes is abandoned with ``DeadlineExceeded``.

    Outcomes: giving up on a status returns the last response unchanged (readable);
    after the last network failure the original aiohttp exception propagates. A wait
    that would end past the caller's allowance (``resilient.deadline()``, the session's
    total timeout) is not started: the last response is returned, or
    ``DeadlineExceeded`` is raised from the last exception. A body that cannot be sent
    again (an async generator already read) raises ``BodyNotReplayable``: it is not
    buffered. Every discarded response is released before the wait.

    The loop after a first attempt, one retry per pass: classify the outcome (a plan:
    reason and wait, or why not), check the wait against the caller's allowance, the
    body and the budget, release the discarded response, wait, attempt again; any step
    that says no gives up. In a :func:`resilient.chain` without an
    ``attempt_timeout`` (or telemetry) the pipeline makes the first attempt:
    :meth:`before` counts it in the budget, :meth:`after` lets stand what ``__call__``
    would hand on as it is, and :meth:`resume` runs the same loop from its outcome.
    """

    __slots__ = (
        "_attempt_timeout",
        "_attempts",
        "_backoff",
        "_balance",
        "_budget",
        "_circuit_wait",
        "_max_delay",
        "_new_backoff",
        "_statuses",
    )

    kind = "retry"
    order = 10

    def __init__(
        self,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        statuses: Iterable[int] = DEFAULT_STATUSES,
        backoff: BackoffLike = DEFAULT_BACKOFF,
        budget: RetryBudget | None = DEFAULT_BUDGET,
        max_delay: float = DEFAULT_MAX_DELAY,
        circuit_wait: float = DEFAULT_CIRCUIT_WAIT,
        attempt_timeout: float | None = None,
    ) -> None:
        attempts = integer("Retry", "attempts", attempts, 1)
        if budget is not None and not isinstance(budget, RetryBudget):
            raise reject("Retry", "budget", "a RetryBudget or None", budget)
        max_delay = number("Retry", "max_delay", max_delay, 0.0, math.inf, high_open=True)
        circuit_wait = number("Retry", "circuit_wait", circuit_wait, 0.0, math.inf, high_open=True)
        attempt_timeout = optional_number(
            "Retry", "attempt_timeout", attempt_timeout, 0.0, math.inf,
            low_open=True, high_open=True, none_means="no bound",
        )  # fmt: skip
        self._attempts = attempts
        self._attempt_timeout = attempt_timeout
        self._statuses = _statuses(statuses)
        self._backoff = backoff
        self._new_backoff = per_call_factory(backoff)
        self._budget = budget
        self._balance = Balance(budget) if budget is not None else None
        self._max_delay = max_delay
        self._circuit_wait = circuit_wait

    @property
    def attempts(self) -> int:
        return self._attempts

    @property
    def statuses(self) -> frozenset[int]:
        return self._statuses

    @property
    def backoff(self) -> BackoffLike:
        return self._backoff

    @property
    def budget(self) -> RetryBudget | None:
        return self._budget

    @property
    def max_delay(self) -> float:
        return self._max_delay

    @property
    def circuit_wait(self) -> float:
        return self._circuit_wait

    @property
    def attempt_timeout(self) -> float | None:
        return self._attempt_timeout

    def __repr__(self) -> str:
        return (
            f"Retry(attempts={self._attempts}, statuses={sorted(self._statuses)},"
            f" backoff={self._backoff!r}, budget={self._budget!r},"
            f" max_delay={self._max_delay!r}, circuit_wait={self._circuit_wait!r},"
            f" attempt_timeout={self._attempt_timeout!r})"
        )

    def stats(self) -> RetryStats:
        """The retry budget's window now (call it inside the event loop)."""
        if self._balance is None:
            return RetryStats(0, 0, None)
        firsts, retries, left = self._balance.totals(_clock.now())
        return RetryStats(firsts, retries, left)

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        if _metrics.recorder is not None and _metrics.outside(self):
            return await _metrics.counted(self, by_host(request), request, handler)
        now = _clock.now_for(request)
        started = _deadline.mark_start(request, now)  # earlier for a re-sent hop of the call
        balance = self._balance
        if balance is not None:
            balance.deposit(now)  # in the bucket of now: each hop counts when it goes
        seconds = self._attempt_timeout
        clock = None if seconds is None else AttemptClock(request, started, seconds)
        try:
            resp = await (handler(request) if clock is None else clock.run(handler, request))
        except aiohttp.ClientError as exc:
            if self._stands(request, exc):
                raise
            return await _Call(self, request, handler, started, clock, exc).run()
        if resp.status not in self._statuses:
            return resp
        return await _Call(self, request, handler, started, clock, resp).run()

    def before(self, request: ClientRequest, key: str | None, now: float) -> Any:
        """The call's start (the ticket), the first attempt counted in the budget; SLOW
        with an ``attempt_timeout`` (its clock wraps the attempt)."""
        if self._attempt_timeout is not None:
            return SLOW
        balance = self._balance  # (the pipeline marks the call before resume)
        if balance is not None:
            balance.deposit(now)
        return now

    def after(self, ticket: float, request: ClientRequest, outcome: Outcome) -> bool:
        """True when ``__call__`` would hand the first attempt's outcome on as it is (a
        status not retried, an error not retried, a cancellation); False: :meth:`resume`."""
        if isinstance(outcome, ClientResponse):
            return outcome.status not in self._statuses
        return not isinstance(outcome, aiohttp.ClientError) or self._stands(request, outcome)

    async def resume(
        self, ticket: float, request: ClientRequest, rest: ClientHandlerType, outcome: Outcome
    ) -> ClientResponse:
        """The retry loop from the first attempt's ``outcome``, the call started at
        ``ticket``: what ``__call__`` does after its first attempt."""
        if not isinstance(outcome, ClientResponse | aiohttp.ClientError):
            raise outcome  # pragma: no cover - after() lets every other outcome stand
        return await _Call(self, request, rest, ticket, None, outcome).run()

    def _stands(self, request: ClientRequest, exc: aiohttp.ClientError) -> bool:
        """The first attempt's ``exc`` is raised as it is: one attempt only, or neither a
        retryable failure nor a short circuit break."""
        return self._attempts == 1 or (
            failure_reason(request, exc) is None and self._break(exc) is None
        )

    def _break(self, exc: aiohttp.ClientError) -> float | None:
        """``retry_after`` of a ``CircuitOpenError`` whose break Retry waits out (``0 <
        retry_after <= circuit_wait``), else ``None``."""
        if isinstance(exc, CircuitOpenError) and 0.0 < exc.retry_after <= self._circuit_wait:
            return exc.retry_after
        return None


class _Plan(NamedTuple):
    """The retry to come: its reason (the event's), the wait before it, and whether that
    waits out a circuit break (then nothing was sent yet)."""

    reason: str
    delay: float
    broken: bool


class _Call:
    """One call past its first attempt (the slow path): the retry loop as named steps, and
    the state they share. ``resp`` / ``exc``: the last attempt's outcome; ``sent``: a
    request of this call reached the wire (a ``CircuitOpenError`` sends nothing)."""

    __slots__ = (
        "backoff",
        "charged",
        "clock",
        "exc",
        "handler",
        "key",
        "policy",
        "request",
        "resp",
        "sent",
        "started",
        "withdrawn",
    )

    def __init__(
        self,
        policy: Retry,
        request: ClientRequest,
        handler: ClientHandlerType,
        started: float,
        clock: AttemptClock | None,
        first: ClientResponse | aiohttp.ClientError,
    ) -> None:
        self.policy = policy
        self.request = request
        self.handler = handler
        self.started = started
        self.clock = clock
        self.key = by_host(request)
        self.resp: ClientResponse | None = None
        self.exc: aiohttp.ClientError | None = None
        if isinstance(first, ClientResponse):
            self.resp = first
        else:
            self.exc = first
        self.sent = not isinstance(first, CircuitOpenError)
        self.backoff: Backoff | None = None  # per-call strategy state, built on the first retry
        self.charged: Balance | None = None  # the budget this retry was counted in
        self.withdrawn = 0.0  # when it was counted there

    async def run(self) -> ClientResponse:
        """Retry until an outcome stands or a step gives up; the loop of the class
        docstring of :class:`Retry`."""
        attempts = self.policy._attempts
        for attempt in range(1, attempts):  # attempt: the number of the retry to come
            plan = self.classify(attempt)
            if isinstance(plan, str):
                return self.give_up(attempt, plan)
            if plan.delay > _deadline.allowance(self.request, self.started):
                return self.out_of_time(attempt, plan)
            if not body_replayable(self.request):
                raise self.unreplayable(attempt, plan)
            if not self.spend():
                return self.give_up(attempt, "retry budget exhausted")
            status = self.discard(attempt, plan)
            await self.wait(plan.delay, status)
            final = await self.attempt()
            if final is not None:
                return final
        return self.give_up(attempts, "attempts exhausted")

    def classify(self, attempt: int) -> _Plan | str:
        """The plan of retry ``attempt`` from the last outcome, or why there is none.

        A short circuit break is waited out: ``retry_after × (1 + CIRCUIT_SPREAD ×
        U[0, 1))``. A retryable status or error waits ``max(backoff(attempt),
        Retry-After)``, the backoff clamped to ``[0, max_delay]``; a ``Retry-After`` above
        ``max_delay`` gives up."""
        policy, resp, exc = self.policy, self.resp, self.exc
        max_delay = policy._max_delay
        refused = None if exc is None else policy._break(exc)
        if refused is not None:
            delay = refused * (1.0 + CIRCUIT_SPREAD * random.random())
            if delay > max_delay:
                return "circuit break beyond max_delay"
            return _Plan("circuit open", delay, True)
        reason = _reason(self.request, resp, exc)
        if reason is None:
            return "not retryable"
        if self.timed_out():
            reason = ATTEMPT_TIMEOUT_REASON
        if self.backoff is None:
            self.backoff = policy._new_backoff()
        wait = _wait_time(resp, _clamp(self.backoff(attempt), max_delay), max_delay)
        if wait is None:
            return "server delay beyond max_delay"
        return _Plan(reason, wait, False)

    def out_of_time(self, attempt: int, plan: _Plan) -> ClientResponse:
        """The wait would end past the caller's allowance: a break's refusal stands (re-
        raised); else the last response is returned, or ``DeadlineExceeded`` raised from
        the last error."""
        if plan.broken:
            return self.give_up(attempt, "deadline")
        self.gave_up(attempt, "deadline")
        if self.resp is not None:
            return self.resp
        raise DeadlineExceeded(
            f"retry: the next attempt ({plan.delay:.3f}s away) would start after"
            " the caller's deadline or the session's total timeout"
        ) from self.exc

    def unreplayable(self, attempt: int, plan: _Plan) -> BodyNotReplayable:
        """The error for a body that cannot be sent again (a one-shot stream already
        read), caused by the last error; the last response is released."""
        self.gave_up(attempt, "body not replayable")
        if self.resp is not None:
            self.resp.release()
        error = BodyNotReplayable(
            f"retry: {plan.reason} needs the request sent again, but its body was a"
            " one-shot stream that was already read"
        )
        error.__cause__ = self.exc
        return error

    def spend(self) -> bool:
        """Count the retry in the budget now; False when the budget does not cover it.
        A call that has sent nothing yet spends nothing: its next attempt is its first
        request on the wire, not a repeat of one."""
        self.withdrawn = _clock.now()
        charged = self.charged = self.policy._balance if self.sent else None
        return charged is None or charged.withdraw(self.withdrawn)

    def discard(self, attempt: int, plan: _Plan) -> int | None:
        """Release the response given up (its status is returned; None after an error)
        and announce retry ``attempt`` (``retry_scheduled``)."""
        resp = self.resp
        status = None if resp is None else resp.status
        if resp is not None:
            resp.release()
        _events.emit(
            "retry_scheduled", "retry", self.key, self.request,
            attempt=attempt, delay=plan.delay, status=status, reason=plan.reason,
        )  # fmt: skip
        return status

    async def wait(self, delay: float, status: int | None) -> None:
        """Sleep ``delay``; a caller cancelled meanwhile never sends its retry, so the
        retry goes back to the budget."""
        with _metrics.waiting("retry", self.key, status):
            try:
                await _clock.sleep(delay)
            except asyncio.CancelledError:
                if self.charged is not None:
                    self.charged.refund(self.withdrawn)
                raise

    async def attempt(self) -> ClientResponse | None:
        """Send the request again (under the attempt clock, if any): the response that
        ends the call (a status not retried), else None with the outcome kept. A retry an
        open circuit refuses sent nothing: it goes back to the budget."""
        clock = self.clock
        try:
            if clock is None:
                resp = await self.handler(self.request)
            else:
                resp = await clock.run(self.handler, self.request)
        except aiohttp.ClientError as error:
            self.resp, self.exc = None, error
            if not isinstance(error, CircuitOpenError):
                self.sent = True
            elif self.charged is not None:
                self.charged.refund(self.withdrawn)
            return None
        self.resp, self.exc = resp, None
        if resp.status not in self.policy._statuses:
            return resp
        self.sent = True
        return None

    def give_up(self, attempts: int, why: str) -> ClientResponse:
        """Announce the end after ``attempts`` (``retry_gave_up``); hand back the last
        response unchanged, or re-raise the last exception."""
        self.gave_up(attempts, why)
        if self.resp is not None:
            return self.resp
        exc, self.exc = self.exc, None
        assert exc is not None
        try:
            raise exc
        finally:
            del exc  # no cycle through the traceback's frame

    def gave_up(self, attempts: int, why: str) -> None:
        """Emit ``retry_gave_up``: ``attempts`` made, the last status or error, and why."""
        resp, exc = self.resp, self.exc
        status = None if resp is None else resp.status
        if resp is None and exc is not None:
            cause = ATTEMPT_TIMEOUT_REASON if self.timed_out() else type(exc).__name__
            why = f"{why} ({cause})"
        _events.emit(
            "retry_gave_up", "retry", self.key, self.request,
            attempt=attempts, status=status, reason=why,
        )  # fmt: skip

    def timed_out(self) -> bool:
        """The last attempt was abandoned by ``attempt_timeout``."""
        clock = self.clock
        return clock is not None and self.exc is not None and self.exc is clock.error


def _reason(
    request: ClientRequest, resp: ClientResponse | None, exc: aiohttp.ClientError | None
) -> str | None:
    """Why this outcome may be retried, or ``None`` (see the class docstring of
    :class:`Retry`): a listed status for an idempotent request or one proving the request
    was not processed (429, 503); a retryable failure (:func:`failure_reason`)."""
    if resp is None:
        return None if exc is None else failure_reason(request, exc)
    status = resp.status
    if status in _NOT_PROCESSED_STATUSES or is_idempotent(request):
        return f"status {status}"
    return None


def _wait_time(resp: ClientResponse | None, backoff: float, max_delay: float) -> float | None:
    """max(backoff, Retry-After of a 429/503); ``None`` if the server asks for > max_delay."""
    if resp is None or resp.status not in _RETRY_AFTER_STATUSES:
        return backoff
    server = parse_retry_after(resp.headers.get("Retry-After"), now=_clock.wall())
    if server is None:
        return backoff
    return None if server > max_delay else max(backoff, server)


def _clamp(delay: float, max_delay: float) -> float:
    """A backoff's delay within [0, max_delay] (NaN and negatives -> 0)."""
    return min(delay, max_delay) if delay > 0.0 else 0.0
