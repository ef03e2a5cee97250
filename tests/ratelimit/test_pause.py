"""PauseGate: the per-key pause, probe election and hand-over, in virtual time."""

from __future__ import annotations

import asyncio
import math

import pytest

from resilient import _clock
from resilient.ratelimit._pause import MAX_PAUSE, PauseGate, PauseTooLong

FAR = math.inf


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_new_gate_is_open_and_idle():
    gate = PauseGate()
    assert not gate.closed
    assert gate.remaining() == 0.0
    assert gate.is_idle()


@pytest.mark.looptime
async def test_pause_closes_the_gate_for_the_delay():
    gate = PauseGate()
    assert gate.pause(30, probe=False) == pytest.approx(30)
    assert gate.closed
    assert gate.remaining() == pytest.approx(30)


@pytest.mark.looptime
async def test_a_shorter_pause_never_shortens_a_longer_one():
    gate = PauseGate()
    gate.pause(100, probe=False)
    assert gate.pause(5, probe=False) == pytest.approx(100)


@pytest.mark.looptime
async def test_an_infinite_pause_is_capped():
    gate = PauseGate()
    assert gate.pause(math.inf, probe=False) == pytest.approx(MAX_PAUSE)


@pytest.mark.looptime
async def test_an_open_gate_lets_a_caller_through_at_once():
    assert await PauseGate().wait_turn(FAR) is False


@pytest.mark.looptime
async def test_the_head_becomes_the_probe_when_the_pause_ends():
    gate = PauseGate()
    gate.pause(10, probe=False)
    t0 = _clock.now()
    assert await gate.wait_turn(FAR) is True
    assert _clock.now() - t0 == pytest.approx(10)
    assert gate.probing
    assert gate.closed


@pytest.mark.looptime
async def test_followers_wait_for_the_probe_and_are_released_together():
    gate = PauseGate()
    gate.pause(10, probe=False)
    roles = [asyncio.create_task(gate.wait_turn(FAR)) for _ in range(5)]
    await asyncio.sleep(11)
    done = [t for t in roles if t.done()]
    assert [t.result() for t in done] == [True]  # exactly one probe
    await asyncio.sleep(100)
    assert sum(t.done() for t in roles) == 1  # the others wait on the probe, not the clock
    gate.open()
    assert sorted(await asyncio.gather(*roles)) == [False] * 4 + [True]


@pytest.mark.looptime
async def test_a_429_on_the_probe_starts_a_new_pause_and_one_more_probe():
    gate = PauseGate()
    gate.pause(10, probe=False)
    first = asyncio.create_task(gate.wait_turn(FAR))
    others = [asyncio.create_task(gate.wait_turn(FAR)) for _ in range(3)]
    assert await first is True
    gate.pause(20, probe=True)
    again = asyncio.create_task(gate.wait_turn(FAR, front=True))
    t0 = _clock.now()
    assert await again is True
    assert _clock.now() - t0 == pytest.approx(20)
    assert not any(t.done() for t in others)
    gate.open()
    assert await asyncio.gather(*others) == [False] * 3


@pytest.mark.looptime
async def test_a_failed_probe_hands_the_probe_to_the_next_waiter_at_once():
    gate = PauseGate()
    gate.pause(10, probe=False)
    first = asyncio.create_task(gate.wait_turn(FAR))
    second = asyncio.create_task(gate.wait_turn(FAR))
    assert await first is True
    t0 = _clock.now()
    gate.probe_failed()
    assert await second is True
    assert _clock.now() == t0


@pytest.mark.looptime
async def test_a_cancelled_head_hands_the_probe_over():
    gate = PauseGate()
    gate.pause(10, probe=False)
    head = asyncio.create_task(gate.wait_turn(FAR))
    second = asyncio.create_task(gate.wait_turn(FAR))
    await asyncio.sleep(3)
    head.cancel()
    t0 = _clock.now()
    assert await second is True
    assert _clock.now() - t0 == pytest.approx(7)
    assert gate.waiting() == 0


@pytest.mark.looptime
async def test_a_cancelled_waiter_leaves_the_queue():
    gate = PauseGate()
    gate.pause(10, probe=False)
    tasks = [asyncio.create_task(gate.wait_turn(FAR)) for _ in range(3)]
    await settle()
    assert gate.waiting() == 3
    tasks[1].cancel()
    await settle()
    assert gate.waiting() == 2
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert gate.waiting() == 0


@pytest.mark.looptime
async def test_a_pause_beyond_the_limit_raises_without_waiting():
    gate = PauseGate()
    gate.pause(60, probe=False)
    t0 = _clock.now()
    with pytest.raises(PauseTooLong) as caught:
        await gate.wait_turn(t0 + 30)
    assert caught.value.retry_after == pytest.approx(60)
    assert _clock.now() == t0
    assert gate.waiting() == 0


@pytest.mark.looptime
async def test_an_extended_pause_makes_a_waiter_give_up_at_once():
    gate = PauseGate()
    gate.pause(10, probe=False)
    t0 = _clock.now()
    waiter = asyncio.create_task(gate.wait_turn(t0 + 30))
    await asyncio.sleep(2)
    gate.pause(100, probe=False)
    with pytest.raises(PauseTooLong):
        await waiter
    assert _clock.now() - t0 == pytest.approx(2)


@pytest.mark.looptime
async def test_a_waiter_behind_a_slow_probe_gives_up_at_its_limit():
    gate = PauseGate()
    gate.pause(1, probe=False)
    t0 = _clock.now()
    probe = asyncio.create_task(gate.wait_turn(FAR))
    follower = asyncio.create_task(gate.wait_turn(t0 + 30))
    assert await probe is True
    with pytest.raises(PauseTooLong) as caught:
        await follower
    assert _clock.now() - t0 == pytest.approx(30, abs=0.01)
    assert caught.value.retry_after == 0.0


@pytest.mark.looptime
async def test_front_queues_ahead_of_earlier_waiters():
    gate = PauseGate()
    gate.pause(5, probe=False)
    back = asyncio.create_task(gate.wait_turn(FAR))
    await settle()
    front = asyncio.create_task(gate.wait_turn(FAR, front=True))
    assert await front is True
    assert not back.done()
    gate.open()
    assert await back is False


@pytest.mark.looptime
async def test_idle_means_nothing_to_remember():
    gate = PauseGate()
    assert gate.is_idle()
    gate.pause(10, probe=False)
    assert not gate.is_idle()  # a pause still running
    await asyncio.sleep(10)
    assert gate.is_idle()  # due, nobody waiting: the next caller may simply send
    task = asyncio.create_task(gate.wait_turn(FAR))
    assert await task is True
    assert not gate.is_idle()  # a probe on the wire
    gate.open()
    assert gate.is_idle()
