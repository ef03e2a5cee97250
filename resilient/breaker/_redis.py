"""Circuit breakers shared through Redis: one circuit per key for every process.

:class:`RedisCircuits` is the Redis peer of :class:`~resilient.breaker._store.MemoryCircuits`
(the same :class:`~resilient.breaker._store.CircuitStore` interface). ``lua/breaker.lua``
keeps a key's circuit (state, epoch, open-until, the tokens of the half-open slots, the
window's buckets) in one Redis hash, on Redis's clock, and runs the steps of
:class:`~resilient.breaker._circuit.Circuit`, the state machine it mirrors.

**Round trips.** A caller waits for Redis only when this process does not know the key:

- a *local mirror* of each key: an answer "closed in epoch e" is trusted for
  :data:`CLOSED_LEASE` seconds from when it was asked (the calls admitted meanwhile
  share one ticket: no round trip); an answer "open for s seconds" is trusted until
  the break ends (refused here, no round trip; nothing can close an open circuit
  before its break ends), a refusal while half-open for at most :data:`CLOSED_LEASE`;
- outcomes are recorded in the background, in order, per key: successes are counted
  and sent every :data:`RECORD_FLUSH` seconds (one round trip per key, whose answer
  renews the lease, so a busy healthy key costs no round trip on any caller's path);
  a failure, or a probe's outcome, is news: it is sent at once (behind the key's send
  in flight, if any), and the key's mirror is distrusted until its answer is back: the
  next caller of the key waits for that answer (it says closed, or opened: refused
  here) rather than asking on its own. So a trip is seen here one round trip after
  the failure that caused it, and by other processes within a lease.
- only then: ``admit`` (one round trip), under a token of its own, the name of the
  half-open slot it may take.

Every answer is numbered by when it was asked, and a key's mirror takes an answer only
if nothing newer is known (an older answer overtaken by a newer one, or by local news,
is dropped). A batch of outcomes keeps their order as run lengths (successes,
failures, successes, ...), which the script replays one outcome at a time, so the
run of failures and the ratio trip exactly as if each were sent alone (all at the
batch's time on Redis's clock, at most a flush interval late).

**What is held is handed back.** Every path that ends without an outcome releases the
token it was admitted under, in the background: the caller failed without an outcome,
was cancelled (during ``admit`` too: Redis may have admitted it), or its ``admit``
failed (a reply after the storage timeout). A release that reaches Redis before its
admission (overtaken) makes that admission take nothing. A probe's outcome that Redis
does not take (an error) releases its slot. A failure to record or release is logged
(at most every ``WARN_EVERY`` seconds); a probe slot whose release is lost frees itself
``open_for`` after its admission.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .. import _clock
from .._errors import StorageError
from ..storage._redis import KEY_PREFIX, RedisStore, T, seconds, tag, text
from ._circuit import CLOSED, HALF_OPEN, OPEN, STATE_NAMES, Circuit, Settings, Ticket
from ._store import KIND, announce, announce_half_open, refuse

if TYPE_CHECKING:
    from aiohttp import ClientRequest

__all__ = ["CLOSED_LEASE", "MAX_RUNS", "MIRROR_KEYS", "RECORD_FLUSH", "RedisCircuits"]

CLOSED_LEASE = 0.1
"""Seconds an answer "closed" is trusted without asking again: a trip by another process
is seen at most this late (a trip by this process, one round trip after its failure)."""
RECORD_FLUSH = 0.05
"""Seconds between two sends of a key's counted successes (below the lease, so a busy
key's lease is renewed before it runs out)."""
MIRROR_KEYS = 4096
"""Keys this process remembers at once (expired ones go first, then the oldest)."""
MAX_RUNS = 64
"""Run lengths one key's batch holds before it is sent without waiting for the flush."""

_SHARED = ", shared"
_CHANGES = ("opened", "closed")
_TRANSITIONS = ("", "half_open", "half_open_again")


class _Known:
    """What this process knows of one key's shared circuit: ``ticket`` (closed: the
    ticket its calls share) or refused until loop time ``ends`` (``state`` open or
    half-open), trusted until loop time ``until`` (0: nothing trusted); ``seq``: the
    number of the answer (or of the local news) it comes from."""

    __slots__ = ("ends", "seq", "state", "ticket", "until")

    def __init__(
        self, seq: int, until: float, state: int, ticket: Ticket | None, ends: float
    ) -> None:
        self.seq = seq
        self.until = until
        self.state = state
        self.ticket = ticket
        self.ends = ends


class _Group:
    """Outcomes of one key waiting to be sent: one probe's (``token`` its slot), or the
    run lengths of calls admitted while closed in ``epoch``."""

    __slots__ = ("epoch", "probe", "runs", "token")

    def __init__(self, epoch: int, probe: bool, runs: list[int], token: str = "") -> None:
        self.epoch = epoch
        self.probe = probe
        self.runs = runs
        self.token = token


class RedisCircuits:
    """The Redis store of a :class:`~resilient.CircuitBreaker` (see the module docstring).

    ``settings``: the breaker's rules; ``buckets``: its window's.
    """

    __slots__ = (
        "_args",
        "_client",
        "_flights",
        "_loop",
        "_max_open_for",
        "_mirror",
        "_pending",
        "_probes",
        "_seq",
        "_store",
        "_tasks",
        "_timer",
        "_urgent",
        "closed",
        "opened",
    )

    def __init__(self, store: RedisStore, settings: Settings, buckets: int) -> None:
        self._store = store
        s = settings
        self._args: list[Any] = [
            s.failure_ratio, s.min_calls, s.open_for, s.half_open_probes, s.width, buckets,
            s.consecutive, s.max_open_for,
        ]  # fmt: skip
        self._max_open_for = s.max_open_for
        self._probes = s.half_open_probes
        self._client = uuid.uuid4().hex
        self._seq = 0
        """Numbers every question to Redis and every piece of local news, in order."""
        self._mirror: dict[str, _Known] = {}
        self._pending: dict[str, list[_Group]] = {}
        self._urgent: set[str] = set()
        """Keys whose pending outcomes hold news (a failure, a probe's outcome)."""
        self._flights: dict[str, asyncio.Task[None]] = {}
        """key -> its outcomes on their way (one send per key at a time, in order)."""
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop of the times, tasks and timer above (another one starts afresh)."""
        self.closed: dict[str, Ticket] = {}
        """Always empty: a lease is checked against the clock, in :meth:`admit`."""
        self.opened: dict[str, Circuit] = {}
        """Always empty: the mirror's refusals are read in :meth:`admit`."""

    @property
    def store(self) -> RedisStore:
        return self._store

    # --- the interface --------------------------------------------------------------

    def admit(self, key: str, request: ClientRequest) -> Ticket | None:
        """From the mirror: the key's closed ticket, ``CircuitOpenError``, or None."""
        if request.loop is not self._loop:
            self._adopt(request.loop)
        known = self._mirror.get(key)
        if known is None:
            return None
        now = request.loop.time()
        if now >= known.until:
            return None
        ticket = known.ticket
        if ticket is not None:
            return ticket
        if known.ends - now <= _clock.DUE_SLACK:  # the break is over: Redis says what now
            return None
        retry_after = min(known.ends - now, self._max_open_for)
        raise refuse(key, retry_after, STATE_NAMES[known.state], request)

    async def ask(self, key: str, request: ClientRequest) -> Ticket:
        """The key's news on its way answers this caller too; else one round trip."""
        flight = self._flights.get(key)
        if flight is not None:
            await asyncio.wait((flight,))
            ticket = self.admit(key, request)
            if ticket is not None:
                return ticket
        now, seq = request.loop.time(), self._next()
        token = f"{self._client}:{seq}"  # the name of the slot it may take
        try:
            verdict, epoch, left, state, change = await self._run(key, "admit", _admission, token)
        except BaseException:  # Redis may have admitted it: hand the slot back
            self._free(key, token)
            raise
        if change:
            announce_half_open(key, change, self._probes, _SHARED)
        if verdict > 0:
            self._distrust(key)
            return Ticket(key, epoch, True, token)
        self._learn(key, seq, now, state, epoch, left, refused=verdict < 0)
        if verdict == 0:
            known = self._mirror.get(key)
            if known is not None and known.ticket is not None and known.ticket.epoch == epoch:
                return known.ticket
            return Ticket(key, epoch)
        raise refuse(key, min(left, self._max_open_for), STATE_NAMES[state], request)

    def record(self, ticket: Ticket, failed: bool, now: float) -> None:
        """Queue the outcome (see the module docstring: news goes at once)."""
        key = ticket.key
        if ticket.probe:
            self._queue(key).append(
                _Group(ticket.epoch, True, [0, 1] if failed else [1], ticket.token)
            )
            self._news(key)
            return
        groups = self._queue(key)
        last = groups[-1] if groups else None
        if last is None or last.probe or last.epoch != ticket.epoch:
            last = _Group(ticket.epoch, False, [])
            groups.append(last)
        runs = last.runs
        if failed:
            if len(runs) % 2:  # after successes (or nothing yet): a new run of failures
                runs.append(1)
            elif runs:
                runs[-1] += 1
            else:
                runs += (0, 1)
            self._news(key)
            return
        if len(runs) % 2:
            runs[-1] += 1
        else:
            runs.append(1)
        if len(runs) > MAX_RUNS and key not in self._flights:
            self._send(key)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RECORD_FLUSH, self._flush)

    def release(self, ticket: Ticket) -> None:
        """Free the slot of a probe that ended without an outcome (in the background)."""
        if ticket.probe:
            self._distrust(ticket.key)
            self._free(ticket.key, ticket.token)

    def state(self, key: str) -> int:
        """What the mirror knows now (closed when it knows nothing)."""
        known = self._mirror.get(key)
        if known is None or known.ticket is not None or _clock.now() >= known.until:
            return CLOSED
        return known.state

    def warn(self, exc: StorageError) -> None:
        self._store.warn(KIND, exc, _clock.now())

    # --- beyond the interface -------------------------------------------------------

    async def read(self, key: str) -> tuple[str, float]:
        """``key``'s shared state name and the seconds until its open (or probe) time ends."""
        return await self._run(key, "state", _state)

    async def drain(self) -> None:
        """Send every pending outcome now and wait until the background work is done
        (tests, shutdown)."""
        while True:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for key in [k for k in self._pending if k not in self._flights]:
                self._send(key)
            if not self._tasks:
                return
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- the mirror -----------------------------------------------------------------

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """A call in another event loop than the last (a test's, a new ``asyncio.run``):
        what was known and pending belongs to the other loop's clock and tasks."""
        self._loop = loop
        self._mirror.clear()
        self._pending.clear()
        self._urgent.clear()
        self._flights.clear()
        self._timer = None
        self._tasks = set()

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _distrust(self, key: str) -> None:
        """Local news of ``key``: trust nothing known of it, nor any answer asked before."""
        self._keep(key, _Known(self._next(), 0.0, CLOSED, None, 0.0))

    def _learn(
        self,
        key: str,
        seq: int,
        asked: float,
        state: int,
        epoch: int,
        left: float,
        *,
        refused: bool,
    ) -> None:
        """Redis answered the question ``seq`` asked at loop time ``asked``: the key is in
        ``state`` (``epoch``), ``left`` seconds from the end of its break or probe time.
        Durations count from ``asked`` (earlier than Redis's answer: never trusted too long)."""
        known = self._mirror.get(key)
        if known is not None and known.seq > seq:
            return  # something newer is known
        if state == CLOSED:
            ticket = known.ticket if known is not None else None
            if ticket is None or ticket.epoch != epoch:
                ticket = Ticket(key, epoch)
            self._keep(key, _Known(seq, asked + CLOSED_LEASE, CLOSED, ticket, 0.0))
        elif state == OPEN:
            ends = asked + min(left, self._max_open_for)
            self._keep(key, _Known(seq, ends, OPEN, None, ends))
        elif refused:  # half-open, every slot taken: a probe elsewhere may close it soon
            ends = asked + left
            self._keep(key, _Known(seq, min(ends, asked + CLOSED_LEASE), HALF_OPEN, None, ends))
        else:
            self._keep(key, _Known(seq, 0.0, HALF_OPEN, None, 0.0))

    def _keep(self, key: str, known: _Known) -> None:
        """Remember ``known`` (at most :data:`MIRROR_KEYS` keys)."""
        mirror = self._mirror
        if len(mirror) >= MIRROR_KEYS and key not in mirror:
            now = _clock.now()
            for name in [name for name, k in mirror.items() if k.until <= now]:
                del mirror[name]
            if len(mirror) >= MIRROR_KEYS:
                del mirror[next(iter(mirror))]
        mirror[key] = known

    # --- outcomes, in the background ------------------------------------------------

    def _queue(self, key: str) -> list[_Group]:
        groups = self._pending.get(key)
        if groups is None:
            groups = self._pending[key] = []
        return groups

    def _news(self, key: str) -> None:
        """A failure or a probe's outcome: distrust the key, send its outcomes now."""
        self._distrust(key)
        self._urgent.add(key)
        if key not in self._flights:
            self._send(key)

    def _flush(self) -> None:
        """The flush timer: send every key's pending outcomes (keys with a send in flight
        follow when it lands)."""
        self._timer = None
        for key in [k for k in self._pending if k not in self._flights]:
            self._send(key)

    def _send(self, key: str) -> None:
        groups = self._pending.pop(key)
        self._urgent.discard(key)
        self._flights[key] = self._background(self._fly(key, groups))

    async def _fly(self, key: str, groups: list[_Group]) -> None:
        """Send ``groups`` (one round trip); the answer updates the mirror."""
        seq, asked = self._next(), _clock.now()
        args: list[int] = [len(groups)]
        for group in groups:
            args += (group.epoch, int(group.probe), len(group.runs), *group.runs)
        try:
            state, epoch, left, changes = await self._run(key, "record", self._outcome, *args)
        except StorageError as exc:
            self._store.warn(KIND, exc, _clock.now(), "these outcomes are not counted")
            for group in groups:
                if group.probe:  # its slot is not settled: free it
                    self._free(key, group.token)
            return
        finally:
            del self._flights[key]
            if key in self._urgent:
                self._send(key)
            elif key in self._pending and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(RECORD_FLUSH, self._flush)
        for change, pause, why in changes:
            announce(key, change, pause=pause, why=why, probes=self._probes, where=_SHARED)
        self._learn(key, seq, asked, state, epoch, left, refused=False)

    def _free(self, key: str, token: str) -> None:
        """Release the admission named ``token`` in the background."""
        self._background(self._release(key, token))

    async def _release(self, key: str, token: str) -> None:
        try:
            await self._run(key, "release", _ignore, token)
        except StorageError as exc:
            self._store.warn(KIND, exc, _clock.now(), "the probe slot frees after open_for")

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, key: str, op: str, parse: Callable[[Any], T], *args: int | str) -> T:
        """Script ``op`` on ``key``'s hash; every call draws the jitter of a break."""
        return await self._store.run(
            "breaker/breaker",
            [f"{KEY_PREFIX}:breaker/{tag(key)}"],
            [op, *self._args, random.random(), *args],
            parse,
        )

    def _outcome(self, reply: Any) -> tuple[int, int, float, list[tuple[str, float, str]]]:
        """``record``: (state, epoch, seconds left, [(change, break seconds, why)])."""
        state, epoch = _state_number(reply[0]), int(reply[1])
        left = seconds(reply[2], math.inf)
        changes = []
        for i in range(3, len(reply) - 2, 3):
            change = text(reply[i])
            if change not in _CHANGES:
                raise ValueError(change)
            pause = seconds(reply[i + 1], self._max_open_for) if change == "opened" else 0.0
            changes.append((change, pause, text(reply[i + 2])))
        return state, epoch, left, changes


def _state_number(value: Any) -> int:
    state = int(value)
    if state not in (CLOSED, OPEN, HALF_OPEN):
        raise ValueError(state)
    return state


def _admission(reply: Any) -> tuple[int, int, float, int, str]:
    """``admit``: (verdict -1/0/1, epoch, seconds left, state, transition)."""
    verdict, epoch = int(reply[0]), int(reply[1])
    if verdict not in (-1, 0, 1):
        raise ValueError(verdict)
    change = text(reply[4])
    if change not in _TRANSITIONS:
        raise ValueError(change)
    return verdict, epoch, seconds(reply[2], math.inf), _state_number(reply[3]), change


def _state(reply: Any) -> tuple[str, float]:
    return STATE_NAMES[_state_number(reply[0])], seconds(reply[1], math.inf)


def _ignore(reply: Any) -> None:
    return None
