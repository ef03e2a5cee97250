"""Per-call time budgets: :func:`deadline` and the allowance of a wait.

A wait may start only if it ends before every limit the caller is under:

    allowance = min(deadline - now,                           # resilient.deadline()
                    session.timeout.total - (now - started))  # aiohttp's total

``started`` is when the call (one ``session.get(...)``) started: the first policy to
ask, the outermost, marks it with :func:`mark_start`, once for the whole call. A
redirect or aiohttp's own re-send of a dropped keep-alive request builds a new
``ClientRequest`` and runs the chain again, so the mark is not kept on the request: it
is a contextvar naming the call by aiohttp's timer (``request._timer``, one per call,
shared by its hops). It is not reset when a policy returns (the next hop must find
it); the next call, with another timer, replaces it. aiohttp's per-request
``timeout=`` is invisible to middlewares (aiohttp 3.14); ``deadline()`` is the
per-call budget.
"""

from __future__ import annotations

import math
from contextvars import ContextVar, Token
from types import TracebackType

from aiohttp import ClientRequest
from aiohttp.helpers import BaseTimerContext

from . import _clock
from ._validate import number

__all__ = ["TIMEOUT_MARGIN", "allowance", "deadline", "mark_start", "remaining"]

TIMEOUT_MARGIN = 0.05
"""Seconds kept in hand before aiohttp's total timeout, so a wait never ends inside it."""

_deadline: ContextVar[float | None] = ContextVar("resilient_deadline", default=None)


class deadline:
    """Budget ``seconds`` for everything inside the block (``with`` or ``async with``).

    Nested deadlines keep the earlier end. A wait that would end past the deadline
    is not started: the policy returns the response it has, or raises
    :class:`~resilient.DeadlineExceeded` when it has none.
    """

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float) -> None:
        number("deadline", "seconds", seconds, 0.0)
        self._seconds = float(seconds)
        self._token: Token[float | None] | None = None

    def __enter__(self) -> deadline:
        end = _clock.now() + self._seconds
        outer = _deadline.get()
        self._token = _deadline.set(end if outer is None else min(outer, end))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _deadline.reset(self._token)
            self._token = None

    async def __aenter__(self) -> deadline:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"resilient.deadline({self._seconds!r})"


def remaining() -> float:
    """Seconds left before the innermost :func:`deadline` (``inf`` outside one)."""
    end = _deadline.get()
    return math.inf if end is None else end - _clock.now()


_call: ContextVar[tuple[BaseTimerContext, float] | None] = ContextVar(
    "resilient_call", default=None
)
"""The call in progress in this context: (aiohttp's timer of the call, its start)."""


def mark_start(request: ClientRequest, now: float) -> float:
    """The start of the call ``request`` belongs to: ``now`` if no policy marked this
    call yet (the caller is the outermost), else the outer policy's mark. Every hop of
    the call (redirects, aiohttp's re-sends) shares it: one contextvar get per call."""
    mark = _call.get()
    timer = request._timer
    if mark is not None and mark[0] is timer:
        return mark[1]
    _call.set((timer, now))
    return now


def allowance(request: ClientRequest, started: float) -> float:
    """Seconds the caller may still spend waiting (may be negative; ``inf`` if unbounded):
    counted from ``started`` or the call's mark (:func:`mark_start`), whichever is earlier."""
    left = remaining()
    session = request.session
    total = session.timeout.total if session is not None else None
    if total is not None and total > 0:
        mark = _call.get()
        if mark is not None and mark[0] is request._timer and mark[1] < started:
            started = mark[1]
        left = min(left, total - (_clock.now() - started) - TIMEOUT_MARGIN)
    return left
