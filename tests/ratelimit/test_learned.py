"""The learned-rate law (resilient.ratelimit._learned): its invariants, property-tested."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient.ratelimit._learned import (
    BETA,
    DOUBLING,
    MIN_RATE,
    MIN_SPAN,
    PLATEAU,
    SLOW_START_MIN,
    LearnedRate,
)

times = st.floats(min_value=0.0, max_value=1e5, allow_nan=False)
counts = st.integers(min_value=0, max_value=5_000)
ceilings = st.one_of(st.just(math.inf), st.floats(min_value=0.5, max_value=1e6))


def learned_after(accepted: int, span: float, *, now: float = 100.0) -> LearnedRate:
    """A key past slow start (a first cut, 2 s at 20/s, a measured cut at ``now``), then
    ``accepted`` responses spread over ``span`` s."""
    rate = LearnedRate(0.0)
    rate.cut(now - 2.0)
    for i in range(40):
        rate.accepted(now - 2.0 + 0.05 * (i + 1))
    rate.cut(now)
    assert not rate.slow
    for i in range(accepted):
        rate.accepted(now + span * (i + 1) / (accepted + 1))
    return rate


def test_a_key_is_not_paced_before_its_first_429():
    rate = LearnedRate(0.0)
    assert not rate.paced
    assert rate.rate(10.0) == math.inf


def test_slow_start_ends_at_half_the_rate_it_had_doubled_to():
    rate = LearnedRate(0.0)
    rate.cut(0.0)
    rate.accepted(1.5)
    doubled_to = rate.rate(2.0)
    rate.cut(2.0)
    assert not rate.slow
    assert rate.rate(2.0) == pytest.approx(BETA * doubled_to / 2)


def test_a_first_429_after_an_unmeasured_burst_starts_slow_start_at_least_one_per_second():
    rate = LearnedRate(0.0)
    rate.cut(0.001)
    assert rate.paced
    assert rate.slow
    assert rate.rate(0.001) == pytest.approx(SLOW_START_MIN)


def test_slow_start_grows_with_accepted_responses_not_with_time():
    rate = LearnedRate(0.0)
    rate.cut(0.0)
    assert rate.rate(30.0) == pytest.approx(SLOW_START_MIN)  # idle: no evidence, no growth
    for i in range(10):
        rate.accepted(30.0 + i * 0.01)
    assert rate.rate(30.1) == pytest.approx(SLOW_START_MIN + 10 * math.log(2) / DOUBLING)


def test_slow_start_doubles_every_doubling_period_while_callers_send_at_it():
    rate, now = LearnedRate(0.0), 0.0
    rate.cut(now)
    rate.accepted(now)  # the probe's answer
    start = rate.rate(now)
    while now < 2.0:  # one departure per 1/r, each accepted
        now += 1.0 / rate.rate(now)
        rate.accepted(now)
    doublings = math.log2(rate.rate(now) / start)
    assert 0.5 * now / DOUBLING <= doublings <= now / DOUBLING * 1.1


def test_a_measured_cut_starts_at_beta_times_the_accepted_rate():
    rate = learned_after(100, 2.0)
    m = rate.measured(102.0)
    assert m is not None
    rate.cut(102.0)
    assert not rate.slow
    assert rate.rate(102.0) == pytest.approx(BETA * m)
    assert rate.peak == pytest.approx(PLATEAU * m)


def test_a_429_after_too_little_sending_keeps_the_rate_it_knew():
    rate = learned_after(100, 2.0)
    rate.cut(102.0)
    before = rate.rate(102.0)
    rate.cut(102.0 + MIN_SPAN / 2)  # nothing measured since: random 429s do not compound
    assert rate.rate(102.0 + MIN_SPAN / 2) == pytest.approx(before)


def test_only_a_429_to_a_request_sent_after_the_last_cut_counts():
    rate = LearnedRate(0.0)
    sent_at = rate.cuts
    rate.cut(1.0)
    assert not rate.counts(sent_at)
    assert rate.counts(rate.cuts)


@given(accepted=counts, span=st.floats(min_value=0.0, max_value=30.0), t=times, ceiling=ceilings)
def test_the_rate_stays_between_min_rate_and_the_ceiling(accepted, span, t, ceiling):
    rate = learned_after(accepted, span)
    rate.ceiling = ceiling
    rate.cut(100.0 + span)
    value = rate.rate(100.0 + span + t)
    assert MIN_RATE <= value <= ceiling


@given(accepted=counts, span=st.floats(min_value=0.0, max_value=30.0), t1=times, t2=times)
def test_the_rate_never_falls_between_cuts(accepted, span, t1, t2):
    rate = learned_after(accepted, span)
    rate.cut(100.0 + span)
    early, late = sorted((t1, t2))
    assert rate.rate(100.0 + span + early) <= rate.rate(100.0 + span + late) * (1 + 1e-12)


@given(accepted=st.integers(min_value=1, max_value=5_000), span=st.floats(1.0, 30.0))
def test_the_climb_reaches_the_plateau_and_passes_it(accepted, span):
    rate = learned_after(accepted, span)
    rate.cut(100.0 + span)
    start = rate.rate(100.0 + span)
    assert start <= rate.peak * (1 + 1e-9)
    assert rate.rate(100.0 + span + 60.0) > rate.peak


@given(accepted=st.integers(min_value=0, max_value=5_000), span=st.floats(0.0, 30.0))
def test_the_measured_rate_is_never_above_what_was_accepted(accepted, span):
    rate = learned_after(accepted, span)
    m = rate.measured(100.0 + span)
    if m is not None:
        sending = max(span, MIN_SPAN)
        # the ring covers at least three quarters of the last second of sending
        assert m * 0.75 * min(sending, 1.0) <= accepted + 1e-9
