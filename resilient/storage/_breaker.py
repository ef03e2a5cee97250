"""Circuit breakers shared through Redis: one circuit per key for every process.

``lua/breaker.lua`` keeps a key's state, epoch, open-until and half-open slots, and its
window of outcomes (``BUCKETS`` buckets of calls and failures, each tagged with its
number so stale ones are skipped) in one Redis hash, on Redis's clock. The rules are
those of :mod:`resilient._breaker`; each request costs two round trips:

- ``admit`` before sending: closed, a half-open probe (slots elected atomically), or
  rejected with the seconds until half-open (``CircuitOpenError``, nothing sent);
- ``record`` its outcome (an outcome of an older epoch is ignored), which opens or
  closes the circuit for everyone; ``release`` a probe slot that got no outcome.

Every admission carries a token of its own, the name of the half-open slot it may take;
``release`` names it, so it frees that slot and never another's. Every path that does
not record an outcome hands the slot back in the background: the caller failed
without an outcome, was cancelled (during ``admit`` too: Redis may have admitted it),
or its ``admit`` failed (a reply after the storage timeout). A release that reaches
Redis before its admission (overtaken) makes that admission take nothing. The outcome
is recorded even if the caller is cancelled meanwhile (the response is released then).

A Redis failure before sending raises ``StorageError`` (``on_storage_error="raise"``)
or falls back to an in-memory breaker of this process (``"allow"``). A failure to
record an outcome after the response never costs the caller the response: it is
logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .. import _clock, _events
from .._breaker import is_failure
from .._errors import CircuitOpenError, StorageError
from .._log import human_duration, logger
from . import OnStorageError
from ._redis import KEY_PREFIX, RedisStore, T, seconds, tag, text

if TYPE_CHECKING:
    from .._breaker import CircuitBreaker, _Settings

__all__ = ["SharedCircuits"]

_KIND = "circuit_breaker"
_NAMES = ("closed", "open", "half_open")


class SharedCircuits:
    """The Redis side of a :class:`~resilient.CircuitBreaker` (see the module docstring).

    ``settings``: the breaker's; ``buckets``: its window's; ``fallback``: an in-memory
    breaker with the same settings.
    """

    __slots__ = (
        "_args",
        "_client",
        "_fallback",
        "_max_open_for",
        "_on_error",
        "_probes",
        "_seq",
        "_store",
        "_tasks",
    )

    def __init__(
        self,
        store: RedisStore,
        settings: _Settings,
        buckets: int,
        fallback: CircuitBreaker,
        on_error: OnStorageError,
    ) -> None:
        self._store = store
        s = settings
        self._args: list[Any] = [
            s.failure_ratio, s.min_calls, s.open_for, s.half_open_probes, s.width, buckets,
            s.consecutive, s.max_open_for,
        ]  # fmt: skip
        self._max_open_for = s.max_open_for
        self._probes = s.half_open_probes
        self._fallback = fallback
        self._on_error = on_error
        self._client = uuid.uuid4().hex
        self._seq = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def fallback(self) -> CircuitBreaker:
        """The in-memory breaker used while Redis fails (``on_storage_error="allow"``)."""
        return self._fallback

    async def call(
        self, key: str, request: ClientRequest, handler: ClientHandlerType
    ) -> ClientResponse:
        """Admit, send, record: the shared breaker's ``__call__``."""
        self._seq += 1
        token = f"{self._client}:{self._seq}"  # the name of the slot it may take
        try:
            verdict, epoch, retry_after, transition = await self._run(
                key, "admit", _admission, token
            )
        except BaseException as exc:  # Redis may have admitted it: hand the slot back
            self._release(key, token)
            if not isinstance(exc, StorageError) or self._on_error == "raise":
                raise
            self._store.warn(_KIND, exc, _clock.now())
            return await self._fallback(request, handler)
        if verdict < 0:
            retry_after = min(retry_after, self._max_open_for)
            _events.emit("circuit_rejected", _KIND, key, request, delay=retry_after, reason="open")
            raise CircuitOpenError(key, retry_after)
        probe = verdict == 1
        if transition:
            _half_open(key, transition == "half_open_again")
        try:
            resp = await handler(request)
        except BaseException as exc:
            if is_failure(exc):
                await self._settle(key, epoch, True, probe, token)
            elif probe:
                self._release(key, token)
            raise
        try:
            await self._settle(key, epoch, resp.status >= 500, probe, token)
        except BaseException:  # cancelled: the outcome is still recorded
            resp.release()
            raise
        return resp

    async def state(self, key: str) -> tuple[str, float]:
        """``key``'s state name and the seconds until its open (or probe) time ends."""
        state: tuple[str, float] = await self._run(key, "state", _state)
        return state

    async def drain(self) -> None:
        """Wait until the background work (releases, outcomes) is done (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _release(self, key: str, token: str) -> None:
        """Free the half-open slot named ``token`` (if it took one) in the background."""
        self._background(self._free(key, token))

    async def _free(self, key: str, token: str) -> None:
        try:
            await self._run(key, "release", _ignore, token)
        except StorageError as exc:
            self._store.warn(_KIND, exc, _clock.now(), "the probe slot frees after open_for")

    async def _settle(self, key: str, epoch: int, failed: bool, probe: bool, token: str) -> None:
        """Record the outcome; the caller waits for it, but a cancelled caller does not
        stop it (a probe's slot is never left without its outcome)."""
        await asyncio.shield(self._background(self._record(key, epoch, failed, probe, token)))

    async def _record(self, key: str, epoch: int, failed: bool, probe: bool, token: str) -> None:
        """Count an outcome; a probe's outcome that Redis did not take frees its slot."""
        try:
            transition, pause, why = await self._run(
                key, "record", self._outcome, epoch, int(failed), int(probe)
            )
        except StorageError as exc:
            self._store.warn(_KIND, exc, _clock.now(), "this outcome is not counted")
            if probe:
                self._release(key, token)
            return
        if transition == "opened":
            _opened(key, why, pause)
        elif transition == "closed":
            _closed(key, self._probes)

    async def _run(self, key: str, op: str, parse: Callable[[Any], T], *args: int | str) -> T:
        """Script ``op`` on ``key``'s hash; every call draws the jitter of a break."""
        return await self._store.run(
            "breaker",
            [f"{KEY_PREFIX}:breaker/{tag(key)}"],
            [op, *self._args, random.random(), *args],
            parse,
        )

    def _outcome(self, reply: Any) -> tuple[str, float, str]:
        """``record``: (transition, seconds of the break it opened for, why)."""
        transition = text(reply[1]) if len(reply) > 1 else ""
        if transition == "opened":
            return transition, seconds(reply[2], self._max_open_for), text(reply[3])
        return transition, 0.0, ""


def _admission(reply: Any) -> tuple[int, int, float, str]:
    """``admit``: (verdict -1/0/1, epoch, seconds until half-open, transition)."""
    verdict, epoch = int(reply[0]), int(reply[1])
    if verdict not in (-1, 0, 1):
        raise ValueError(verdict)
    if verdict < 0:
        return verdict, epoch, seconds(reply[2], math.inf), ""
    return verdict, epoch, 0.0, text(reply[2]) if len(reply) > 2 else ""


def _state(reply: Any) -> tuple[str, float]:
    return _NAMES[int(reply[0])], seconds(reply[1], math.inf)


def _ignore(reply: Any) -> None:
    return None


def _opened(key: str, why: str, pause: float) -> None:
    _events.emit("circuit_opened", _KIND, key, delay=pause, reason=why)
    if logger.isEnabledFor(logging.WARNING):
        logger.warning(
            "circuit_breaker: opened on %s (%s, shared); failing fast for %s, half-open at %s",
            key,
            why,
            human_duration(pause),
            _clock.wall_after(pause).isoformat(timespec="seconds"),
        )


def _half_open(key: str, overdue: bool) -> None:
    reason = "probes overdue" if overdue else "open_for elapsed"
    _events.emit("circuit_half_open", _KIND, key, reason=reason)
    if logger.isEnabledFor(logging.INFO):
        again = " again (the probes in flight are overdue)" if overdue else ""
        logger.info("circuit_breaker: half-open on %s%s (shared)", key, again)


def _closed(key: str, probes: int) -> None:
    _events.emit("circuit_closed", _KIND, key, reason="probes succeeded")
    if logger.isEnabledFor(logging.INFO):
        logger.info("circuit_breaker: closed on %s (%d probe(s) succeeded, shared)", key, probes)
