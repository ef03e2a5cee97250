import asyncio

import pytest

import resilient
from resilient import _clock


@pytest.mark.looptime
async def test_a_day_of_virtual_time_passes_around_real_loopback_io(server):
    async with resilient.session() as s:
        async with s.get(server.url + "/a") as r:
            assert r.status == 200
        t0 = _clock.now()
        await _clock.sleep(86_400)
        async with s.get(server.url + "/b") as r:
            assert await r.text() == "status 200"
        assert _clock.now() - t0 >= 86_400
    assert server.count() == 2


@pytest.mark.looptime
async def test_deadline_remaining_counts_down_on_loop_clock():
    with resilient.deadline(10):
        await asyncio.sleep(4)
        from resilient._deadline import remaining

        assert remaining() == pytest.approx(6, abs=0.01)
