"""Events: one frozen :class:`Event` per decision a policy takes, sent to hooks and logged.

Policies call :func:`emit` only at decision points (a wait, a give-up, a circuit
transition), never on the success path. :func:`emit` logs the decision (waits through
:func:`~resilient.observe._log.log_wait`: INFO from one second up; every other decision at
DEBUG) and, when hooks are registered, builds the event and calls each hook. A hook
may be sync or async (an async one runs as a task); its exceptions are logged on
logger ``resilient`` at WARNING and never reach the request.

An event never carries a secret: no headers, and its ``url`` has no query string,
fragment or user:password.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, get_args

from yarl import URL

from .. import _clock
from . import _metrics
from ._log import log_wait, logger

__all__ = [
    "EVENT_KINDS",
    "WAIT_KINDS",
    "Event",
    "EventKind",
    "Hook",
    "add_hook",
    "emit",
    "safe_url",
]

EventKind = Literal[
    "retry_scheduled",
    "retry_gave_up",
    "rate_limited",
    "pause_probe",
    "throttled",
    "circuit_opened",
    "circuit_half_open",
    "circuit_closed",
    "circuit_rejected",
    "token_refreshed",
    "reauthorize",
    "hedge_sent",
    "hedge_won",
    "hedge_skipped",
    "limit_rejected",
]
EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))
"""Every event kind (see :data:`EventKind`)."""
WAIT_KINDS: frozenset[str] = frozenset({"retry_scheduled", "rate_limited", "throttled"})
"""Kinds that announce a wait: logged by ``log_wait`` (INFO from one second up)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One decision of one policy.

    ``kind``: what happened (:data:`EventKind`). ``key``: the state key (e.g.
    ``"https://api.example.com"``). ``policy``: the policy's kind (``"retry"``,
    ``"circuit_breaker"``, ``"rate_limit_backoff"``, ``"throttle"``, ``"auth"``,
    ``"hedge"``, ``"concurrency_limit"``).
    ``method``, ``url``: the request (the url without query, fragment or
    user:password); empty for key-level events (circuit transitions). ``attempt``:
    attempts made so far in this call (429s for ``rate_limited``), 0 when not counted.
    ``delay``: seconds of the wait (or until half-open), else None. ``until``: the UTC
    time the wait ends, else None. ``status``: the HTTP status behind the decision, if
    any. ``reason``: why, in words (``"status 503"``, ``"attempts exhausted"``, ...).
    """

    kind: EventKind
    key: str
    policy: str
    method: str = ""
    url: str = ""
    attempt: int = 0
    delay: float | None = None
    until: datetime | None = None
    status: int | None = None
    reason: str = ""


Hook = Callable[[Event], object]
"""``(event) -> None``, or an ``async`` function (run as a task)."""


class _Message(Protocol):
    """A request or a response: both name their method and URL."""

    @property
    def method(self) -> str: ...

    @property
    def url(self) -> URL: ...


_hooks: tuple[Hook, ...] = ()
_tasks: set[asyncio.Future[None]] = set()  # async hooks still running (held until done)


def add_hook(fn: Hook) -> Callable[[], None]:
    """Call ``fn(event)`` for every event of every policy; returns ``remove()``.

    ``fn`` may be sync or async. Adding one function twice calls it twice; each
    ``remove()`` undoes its own registration and may be called more than once.
    """
    global _hooks
    if not callable(fn):
        raise ValueError(
            f"add_hook: fn must be a callable (event) -> None, sync or async,"
            f" got {type(fn).__name__}"
        )
    entry = _Entry(fn)
    _hooks = (*_hooks, entry)

    def remove() -> None:
        global _hooks
        _hooks = tuple(h for h in _hooks if h is not entry)

    return remove


class _Entry:
    """One registration (so adding a function twice gives two removable entries)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Hook) -> None:
        self.fn = fn

    def __call__(self, event: Event) -> object:
        return self.fn(event)


def safe_url(url: URL) -> str:
    """``url`` without its query string, fragment and user:password."""
    return str(url.with_query(None).with_fragment(None).with_user(None))


def emit(
    kind: EventKind,
    policy: str,
    key: str,
    message: _Message | None = None,
    *,
    attempt: int = 0,
    delay: float | None = None,
    status: int | None = None,
    reason: str = "",
) -> None:
    """Log one decision and send it to the hooks (cheap when nobody listens).

    A wait (``retry_scheduled``, ``rate_limited``, ``throttled``) is logged by
    ``log_wait`` with the event's ``until``; any other decision at DEBUG.
    """
    hooks = _hooks
    wait = delay if kind in WAIT_KINDS else None  # the seconds of a wait to log
    if not hooks:  # build nothing unless a line is logged
        if wait is not None:
            log_wait(policy, reason or kind, key, wait)
        elif logger.isEnabledFor(logging.DEBUG):
            event = _event(kind, policy, key, message, attempt, delay, status, reason)
            logger.debug("%s", describe(event))
        return
    event = _event(kind, policy, key, message, attempt, delay, status, reason)
    if wait is not None:
        log_wait(policy, reason or kind, key, wait, event.until)
    elif logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s", describe(event))
    for hook in hooks:
        _call(hook, event)


def _event(
    kind: EventKind,
    policy: str,
    key: str,
    message: _Message | None,
    attempt: int,
    delay: float | None,
    status: int | None,
    reason: str,
) -> Event:
    method, url = ("", "") if message is None else (message.method, safe_url(message.url))
    until = None if delay is None else _clock.wall_after(delay)
    return Event(kind, key, policy, method, url, attempt, delay, until, status, reason)


def describe(event: Event) -> str:
    """One log line for ``event`` (no headers, the url already stripped)."""
    parts = [f"{event.policy}: {event.kind} on {event.key}"]
    if event.method:
        parts.append(f" ({event.method} {event.url})")
    if event.attempt:
        parts.append(f", attempt {event.attempt}")
    if event.status is not None:
        parts.append(f", status {event.status}")
    if event.until is not None:
        parts.append(f", until {event.until.isoformat(timespec='seconds')}")
    if event.reason:
        parts.append(f": {event.reason}")
    return "".join(parts)


def _call(hook: Hook, event: Event) -> None:
    """Run one hook; an async one becomes a task held in ``_tasks`` until it ends."""
    try:
        result = hook(event)
        if inspect.isawaitable(result):
            loop = asyncio.get_running_loop()
            task = loop.create_task(_awaited(hook, result), context=_metrics.fresh_context())
            _tasks.add(task)
            task.add_done_callback(_tasks.discard)
    except Exception as exc:  # a hook never breaks a request
        _hook_failed(hook, exc)


async def _awaited(hook: Hook, result: Awaitable[object]) -> None:
    try:
        await result
    except Exception as exc:
        _hook_failed(hook, exc)


def _hook_failed(hook: Hook, exc: Exception) -> None:
    fn = hook.fn if isinstance(hook, _Entry) else hook
    logger.warning("event hook %s raised %s", _name(fn), type(exc).__name__, exc_info=exc)


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", type(fn).__name__))
