"""The telemetry seam: ``recorder`` is None unless a backend is installed.

The success path pays one module attribute read per policy call
(``_metrics.recorder is not None``). Only when a backend is installed
(:func:`resilient.instrument_opentelemetry`) does a policy route its call through
:func:`counted`, and do waits report through :class:`waiting` (callers waiting now,
seconds waited).

**Calls.** The outermost policy of a call counts it once (the key, that policy's kind
and the outcome). :func:`counted` marks the call in a contextvar (a :class:`Frame`) and
calls the policy again: :func:`outside` is False for the policy it re-enters, which then
runs its body. Tasks that are not part of the call (async hooks, a token refresh) start
from :func:`fresh_context`, without the mark.

**Attempts.** :func:`counted` hands the policy it re-enters a handler of its own
(:class:`_Wire`) that times every call of the real handler. If that handler leads to
another ``resilient`` policy, the inner policy's :func:`outside` *forwards* the pending
attempt (it is not on the wire: the inner policy's own handler calls are), and goes
through :func:`counted` in turn. An attempt that nobody forwarded reached the transport
(or a foreign middleware beneath the last policy): the backend records it, with the
call's re-send count, as one HTTP request on the wire (OpenTelemetry: a client span and
``http.client.request.duration``). Every hop of a call (redirects, aiohttp's re-send of
a dropped keep-alive request) shares one re-send count, kept per aiohttp call timer
like :func:`resilient._deadline.mark_start`.
"""

from __future__ import annotations

from asyncio import CancelledError
from contextvars import Context, ContextVar, copy_context
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .. import _clock
from ..retry import _attempt

if TYPE_CHECKING:
    from .._policy import Policy

__all__ = [
    "Frame",
    "Recorder",
    "counted",
    "current_request",
    "fresh_context",
    "outside",
    "recorder",
    "waiting",
]


class Recorder(Protocol):
    """What a telemetry backend implements (attributes: key, policy, status if known)."""

    def request(
        self, policy: str, key: str, request: ClientRequest, status: int | BaseException
    ) -> None:
        """One call through ``policy`` ended: its final status, or the exception raised."""

    def wait_started(self, policy: str, key: str) -> None:
        """A caller starts waiting."""

    def wait_ended(self, policy: str, key: str, status: int | None, seconds: float) -> None:
        """A caller stopped waiting after ``seconds`` (done, given up or cancelled)."""

    def attempt_started(self) -> object:
        """An attempt begins: whatever :meth:`attempt_ended` needs from this moment (the
        caller's tracing context)."""

    def attempt_ended(
        self,
        request: ClientRequest,
        started: object,
        start: float,
        seconds: float,
        resends: int,
        outcome: ClientResponse | BaseException,
    ) -> None:
        """One request went to the wire at ``start`` (wall-clock seconds, see
        :attr:`Frame.origin`) and ended ``seconds`` later with ``outcome``; ``resends``:
        requests of this call sent before it (0 for the first)."""


recorder: Recorder | None = None
"""The installed backend; None (nothing recorded, nothing paid) unless instrumented."""


class _Attempt:
    """A handler call in progress; ``forwarded`` once it reached another policy."""

    __slots__ = ("forwarded",)

    def __init__(self) -> None:
        self.forwarded = False


class Frame:
    """Where the current task stands in a counted call: the request that started it, the
    backend, the re-send counter ``[sends]``, the wall-clock ``origin`` of the loop's
    clock, the policy running its body, and the attempt its handler call is making (None
    outside a handler call).

    ``origin``: wall-clock seconds at loop time 0, read once when the call starts, so
    the call's requests lie on one timeline (the loop's: fast-forwarded waits count)."""

    __slots__ = ("attempt", "backend", "origin", "policy", "request", "sends")

    def __init__(
        self,
        request: ClientRequest,
        backend: Recorder,
        sends: list[int],
        origin: float,
        policy: Policy,
        attempt: _Attempt | None,
    ) -> None:
        self.request = request
        self.backend = backend
        self.sends = sends
        self.origin = origin
        self.policy = policy
        self.attempt = attempt

    def enter(self, policy: Policy, attempt: _Attempt | None) -> Frame:
        return Frame(self.request, self.backend, self.sends, self.origin, policy, attempt)


_frame: ContextVar[Frame | None] = ContextVar("resilient_counting", default=None)
_resends: ContextVar[tuple[object, list[int]] | None] = ContextVar(
    "resilient_resends", default=None
)


def outside(policy: Policy) -> bool:
    """False only for the policy that :func:`counted` re-enters (it runs its body).

    For an inner policy of a counted call it is True (it goes through :func:`counted`
    to time its own handler calls) and the outer policy's pending attempt is marked
    forwarded: it did not reach the wire itself."""
    frame = _frame.get()
    if frame is None:
        return True
    if frame.policy is policy:
        return False
    attempt = frame.attempt
    if attempt is not None:
        attempt.forwarded = True
    return True


def current_request() -> ClientRequest | None:
    """The request of the counted call this task is in (None outside one)."""
    frame = _frame.get()
    return None if frame is None else frame.request


def fresh_context() -> Context:
    """A copy of the current context without the mark of the call being counted."""
    context = copy_context()
    context.run(_frame.set, None)
    return context


async def counted(
    policy: Policy, key: str, request: ClientRequest, handler: ClientHandlerType
) -> ClientResponse:
    """Run ``policy(request, handler)`` with its handler calls timed; the outermost policy
    of a call also counts the call's outcome (status, or the exception) under ``key``."""
    frame = _frame.get()
    if frame is not None:  # an inner policy of a counted call
        token = _frame.set(frame.enter(policy, None))
        try:
            return await policy(request, _Wire(handler))
        finally:
            _frame.reset(token)
    backend = recorder
    if backend is None:  # uninstrumented meanwhile
        return await policy(request, handler)
    origin = _clock.wall() - _clock.now_for(request)
    token = _frame.set(Frame(request, backend, _sends_of(request), origin, policy, None))
    outcome: int | BaseException = 0
    try:
        resp = await policy(request, _Wire(handler))
        outcome = resp.status
        return resp
    except BaseException as exc:
        outcome = exc
        raise
    finally:
        _frame.reset(token)
        backend.request(policy.kind, key, request, outcome)


def _sends_of(request: ClientRequest) -> list[int]:
    """The re-send counter of the aiohttp call ``request`` belongs to (shared by its
    hops: redirects and aiohttp's own re-sends build new requests with the same timer)."""
    timer = request._timer
    mark = _resends.get()
    if mark is not None and mark[0] is timer:
        return mark[1]
    sends = [0]
    _resends.set((timer, sends))
    return sends


class _Wire:
    """The handler a counted policy calls: each call is an attempt, recorded as a request
    on the wire unless it reached another policy (which records its own)."""

    __slots__ = ("_handler",)

    def __init__(self, handler: ClientHandlerType) -> None:
        self._handler = handler

    async def __call__(self, request: ClientRequest) -> ClientResponse:
        frame = _frame.get()
        if frame is None:  # pragma: no cover - only ever called inside counted()
            return await self._handler(request)
        attempt = _Attempt()
        backend = frame.backend
        token = _frame.set(frame.enter(frame.policy, attempt))
        started, begun = backend.attempt_started(), _clock.now()
        try:
            resp = await self._handler(request)
        except BaseException as exc:
            if not attempt.forwarded:
                timed_out = isinstance(exc, CancelledError) and _attempt.timed_out()
                outcome = _TIMED_OUT if timed_out else exc  # Retry's attempt_timeout
                _ended(frame, request, started, begun, outcome)
            raise
        finally:
            _frame.reset(token)
        if not attempt.forwarded:
            _ended(frame, request, started, begun, resp)
        return resp


_TIMED_OUT = aiohttp.SocketTimeoutError("attempt_timeout")
"""The outcome recorded for an attempt Retry's ``attempt_timeout`` abandoned (the policy
beneath sees a cancellation; on the wire it was a read timeout)."""


def _ended(
    frame: Frame,
    request: ClientRequest,
    started: object,
    begun: float,
    outcome: ClientResponse | BaseException,
) -> None:
    sends = frame.sends
    resends = sends[0]
    sends[0] = resends + 1
    seconds = _clock.now() - begun
    frame.backend.attempt_ended(request, started, frame.origin + begun, seconds, resends, outcome)


class waiting:
    """``with waiting(policy, key, status):`` around a wait, to report it (no-op when not
    instrumented). The backend seen on entry gets the end too, so its count of callers
    waiting returns to zero even if instrumentation changes meanwhile.

    A wait inside a Retry attempt with an ``attempt_timeout`` also holds the attempt's
    clock, which starts afresh when the wait ends (see :mod:`resilient.retry._attempt`): every
    wait of a policy inside Retry must go through here."""

    __slots__ = ("_attempt", "_backend", "_key", "_policy", "_started", "_status")

    def __init__(self, policy: str, key: str, status: int | None = None) -> None:
        self._policy = policy
        self._key = key
        self._status = status
        self._backend: Recorder | None = None
        self._started = 0.0
        self._attempt: _attempt.AttemptClock | None = None

    def __enter__(self) -> waiting:
        clock = _attempt.current.get()
        if clock is not None and clock.hold():
            self._attempt = clock
        backend = self._backend = recorder
        if backend is not None:
            self._started = _clock.now()
            backend.wait_started(self._policy, self._key)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        clock = self._attempt
        if clock is not None:
            self._attempt = None
            clock.resume()
        backend = self._backend
        if backend is not None:
            self._backend = None
            seconds = _clock.now() - self._started
            backend.wait_ended(self._policy, self._key, self._status, seconds)
