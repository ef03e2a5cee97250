"""The breaker's circuit against a model of its documented state machine (hypothesis).

``_Circuit`` is driven the way ``CircuitBreaker.__call__`` drives it (``admit`` when not
closed, then ``record`` or ``release``), with explicit loop times. The model below is
written from the ``CircuitBreaker`` docstring, not from the code:

- closed: every call goes; outcomes of calls admitted while closed are counted in a
  sliding window of 10 one-second buckets and in a run of failures (a success ends
  it); a failure that makes the run ``consecutive_failures`` long, or that leaves
  ``min_calls`` calls and a failure ratio >= ``failure_ratio`` in the window, opens
  the circuit for ``open_for``;
- open: a call raises ``CircuitOpenError`` with ``retry_after`` = time left; once
  the break is over, the next call is a probe (half-open); the break after the n-th
  failed probe since the circuit closed lies in
  [max(open_for, nominal / 2), nominal], nominal = min(max_open_for, open_for × 2^n)
  (the jitter is random: the model checks the bounds, then takes the circuit's value);
- half-open: ``half_open_probes`` probe slots per spell; a probe holds its slot while
  in flight and after it succeeded (closing takes ``half_open_probes`` successes, so
  no more probes are in flight than it takes to close); a cancelled probe frees its
  slot; when all slots are taken and the last one was admitted ``open_for`` ago, the
  probes in flight are given up and a new half-open spell starts; one failed probe
  re-opens, ``half_open_probes`` successes close, empty the window and reset the
  break to ``open_for``;
- an outcome from an earlier spell (the circuit moved on meanwhile) is ignored.

Times are multiples of 1/4 s so bucket boundaries are exact in binary floating point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from resilient import CircuitOpenError
from resilient._breaker import _NEVER, BUCKETS, CLOSED, HALF_OPEN, OPEN, _Circuit, _Settings

WIDTH = 1.0  # window = 10 s
NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


@dataclass(frozen=True)
class Call:
    """A call let through: the spell it was admitted in, whether it is a probe, and
    the circuit's own epoch (what CircuitBreaker hands back to ``record``)."""

    spell: int
    probe: bool
    epoch: int


class CircuitMachine(RuleBasedStateMachine):
    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.state = "closed"
        self.spell = 0  # bumped on every transition of the model
        self.until = 0.0  # open: when it half-opens; half-open: last admission + open_for
        self.slots = 0  # half-open: probe slots taken in this spell (running or succeeded)
        self.successes = 0
        self.outcomes: list[tuple[float, bool]] = []  # closed-spell outcomes since the last close
        self.streak = 0  # failures in a row while closed
        self.level = 0  # failed probes since the circuit last closed

    @initialize(
        ratio=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]),
        min_calls=st.integers(1, 6),
        open_for=st.sampled_from([0.25, 1.0, 2.5, 30.0]),
        probes=st.integers(1, 3),
        consecutive=st.sampled_from([1, 2, 3, 5, None]),
        growth=st.sampled_from([1.0, 2.0, 8.0, 1000.0]),
    )
    def configure(
        self,
        ratio: float,
        min_calls: int,
        open_for: float,
        probes: int,
        consecutive: int | None,
        growth: float,
    ) -> None:
        self.ratio, self.min_calls, self.open_for, self.probes = ratio, min_calls, open_for, probes
        self.consecutive = math.inf if consecutive is None else consecutive
        self.max_open_for = open_for * growth
        settings = _Settings(
            ratio,
            min_calls,
            open_for,
            probes,
            WIDTH,
            _NEVER if consecutive is None else consecutive,
            self.max_open_for,
        )
        self.circuit = _Circuit("k", settings)

    # --- the model's transitions ----------------------------------------------------

    def _move(self, state: str) -> None:
        self.state = state
        self.spell += 1

    def _open(self) -> None:
        """Open for a break within the documented bounds (the circuit drew the jitter)."""
        self._move("open")
        self.streak = 0
        pause = self.circuit.until - self.now
        if self.level == 0:
            assert pause == self.open_for
        else:
            nominal = min(self.max_open_for, self.open_for * 2.0**self.level)
            low = max(self.open_for, nominal / 2)
            assert low - 1e-9 <= pause <= nominal + 1e-9, (self.level, pause)
        self.until = self.circuit.until

    def _window(self) -> tuple[int, int]:
        """(calls, fails) in the last ``BUCKETS`` one-second buckets as of the last
        outcome (the window moves on when a call is counted, not with the clock)."""
        if not self.outcomes:
            return 0, 0
        tick = math.floor(self.outcomes[-1][0] / WIDTH)
        recent = [f for t, f in self.outcomes if tick - math.floor(t / WIDTH) < BUCKETS]
        return len(recent), sum(recent)

    # --- rules ----------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.0, 0.25, 0.75, 1.0, 2.5, 9.75, 10.0, 31.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(target=calls)
    def start(self):  # type: ignore[no-untyped-def]
        if self.state == "closed":
            return Call(self.spell, False, self.circuit.epoch)
        full = self.state == "open" or self.slots >= self.probes
        if full and self.now < self.until:
            with pytest.raises(CircuitOpenError) as refused:
                self.circuit.admit(self.now)
            assert refused.value.retry_after == self.until - self.now > 0.0
            assert refused.value.key == "k"
            return multiple()
        if full:  # open_for is over, or the probes in flight are overdue: a new spell
            self._move("half_open")
            self.slots = self.successes = 0
        self.circuit.admit(self.now)
        self.slots += 1
        self.until = self.now + self.open_for
        return Call(self.spell, True, self.circuit.epoch)

    @rule(call=consumes(calls), failed=st.booleans())
    def finish(self, call: Call, failed: bool) -> None:
        self.circuit.record(self.now, failed, call.epoch, call.probe)
        if call.spell != self.spell:
            return  # the circuit moved on since this call was admitted
        if call.probe:
            if failed:
                self.level += 1
                self._open()
                return
            self.successes += 1
            if self.successes >= self.probes:
                self._move("closed")
                self.outcomes.clear()
                self.streak = self.level = 0
            return
        self.outcomes.append((self.now, failed))
        if not failed:
            self.streak = 0
            return
        self.streak += 1
        calls, fails = self._window()
        if self.streak >= self.consecutive or (
            calls >= self.min_calls and fails / calls >= self.ratio
        ):
            self._open()

    @rule(call=consumes(calls))
    def cancel(self, call: Call) -> None:
        """Cancelled, or ended with an error that is not an outcome: no record."""
        if call.probe:
            self.circuit.release(call.epoch)
            if call.spell == self.spell:
                self.slots -= 1

    # --- invariants -----------------------------------------------------------------

    @invariant()
    def state_matches(self) -> None:
        assert NAMES[self.circuit.state] == self.state

    @invariant()
    def closed_window_counts_match(self) -> None:
        if self.state == "closed":
            assert (self.circuit.calls, self.circuit.fails) == self._window()

    @invariant()
    def half_open_slots_match(self) -> None:
        if self.state == "half_open":
            assert self.circuit.admitted == self.slots
            assert 0 <= self.successes <= self.slots <= self.probes
            assert self.circuit.successes == self.successes < self.probes

    @invariant()
    def until_matches_while_not_closed(self) -> None:
        if self.state != "closed":
            assert self.circuit.until == self.until

    @invariant()
    def run_and_level_match(self) -> None:
        assert (self.circuit.streak, self.circuit.level) == (self.streak, self.level)


# --- stale outcomes, spelled out (the model finds these only with long runs) ----------


def _circuit(probes: int = 1) -> _Circuit:
    """Breaks of exactly 10 s (max_open_for = open_for): the spelled-out times hold."""
    return _Circuit("k", _Settings(0.5, 2, 10.0, probes, WIDTH, _NEVER, 10.0))


def _trip(circuit: _Circuit, now: float) -> None:
    for _ in range(2):
        circuit.record(now, True, circuit.epoch, False)
    assert circuit.state == OPEN


def test_an_outcome_from_before_the_circuit_opened_is_ignored_in_every_later_spell():
    circuit = _circuit()
    late = circuit.epoch  # a call admitted while closed, still in flight
    _trip(circuit, 1000.0)
    for now in (1010.0, 1030.0, 1050.0):  # half-open, probe fails: open; ... three times
        circuit.admit(now)
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
        circuit.admit(now)
        first = circuit.epoch
        circuit.admit(now)
        circuit.record(now, True, circuit.epoch, True)
        assert circuit.state == OPEN
    circuit.admit(1050.0)
    circuit.record(1050.0, False, first, True)  # a success from an earlier spell
    circuit.record(1050.0, False, circuit.epoch, True)  # one of the two this spell needs
    assert circuit.state == HALF_OPEN
    assert circuit.successes == 1


@pytest.mark.parametrize("reopened", [False, True], ids=["closed", "closed-then-reopened"])
def test_an_overdue_probe_answering_after_the_circuit_closed_is_ignored(reopened):
    circuit = _circuit(probes=2)
    _trip(circuit, 1000.0)
    circuit.admit(1010.0)  # spell A: two probes; the first succeeds, the second hangs
    overdue = circuit.epoch
    circuit.admit(1010.0)
    circuit.record(1011.0, False, overdue, True)
    circuit.admit(1020.0)  # both slots taken, the last one admitted open_for ago: spell B
    circuit.admit(1020.0)
    for _ in range(2):
        circuit.record(1021.0, False, circuit.epoch, True)
    assert circuit.state == CLOSED
    if reopened:
        _trip(circuit, 1022.0)
    before = (circuit.state, circuit.until, circuit.calls, circuit.fails)
    circuit.record(1025.0, True, overdue, True)  # the hung probe of spell A fails at last
    assert (circuit.state, circuit.until, circuit.calls, circuit.fails) == before


CircuitMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_circuit_follows_its_state_machine = CircuitMachine.TestCase
