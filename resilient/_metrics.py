"""The metrics seam: ``recorder`` is None unless a metrics backend is installed.

The success path pays one module attribute read per policy call
(``_metrics.recorder is not None``). Only when a backend is installed
(:func:`resilient.instrument_opentelemetry`) does the outermost policy of a call route
it through :func:`counted` (one count per call: the key, that policy's kind and the
outcome), and do waits report through :class:`waiting` (callers waiting now, seconds
waited).

:func:`counted` marks the call in a contextvar and calls the policy again;
:func:`outside` is False inside a marked call, so the re-entered policy and every
policy inside it (retries included) run their bodies without counting again. Tasks
that are not part of the call (async hooks, a token refresh) start from
:func:`fresh_context`, without the mark.
"""

from __future__ import annotations

from contextvars import Context, ContextVar, copy_context
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from . import _clock

if TYPE_CHECKING:
    from ._policy import Policy

__all__ = ["Recorder", "counted", "fresh_context", "outside", "recorder", "waiting"]


class Recorder(Protocol):
    """What a metrics backend implements (attributes: key, policy, and status if known)."""

    def request(self, policy: str, key: str, status: int | str) -> None:
        """One call through ``policy`` ended: its status, or the exception's class name."""

    def wait_started(self, policy: str, key: str) -> None:
        """A caller starts waiting."""

    def wait_ended(self, policy: str, key: str, status: int | None, seconds: float) -> None:
        """A caller stopped waiting after ``seconds`` (done, given up or cancelled)."""


recorder: Recorder | None = None
"""The installed backend; None (nothing recorded, nothing paid) unless instrumented."""

_counting: ContextVar[object] = ContextVar("resilient_counting", default=None)


def outside(policy: Policy) -> bool:
    """True unless an outer policy (or ``policy`` itself, re-entered) counts this call."""
    return _counting.get() is None


def fresh_context() -> Context:
    """A copy of the current context without the mark of the call being counted."""
    context = copy_context()
    context.run(_counting.set, None)
    return context


async def counted(
    policy: Policy, key: str, request: ClientRequest, handler: ClientHandlerType
) -> ClientResponse:
    """Run ``policy(request, handler)`` and count its outcome (status or exception name)
    as one call of ``key`` through ``policy`` (the outermost policy of the call)."""
    token = _counting.set(policy)
    status: int | str = "unknown"
    try:
        resp = await policy(request, handler)
        status = resp.status
        return resp
    except BaseException as exc:
        status = type(exc).__name__
        raise
    finally:
        _counting.reset(token)
        backend = recorder
        if backend is not None:
            backend.request(policy.kind, key, status)


class waiting:
    """``with waiting(policy, key, status):`` around a wait, to report it (no-op when not
    instrumented). The backend seen on entry gets the end too, so its count of callers
    waiting returns to zero even if instrumentation changes meanwhile."""

    __slots__ = ("_backend", "_key", "_policy", "_started", "_status")

    def __init__(self, policy: str, key: str, status: int | None = None) -> None:
        self._policy = policy
        self._key = key
        self._status = status
        self._backend: Recorder | None = None
        self._started = 0.0

    def __enter__(self) -> waiting:
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
        backend = self._backend
        if backend is not None:
            self._backend = None
            seconds = _clock.now() - self._started
            backend.wait_ended(self._policy, self._key, self._status, seconds)
