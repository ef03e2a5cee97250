"""Quota windows shared through Redis: every process's requests count in one window.

:class:`RedisQuotas` is the Redis peer of :class:`~resilient.throttle._quota.Quotas` (the
same :class:`~resilient.throttle._store.QuotaStore` interface). The windows are
``limits``' moving windows, kept in ``limits``' Redis layout (one list of timestamps per
window, newest first, under ``resilient:LIMITER/...``), so ``limits``' own
``MovingWindowRateLimiter`` reads the same counts. Three scripts make the rule of
:mod:`resilient.throttle._quota` hold across processes and hosts:

- ``quota_board``: if ``used + in_flight < amount`` in every window, where ``in_flight``
  counts every process's tickets in flight (a sorted set), add this request's ticket, or
  several at once (a lease, :mod:`resilient.throttle._lease`); else return the wait;
- ``quota_land``: attempts ended: their tickets leave the set and take slots
  timestamped with Redis's ``TIME`` (later than the server's arrival); leased tickets
  left unused leave the set;
- ``quota_forget``: a boarding that never answered its caller is taken out.

**Round trips.** A caller waits for Redis only when this process holds no leased ticket
for the key (``board`` answers None, ``ask`` boards: one round trip). A busy key leases
``demand + 1`` tickets while the windows have plenty of room, and renews its lease in the
background before it runs out, so its callers find a ticket here (no round trip);
near the limit every request boards alone, as without leases. Landings and hand-backs
go in the background, one send per key at a time: those that come while a send is on its
way go together in the next one.

**What is held is handed back.** A ticket is leased in Redis for the longest window plus
:data:`IN_FLIGHT_LEASE` seconds. A landing (re-lease, hand-back) Redis fails to answer
may have run or not: it is sent again after each :data:`SEND_AGAIN` pause (run twice, a
landing counts twice: fewer sends, never more). One that never comes (the process died,
or Redis failed through every re-send) holds its place at least as long as a recorded
slot would have, then frees it. A boarding that never answers its caller (cancelled, or
its reply came after the storage timeout: ``StorageError``) may have boarded all the
same: ``quota_forget`` takes its tickets out in the background, naming them, and if the
boarding has not arrived yet (its command was overtaken) remembers its first ticket as
gone, so that boarding counts nothing. Leased tickets unused
:data:`~resilient.throttle._lease.LEASE` seconds after their lease, and every spare at
:meth:`RedisQuotas.drain`, are handed back by name. A window full of other processes'
requests in flight is looked at again every :data:`POLL` seconds (their landings do not
wake this process).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import _clock
from .._errors import StorageError
from ..storage._redis import KEY_PREFIX, RedisStore, seconds, tag
from ._lease import SPARE_TTL, SPREAD, USED_FLUSH, Lease
from ._quota import MIN_QUOTA_WAIT, NAMESPACE, parse_quotas

if TYPE_CHECKING:
    from limits import RateLimitItem

    from ._quota import Quotas

__all__ = ["IN_FLIGHT_LEASE", "KEY_CACHE", "MAX_BATCH", "POLL", "RedisQuotas"]

IN_FLIGHT_LEASE = 300.0
"""Seconds, beyond the longest window, that a ticket in flight lives in Redis."""
POLL = 0.05
"""Seconds between two looks at a window full of other processes' requests in flight."""
KEY_CACHE = 1024
"""Policy keys whose Redis key names (and idle leases) are kept (the oldest go first)."""
MAX_BATCH = 512
"""Most tickets one ``quota_land`` call carries (more go in the next call)."""
SEND_AGAIN = (0.25, 1.0, 4.0)
"""Seconds after which a background call (``quota_land``, ``quota_forget``) Redis failed
to answer is sent again, once per entry (alone: what comes meanwhile goes next); then
its tickets' leases free them."""

_KIND = "throttle"
_BOARDED = (0.0, "")


class RedisQuotas:
    """The Redis store of a :class:`~resilient.Throttle`'s quotas (see the module docstring).

    ``local``: this process's own windows, which count a landing Redis did not take
    (``on_storage_error="allow"``: they decide while Redis fails), or None.
    """

    __slots__ = (
        "_again",
        "_args",
        "_client",
        "_draining",
        "_flights",
        "_hurry",
        "_items",
        "_landed",
        "_leases",
        "_local",
        "_longest",
        "_loop",
        "_names",
        "_returned",
        "_seq",
        "_store",
        "_tasks",
        "_timer",
        "_ttl",
        "_used",
        "text",
    )

    def __init__(self, text: str, store: RedisStore, local: Quotas | None) -> None:
        self.text = text
        self._items = parse_quotas(text)
        self._store = store
        self._local = local
        self._client = uuid.uuid4().hex
        self._seq = 0
        windows: list[Any] = []
        for item in self._items:
            windows += [item.amount, item.get_expiry()]
        self._args = windows
        self._longest = float(max(item.get_expiry() for item in self._items))
        self._ttl = self._longest + IN_FLIGHT_LEASE
        self._names: dict[str, list[str]] = {}
        self._leases: dict[str, Lease] = {}
        self._landed: dict[str, list[str]] = {}
        """key -> tickets whose attempts ended, not sent yet."""
        self._used: dict[str, dict[str, None]] = {}
        """key -> spares taken into use, neither landed nor re-leased yet (in order)."""
        self._returned: dict[str, list[str]] = {}
        """key -> spares handed back unused, not sent yet."""
        self._again: dict[str, tuple[list[str], list[str], list[str], int]] = {}
        """key -> a batch Redis failed to take (landed, used, returned) and its failures,
        waiting to be sent again (:data:`SEND_AGAIN`)."""
        self._flights: dict[str, asyncio.Task[None]] = {}
        """key -> its send on its way (one per key at a time)."""
        self._draining = False
        """:meth:`drain` runs: a failed send is not sent again later."""
        self._hurry: asyncio.Event | None = None
        """Set by :meth:`drain`: a send in its :data:`SEND_AGAIN` pause goes at once."""
        self._timer: asyncio.TimerHandle | None = None
        """Sends the re-leases of the spares taken into use (:data:`USED_FLUSH`)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop of the timers and tasks above (another one starts afresh)."""

    # --- the interface --------------------------------------------------------------

    def board(self, key: str, in_flight: int, now: float) -> tuple[float, str] | None:
        """A spare of ``key`` if this process holds one still usable (renewing the lease
        in the background when they run low), else None."""
        lease = self._leases.get(key)
        if lease is None or not lease.spare:
            return None
        if asyncio.get_running_loop() is not self._loop:
            self._adopt()
            return None
        ticket = lease.take(now)
        if ticket is None:  # the oldest are past their use: hand them back now
            self._hand_back(key, lease.stale(now))
            ticket = lease.take(now)
            if ticket is None:
                return None
        lease.count(now)
        used = self._used.get(key)
        if used is None:
            self._used[key] = {ticket: None}
        else:
            used[ticket] = None
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(USED_FLUSH, self._flush)
        want = lease.renewal(now)
        if want:
            lease.asking = True
            self._background(self._renew(key, lease, want))
        return 0.0, ticket

    async def ask(self, key: str, in_flight: int) -> tuple[float, str]:
        """One round trip: board ``key`` in Redis (leasing places when it is busy) or the
        wait; see the module docstring."""
        lease = self._lease(key)
        asked = _clock.now()
        want = lease.want(asked)
        if want > 1:
            lease.asking = True  # the callers meanwhile board alone (no double lease)
        try:
            tickets, wait = await self._board(key, want, 1, len(lease.spare))
        finally:
            if want > 1:
                lease.asking = False
        if not tickets:
            return wait
        lease.count(_clock.now())
        if len(tickets) > 1:
            self._keep(key, lease, tickets[1:], asked)
        return 0.0, tickets[0]

    def land(self, key: str, now: float, ticket: str) -> None:
        """Queue the landing; it reaches Redis in the background."""
        if asyncio.get_running_loop() is not self._loop:
            self._adopt()
        used = self._used.get(key)
        if used is not None and ticket in used:
            del used[ticket]  # the landing takes it out: no re-lease needed
        landed = self._landed.get(key)
        if landed is None:
            self._landed[key] = [ticket]
        else:
            landed.append(ticket)
        if key not in self._flights:
            self._send(key)

    def warn(self, exc: StorageError) -> None:
        self._store.warn(_KIND, exc, _clock.now())

    # --- beyond the interface -------------------------------------------------------

    @property
    def items(self) -> tuple[RateLimitItem, ...]:
        return self._items

    @property
    def store(self) -> RedisStore:
        return self._store

    def spares(self, key: str) -> int:
        """Leased places of ``key`` this process holds unused."""
        lease = self._leases.get(key)
        return 0 if lease is None else len(lease.spare)

    async def drain(self) -> None:
        """Hand back every spare, send every re-lease and landing, wait until the
        background work has reached Redis, and forget the keys' demand (the next request
        of a key boards alone): for tests and shutdown. A send Redis failed is sent once
        more, now (no :data:`SEND_AGAIN` pause)."""
        if asyncio.get_running_loop() is not self._loop:
            self._adopt()
        self._draining = True
        if self._hurry is not None:
            self._hurry.set()
        try:
            while True:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                for key, lease in list(self._leases.items()):
                    if lease.timer is not None:
                        lease.timer.cancel()
                        lease.timer = None
                    if lease.spare:
                        self._hand_back(key, lease.clear())
                    if not lease.asking:
                        del self._leases[key]
                for key in [*self._used, *self._landed, *self._returned, *self._again]:
                    if key not in self._flights:
                        self._send(key)
                if not self._tasks:
                    return
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._draining = False
            self._hurry = None

    # --- boarding -------------------------------------------------------------------

    async def _board(
        self, key: str, want: int, used: int, held: int
    ) -> tuple[list[str], tuple[float, str]]:
        """Board up to ``want`` places, the first ``used`` of them in flight now and the
        others spares, this process holding ``held`` spares already (see
        :func:`~resilient.throttle._lease.granted`): ``(their tickets, _)``, or ``([],
        (the wait, the full window's name))`` (no wait when asked ahead). A call that
        fails or is cancelled takes its places out (in the background)."""
        first = self._seq + 1
        self._seq += want
        args = [self._client, first, want, self._ttl, SPARE_TTL, used, held, POLL, SPREAD]
        try:
            granted, wait, which = await self._store.run(
                "throttle/quota_board",
                self._keys(key),
                [*args, *self._args],
                partial(self._boarding, want, used),
            )
        except BaseException:  # it may have boarded (a late reply): take it out
            self._background(self._forget(key, first, want))
            raise
        if not granted:
            if not used:
                return [], _BOARDED
            return [], (max(wait, MIN_QUOTA_WAIT), f"quota {self._items[which]}")
        return [f"{self._client}:{first + i}" for i in range(granted)], _BOARDED

    def _boarding(self, want: int, used: int, reply: Any) -> tuple[int, float, int]:
        """An integer ``k`` in ``[1, want]`` (boarded ``k`` places; 0 too when asked
        ahead: nothing granted) -> ``(k, 0.0, 0)``; else ``{seconds, window index}`` ->
        ``(0, seconds, index)``, a wait no longer than the longest window."""
        if isinstance(reply, int):
            if not used <= reply <= want:
                raise ValueError(reply)
            return reply, 0.0, 0
        which = int(reply[1]) - 1
        if not 0 <= which < len(self._items):
            raise ValueError(which)
        return 0, seconds(reply[0], self._longest), which

    async def _renew(self, key: str, lease: Lease, want: int) -> None:
        """Lease ``want`` more places of ``key`` (in the background)."""
        asked = _clock.now()
        try:
            tickets, _ = await self._board(key, want, 0, len(lease.spare))
        except StorageError as exc:
            self._store.warn(_KIND, exc, _clock.now(), "no places are leased ahead")
            return
        finally:
            lease.asking = False
        if tickets:
            self._keep(key, lease, tickets, asked)

    def _keep(self, key: str, lease: Lease, tickets: list[str], asked: float) -> None:
        """Hold ``tickets`` as spares (see :meth:`Lease.keep`); the lease's timer hands
        them back when they are past their use."""
        if self._leases.get(key) is not lease:  # forgotten meanwhile (drain)
            self._hand_back(key, tickets)
            return
        lease.keep(tickets, asked)
        if lease.timer is None:
            lease.timer = asyncio.get_running_loop().call_at(lease.spare[0][1], self._expire, key)

    def _expire(self, key: str) -> None:
        """A lease's timer: hand back the spares past their use; wait for the next."""
        lease = self._leases.get(key)
        if lease is None:
            return
        lease.timer = None
        loop = asyncio.get_running_loop()
        stale = lease.stale(loop.time())
        if stale:
            self._hand_back(key, stale)
        if lease.spare:
            lease.timer = loop.call_at(lease.spare[0][1], self._expire, key)

    def _hand_back(self, key: str, tickets: list[str]) -> None:
        returned = self._returned.get(key)
        if returned is None:
            self._returned[key] = tickets
        else:
            returned += tickets
        if key not in self._flights:
            self._send(key)

    def _lease(self, key: str) -> Lease:
        """``key``'s lease record (idle ones are dropped beyond :data:`KEY_CACHE` keys)."""
        if asyncio.get_running_loop() is not self._loop:
            self._adopt()
        lease = self._leases.get(key)
        if lease is None:
            leases = self._leases
            if len(leases) >= KEY_CACHE:
                for name in [name for name, held in leases.items() if held.idle()]:
                    del leases[name]
            lease = leases[key] = Lease(_clock.now())
        return lease

    # --- re-leases, landings and hand-backs, in the background ----------------------

    def _flush(self) -> None:
        """The re-lease timer: send every key's spares taken into use."""
        self._timer = None
        for key in self._used:
            if key not in self._flights:
                self._send(key)

    def _send(self, key: str) -> None:
        self._flights[key] = self._background(self._fly(key))

    async def _fly(self, key: str) -> None:
        """Send ``key``'s re-leases, landings and hand-backs, :data:`MAX_BATCH` tickets at
        most per call, re-leases first (the rest, and what comes meanwhile, goes next).

        A call Redis fails to answer may have run or not: it is sent again after each
        :data:`SEND_AGAIN` pause. Sent twice, a landing counts twice (fewer sends for a
        window, never more); never sent, it would hold its place for its lease."""
        try:
            while True:
                again = self._again.pop(key, None)
                if again is not None:
                    landed, used, returned, failures = again
                else:
                    failures = 0
                    used = list(self._used.pop(key, ()))
                    if len(used) > MAX_BATCH:
                        self._used[key] = dict.fromkeys(used[MAX_BATCH:])
                        used = used[:MAX_BATCH]
                    landed = _cut(self._landed, key, MAX_BATCH - len(used))
                    returned = _cut(self._returned, key, MAX_BATCH - len(used) - len(landed))
                    if not used and not landed and not returned:
                        return
                if not await self._land(key, landed, used, returned, failures):
                    self._again[key] = (landed, used, returned, failures + 1)
                    await self._pause(SEND_AGAIN[failures])
        finally:
            if self._flights.get(key) is asyncio.current_task():
                del self._flights[key]

    async def _land(
        self, key: str, landed: list[str], used: list[str], returned: list[str], failures: int
    ) -> bool:
        """One ``quota_land`` call, after ``failures`` failed ones: True once done with
        (Redis took it, or it is given up), False to be sent again. The first failure
        counts the landings in this process's own windows."""
        try:
            await self._store.run(
                "throttle/quota_land",
                self._keys(key),
                [len(landed), len(used), self._ttl, *self._args, *landed, *used, *returned],
            )
            return True
        except StorageError as exc:
            local = self._local
            if local is not None and not failures:
                now = _clock.now()
                for _ in landed:
                    local.record_at(key, now)
            again = failures < len(SEND_AGAIN) and not self._draining
            then = "the landings are sent again" if again else "given up"
            self._store.warn(_KIND, exc, _clock.now(), then)
            return not again

    async def _forget(self, key: str, first: int, want: int) -> None:
        """Take out a boarding that never answered its caller; a call Redis fails to
        answer is sent again after each :data:`SEND_AGAIN` pause (Redis, slow enough to
        fail the boarding, may fail this too), then the tickets' lease frees them."""
        names = self._keys(key)
        tickets = [f"{self._client}:{first + i}" for i in range(want)]
        for pause in (*SEND_AGAIN, None):
            try:
                await self._store.run(
                    "throttle/quota_forget", [names[0], names[-1]], [self._ttl, *tickets]
                )
                return
            except StorageError as exc:
                if pause is None or self._draining:
                    self._store.warn(_KIND, exc, _clock.now(), "the tickets' lease frees them")
                    return
                self._store.warn(_KIND, exc, _clock.now(), "the forget is sent again")
                await self._pause(pause)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` before a send goes again, or less if :meth:`drain` hurries."""
        hurry = self._hurry
        if hurry is None:
            hurry = self._hurry = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await hurry.wait()

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _adopt(self) -> None:
        """A call in another event loop than the last (a test's, a new ``asyncio.run``):
        the timers and tasks belonged to the other loop. Spares, re-leases and landings
        not sent yet are still owed to Redis: they are sent from this loop."""
        self._loop = asyncio.get_running_loop()
        self._flights.clear()
        self._tasks = set()
        self._timer = None
        self._hurry = None
        for key, lease in self._leases.items():
            lease.timer = None
            lease.asking = False
            if lease.spare:
                self._returned.setdefault(key, []).extend(lease.clear())
        for key in {*self._used, *self._landed, *self._returned, *self._again}:
            self._send(key)

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

    def __repr__(self) -> str:
        return f"RedisQuotas({self.text!r}, storage={self._store.name!r})"


def _cut(pending: dict[str, list[str]], key: str, room: int) -> list[str]:
    """Take out up to ``room`` of ``key``'s pending tickets (the rest stay pending)."""
    tickets = pending.pop(key, [])
    if tickets and len(tickets) > room:
        if room <= 0:
            pending[key] = tickets
            return []
        pending[key], tickets = tickets[room:], tickets[:room]
    return tickets
