"""Properties of the token bucket and of the Throttle's queue (hypothesis).

The pure ``TokenBucket`` is driven with explicit times; the queue is checked end to end
against a real loopback server in virtual time (looptime), a few examples only.
test_throttle.py holds the example-based tests and the basic ``burst + rate·t`` bound.
"""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient.throttle._bucket import GRANT_SLACK, TokenBucket
from resilient.throttle._throttle import Throttle

RATES = st.floats(0.01, 1e4)
BURSTS = st.integers(1, 20)
STARTS = st.floats(0.0, 1e6)
TICK = 1e-6


def _max_in_any_interval(grants: list[float], rate: float) -> float:
    """max over i <= j of (j - i + 1) - rate · (grants[j] - grants[i]): must be <= burst."""
    excess = 0.0
    for i, first in enumerate(grants):
        for j in range(i, len(grants)):
            excess = max(excess, j - i + 1 - rate * (grants[j] - first + GRANT_SLACK))
    return excess


@given(
    rate=RATES,
    burst=BURSTS,
    start=STARTS,
    ops=st.lists(
        st.tuples(st.floats(0.0, 3.0), st.sampled_from(["take", "take-and-give-back", "peek"])),
        min_size=1,
        max_size=50,
    ),
)
def test_grants_kept_in_any_interval_never_exceed_burst_plus_rate_times_t(rate, burst, start, ops):
    """A token given back (a cancelled waiter's) is as if it had never been taken."""
    bucket = TokenBucket(rate, burst, start)
    now, kept = start, []
    for advance, op in ops:
        now += advance / rate
        if op == "peek":
            bucket.delay(now)
        elif bucket.take(now) == 0.0:
            if op == "take":
                kept.append(now)
            else:
                bucket.give_back()
    assert _max_in_any_interval(kept, rate) <= burst + 1e-9


@given(rate=RATES, burst=BURSTS, start=STARTS, times=st.lists(st.floats(-10.0, 10.0), max_size=40))
def test_tokens_stay_between_the_grant_slack_debt_and_burst_on_any_clock(rate, burst, start, times):
    """Whatever the clock does (another loop's clock goes back), the count stays bounded."""
    bucket = TokenBucket(rate, burst, start)
    for offset in times:
        bucket.take(start + offset * 1000.0 / rate)
        assert -rate * GRANT_SLACK - 1e-9 <= bucket.tokens <= burst


@given(rate=RATES, burst=BURSTS, start=STARTS, steps=st.lists(st.floats(0.0, 2.0), max_size=30))
def test_delay_names_what_take_would_do_and_takes_nothing(rate, burst, start, steps):
    bucket = TokenBucket(rate, burst, start)
    now = start
    for step in steps:
        now += step / rate
        seen = bucket.delay(now)
        assert bucket.delay(now) == seen  # a peek takes nothing
        taken = bucket.take(now)
        assert (seen == 0.0) == (taken == 0.0)
        if taken:
            assert taken == pytest.approx(seen, rel=1e-9, abs=1e-12)


@given(rate=st.floats(0.1, 100.0), burst=BURSTS, start=STARTS, span=st.floats(1.0, 200.0))
def test_a_taker_that_comes_back_when_told_gets_the_full_rate(rate, burst, start, span):
    """Liveness: over ``t`` seconds a greedy taker gets burst + rate·t tokens, give or take one."""
    bucket = TokenBucket(rate, burst, start)
    now, end, grants = start, start + span / rate, 0
    while now <= end:
        delay = bucket.take(now)
        if delay == 0.0:
            grants += 1
        else:
            now += delay
    assert burst + span - 1 <= grants <= burst + span + 1


@given(rate=RATES, burst=BURSTS, start=STARTS, idle=st.floats(0.0, 1e6))
def test_an_idle_bucket_is_full_and_holds_burst_tokens_only(rate, burst, start, idle):
    bucket = TokenBucket(rate, burst, start)
    for _ in range(burst):
        assert bucket.take(start) == 0.0
    later = start + (idle + burst + 1e-3) / rate  # 1e-3 token: float rounding of the sum
    assert bucket.full(later)
    grants = 0
    while bucket.take(later) == 0.0:
        grants += 1
    assert grants == burst


@given(rate=RATES, burst=BURSTS, start=STARTS)
def test_give_back_never_lifts_the_bucket_above_burst(rate, burst, start):
    bucket = TokenBucket(rate, burst, start)
    bucket.give_back()
    bucket.give_back()
    assert bucket.tokens == burst
    assert bucket.refill(start + 1e6 / rate) == burst


# --- the Throttle's queue, end to end ---------------------------------------------

_example = itertools.count()


async def _get(session: aiohttp.ClientSession, url: str, throttle: Throttle) -> None:
    async with session.get(url, middlewares=(throttle,)) as resp:
        await resp.read()


@pytest.mark.looptime
@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rate=st.sampled_from([0.5, 1.0, 4.0]),
    burst=st.integers(1, 3),
    gaps=st.lists(st.sampled_from([0.0, 0.0, 0.1, 0.3, 1.0, 2.5]), min_size=2, max_size=7),
)
async def test_callers_reach_the_server_in_arrival_order_within_the_rate(
    server, client, rate, burst, gaps
):
    prefix = f"/e{next(_example)}-"
    throttle = Throttle(rate, burst=burst)
    tasks = []
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(_get(client, f"{server.url}{prefix}{i}", throttle)))
        for _ in range(5):  # let it reach the throttle before the next one starts
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    sent = {a.path: a.time for a in server.arrivals if a.path.startswith(prefix)}
    times = [sent[f"{prefix}{i}"] for i in range(len(gaps))]  # in the callers' order
    assert all(earlier <= later + TICK for earlier, later in itertools.pairwise(times))
    assert _max_in_any_interval(sorted(times), rate) <= burst + rate * TICK
