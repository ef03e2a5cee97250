"""Properties of the in-memory quota windows (hypothesis), on fake time passed explicitly.

:class:`~resilient.throttle._quota.MovingWindow` and
:class:`~resilient.throttle._quota.Quotas` take ``now`` as an argument, so these tests
are pure: no event loop, no clock. Times are multiples of 1/8 s (exact in binary
floating point), so a slot that reaches the edge of its window reaches it exactly, in
every implementation compared.

- a window never takes more than ``amount`` slots in any ``expiry`` span;
- boarding by ``used + in_flight < amount`` and recording when the attempt ends never
  lets ``amount + 1`` arrivals into one window, whatever the latencies;
- ``Quotas.room_at`` / ``record_at`` decide as ``limits``' MovingWindowRateLimiter over
  its MemoryStorage did (the memory path of 0.1.0), on random schedules.
"""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from limits import RateLimitItem
from limits.aio.storage import MemoryStorage
from limits.aio.storage import memory as limits_memory
from limits.aio.strategies import MovingWindowRateLimiter

from resilient.throttle._quota import (
    MIN_QUOTA_WAIT,
    NAMESPACE,
    SWEEP_MIN,
    MovingWindow,
    Quotas,
    parse_quotas,
)

pytestmark = [pytest.mark.timeout(120)]

TICK = 0.125
"""Seconds: every time in these tests is a whole number of ticks (exact in binary)."""
KEY = "http://api.example:443"
QUOTA_TEXTS = st.sampled_from(
    [
        "1/second",
        "3/second",
        "2 per 2 seconds",
        "4 per 3 seconds",
        "2/second;3 per 2 seconds",
        "1/second;5 per 4 seconds",
        "3 per 2 seconds;2/second;6 per 5 seconds",
    ]
)
STEPS = st.integers(0, 20)
"""Ticks between two operations: up to 2.5 s, beyond the shortest windows."""


def windows(quotas: Quotas) -> tuple[MovingWindow, ...]:
    return quotas._windows[KEY]


# --- one window ---------------------------------------------------------------------


@given(
    amount=st.integers(1, 6),
    expiry=st.integers(1, 4),
    steps=st.lists(STEPS, min_size=1, max_size=80),
)
def test_a_window_never_takes_more_than_amount_slots_in_any_expiry_span(amount, expiry, steps):
    window = MovingWindow(amount, float(expiry))
    now, taken = 0.0, []
    for step in steps:
        now += step * TICK
        used = window.used(now)
        assert used == sum(1 for t in taken if now - expiry < t)
        if window.record(now):
            assert used < amount
            taken.append(now)
        else:
            assert used == amount
        assert len(window.slots) <= amount  # bounded memory
    for t in taken:  # every span (t - expiry, t] ending at a slot
        assert sum(1 for u in taken if t - expiry < u <= t) <= amount


def test_a_slot_leaves_its_window_exactly_expiry_seconds_after_it_was_taken():
    """At ``slot + expiry`` the slot has left (limits' window counts agree; only its hit
    still refused there, so a slot taken at that instant in virtual time was lost)."""
    window = MovingWindow(1, 60.0)
    assert window.record(100.0)
    assert window.used(159.875) == 1
    assert not window.record(159.875)
    assert window.used(160.0) == 0
    assert window.record(160.0)
    assert list(window.slots) == [160.0]


# --- boarding and landing: the arrivals ------------------------------------------------


@given(
    text=QUOTA_TEXTS,
    ops=st.lists(
        st.tuples(STEPS, st.sampled_from(["send", "send", "land"]), st.integers(0, 10**6)),
        min_size=1,
        max_size=80,
    ),
)
def test_no_window_of_arrivals_ever_holds_more_than_amount(text, ops):
    """Requests board by ``room_at`` and take their slot by ``record_at`` when they land,
    in any order. A request sent at ``s`` and answered at ``r`` arrived somewhere in
    ``[s, r]``: ``amount + 1`` arrivals can fall in one window only if, when some request
    was sent, ``amount`` requests sent before it had not landed more than ``expiry``
    seconds earlier. That never happens, for every window of the quota."""
    quotas = Quotas(text)
    items = parse_quotas(text)
    now = 0.0
    sent: list[float] = []
    landed: list[float] = []  # math.inf: still in flight
    flying: list[int] = []
    for step, op, pick in ops:
        now += step * TICK
        if op == "send":
            wait, name = quotas.room_at(KEY, len(flying), now)
            if not wait:
                assert name == ""
                flying.append(len(sent))
                sent.append(now)
                landed.append(math.inf)
            else:  # refused only when some window is really full
                assert wait >= MIN_QUOTA_WAIT
                assert any(
                    name == f"quota {item}"
                    and sum(1 for r in landed if now - item.get_expiry() < r <= now) + len(flying)
                    >= item.amount
                    for item in items
                )
        elif flying:
            landed[flying.pop(pick % len(flying))] = now
            quotas.record_at(KEY, now)
    for item in items:
        amount, expiry = item.amount, item.get_expiry()
        for j, s in enumerate(sent):
            overlapping = sum(1 for r in landed[:j] if r > s - expiry)
            assert overlapping < amount, (str(item), j)
    if sent:
        for window in windows(quotas):
            assert len(window.slots) <= window.amount  # bounded memory


# --- against limits' moving window ------------------------------------------------------


async def _limits_room(
    limiter: MovingWindowRateLimiter, items: tuple[RateLimitItem, ...], in_flight: int, now: float
) -> tuple[float, str]:
    """The memory path of 0.1.0 (``Quotas.room`` on limits), verbatim but for ``now``."""
    wait, name = 0.0, ""
    for item in items:
        stats = await limiter.get_window_stats(item, NAMESPACE, KEY)
        used = item.amount - stats.remaining
        if used + in_flight < item.amount:
            continue
        until = stats.reset_time - now if used else float(item.get_expiry())
        until = max(until, MIN_QUOTA_WAIT)
        if until > wait:
            wait, name = until, f"quota {item}"
    return wait, name


def _on_the_edge(taken: list[float], item: RateLimitItem, now: float) -> bool:
    """The ``amount``-th newest slot taken leaves the window exactly at ``now``: here
    (only) limits' hit refuses a slot that ours takes (see the test above)."""
    return len(taken) >= item.amount and taken[-item.amount] == now - item.get_expiry()


@given(
    text=QUOTA_TEXTS,
    ops=st.lists(
        st.tuples(STEPS, st.sampled_from(["room", "record"]), st.integers(0, 7)),
        min_size=1,
        max_size=60,
    ),
)
def test_the_windows_decide_as_limits_moving_window_did(text, ops):
    """Same waits, same window names, same slots taken, on any schedule of reads (with
    any count in flight) and records, including records into full windows."""
    clock = SimpleNamespace(now=1_000_000.0)
    fake_time = SimpleNamespace(time=lambda: clock.now)

    async def run() -> None:
        items = parse_quotas(text)
        limiter = MovingWindowRateLimiter(MemoryStorage())
        ours = Quotas(text)
        taken: list[list[float]] = [[] for _ in items]  # the slots limits took, per window
        for step, op, in_flight in ops:
            clock.now += step * TICK
            now = clock.now
            if op == "room":
                expected = await _limits_room(limiter, items, in_flight, now)
                wait, name = ours.room_at(KEY, in_flight, now)
                assert (wait, name) == (pytest.approx(expected[0], abs=1e-9), expected[1])
            else:
                if any(_on_the_edge(t, item, now) for t, item in zip(taken, items, strict=True)):
                    continue  # the one instant where the two differ, on purpose
                for item, slots in zip(items, taken, strict=True):
                    if await limiter.hit(item, NAMESPACE, KEY):
                        slots.append(now)
                ours.record_at(KEY, now)
            for item, window in zip(items, windows(ours), strict=True):
                stats = await limiter.get_window_stats(item, NAMESPACE, KEY)
                assert window.used(now) == item.amount - stats.remaining

    with mock.patch.object(limits_memory, "time", fake_time):
        asyncio.run(run())


# --- bounded memory ---------------------------------------------------------------------


def test_keys_whose_windows_have_emptied_are_forgotten():
    quotas = Quotas("1/second")
    for i in range(20 * SWEEP_MIN):
        quotas.record_at(f"key-{i}", float(i))  # each key's window empties a second later
        assert len(quotas) <= SWEEP_MIN


def test_the_keys_held_stay_within_twice_the_keys_with_slots():
    quotas = Quotas("2/second;3 per 5 seconds")
    now = 0.0
    for i in range(20 * SWEEP_MIN):
        now += 0.001  # 1,000 new keys per second: about 5,000 with a slot in a window
        quotas.record_at(f"key-{i}", now)
        assert len(quotas) <= 2 * 5_001


def test_a_key_with_slots_in_its_windows_is_never_forgotten():
    quotas = Quotas("1/day")
    quotas.record_at("busy", 0.0)
    for i in range(4 * SWEEP_MIN):
        quotas.room_at(f"idle-{i}", 0, 1.0 + i)
    assert len(quotas) < 4 * SWEEP_MIN  # swept
    assert quotas.room_at("busy", 0, 4 * SWEEP_MIN + 1.0) == (
        pytest.approx(86_400.0 - 4 * SWEEP_MIN - 1.0),
        "quota 1 per 1 day",
    )
