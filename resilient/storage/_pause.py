"""The 429 pause of a key shared through Redis: one process's 429 pauses every process.

Redis holds, per key, the pause's end on Redis's own clock and the probe's owner
(``lua/pause.lua``). Each process keeps its local :class:`~resilient._pause.PauseGate`
(its queue of callers and its local probe) and syncs it with Redis:

- before a request of a key that is not paused locally: ``check`` (one round trip);
  a pause found there closes the local gate for the time left;
- a 429: ``pause`` extends the shared end; the local gate closes until then;
- the local probe, before it sends: ``claim``. Exactly one client of all gets
  ``probe`` (atomic in Redis, leased for :data:`PROBE_LEASE` seconds); the others
  learn that the pause is over (``open``), longer (``paused``), or that another
  process probes (``busy``: look again in at most :data:`PROBE_POLL` seconds);
- the probe's answer: ``open`` (not a 429) deletes the pause, unless a 429 extended it
  meanwhile; no answer (an error, a cancellation): ``release`` frees the probe.

Only durations cross the wire (seconds left, computed in Redis), so clock skew
between hosts does not move a pause.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any, Literal

from .. import _clock
from .._errors import StorageError
from .._pause import MAX_PAUSE
from . import OnStorageError
from ._redis import KEY_PREFIX, RedisStore, seconds, tag, text

__all__ = ["PROBE_LEASE", "PROBE_POLL", "SharedPause", "Verdict"]

PROBE_LEASE = 120.0
"""Seconds a probe may stay unanswered before another client may probe."""
PROBE_POLL = 0.5
"""Seconds between two claims while another process's probe is on the wire."""

Verdict = Literal["open", "paused", "busy", "probe"]
_VERDICTS = ("open", "paused", "busy", "probe")
_KIND = "rate_limit_backoff"


class SharedPause:
    """The Redis side of every key's pause for one :class:`~resilient.RateLimitBackoff`.

    With ``on_error="allow"``, a Redis failure leaves the local gate alone in charge
    (``check``: not paused; ``pause``: the local delay; ``claim``: ``probe``).
    """

    __slots__ = ("_client", "_on_error", "_store", "_tasks")

    def __init__(self, store: RedisStore, on_error: OnStorageError) -> None:
        self._store = store
        self._on_error = on_error
        self._client = uuid.uuid4().hex
        self._tasks: set[asyncio.Task[None]] = set()

    async def check(self, key: str) -> float | None:
        """Seconds until ``key``'s shared pause ends (0: a probe is due), None if not paused."""
        left: float | None = await self._run(key, "check", 0.0, None, _left)
        return left

    async def pause(self, key: str, delay: float) -> float:
        """Pause ``key`` for ``delay`` seconds at least; the seconds the shared pause lasts."""
        lasts: float = await self._run(key, "pause", delay, delay, _lasts)
        return lasts

    async def claim(self, key: str) -> tuple[Verdict, float]:
        """May this client probe now? See the module docstring."""
        try:
            claimed: tuple[Verdict, float] = await self._run(
                key, "claim", PROBE_LEASE, ("probe", 0.0), _verdict
            )
        except asyncio.CancelledError:  # we may have won it: free it for the others
            self.release(key)
            raise
        return claimed

    async def open(self, key: str) -> None:
        """The probe's answer was not a 429. A failure is logged, never raised: the
        caller's response is in hand (the others' claims see the pause over, or this
        probe's lease run out)."""
        try:
            await self._store.run("pause", [_keys(key)], ["open", self._client, 0.0], _ignore)
        except StorageError as exc:
            self._store.warn(_KIND, exc, _clock.now(), "the response is returned")

    def release(self, key: str) -> None:
        """Free this client's probe of ``key`` in the background (it may be cancelled)."""
        task = asyncio.get_running_loop().create_task(self._release(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, key: str) -> None:
        try:
            await self._store.run("pause", [_keys(key)], ["release", self._client, 0])
        except StorageError as exc:  # the probe's lease frees it
            self._store.warn(_KIND, exc, _clock.now(), "the probe is freed when its lease ends")

    async def _run(
        self, key: str, op: str, seconds: float, fallback: Any, parse: Callable[[Any], Any]
    ) -> Any:
        try:
            return await self._store.run("pause", [_keys(key)], [op, self._client, seconds], parse)
        except StorageError as exc:
            if self._on_error == "raise":
                raise
            self._store.warn(_KIND, exc, _clock.now())
            return fallback


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
