"""The breaker's state machine against a model of its documented rules (hypothesis).

One model, :class:`CircuitModel`, written from the ``CircuitBreaker`` docstring, not
from the code, drives a backend through the store interface the breaker uses (``admit``,
then ``record`` or ``release``): here the memory store (:class:`MemoryCircuits`, on
explicit times); ``test_breaker_model_redis.py`` drives the Redis store with the same
model (a real ``redis-server``, real time, faults). The rules:

- closed: every call goes; outcomes of calls admitted while closed are counted in a
  sliding window of 10 buckets and in a run of failures (a success ends it); a failure
  that makes the run ``consecutive_failures`` long, or that leaves ``min_calls`` calls
  and a failure ratio >= ``failure_ratio`` in the window, opens the circuit for
  ``open_for``;
- open: a call raises ``CircuitOpenError`` with ``retry_after`` = time left; once
  the break is over, the next call is a probe (half-open); the break after the n-th
  failed probe since the circuit closed lies in
  [max(open_for, nominal / 2), nominal], nominal = min(max_open_for, open_for × 2^n)
  (the jitter is random: the model checks the bounds, then takes the backend's value);
- half-open: ``half_open_probes`` probe slots per spell, each named by its admission's
  token; a probe holds its slot while in flight and after it succeeded (closing takes
  ``half_open_probes`` successes, so no more probes are in flight than it takes to
  close); a cancelled probe frees its slot (its own, by name); when all slots are taken
  and the last one was admitted ``open_for`` ago, the probes in flight are given up and
  a new half-open spell starts; one failed probe re-opens, ``half_open_probes``
  successes close, empty the window and reset the break to ``open_for``;
- an outcome from an earlier spell (the circuit moved on meanwhile) is ignored.

Memory times are multiples of 1/4 s so bucket boundaries are exact in binary floating
point. A backend on a real clock reports each step's time as an interval: where the
rules' answer differs between its ends (a break ending during the step), the model
accepts either and follows the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from yarl import URL

from resilient import CircuitOpenError
from resilient._clock import DUE_SLACK
from resilient.breaker._circuit import (
    BUCKETS,
    CLOSED,
    HALF_OPEN,
    NEVER,
    OPEN,
    Circuit,
    Settings,
    Ticket,
)
from resilient.breaker._store import MemoryCircuits

KEY = "k"
NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


@dataclass
class View:
    """A backend's circuit as stored: what the invariants compare with the model."""

    state: str
    epoch: int
    until: float
    slots: list[str]
    successes: int
    streak: int
    level: int
    calls: int
    fails: int


@dataclass(frozen=True)
class Call:
    """A call let through: the model's spell it was admitted in, whether it is a probe,
    and the backend's ticket (what the breaker hands back to ``record``)."""

    spell: int
    probe: bool
    ticket: Ticket
    which: int = 0  # the store (the process) that admitted it


class Clock:
    """A stand-in for the request's event loop: ``request.loop.time()`` is ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@dataclass
class Stub:
    """A stand-in for ``ClientRequest`` (the store reads ``request.loop.time()``)."""

    loop: Any
    method: str = "GET"
    url: URL = field(default_factory=lambda: URL("http://k/"))


class MemoryBackend:
    """The memory store on explicit times (exact)."""

    tolerance = 0.0

    def __init__(self, settings: Settings) -> None:
        self.store = MemoryCircuits(settings, False, 100)
        self.clock = Clock(1000.0)
        self.request = Stub(self.clock)

    def time(self) -> float:
        return self.clock.now

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    def admit(self, which: int) -> Ticket:
        ticket = self.store.admit(KEY, self.request)  # type: ignore[arg-type]
        assert ticket is not None  # memory always answers
        return ticket

    def record(self, outcomes: list[tuple[Ticket, bool]]) -> None:
        for ticket, failed in outcomes:
            self.store.record(ticket, failed, self.clock.now)

    def release(self, ticket: Ticket) -> None:
        self.store.release(ticket)

    def observe(self) -> View:
        circuit = self.store.circuits.get(KEY)
        if circuit is None:
            return View("closed", 0, 0.0, [], 0, 0, 0, 0, 0)
        assert isinstance(circuit, Circuit)
        return View(
            NAMES[circuit.state], circuit.epoch, circuit.until, list(circuit.slots),
            circuit.successes, circuit.streak, circuit.level, circuit.calls, circuit.fails,
        )  # fmt: skip

    def close(self) -> None:
        pass


class CircuitModel(RuleBasedStateMachine):
    """The documented rules (module docstring) against ``backend``. The calls in flight
    are a list, not a bundle: whether a call is refused depends on a real clock for some
    backends, and hypothesis draws the same steps only if no rule depends on it."""

    WIDTH = 1.0  # window = 10 s
    OPEN_FORS: tuple[float, ...] = (0.25, 1.0, 2.5, 30.0)
    GROWTHS: tuple[float, ...] = (1.0, 2.0, 8.0, 1000.0)
    ADVANCES: tuple[float, ...] = (0.0, 0.25, 0.75, 1.0, 2.5, 9.75, 10.0, 31.0)
    STORES = 1

    def __init__(self) -> None:
        super().__init__()
        self.state = "closed"
        self.spell = 0  # bumped on every transition of the model
        self.until = 0.0  # open: when it half-opens; half-open: last admission + open_for
        self.slots: set[str] = set()  # half-open: tokens of this spell's probes
        self.successes = 0
        self.outcomes: list[tuple[float, bool]] = []  # closed-spell outcomes since the last close
        self.streak = 0  # failures in a row while closed
        self.level = 0  # failed probes since the circuit last closed
        self.inflight: list[Call] = []

    def new_backend(self, settings: Settings) -> Any:
        return MemoryBackend(settings)

    @initialize(
        ratio=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]),
        min_calls=st.integers(1, 6),
        open_for=st.data(),
        probes=st.integers(1, 3),
        consecutive=st.sampled_from([1, 2, 3, 5, None]),
        growth=st.data(),
    )
    def configure(
        self,
        ratio: float,
        min_calls: int,
        open_for: st.DataObject,
        probes: int,
        consecutive: int | None,
        growth: st.DataObject,
    ) -> None:
        self.ratio, self.min_calls, self.probes = ratio, min_calls, probes
        self.open_for = open_for.draw(st.sampled_from(self.OPEN_FORS))
        self.max_open_for = self.open_for * growth.draw(st.sampled_from(self.GROWTHS))
        self.consecutive = math.inf if consecutive is None else consecutive
        never = NEVER if consecutive is None else consecutive
        settings = Settings(
            ratio, min_calls, self.open_for, probes, self.WIDTH, never, self.max_open_for
        )
        self.backend = self.new_backend(settings)
        self.tolerance = self.backend.tolerance

    def teardown(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()

    # --- the model's transitions ----------------------------------------------------

    def _move(self, state: str) -> None:
        self.state = state
        self.spell += 1

    def _open(self, during: tuple[float, float]) -> None:
        """Open for a break within the documented bounds (the backend drew the jitter)."""
        self._move("open")
        self.streak = 0
        self.slots, self.successes = set(), 0
        until = self.backend.observe().until
        shortest, longest = until - during[1], until - during[0]
        tol = self.tolerance
        if self.level == 0:
            assert shortest - tol <= self.open_for <= longest + tol, (during, until)
        else:
            nominal = min(self.max_open_for, self.open_for * 2.0**self.level)
            low = max(self.open_for, nominal / 2)
            assert low - 1e-9 - tol <= longest, (self.level, during, until)
            assert shortest <= nominal + 1e-9 + tol, (self.level, during, until)
        self.until = until

    def _half_open(self) -> None:
        self._move("half_open")
        self.slots, self.successes = set(), 0

    def _window(self) -> tuple[int, int]:
        """(calls, fails) in the last ``BUCKETS`` buckets as of the last outcome (the
        window moves on when a call is counted, not with the clock)."""
        if not self.outcomes:
            return 0, 0
        tick = math.floor(self.outcomes[-1][0] / self.WIDTH)
        recent = [f for t, f in self.outcomes if tick - math.floor(t / self.WIDTH) < BUCKETS]
        return len(recent), sum(recent)

    def _admission(self, now: float) -> str:
        """What an admission at ``now`` is: closed, probe, new spell, or refused."""
        if self.state == "closed":
            return "closed"
        full = self.state == "open" or len(self.slots) >= self.probes
        if full and now < self.until:
            return "refused"
        return "new spell" if full else "probe"

    def _admitted(
        self, ticket: Ticket, during: tuple[float, float], spell_started: bool, which: int = 0
    ) -> Call:
        if not ticket.probe:
            assert self.state == "closed"
            return Call(self.spell, False, ticket, which)
        if spell_started:
            self._half_open()
        assert self.state == "half_open"
        self.slots.add(ticket.token)
        until, tol = self.backend.observe().until, self.tolerance + 1e-9
        assert during[0] + self.open_for - tol <= until <= during[1] + self.open_for + tol
        self.until = until
        return Call(self.spell, True, ticket, which)

    def _outcome(self, call: Call, failed: bool, during: tuple[float, float]) -> None:
        if call.spell != self.spell:
            return  # the circuit moved on since this call was admitted
        if call.probe:
            if failed:
                self.level += 1
                self._open(during)
                return
            self.successes += 1
            if self.successes >= self.probes:
                self._move("closed")
                self.outcomes.clear()
                self.slots = set()
                self.successes = self.streak = self.level = 0
            return
        self.outcomes.append((during[0], failed))
        if not failed:
            self.streak = 0
            return
        self.streak += 1
        calls, fails = self._window()
        if self.streak >= self.consecutive or (
            calls >= self.min_calls and fails / calls >= self.ratio
        ):
            self._open(during)

    def _follow(self, before: View, ends: set[str], during: tuple[float, float]) -> None:
        """After a step whose admission may or may not have run (its answer was lost:
        cancelled, timed out; ``ends``: what it was at either end of the step), follow
        the backend: nothing changed, or the admission ran and its slot was handed back
        (a spell it began stays, and the probe time counts from it)."""
        after = self.backend.observe()
        if self.state == "closed" or (after.epoch, after.until) == (before.epoch, before.until):
            return
        assert ends & {"new spell", "probe"}, (ends, before, after)
        if after.epoch != before.epoch:
            assert "new spell" in ends, (ends, before, after)
            self._half_open()
        tol = self.tolerance + 1e-9
        assert during[0] + self.open_for - tol <= after.until <= during[1] + self.open_for + tol
        self.until = after.until

    # --- rules ----------------------------------------------------------------------

    @rule(data=st.data())
    def advance(self, data: st.DataObject) -> None:
        self.backend.advance(data.draw(st.sampled_from(self.ADVANCES)))

    def _take(self, pick: int) -> Call | None:
        """A call in flight (``pick`` modulo their number), or None."""
        return self.inflight.pop(pick % len(self.inflight)) if self.inflight else None

    @rule(which=st.integers(0, 1))
    def start(self, which: int) -> None:
        which %= self.STORES
        t1 = self.backend.time()
        try:
            ticket = self.backend.admit(which)
        except CircuitOpenError as exc:
            refused: CircuitOpenError | None = exc
        else:
            refused = None
        t2 = self.backend.time()
        ends = {self._admission(t1), self._admission(t2)}
        if refused is not None:
            assert "refused" in ends, (ends, refused.retry_after)
            assert refused.key == KEY
            left, tol = self.until - t1, self.tolerance
            assert left - (t2 - t1) - tol <= refused.retry_after <= left + tol + 1e-9
            assert refused.retry_after > 0.0
            return
        assert ends != {"refused"}, ticket
        assert ticket.probe == (ends != {"closed"}), (ends, ticket)
        # "full" does not change with time: the ends are one answer, or refused / new spell
        started = ticket.probe and "new spell" in ends
        self.inflight.append(self._admitted(ticket, (t1, t2), started, which))

    @rule(pick=st.integers(0, 7), failed=st.booleans())
    def finish(self, pick: int, failed: bool) -> None:
        call = self._take(pick)
        if call is None:
            return
        t1 = self.backend.time()
        self.backend.record([(call.ticket, failed)])
        t2 = self.backend.time()
        self._outcome(call, failed, (t1, t2))

    @rule(pick=st.integers(0, 7), failed=st.tuples(st.booleans(), st.booleans()))
    def finish_two(self, pick: int, failed: tuple[bool, bool]) -> None:
        """Two outcomes of one process at once (a remote store may send them in one
        batch; they count in their order. Two processes' outcomes have no order.)"""
        first = self._take(pick)
        if first is None:
            return
        mates = [i for i, c in enumerate(self.inflight) if c.which == first.which]
        if not mates:
            self.inflight.append(first)
            return
        second = self.inflight.pop(mates[pick % len(mates)])
        t1 = self.backend.time()
        self.backend.record([(first.ticket, failed[0]), (second.ticket, failed[1])])
        t2 = self.backend.time()
        self._outcome(first, failed[0], (t1, t2))
        self._outcome(second, failed[1], (t1, t2))

    @rule(pick=st.integers(0, 7))
    def cancel(self, pick: int) -> None:
        """Cancelled, or ended with an error that is not an outcome: released."""
        call = self._take(pick)
        if call is None:
            return
        self.backend.release(call.ticket)
        if call.probe and call.spell == self.spell:
            self.slots.discard(call.ticket.token)

    # --- invariants -----------------------------------------------------------------

    @invariant()
    def state_matches(self) -> None:
        if hasattr(self, "backend"):
            view = self.backend.observe()
            assert view.state == self.state, (view, self.state)
            assert (view.streak, view.level) == (self.streak, self.level), view
            if self.state == "closed":
                assert (view.calls, view.fails) == self._window(), view
            if self.state == "half_open":
                assert set(view.slots) == self.slots, (view, self.slots)
                assert len(view.slots) == len(self.slots)
                assert 0 <= self.successes <= len(self.slots) <= self.probes
                assert view.successes == self.successes < self.probes
            if self.state != "closed":
                assert abs(view.until - self.until) <= self.tolerance + 1e-9, (view, self.until)


CircuitModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_the_memory_store_follows_the_model = CircuitModel.TestCase


# --- the pure circuit: stale outcomes and batches, spelled out ----------------------------


def _circuit(probes: int = 1) -> Circuit:
    """Breaks of exactly 10 s (max_open_for = open_for): the spelled-out times hold."""
    return Circuit("k", Settings(0.5, 2, 10.0, probes, 1.0, NEVER, 10.0))


def _trip(circuit: Circuit, now: float) -> None:
    for _ in range(2):
        circuit.record(now, True, circuit.epoch, False)
    assert circuit.state == OPEN


def test_an_outcome_from_before_the_circuit_opened_is_ignored_in_every_later_spell():
    circuit = _circuit()
    late = circuit.epoch  # a call admitted while closed, still in flight
    _trip(circuit, 1000.0)
    for i, now in enumerate((1010.0, 1030.0, 1050.0)):  # half-open, probe fails; three times
        assert circuit.admit(now, f"p{i}")[0] == 1
        assert circuit.state == HALF_OPEN
        circuit.record(now, True, late, False)
        assert (circuit.state, circuit.admitted) == (HALF_OPEN, 1)
        circuit.record(now, True, circuit.epoch, True)
        assert circuit.state == OPEN
        circuit.record(now, True, late, False)
        assert circuit.state == OPEN


def test_a_probe_of_an_earlier_half_open_spell_is_ignored():
    circuit = _circuit(probes=2)
    _trip(circuit, 1000.0)
    for now in (1010.0, 1030.0):  # two half-open spells; the first ends with a failed probe
        circuit.admit(now, f"a{now}")
        first = circuit.epoch
        circuit.admit(now, f"b{now}")
        circuit.record(now, True, circuit.epoch, True)
        assert circuit.state == OPEN
    circuit.admit(1050.0, "c")
    circuit.record(1050.0, False, first, True)  # a success from an earlier spell
    circuit.record(1050.0, False, circuit.epoch, True)  # one of the two this spell needs
    assert circuit.state == HALF_OPEN
    assert circuit.successes == 1


@pytest.mark.parametrize("reopened", [False, True], ids=["closed", "closed-then-reopened"])
def test_an_overdue_probe_answering_after_the_circuit_closed_is_ignored(reopened):
    circuit = _circuit(probes=2)
    _trip(circuit, 1000.0)
    circuit.admit(1010.0, "a1")  # spell A: two probes; the first succeeds, the second hangs
    overdue = circuit.epoch
    circuit.admit(1010.0, "a2")
    circuit.record(1011.0, False, overdue, True)
    circuit.admit(1020.0, "b1")  # both slots taken, the last admitted open_for ago: spell B
    circuit.admit(1020.0, "b2")
    for _ in range(2):
        circuit.record(1021.0, False, circuit.epoch, True)
    assert circuit.state == CLOSED
    if reopened:
        _trip(circuit, 1022.0)
    before = (circuit.state, circuit.until, circuit.calls, circuit.fails)
    circuit.record(1025.0, True, overdue, True)  # the hung probe of spell A fails at last
    assert (circuit.state, circuit.until, circuit.calls, circuit.fails) == before


def test_a_release_frees_only_the_slot_it_names():
    circuit = _circuit(probes=2)
    _trip(circuit, 1000.0)
    circuit.admit(1010.0, "a")
    circuit.admit(1010.0, "b")
    circuit.release("stale")  # a token of no slot: remembered as gone, frees nothing
    assert circuit.slots == ["a", "b"]
    circuit.release("a")
    assert circuit.slots == ["b"]
    assert circuit.admit(1010.0, "stale")[0] == -1  # released before it arrived: refused
    assert circuit.admit(1010.0, "c")[0] == 1


@pytest.mark.parametrize("probes", [1, 2])
def test_a_refusal_is_what_admit_would_answer_without_holding_anything(probes):
    circuit = _circuit(probes)
    _trip(circuit, 1000.0)
    for now in (1000.0, 1009.75, 1010.0, 1015.0, 1020.0, 1030.0):
        left = circuit.refusal(now)
        verdict, seconds, _ = circuit.admit(now, str(now))
        assert (verdict < 0) == (left > 0.0)
        if verdict < 0:
            assert seconds == left


@given(
    opened=st.integers(0, 10**13),
    told=st.floats(0.0, 1.0),
    pause=st.floats(1e-3, 86_400.0),
)
def test_a_caller_that_waits_exactly_its_retry_after_is_let_through(opened, told, pause):
    """A loop clock ticks in whole microseconds (``looptime``; asyncio may fire a timer
    up to a tick early): a caller that sleeps exactly its ``retry_after`` may wake a hair
    short of ``until``. A break due within ``DUE_SLACK`` counts as ended (CI saw "retry
    in 0.000s" after such a sleep)."""
    tick = 1e-6
    circuit = Circuit("k", Settings(0.5, 2, pause, 1, 1.0, NEVER, pause))
    _trip(circuit, opened * tick)
    at = round(opened + told * pause / tick) * tick  # refused somewhere in the break ...
    left = circuit.refusal(at)
    back = (round(at / tick) + round(left / tick)) * tick  # ... it sleeps what it was told
    assert circuit.refusal(back) == 0.0, (at, left, back, circuit.until)
    assert circuit.state_at(back) == HALF_OPEN
    assert circuit.admit(back, "back")[0] == 1
    circuit = Circuit("k", Settings(0.5, 2, pause, 1, 1.0, NEVER, pause))
    _trip(circuit, opened * tick)
    assert circuit.refusal(circuit.until - 2 * DUE_SLACK) > 0.0  # a real wait is kept


def test_the_redis_mirror_lets_a_caller_back_once_its_break_is_due():
    """The Redis store's mirror refuses until ``ends`` without a round trip; a caller
    back a hair short of it (a microsecond-tick clock) is not refused for "0.000s":
    it asks Redis, which says what now."""
    from resilient.breaker._redis import RedisCircuits, _Known
    from resilient.storage._redis import RedisStore

    settings = Settings(0.5, 2, 10.0, 1, 1.0, NEVER, 10.0)
    store = RedisCircuits(RedisStore("redis://127.0.0.1:1/0"), settings, 10)
    clock = Clock(1000.0)
    request: Any = Stub(clock)
    store.admit("k", request)  # adopts the stand-in loop (nothing known yet)
    ends = 1000.0 + 0.3
    store._mirror["k"] = _Known(1, ends, OPEN, None, ends)
    with pytest.raises(CircuitOpenError) as caught:
        store.admit("k", request)
    assert caught.value.retry_after == pytest.approx(0.3)
    clock.now = ends - DUE_SLACK / 2
    assert store.admit("k", request) is None  # due: Redis is asked
    clock.now = ends - 2 * DUE_SLACK
    with pytest.raises(CircuitOpenError):
        store.admit("k", request)


@pytest.mark.parametrize("consecutive", [3, NEVER])
@given(
    runs=st.lists(st.integers(0, 6), max_size=12),
    ratio=st.sampled_from([0.1, 0.5, 0.75, 1.0]),
    min_calls=st.integers(1, 8),
)
def test_runs_of_outcomes_count_as_the_outcomes_one_by_one(consecutive, runs, ratio, min_calls):
    """A batch (run lengths: successes, failures, successes, ..., as sent to Redis)
    changes the circuit exactly as its outcomes recorded one at a time."""
    s = Settings(ratio, min_calls, 10.0, 1, 1.0, consecutive, 10.0, jitter=lambda: 0.5)
    one, batch = Circuit("k", s), Circuit("k", s)
    flat = [i % 2 == 1 for i, count in enumerate(runs) for _ in range(count)]
    changes = [c for failed in flat if (c := one.record(1000.0, failed, 0, False))]
    assert batch.record_runs(1000.0, 0, runs) == changes
    assert (batch.state, batch.epoch, batch.streak, batch.calls, batch.fails) == (
        one.state, one.epoch, one.streak, one.calls, one.fails,
    )  # fmt: skip
