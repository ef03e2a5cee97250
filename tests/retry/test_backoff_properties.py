"""Backoff maths stays within its bounds for any input (hypothesis).

Covers the helpers test_backoff.py does not: ``capped_doubling`` (shared by Retry and
RateLimitBackoff), decorrelated jitter's step from any previous wait, tenacity waits
through the adapter, Retry's clamp of a user backoff, and the 429 backoff with its
floors against ``Retry-After: 0`` hot loops.
"""

from __future__ import annotations

import itertools
import math

import tenacity
from hypothesis import given
from hypothesis import strategies as st

from resilient.ratelimit._ratelimit import backoff_delay
from resilient.retry._backoff import (
    DecorrelatedJitter,
    FullJitter,
    capped_doubling,
    per_call_factory,
)
from resilient.retry._retry import _clamp

BASES = st.floats(1e-6, 1e3)
SPANS = st.floats(1.0, 1e6)
EXPONENTS = st.integers(-(10**18), 10**18)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


@given(BASES, SPANS, EXPONENTS)
def test_capped_doubling_is_the_doubling_step_up_to_the_cap(base, span, exponent):
    cap = base * span
    expected = cap if exponent >= 1023 else min(cap, base * 2.0 ** max(exponent, 0))
    assert capped_doubling(base, cap, exponent) == expected


@given(BASES, SPANS, EXPONENTS, st.integers(0, 10**6))
def test_capped_doubling_never_shrinks_as_the_exponent_grows(base, span, exponent, more):
    cap = base * span
    assert (
        base
        <= capped_doubling(base, cap, exponent)
        <= capped_doubling(base, cap, exponent + more)
        <= cap
    )


@given(BASES, SPANS, st.floats(0.0, 1.0))
def test_decorrelated_step_from_any_previous_wait_stays_between_base_and_cap(base, span, share):
    strategy = DecorrelatedJitter(base=base, cap=base * span)
    previous = strategy.base + share * (strategy.cap - strategy.base)
    assert strategy.base <= strategy.step(previous) <= strategy.cap


@given(st.floats(1e-6, 1.0), st.integers(1, 10**6))
def test_decorrelated_jitter_with_an_enormous_cap_neither_overflows_nor_exceeds_it(base, attempt):
    strategy = DecorrelatedJitter(base=base, cap=1.7e308)  # 3 × previous overflows to inf
    delay = strategy.per_call()
    assert all(base <= delay(n) <= 1.7e308 for n in range(attempt, attempt + 30))


@given(BASES, SPANS, st.integers(-5, 10**6))
def test_full_jitter_is_never_negative_nor_above_cap_even_for_non_positive_attempts(
    base, span, attempt
):
    strategy = FullJitter(base=base, cap=base * span)
    assert 0.0 <= strategy(attempt) <= strategy.cap


@given(
    multiplier=st.floats(0.01, 10.0),
    low=st.floats(0.0, 5.0),
    span=st.floats(0.0, 100.0),
    attempts=st.integers(1, 60),
)
def test_tenacity_exponential_wait_through_the_adapter_stays_within_its_min_and_max(
    multiplier, low, span, attempts
):
    high = low + span
    delay = per_call_factory(tenacity.wait_exponential(multiplier=multiplier, min=low, max=high))()
    assert all(low <= delay(n) <= high for n in range(1, attempts + 1))


@given(ANY_FLOAT, st.floats(0.0, 1e6))
def test_retry_clamps_any_backoff_value_into_zero_and_max_delay(value, max_delay):
    delay = _clamp(value, max_delay)
    assert 0.0 <= delay <= max_delay
    if 0.0 <= value <= max_delay:
        assert delay == value


# --- RateLimitBackoff's backoff ---------------------------------------------------

SERVER = st.one_of(st.none(), st.floats(0.0, 1e7), st.just(math.inf))


@given(SERVER, st.integers(1, 10**6), BASES, SPANS)
def test_429_backoff_is_jitter_without_a_server_time_else_at_least_the_server_time(
    server, strikes, base, span
):
    cap = base * span
    delay = backoff_delay(server, strikes, base=base, cap=cap)
    if server is None:
        assert 0.0 <= delay <= capped_doubling(base, cap, strikes - 1)
    else:
        assert delay >= server
        assert delay <= max(server, cap)


@given(st.floats(0.0, 1e7), BASES, SPANS)
def test_429_backoff_trusts_the_server_on_the_first_strike(server, base, span):
    assert backoff_delay(server, 1, base=base, cap=base * span) == server


@given(st.integers(2, 200), BASES, SPANS)
def test_retry_after_zero_repeated_backs_off_from_a_doubling_floor(strikes, base, span):
    """The hot-loop guard: the n-th ``Retry-After: 0`` of a call waits base·2^(n−2), capped."""
    cap = base * span
    waits = [backoff_delay(0.0, n, base=base, cap=cap) for n in range(2, strikes + 1)]
    assert waits[0] == base
    assert all(a <= b for a, b in itertools.pairwise(waits))
    assert waits[-1] == capped_doubling(base, cap, strikes - 2)
