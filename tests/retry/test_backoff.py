"""Backoff strategies: formulas stay in bounds; per-call state; tenacity waits adapted."""

from __future__ import annotations

import math

import pytest
import tenacity
from hypothesis import given
from hypothesis import strategies as st

from resilient.retry._backoff import DecorrelatedJitter, FullJitter, per_call_factory

bases = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)
spans = st.floats(min_value=1.0, max_value=1e6, allow_nan=False, allow_infinity=False)
attempts = st.integers(min_value=1, max_value=100_000)


@given(base=bases, span=spans, attempt=attempts)
def test_full_jitter_stays_within_zero_and_the_capped_exponential(base, span, attempt):
    strategy = FullJitter(base=base, cap=base * span)
    delay = strategy(attempt)
    ceiling = strategy.cap if attempt > 1000 else min(strategy.cap, base * 2.0 ** (attempt - 1))
    assert 0.0 <= delay <= ceiling


@pytest.mark.parametrize("attempt", [1024, 1025, 10**6, 10**18])
def test_full_jitter_survives_huge_attempt_numbers(attempt):
    delay = FullJitter(0.5, 30.0)(attempt)
    assert 0.0 <= delay <= 30.0


def test_full_jitter_first_retry_is_bounded_by_base():
    strategy = FullJitter(base=2.0, cap=100.0)
    assert max(strategy(1) for _ in range(500)) <= 2.0


@given(base=bases, span=spans, n=st.integers(min_value=1, max_value=200))
def test_decorrelated_jitter_stays_between_base_and_cap(base, span, n):
    strategy = DecorrelatedJitter(base=base, cap=base * span)
    delay = strategy.per_call()
    previous = strategy.base
    for attempt in range(1, n + 1):
        value = delay(attempt)
        assert strategy.base <= value <= strategy.cap
        assert value <= 3.0 * previous * (1 + 1e-12)
        previous = value


def test_decorrelated_jitter_state_is_per_call():
    strategy = DecorrelatedJitter(base=1.0, cap=1e9)
    grown = strategy.per_call()
    for _ in range(50):
        for attempt in range(1, 20):
            grown(attempt)  # this call's "previous" grows towards the cap
        assert strategy.per_call()(1) <= 3.0  # a new call starts again from base


def test_strategies_are_immutable():
    strategy = FullJitter(0.5, 30.0)
    with pytest.raises(AttributeError):
        strategy.base = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("cls", [FullJitter, DecorrelatedJitter])
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"base": 0.0}, "base"),
        ({"base": -1.0}, "base"),
        ({"base": math.nan}, "base"),
        ({"base": math.inf}, "base"),
        ({"base": "1"}, "base"),
        ({"base": True}, "base"),
        ({"base": 2.0, "cap": 1.0}, "cap"),
        ({"cap": math.inf}, "cap"),
        ({"cap": math.nan}, "cap"),
    ],
)
def test_invalid_strategy_configuration_names_the_argument(cls, kwargs, named):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {named} must be"):
        cls(**kwargs)


def test_tenacity_wait_exponential_is_adapted_with_attempt_numbers():
    start = per_call_factory(tenacity.wait_exponential(multiplier=1, max=10))
    delay = start()
    assert [delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_tenacity_wait_fixed_is_adapted():
    delay = per_call_factory(tenacity.wait_fixed(3))()
    assert delay(1) == delay(5) == 3.0


def test_tenacity_combined_waits_are_adapted():
    delay = per_call_factory(tenacity.wait_fixed(1) + tenacity.wait_fixed(2))()
    assert delay(1) == 3.0


def test_plain_callable_is_used_as_is():
    delay = per_call_factory(lambda attempt: attempt * 0.25)()
    assert delay(4) == 1.0


def test_non_callable_backoff_is_rejected():
    with pytest.raises(ValueError, match="backoff must be"):
        per_call_factory(5)  # type: ignore[arg-type]
