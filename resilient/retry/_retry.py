"""Retry: re-send on transient statuses and network failures, with jitter and a budget.

Safe for APIs where a repeated POST creates a second record: a non-idempotent request
is re-sent only when the outcome proves the server did not process it.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterable

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
from .._policy import Policy
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
        raise ValueError(f"Retry: statuses must be HTTP status codes 100..599, got {value!r}")
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
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ValueError(f"Retry: attempts must be an integer >= 1, got {attempts!r}")
        if budget is not None and not isinstance(budget, RetryBudget):
            raise ValueError(f"Retry: budget must be a RetryBudget or None, got {budget!r}")
        if (
            isinstance(max_delay, bool)
            or not isinstance(max_delay, (int, float))
            or not 0.0 <= max_delay < math.inf
        ):
            raise ValueError(
                f"Retry: max_delay must be a finite number >= 0 (seconds), got {max_delay!r}"
            )
        if (
            isinstance(circuit_wait, bool)
            or not isinstance(circuit_wait, (int, float))
            or not 0.0 <= circuit_wait < math.inf
        ):
            raise ValueError(
                "Retry: circuit_wait must be a finite number >= 0 (seconds; 0: never wait"
                f" for a circuit), got {circuit_wait!r}"
            )
        if attempt_timeout is not None and (
            isinstance(attempt_timeout, bool)
            or not isinstance(attempt_timeout, (int, float))
            or not 0.0 < attempt_timeout < math.inf
        ):
            raise ValueError(
                "Retry: attempt_timeout must be None (no bound) or a finite number > 0"
                f" (seconds), got {attempt_timeout!r}"
            )
        self._attempts = attempts
        self._attempt_timeout = None if attempt_timeout is None else float(attempt_timeout)
        self._statuses = _statuses(statuses)
        self._backoff = backoff
        self._new_backoff = per_call_factory(backoff)
        self._budget = budget
        self._balance = Balance(budget) if budget is not None else None
        self._max_delay = float(max_delay)
        self._circuit_wait = float(circuit_wait)

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
        started = _deadline.mark_start(request, _clock.now_for(request))
        balance = self._balance
        if balance is not None:
            balance.deposit(started)
        seconds = self._attempt_timeout
        clock = None if seconds is None else AttemptClock(request, started, seconds)
        try:
            resp = await (handler(request) if clock is None else clock.run(handler, request))
        except aiohttp.ClientError as exc:
            if self._attempts == 1 or (
                failure_reason(request, exc) is None and self._break(exc) is None
            ):
                raise
            return await self._retry(request, handler, started, None, exc, clock)
        if resp.status not in self._statuses:
            return resp
        return await self._retry(request, handler, started, resp, None, clock)

    async def _retry(
        self,
        request: ClientRequest,
        handler: ClientHandlerType,
        started: float,
        resp: ClientResponse | None,
        exc: aiohttp.ClientError | None,
        clock: AttemptClock | None,
    ) -> ClientResponse:
        """The slow path: ``resp`` or ``exc`` is the outcome of the attempt just made
        (under ``clock`` when there is an ``attempt_timeout``)."""
        backoff: Backoff | None = None  # per-call strategy state, built on the first retry
        key, made, why = by_host(request), self._attempts, "attempts exhausted"
        sent = resp is not None or not isinstance(exc, CircuitOpenError)  # the wire was used
        for attempt in range(1, self._attempts):  # attempt = number of this retry
            refused = None if exc is None else self._break(exc)
            if refused is not None:  # a short break: wait it out (nothing was sent)
                reason = "circuit open"
                delay = refused * (1.0 + CIRCUIT_SPREAD * random.random())
                if delay > self._max_delay:
                    made, why = attempt, "circuit break beyond max_delay"
                    break
            else:
                retryable = self._reason(request, resp, exc)
                if retryable is None:
                    made, why = attempt, "not retryable"
                    break
                if clock is not None and exc is not None and exc is clock.error:
                    retryable = ATTEMPT_TIMEOUT_REASON
                if backoff is None:
                    backoff = self._new_backoff()
                wait = _wait_time(resp, _clamp(backoff(attempt), self._max_delay), self._max_delay)
                if wait is None:  # the server asks for more than max_delay
                    made, why = attempt, "server delay beyond max_delay"
                    break
                reason, delay = retryable, wait
            if delay > _deadline.allowance(request, started):
                if refused is not None:  # nothing sent: the breaker's verdict stands
                    made, why = attempt, "deadline"
                    break
                _gave_up(request, key, attempt, resp, exc, "deadline", clock)
                if resp is None:
                    raise DeadlineExceeded(
                        f"retry: the next attempt ({delay:.3f}s away) would start after"
                        " the caller's deadline or the session's total timeout"
                    ) from exc
                return resp
            if not body_replayable(request):
                _gave_up(request, key, attempt, resp, exc, "body not replayable", clock)
                if resp is not None:
                    resp.release()
                raise BodyNotReplayable(
                    f"retry: {reason} needs the request sent again, but its body was a"
                    " one-shot stream that was already read"
                ) from exc
            withdrawn = _clock.now()
            # A call that has sent nothing yet spends no budget: its next attempt is its
            # first request on the wire, not a repeat of one.
            balance = self._balance if sent else None
            if balance is not None and not balance.withdraw(withdrawn):
                made, why = attempt, "retry budget exhausted"
                break
            status = None if resp is None else resp.status
            if resp is not None:
                resp.release()
            _events.emit(
                "retry_scheduled", "retry", key, request,
                attempt=attempt, delay=delay, status=status, reason=reason,
            )  # fmt: skip
            with _metrics.waiting("retry", key, status):
                await _backoff_sleep(balance, withdrawn, delay)
            try:
                if clock is None:
                    resp, exc = await handler(request), None
                else:
                    resp, exc = await clock.run(handler, request), None
            except aiohttp.ClientError as error:
                resp, exc = None, error
                if isinstance(error, CircuitOpenError):  # refused: this retry sent nothing
                    if balance is not None:
                        balance.refund(withdrawn)
                else:
                    sent = True
            else:
                if resp.status not in self._statuses:
                    return resp
                sent = True
        _gave_up(request, key, made, resp, exc, why, clock)
        return _give_up(resp, exc)

    def _break(self, exc: aiohttp.ClientError) -> float | None:
        """``retry_after`` of a ``CircuitOpenError`` whose break Retry waits out (``0 <
        retry_after <= circuit_wait``), else ``None``."""
        if isinstance(exc, CircuitOpenError) and 0.0 < exc.retry_after <= self._circuit_wait:
            return exc.retry_after
        return None

    def _reason(
        self,
        request: ClientRequest,
        resp: ClientResponse | None,
        exc: aiohttp.ClientError | None,
    ) -> str | None:
        """Why this outcome may be retried, or ``None`` (see the class docstring)."""
        if resp is None:
            return None if exc is None else failure_reason(request, exc)
        status = resp.status
        if status in _NOT_PROCESSED_STATUSES or is_idempotent(request):
            return f"status {status}"
        return None


async def _backoff_sleep(balance: Balance | None, withdrawn: float, delay: float) -> None:
    """Sleep ``delay``; a caller cancelled meanwhile never sends its retry, so the retry
    counted at ``withdrawn`` goes back to the budget."""
    try:
        await _clock.sleep(delay)
    except asyncio.CancelledError:
        if balance is not None:
            balance.refund(withdrawn)
        raise


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


def _gave_up(
    request: ClientRequest,
    key: str,
    attempts: int,
    resp: ClientResponse | None,
    exc: BaseException | None,
    why: str,
    clock: AttemptClock | None = None,
) -> None:
    """Emit ``retry_gave_up``: ``attempts`` made, the last status or error, and why."""
    status = None if resp is None else resp.status
    if resp is None and exc is not None:
        timed_out = clock is not None and exc is clock.error
        why = f"{why} ({ATTEMPT_TIMEOUT_REASON if timed_out else type(exc).__name__})"
    _events.emit(
        "retry_gave_up", "retry", key, request, attempt=attempts, status=status, reason=why
    )


def _give_up(resp: ClientResponse | None, exc: aiohttp.ClientError | None) -> ClientResponse:
    """Hand back the last response unchanged, or re-raise the last exception."""
    if resp is not None:
        return resp
    assert exc is not None
    raise exc
