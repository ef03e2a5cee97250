"""RetryBudget: retries <= ratio × first attempts + min_per_second × 10 per 10 s window."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient.retry._budget import BUCKETS, Balance, RetryBudget


def test_reserve_allows_min_per_second_times_ten_retries_without_traffic():
    balance = Balance(RetryBudget(ratio=0.0, min_per_second=0.5))
    granted = [balance.withdraw(3.0) for _ in range(8)]
    assert granted == [True] * 5 + [False] * 3


def test_ratio_allows_that_share_of_first_attempts():
    balance = Balance(RetryBudget(ratio=0.5, min_per_second=0.0))
    for _ in range(10):
        balance.deposit(2.0)
    granted = [balance.withdraw(2.5) for _ in range(7)]
    assert granted == [True] * 5 + [False] * 2


def test_first_attempts_leave_the_window_after_ten_seconds():
    balance = Balance(RetryBudget(ratio=0.5, min_per_second=0.0))
    for _ in range(10):
        balance.deposit(0.5)
    assert balance.withdraw(9.9)
    assert not balance.withdraw(10.1)  # the first attempts of second 0 no longer count


def test_retries_leave_the_window_after_ten_seconds():
    balance = Balance(RetryBudget(ratio=0.0, min_per_second=0.1))  # one retry per window
    assert balance.withdraw(0.5)
    assert not balance.withdraw(9.9)
    assert balance.withdraw(10.1)


def test_a_quiet_window_empties_the_balance():
    balance = Balance(RetryBudget(ratio=0.0, min_per_second=0.1))
    assert balance.withdraw(1.0)
    assert not balance.withdraw(1.5)
    assert balance.withdraw(100.0)


def test_a_clock_that_goes_back_starts_a_new_window():
    """A Retry reused on a new event loop sees a smaller loop time."""
    balance = Balance(RetryBudget(ratio=0.0, min_per_second=0.1))
    assert balance.withdraw(5000.0)
    assert not balance.withdraw(5000.5)
    assert balance.withdraw(0.0)


def _window(events, tick):
    lo = tick - (BUCKETS - 1)
    firsts = sum(1 for t, kind in events if kind == "first" and lo <= math.floor(t) <= tick)
    retries = sum(1 for t, kind in events if kind == "retry" and lo <= math.floor(t) <= tick)
    return firsts, retries


@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 1.0, 3.0]),
    per_second=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
    steps=st.lists(st.tuples(st.floats(min_value=0.0, max_value=4.0), st.booleans()), max_size=200),
)
def test_balance_matches_the_rule_over_the_last_ten_seconds(ratio, per_second, steps):
    """Model check: a retry is granted iff it fits the rule over the current second
    and the nine before it (a brute-force count over every event so far)."""
    balance = Balance(RetryBudget(ratio=ratio, min_per_second=per_second))
    events: list[tuple[float, str]] = []
    now = 0.0
    for gap, is_retry in steps:
        now += gap
        if is_retry:
            firsts, retries = _window(events, math.floor(now))
            expected = retries + 1 <= ratio * firsts + per_second * 10
            assert balance.withdraw(now) is expected
            if expected:
                events.append((now, "retry"))
        else:
            balance.deposit(now)
            events.append((now, "first"))


def test_budget_is_immutable():
    budget = RetryBudget()
    with pytest.raises(AttributeError):
        budget.ratio = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1000.5}, "ratio"),
        ({"ratio": math.nan}, "ratio"),
        ({"ratio": math.inf}, "ratio"),
        ({"ratio": "0.2"}, "ratio"),
        ({"min_per_second": -1.0}, "min_per_second"),
        ({"min_per_second": math.inf}, "min_per_second"),
        ({"min_per_second": math.nan}, "min_per_second"),
        ({"min_per_second": None}, "min_per_second"),
    ],
)
def test_invalid_budget_names_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=rf"RetryBudget: {named} must be"):
        RetryBudget(**kwargs)


def test_edges_of_the_accepted_range_are_accepted():
    assert RetryBudget(ratio=0.0, min_per_second=0.0).ratio == 0.0
    assert RetryBudget(ratio=1000, min_per_second=0).ratio == 1000.0
