"""The 429 pause of a key shared through Redis: one process's 429 pauses every process.

:class:`RedisPause` is the Redis peer of :class:`~resilient.ratelimit._store.MemoryPause`
(the same :class:`~resilient.ratelimit._store.PauseStore` interface); :class:`SharedPause`
is its Redis half: the scripts, their tokens, the background work and the lease of a
healthy key.

Redis holds, per key, the pause's end on Redis's own clock and the probe's owner
(``pause.lua``). Each process keeps its local :class:`~resilient.ratelimit._pause.PauseGate`
(its queue of callers and its local probe) and syncs it with Redis:

- before a request of a key that is not paused locally: ``admit`` (one round trip, in
  ``rate.lua``, below); a pause found there closes the local gate for the time left;
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

The key's learned rate (:mod:`resilient.ratelimit._learned`'s law, mirrored in ``rate.lua``)
and its departure slots live in Redis too, so every process paces the key together:

- ``admit``, the one round trip before a request of a key not paused here, reads the
  pause and, for a paced key, reserves the caller's departure slot (``go`` in ``wait``
  seconds, or ``late``: beyond what the caller may wait, nothing reserved); a key found
  neither paused nor paced is trusted for :data:`HEALTHY_LEASE` seconds (no round trip);
- ``peek``, the same look reserving nothing, renews that lease in the background: a caller
  that finds less than :data:`RENEW_AHEAD` seconds of it left sends one (one at a time per
  key), so while the key stays healthy and busy no caller waits for Redis. The lease is
  the token of the key's state: an answer renews only the lease it was asked under, so a
  late ``open`` never overwrites a newer state (a pause, a cut, a paced answer);
- ``depart``: a slot after a pause (the probe has answered);
- a 429 cuts the rate (``cut``, in the background; once per round, by the cuts its request
  was sent after); answers that are not 429s are counted in batches (``accepted``); the
  probe's answer resumes sending (with ``opened``).

Only durations cross the wire (seconds left, computed in Redis), so clock skew
between hosts does not move a pause.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

from .. import _clock
from .._clock import DUE_SLACK
from .._errors import RateLimited, StorageError
from ..storage import OnStorageError
from ..storage._redis import KEY_PREFIX, RedisStore, seconds, tag, text
from ._learned import SLOW_START_MIN
from ._pause import MAX_PAUSE, PauseGate
from ._store import KIND, new_gates, waiting

if TYPE_CHECKING:
    from ._learned import LearnedRate

__all__ = [
    "ACCEPTED_FLUSH",
    "HEALTHY_KEYS",
    "HEALTHY_LEASE",
    "PROBE_LEASE",
    "PROBE_POLL",
    "RENEW_AHEAD",
    "UNRELEASED_KEYS",
    "Admission",
    "RedisPause",
    "SharedPause",
    "Verdict",
]

PROBE_LEASE = 120.0
"""Seconds a probe may stay unanswered before another client may probe."""
PROBE_POLL = 0.5
"""Seconds between two claims while another process's probe is on the wire."""

UNRELEASED_KEYS = 1024
"""Keys whose unanswered releases are remembered at once (the oldest key is dropped)."""
ACCEPTED_FLUSH = 0.1
"""Seconds between two batches of accepted answers sent to a paced key's shared rate."""
HEALTHY_LEASE = 0.1
"""Seconds an ``admit`` answer "neither paused nor paced" is trusted without asking again:
a pause begun by another process is seen at most this late (its own 429s are seen at once)."""
RENEW_AHEAD = 0.025
"""Seconds before a healthy key's lease ends that its next caller renews it (a ``peek`` in
the background): a reply within this time keeps the key known healthy without a gap. A
busy key's lease is renewed about every ``HEALTHY_LEASE - RENEW_AHEAD`` seconds."""
HEALTHY_KEYS = 4096
"""Keys known healthy at once (the bound of the local mirror)."""

T = TypeVar("T")
Verdict = Literal["open", "paused", "busy", "probe"]
_VERDICTS = ("open", "paused", "busy", "probe")


class Admission(NamedTuple):
    """A reply of ``admit`` / ``depart``: ``verdict`` ``"paused"`` (``seconds`` left),
    ``"open"`` (not paced), ``"go"`` (our departure slot is in ``seconds``) or ``"late"``
    (the slot would be ``seconds`` away: nothing reserved); the key's shared ``cuts``
    and ``rate`` (0.0: not paced)."""

    verdict: Literal["paused", "open", "go", "late"]
    seconds: float
    cuts: int = 0
    rate: float = 0.0


_OPEN = Admission("open", 0.0)


class _Lease:
    """What this process knows of a key's health: known neither paused nor paced until
    loop time ``until`` (0.0: not known); ``renewing``: a ``peek`` is on its way. The
    object is the token of the key's state: an answer asked under it applies only while
    it is still the key's lease (anything newer replaces or removes it)."""

    __slots__ = ("renewing", "until")

    def __init__(self, until: float = 0.0) -> None:
        self.until = until
        self.renewing = False


class SharedPause:
    """The Redis side of every key's pause for one :class:`~resilient.RateLimitBackoff`.

    With ``on_error="allow"``, a Redis failure leaves the local gate alone in charge
    (``admit``: not paused, not paced; ``pause``: the local delay; ``claim``: ``probe``).
    """

    __slots__ = (
        "_accepted",
        "_flusher",
        "_healthy",
        "_held",
        "_on_error",
        "_store",
        "_tasks",
        "_unreleased",
    )

    def __init__(self, store: RedisStore, on_error: OnStorageError) -> None:
        self._store = store
        self._on_error = on_error
        self._held: dict[str, str] = {}
        """key -> the token of this process's probe claim (one at a time per key)."""
        self._unreleased: dict[str, dict[str, float]] = {}
        """key -> {token whose release got no answer: loop time its lease ends}."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted: dict[str, int] = {}
        """key -> answers not yet counted in the key's shared rate (see ``accepted``)."""
        self._flusher: asyncio.Task[None] | None = None
        self._healthy: dict[str, _Lease] = {}
        """key -> its lease (see :class:`_Lease`)."""

    async def pause(self, key: str, delay: float, *, probe: bool = False) -> float:
        """Pause ``key`` for ``delay`` seconds at least; the seconds the shared pause lasts.
        ``probe``: the 429 answered this process's probe, whose claim it ends."""
        self._distrust(key)
        token = self._held.pop(key, "") if probe else ""
        try:
            lasts: float = await self._store.run(
                "ratelimit/pause", [_keys(key)], ["pause", token, delay], _lasts
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
                "ratelimit/pause", [_keys(key)], ["claim", token, PROBE_LEASE, *stale], _verdict
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

    async def admit(self, key: str, ceiling: float, max_wait: float) -> Admission:
        """Before a request of ``key`` (not paused here): the shared pause's time left,
        or for a paced key this caller's departure slot (see the module docstring).

        No round trip while the key is known healthy: an ``open`` answer (neither paused
        nor paced) is trusted for :data:`HEALTHY_LEASE` seconds from when it was asked,
        unless this process learns a newer state of the key meanwhile (see :class:`_Lease`)."""
        now = _clock.now()
        if self.healthy(key, now):
            return _OPEN
        lease = self._lease(key)
        admission = await self._admission("admit", key, ceiling, max_wait)
        if admission.verdict == "open":
            if self._healthy.get(key) is lease:  # a fresh token: no renewal is asked under it
                self._healthy[key] = _Lease(now + HEALTHY_LEASE)
        else:
            self._forget(key, lease)
        return admission

    def healthy(self, key: str, now: float) -> bool:
        """Whether ``key`` is known neither paused nor paced at loop time ``now`` (the
        lease of an ``open`` answer: :meth:`admit` would answer it without a round trip).
        With less than :data:`RENEW_AHEAD` seconds of the lease left, it is renewed in the
        background (:meth:`_renew`)."""
        lease = self._healthy.get(key)
        if lease is None:
            return False
        left = lease.until - now
        if left <= 0.0:
            return False
        if left < RENEW_AHEAD and not lease.renewing:
            lease.renewing = True
            self._background(self._renew(key, lease))
        return True

    async def depart(self, key: str, ceiling: float, max_wait: float) -> Admission:
        """A departure slot of paced ``key`` after a pause (``open``: not paced)."""
        return await self._admission("depart", key, ceiling, max_wait)

    def cut(self, key: str, cuts: int, ceiling: float) -> None:
        """A 429 to a request sent after ``cuts`` shared cuts: cut the shared rate if it
        is news (the first 429 of a key starts its slow start), in the background."""
        self._distrust(key)
        self._background(self._rate_op(key, "cut", ceiling, cuts))

    def accepted(self, key: str) -> None:
        """An answer of paced ``key`` that was not a 429: counted in the next batch."""
        self._accepted[key] = self._accepted.get(key, 0) + 1
        if self._flusher is None:
            self._flusher = self._background(self._flush())

    def opened(self, key: str) -> None:
        """The probe's answer was not a 429: ``open`` (and ``resume`` the shared rate) in
        the background. A failure is logged, never raised: the caller's response is in
        hand (the claim is released later, or its lease runs out)."""
        self._background(self._open(key, self._held.pop(key, "")))

    def release(self, key: str) -> None:
        """Free this process's probe claim of ``key`` in the background (named by its
        token, taken now: the background work never frees a later claim)."""
        token = self._held.pop(key, "")
        if token:
            self._release(key, token)

    async def drain(self) -> None:
        """Wait until the background work (opens, releases, lease renewals) is done (tests,
        shutdown); each piece ends within the storage timeout."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _release(self, key: str, token: str) -> None:
        self._background(self._free(key, token))

    def _lease(self, key: str) -> _Lease:
        """``key``'s lease, created unknown (the token an ``admit`` is asked under); at most
        :data:`HEALTHY_KEYS` keys: expired ones go first, then the oldest (an answer to a
        lease gone is not applied)."""
        healthy = self._healthy
        lease = healthy.get(key)
        if lease is not None:
            return lease
        if len(healthy) >= HEALTHY_KEYS:
            now = _clock.now()
            for name in [name for name, held in healthy.items() if held.until <= now]:
                del healthy[name]
            if len(healthy) >= HEALTHY_KEYS:
                del healthy[next(iter(healthy))]
        lease = healthy[key] = _Lease()
        return lease

    def _forget(self, key: str, lease: _Lease) -> None:
        """An answer asked under ``lease`` found ``key`` paused or paced: not healthy (if
        ``lease`` is still its lease; a newer one knows better)."""
        if self._healthy.get(key) is lease:
            del self._healthy[key]

    def _distrust(self, key: str) -> None:
        """A 429 of ``key`` here: ask Redis again from now on (and do not trust an answer
        that was on its way meanwhile: its lease is gone)."""
        self._healthy.pop(key, None)

    async def _renew(self, key: str, lease: _Lease) -> None:
        """Renew ``lease`` (in the background): ``peek`` at ``key`` (nothing reserved);
        ``open`` extends it to :data:`HEALTHY_LEASE` seconds from when it was asked, any
        other answer ends it (the next caller asks with ``admit``); applied only while it
        is still the key's lease. A failure leaves it to run out."""
        asked = _clock.now()
        try:
            healthy = await self._store.run(
                "ratelimit/rate", [_keys(key), _rate_key(key)], ["peek", "", "", 0], _is_open
            )
        except StorageError as exc:
            self._store.warn(KIND, exc, _clock.now(), "the key's next caller asks Redis")
            return
        finally:
            lease.renewing = False
        if not healthy:
            self._forget(key, lease)
        elif self._healthy.get(key) is lease:
            lease.until = max(lease.until, asked + HEALTHY_LEASE)

    def _background(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _admission(self, op: str, key: str, ceiling: float, max_wait: float) -> Admission:
        try:
            return await self._store.run(
                "ratelimit/rate",
                [_keys(key), _rate_key(key)],
                [op, "", _ceiling(ceiling), max_wait],
                _parse_admission,
            )  # fmt: skip
        except StorageError as exc:  # "allow": this process's own gate decides
            return self._fallback(exc, _OPEN)

    async def _rate_op(self, key: str, op: str, ceiling: float, x: float) -> None:
        try:
            await self._store.run(
                "ratelimit/rate",
                [_keys(key), _rate_key(key)],
                [op, "", _ceiling(ceiling), x],
                _ignore,
            )
        except StorageError as exc:
            self._store.warn(KIND, exc, _clock.now(), "the shared rate misses one update")

    async def _flush(self) -> None:
        """Send the accepted answers in batches, one round trip per key every
        :data:`ACCEPTED_FLUSH` seconds, until none are left."""
        try:
            while self._accepted:
                await _clock.sleep(ACCEPTED_FLUSH)
                batch, self._accepted = self._accepted, {}
                for key, count in batch.items():
                    await self._rate_op(key, "accepted", math.inf, count)
        finally:
            self._flusher = None

    async def _open(self, key: str, token: str) -> None:
        try:
            await self._store.run("ratelimit/pause", [_keys(key)], ["open", token, 0.0], _ignore)
        except StorageError as exc:
            self._store.warn(KIND, exc, _clock.now(), "the response is returned")
            if token:
                self._release(key, token)
            return
        await self._rate_op(key, "resume", math.inf, 0.0)

    async def _free(self, key: str, token: str) -> None:
        try:
            await self._store.run("ratelimit/pause", [_keys(key)], ["release", token, 0.0], _ignore)
        except StorageError as exc:
            self._remember(key, token)
            self._store.warn(
                KIND, exc, _clock.now(), "the probe is freed by the next claim or its lease"
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
        self._store.warn(KIND, exc, _clock.now())
        return value


class RedisPause:
    """The Redis store of a :class:`~resilient.RateLimitBackoff` (a
    :class:`~resilient.ratelimit._store.PauseStore`): this process's gates (its queue of
    callers, its local probe, an advertised spread), kept in step with the key's pause,
    probe claim, rate and departure slots in Redis through ``remote``.

    A request leaves without a round trip while the key is known healthy (its
    ``HEALTHY_LEASE``, renewed in the background while the key is busy) and not paused
    or paced here; else ``enter`` asks Redis (one round trip: the pause, or a departure
    slot). 429s and answers reach Redis in the background. With
    ``on_storage_error="allow"`` a failing Redis leaves the local gate alone in charge
    (``SharedPause``'s fallback)."""

    __slots__ = ("gates", "remote")

    gates_decide = False  # a key's lease in ``remote`` decides too

    def __init__(self, remote: SharedPause, max_keys: int) -> None:
        self.remote = remote
        self.gates = new_gates(max_keys)

    def ready(self, key: str, gate: PauseGate | None, now: float) -> bool:
        if gate is not None and gate.closed:
            return False
        if not self.remote.healthy(key, now):
            return False
        if gate is None:
            return True
        gate.shared_rate = 0.0  # what an "open" answer says
        return not gate.paced  # an advertised spread: its departure asks Redis first

    async def enter(
        self, key: str, gate: PauseGate | None, ceiling: float, bound: float
    ) -> tuple[PauseGate | None, bool]:
        """One round trip: close the local gate if another process paused the key; if the
        key is paced there, wait for the departure slot Redis gave us (True: departed)."""
        if gate is not None and gate.closed:
            return gate, False
        admission = await self.remote.admit(key, ceiling, bound - _clock.now())
        if admission.verdict == "open":
            if gate is not None:
                gate.shared_rate = 0.0
            return gate, False
        gate = self.gates.get_or_create(key)
        if admission.verdict == "paused":
            gate.pause(admission.seconds, probe=False)
            return gate, False
        await _leave(key, gate, admission)
        return gate, True

    async def depart(self, key: str, gate: PauseGate, ceiling: float, bound: float) -> None:
        """A slot reserved in Redis (one round trip); an advertised spread (this process's)
        still applies when Redis does not pace the key."""
        admission = await self.remote.depart(key, ceiling, bound - _clock.now())
        if admission.verdict == "open":
            gate.shared_rate = 0.0
            if gate.paced:  # an advertised spread
                with waiting(key):
                    await gate.depart(bound)
            return
        await _leave(key, gate, admission)

    async def share(self, key: str, gate: PauseGate, delay: float, probe: bool) -> float:
        try:
            return max(delay, await self.remote.pause(key, delay, probe=probe))
        except BaseException:  # StorageError or cancelled: the key is paused here
            gate.pause(delay, probe=probe)
            raise

    async def claim(self, key: str, gate: PauseGate) -> bool | None:
        try:
            verdict, seconds_ = await self.remote.claim(key)
        except BaseException:  # StorageError or cancelled: a local waiter probes instead
            gate.probe_failed()
            raise
        if verdict == "probe":
            return True
        if verdict == "open":
            gate.open()
            return False
        gate.pause(seconds_ if verdict == "paused" else min(seconds_, PROBE_POLL), probe=True)
        return None

    def cuts(self, gate: PauseGate) -> int:
        return gate.cuts_seen

    def learn(self, key: str, gate: PauseGate, cuts: int, ceiling: float) -> None:
        """Redis cuts (in the background, if it is news there); the key is paced here from
        now on, at the slow start's rate until Redis says otherwise."""
        if cuts == gate.cuts_seen:
            gate.cuts_seen += 1
            gate.streak += 1
        gate.shared_rate = gate.shared_rate or SLOW_START_MIN
        self.remote.cut(key, cuts, ceiling)

    def answered(self, key: str, gate: PauseGate, learned: LearnedRate | None) -> None:
        if gate.shared_rate:
            self.remote.accepted(key)  # counted in the next batch

    def opened(self, key: str, gate: PauseGate) -> None:
        gate.open()
        self.remote.opened(key)  # in the background, with the shared rate

    def abandoned(self, key: str, gate: PauseGate) -> None:
        gate.probe_failed()
        self.remote.release(key)


async def _leave(key: str, gate: PauseGate, admission: Admission) -> None:
    """Wait for the departure slot ``admission`` reserved (``go``), or RateLimited
    (``late``: nothing was reserved, nothing is sent)."""
    gate.shared_rate, gate.cuts_seen = admission.rate, admission.cuts
    if admission.verdict == "late":
        raise RateLimited(key, admission.seconds)
    if admission.seconds > DUE_SLACK:
        with waiting(key):
            await _clock.sleep(admission.seconds)


def _lasts(reply: Any) -> float:
    return seconds(reply, MAX_PAUSE)


def _verdict(reply: Any) -> tuple[Verdict, float]:
    verdict = text(reply[0])
    if verdict not in _VERDICTS:
        raise ValueError(verdict)
    return verdict, seconds(reply[1], MAX_PAUSE) if len(reply) > 1 else 0.0  # type: ignore[return-value]


def _parse_admission(reply: Any) -> Admission:
    verdict = text(reply[0])
    if verdict == "paused":
        return Admission("paused", seconds(reply[1], MAX_PAUSE))
    if verdict == "open":
        return Admission("open", 0.0, int(text(reply[2])))
    if verdict not in ("go", "late"):
        raise ValueError(verdict)
    rate = float(text(reply[3]))
    if not 0.0 < rate < math.inf:
        raise ValueError(rate)
    return Admission(verdict, seconds(reply[1], MAX_PAUSE), int(text(reply[2])), rate)  # type: ignore[arg-type]


def _is_open(reply: Any) -> bool:
    """A ``peek`` reply: True if the key is neither paused nor paced."""
    verdict = text(reply[0])
    if verdict not in ("paused", "open", "paced"):
        raise ValueError(verdict)
    return verdict == "open"


def _ignore(reply: Any) -> None:
    return None


def _ceiling(rate: float) -> str | float:
    """A rate ceiling as the script reads it ('' for none)."""
    return "" if rate == math.inf else rate


def _keys(key: str) -> str:
    return f"{KEY_PREFIX}:pause/{tag(key)}"


def _rate_key(key: str) -> str:
    return f"{KEY_PREFIX}:rate/{tag(key)}"
