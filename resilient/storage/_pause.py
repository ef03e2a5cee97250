"""The 429 pause of a key shared through Redis: one process's 429 pauses every process.

Redis holds, per key, the pause's end on Redis's own clock and the probe's owner
(``lua/pause.lua``). Each process keeps its local :class:`~resilient._pause.PauseGate`
(its queue of callers and its local probe) and syncs it with Redis:

- before a request of a key that is not paused locally: ``check`` (one round trip);
  a pause found there closes the local gate for the time left;
- a 429: ``pause`` extends the shared end; the local gate closes until then;
- the local probe, before it sends: ``claim``, under a token of its own (a fresh name
  for every claim). Exactly one claim of all gets ``probe`` (atomic in Redis, leased
  for :data:`PROBE_LEASE` seconds); the others learn that the pause is over
  (``open``), longer (``paused``), or that another claim probes (``busy``: look again
  in at most :data:`PROBE_POLL` seconds);
- the probe's answer: ``open`` (not a 429) deletes the pause, unless a 429 extended it
  meanwhile; a 429 (``pause``) ends the claim; no answer (an error, a cancellation, a
  reply that never came): ``release`` frees the claim in the background.

Every step that ends a claim names it by its token, so a release that arrives late
never frees the next claim (of this process or another), and a release that arrives
before its claim (the claim's command was overtaken) makes that claim probe nothing. A
release that gets no answer (Redis down) is sent again with this process's next claim
of the key, so the key is not blocked for the lease once Redis is back.

Only durations cross the wire (seconds left, computed in Redis), so clock skew
between hosts does not move a pause.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

from .. import _clock
from .._errors import StorageError
from .._pause import MAX_PAUSE
from . import OnStorageError
from ._redis import KEY_PREFIX, RedisStore, seconds, tag, text

__all__ = ["PROBE_LEASE", "PROBE_POLL", "UNRELEASED_KEYS", "SharedPause", "Verdict"]

PROBE_LEASE = 120.0
"""Seconds a probe may stay unanswered before another client may probe."""
PROBE_POLL = 0.5
"""Seconds between two claims while another process's probe is on the wire."""

UNRELEASED_KEYS = 1024
"""Keys whose unanswered releases are remembered at once (the oldest key is dropped)."""

T = TypeVar("T")
Verdict = Literal["open", "paused", "busy", "probe"]
_VERDICTS = ("open", "paused", "busy", "probe")
_KIND = "rate_limit_backoff"


class SharedPause:
    """The Redis side of every key's pause for one :class:`~resilient.RateLimitBackoff`.

    With ``on_error="allow"``, a Redis failure leaves the local gate alone in charge
    (``check``: not paused; ``pause``: the local delay; ``claim``: ``probe``).
    """

    __slots__ = ("_held", "_on_error", "_store", "_tasks", "_unreleased")

    def __init__(self, store: RedisStore, on_error: OnStorageError) -> None:
        self._store = store
        self._on_error = on_error
        self._held: dict[str, str] = {}
        """key -> the token of this process's probe claim (one at a time per key)."""
        self._unreleased: dict[str, dict[str, float]] = {}
        """key -> {token whose release got no answer: loop time its lease ends}."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def check(self, key: str) -> float | None:
        """Seconds until ``key``'s shared pause ends (0: a probe is due), None if not paused."""
        try:
            left: float | None = await self._store.run(
                "pause", [_keys(key)], ["check", "", 0.0], _left
            )
        except StorageError as exc:
            return self._fallback(exc, None)
        return left

    async def pause(self, key: str, delay: float, *, probe: bool = False) -> float:
        """Pause ``key`` for ``delay`` seconds at least; the seconds the shared pause lasts.
        ``probe``: the 429 answered this process's probe, whose claim it ends."""
        token = self._held.pop(key, "") if probe else ""
        try:
            lasts: float = await self._store.run(
                "pause", [_keys(key)], ["pause", token, delay], _lasts
            )
        except BaseException as exc:
            if token:  # the claim may still be there: hand it back
                self._release(key, token)
            if isinstance(exc, StorageError):
                return self._fallback(exc, delay)
            raise
        return lasts

    async def claim(self, key: str) -> tuple[Verdict, float]:
        """May this process probe now? See the module docstring."""
        token = uuid.uuid4().hex
        now = _clock.now()
        unreleased = self._unreleased.get(key)
        stale = [t for t, end in unreleased.items() if end > now] if unreleased else []
        try:
            claimed: tuple[Verdict, float] = await self._store.run(
                "pause", [_keys(key)], ["claim", token, PROBE_LEASE, *stale], _verdict
            )
        except BaseException as exc:  # we may have won it: free it for the others
            self._release(key, token)
            if isinstance(exc, StorageError):
                return self._fallback(exc, ("probe", 0.0))
            raise
        if unreleased is not None:  # Redis freed them
            for name in stale:
                unreleased.pop(name, None)
            if not any(end > now for end in unreleased.values()):
                del self._unreleased[key]
        if claimed[0] == "probe":
            self._held[key] = token
        return claimed

    def opened(self, key: str) -> None:
        """The probe's answer was not a 429: ``open`` in the background. A failure is
        logged, never raised: the caller's response is in hand (the claim is released
        later, or its lease runs out)."""
        self._background(self._open(key, self._held.pop(key, "")))

    def release(self, key: str) -> None:
        """Free this process's probe claim of ``key`` in the background (named by its
        token, taken now: the background work never frees a later claim)."""
        token = self._held.pop(key, "")
        if token:
            self._release(key, token)

    async def drain(self) -> None:
        """Wait until the background work (opens, releases) is done (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _release(self, key: str, token: str) -> None:
        self._background(self._free(key, token))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, key: str, token: str) -> None:
        try:
            await self._store.run("pause", [_keys(key)], ["open", token, 0.0], _ignore)
        except StorageError as exc:
            self._store.warn(_KIND, exc, _clock.now(), "the response is returned")
            if token:
                self._release(key, token)

    async def _free(self, key: str, token: str) -> None:
        try:
            await self._store.run("pause", [_keys(key)], ["release", token, 0.0], _ignore)
        except StorageError as exc:
            self._remember(key, token)
            self._store.warn(
                _KIND, exc, _clock.now(), "the probe is freed by the next claim or its lease"
            )

    def _remember(self, key: str, token: str) -> None:
        """A release without an answer: the next claim of ``key`` frees ``token``."""
        now = _clock.now()
        unreleased = self._unreleased.get(key)
        if unreleased is None:
            if len(self._unreleased) >= UNRELEASED_KEYS:  # the oldest is left to its lease
                del self._unreleased[next(iter(self._unreleased))]
            unreleased = self._unreleased[key] = {}
        for name in [name for name, end in unreleased.items() if end <= now]:
            del unreleased[name]
        unreleased[token] = now + PROBE_LEASE

    def _fallback(self, exc: StorageError, value: T) -> T:
        """``on_error="allow"``: warn, then ``value`` (this process's own state decides)."""
        if self._on_error == "raise":
            raise exc
        self._store.warn(_KIND, exc, _clock.now())
        return value


def _left(reply: Any) -> float | None:
    """``check``: -1 (not paused) -> None, else the seconds left (at most MAX_PAUSE)."""
    return None if float(reply) == -1 else seconds(reply, MAX_PAUSE)


def _lasts(reply: Any) -> float:
    return seconds(reply, MAX_PAUSE)


def _verdict(reply: Any) -> tuple[Verdict, float]:
    verdict = text(reply[0])
    if verdict not in _VERDICTS:
        raise ValueError(verdict)
    return verdict, seconds(reply[1], MAX_PAUSE) if len(reply) > 1 else 0.0  # type: ignore[return-value]


def _ignore(reply: Any) -> None:
    return None


def _keys(key: str) -> str:
    return f"{KEY_PREFIX}:pause/{tag(key)}"
