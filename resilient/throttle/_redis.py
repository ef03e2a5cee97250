"""Quota windows shared through Redis: every process's requests count in one window.

The windows are ``limits``' moving windows, kept in ``limits``' Redis layout (one list
of timestamps per window, newest first, under ``resilient:LIMITER/...``), so
``limits``' own ``MovingWindowRateLimiter`` reads the same counts. Two scripts make
the rule of :mod:`resilient.throttle._quota` hold across processes and hosts:

- ``quota_board``: if ``used + in_flight < amount`` in every window, where
  ``in_flight`` counts every process's requests in flight (a sorted set of tickets),
  add this request's ticket (one round trip); else return the wait.
- ``quota_land``: when the attempt ends, remove the ticket and take a slot
  timestamped with Redis's ``TIME`` (a later time than the server's arrival).

Landing runs in the background, so a request costs one round trip on its way out.
A ticket is leased for the longest window plus :data:`IN_FLIGHT_LEASE` seconds: a
landing that never comes (the process died, or Redis failed then) holds its slot at
least as long as a recorded slot would have, then frees it. A window full of other
processes' requests in flight is looked at again every :data:`POLL` seconds (their
landings do not wake this process).

A boarding that never answers its caller (cancelled, or its reply came after the storage
timeout: ``StorageError``) may have boarded all the same: ``quota_forget`` takes its
ticket out in the background, naming it, and if the boarding has not arrived yet (its
command was overtaken) remembers the ticket as gone, so that boarding counts nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Coroutine
from typing import Any

from limits import RateLimitItem

from .. import _clock
from .._errors import StorageError
from ..storage import OnStorageError
from ..storage._redis import KEY_PREFIX, RedisStore, seconds, tag
from ._quota import MIN_QUOTA_WAIT, NAMESPACE, Quotas

__all__ = ["IN_FLIGHT_LEASE", "KEY_CACHE", "POLL", "SharedQuotas"]

IN_FLIGHT_LEASE = 300.0
"""Seconds, beyond the longest window, that a ticket of a request in flight lives."""
POLL = 0.05
"""Seconds between two looks at a window full of other processes' requests in flight."""
KEY_CACHE = 1024
"""Policy keys whose Redis key names are kept built (the oldest is dropped first)."""


class SharedQuotas(Quotas):
    """:class:`~resilient.throttle._quota.Quotas` with the windows and in-flight counts in Redis.

    ``on_storage_error="allow"``: when Redis fails, the windows of this process alone
    (in memory) decide, with a warning logged at most every 10 s.
    """

    __slots__ = (
        "_args",
        "_client",
        "_landing",
        "_lease",
        "_longest",
        "_names",
        "_on_error",
        "_seq",
        "_store",
        "_tickets",
    )

    def __init__(self, text: str, store: RedisStore, on_error: OnStorageError) -> None:
        super().__init__(text)  # the fallback windows
        self._store = store
        self._on_error = on_error
        self._client = uuid.uuid4().hex
        self._seq = 0
        self._tickets: dict[str, deque[str]] = {}
        self._landing: set[asyncio.Task[None]] = set()
        self._names: dict[str, list[str]] = {}
        windows: list[Any] = []
        for item in self._items:
            windows += [item.amount, item.get_expiry()]
        self._args = windows
        self._longest = float(max(item.get_expiry() for item in self._items))
        self._lease = self._longest + IN_FLIGHT_LEASE

    def _keys(self, key: str) -> list[str]:
        """``key``'s in-flight set, window lists and gone set, built once (see
        :data:`KEY_CACHE`)."""
        names = self._names.get(key)
        if names is None:
            if len(self._names) >= KEY_CACHE:
                del self._names[next(iter(self._names))]
            prefixed = self._store.limits.bridge.prefixed_key
            base = f"{KEY_PREFIX}:throttle/{tag(key)}"
            names = self._names[key] = [
                f"{base}/flying",
                *(prefixed(item.key_for(NAMESPACE, tag(key))) for item in self._items),
                f"{base}/gone",
            ]
        return names

    async def room(self, key: str, in_flight: int) -> tuple[float, str]:
        """Board in Redis (counted in flight there) or the wait; see the module docstring."""
        self._seq += 1
        ticket = f"{self._client}:{self._seq}"
        try:
            wait, which = await self._store.run(
                "throttle/quota_board",
                self._keys(key),
                [ticket, self._lease, POLL, *self._args],
                self._boarding,
            )
        except StorageError as exc:  # it may have boarded (a late reply): take it out
            self._background(self._forget(key, ticket))
            if self._on_error == "raise":
                raise
            self._store.warn("throttle", exc, _clock.now())
            return await super().room(key, in_flight)
        except asyncio.CancelledError:  # the ticket may be in Redis: take it out
            self._background(self._forget(key, ticket))
            raise
        if not wait:
            self._tickets.setdefault(key, deque()).append(ticket)
            return 0.0, ""
        return max(wait, MIN_QUOTA_WAIT), f"quota {self._items[which]}"

    def _boarding(self, reply: Any) -> tuple[float, int]:
        """``0`` (boarded: a bare integer, the cheapest reply) -> ``(0.0, 0)``; else
        ``(seconds, window index)``, a wait no longer than the longest window."""
        if reply == 0:
            return 0.0, 0
        which = int(reply[1]) - 1
        if not 0 <= which < len(self._items):
            raise ValueError(which)
        return seconds(reply[0], self._longest), which

    async def record(self, key: str) -> None:
        """Land in the background: the caller does not wait for the round trip."""
        tickets = self._tickets.get(key)
        ticket = tickets.popleft() if tickets else ""  # "": boarded on the local fallback
        if tickets is not None and not tickets:
            del self._tickets[key]
        self._background(self._land(key, ticket))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._landing.add(task)
        task.add_done_callback(self._landing.discard)

    async def _forget(self, key: str, ticket: str) -> None:
        try:
            names = self._keys(key)
            await self._store.run(
                "throttle/quota_forget", [names[0], names[-1]], [ticket, self._lease]
            )
        except StorageError as exc:
            self._store.warn("throttle", exc, _clock.now(), "the ticket's lease frees it")

    async def _land(self, key: str, ticket: str) -> None:
        try:
            await self._store.run(
                "throttle/quota_land", self._keys(key), [ticket, self._lease, POLL, *self._args]
            )
        except StorageError as exc:  # the lease frees Redis's count; count here at least
            self._store.warn("throttle", exc, _clock.now(), "the slot is counted here only")
            await super().record(key)

    async def drain(self) -> None:
        """Wait until every landing in the background has reached Redis (for tests, shutdown)."""
        while self._landing:
            await asyncio.gather(*self._landing, return_exceptions=True)

    @property
    def items(self) -> tuple[RateLimitItem, ...]:
        return self._items

    def __repr__(self) -> str:
        return f"SharedQuotas({self.text!r}, storage={self._store.name!r})"
