"""Throttle(quotas=...): moving windows in memory, mostly in REAL time.

The windows run on the event loop's clock, as the server's arrival times do. Most tests
here use short real windows (1-2 s) with real latencies; the ``looptime`` ones fill
minute-long windows in virtual time. A slot counts from the response, so the windows
hold for the server's arrival times exactly; a window is checked with a tolerance of
``JITTER``. Pure properties of the windows: test_quota_properties.py.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

import resilient
from resilient import DeadlineExceeded
from resilient.testing import SimulatedAPI
from resilient.throttle._quota import Quotas, parse_quotas
from resilient.throttle._throttle import Throttle

JITTER = 0.002
"""Seconds of tolerance on a window of arrival times."""
FAST = 1000.0
"""A bucket rate that never waits: only the quota paces."""


async def get(session: aiohttp.ClientSession, url: str, throttle: Throttle) -> int:
    async with session.get(url, middlewares=(throttle,)) as resp:
        await resp.read()
        return resp.status


def most_in_any_window(times: list[float], width: float) -> int:
    """The most arrivals within any ``width``-second span (less ``JITTER``)."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, sum(1 for t in times[i:] if t < start + width - JITTER))
    return best


def arrival_times(server, path: str | None = None) -> list[float]:
    return [a.time for a in server.arrivals if path is None or a.path == path]


async def test_a_window_is_never_exceeded(server, client):
    throttle = Throttle(FAST, burst=100, quotas="4/second")
    statuses = await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(8)))
    assert statuses == [200] * 8
    times = arrival_times(server)
    assert len(times) == 8
    assert most_in_any_window(times, 1.0) == 4
    assert max(times) - min(times) >= 1.0 - JITTER  # the second four waited for the window


async def test_every_window_of_several_is_respected(server, client):
    throttle = Throttle(FAST, burst=100, quotas="2 per 1 second; 3 per 2 seconds")
    await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(4)))
    times = arrival_times(server)
    assert len(times) == 4
    assert most_in_any_window(times, 1.0) <= 2
    assert most_in_any_window(times, 2.0) <= 3


async def test_a_quota_wait_sleeps_until_the_window_frees_a_slot(server, client, monkeypatch):
    calls = 0
    room_at = Quotas.room_at

    def counted(self: Quotas, key: str, in_flight: int, now: float) -> tuple[float, str]:
        nonlocal calls
        calls += 1
        return room_at(self, key, in_flight, now)

    monkeypatch.setattr(Quotas, "room_at", counted)
    throttle = Throttle(FAST, burst=100, quotas="3/second")
    await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(6)))
    assert server.count() == 6
    assert calls >= 6
    # 3 at once; the 4th looks once, then again as each of the 3 lands and at the
    # reset; the others follow. A busy loop would look thousands of times in that second.
    assert calls <= 3 * 6


async def test_a_newcomer_does_not_overtake_a_quota_waiter_even_with_a_token(server, client):
    throttle = Throttle(FAST, burst=100, quotas="2/second")
    await asyncio.gather(*(get(client, server.url + "/fill", throttle) for _ in range(2)))
    waiter = asyncio.create_task(get(client, server.url + "/waiter", throttle))
    await asyncio.sleep(0.05)  # the waiter is queued; the bucket has tokens to spare
    assert throttle.waiting(server.url) == 1
    newcomer = asyncio.create_task(get(client, server.url + "/newcomer", throttle))
    await asyncio.gather(waiter, newcomer)
    assert [a.path for a in server.arrivals][-2:] == ["/waiter", "/newcomer"]


async def test_a_request_refused_by_the_quota_spends_no_token(server, client):
    throttle = Throttle(1.0, burst=3, quotas="2/second")
    await asyncio.gather(*(get(client, server.url + "/a", throttle) for _ in range(2)))
    await asyncio.sleep(0.5)  # 1.5 tokens; the window is full until the first two leave it
    await asyncio.gather(*(get(client, server.url + "/b", throttle) for _ in range(2)))
    first, *_, last = arrival_times(server)
    assert last - first < 1.5  # both at about 1.0; a lost token would push the last to 2.0


async def test_keys_have_separate_quotas(server, client):
    throttle = Throttle(FAST, burst=10, quotas="1/second", key=lambda r: r.url.path)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(get(client, server.url + p, throttle) for p in ("/a", "/b", "/c")))
    assert server.count() == 3
    assert loop.time() - start < 0.5  # nobody waited for another key's window


async def test_a_quota_wait_beyond_the_deadline_raises_without_sending(server, client):
    throttle = Throttle(FAST, burst=10, quotas="1/minute")
    await get(client, server.url + "/first", throttle)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with resilient.deadline(5.0), pytest.raises(DeadlineExceeded, match="quota 1 per 1 minute"):
        await get(client, server.url + "/second", throttle)
    assert loop.time() - start < 0.5
    assert server.count("/second") == 0


async def test_a_quota_waiter_leaves_the_queue_when_it_gives_up(server, client):
    throttle = Throttle(FAST, burst=10, quotas="1/minute")
    await get(client, server.url + "/first", throttle)
    with resilient.deadline(5.0), pytest.raises(DeadlineExceeded):
        await get(client, server.url + "/second", throttle)
    assert throttle.waiting(server.url) == 0


@pytest.mark.looptime
@pytest.mark.timeout(60)
async def test_a_minute_window_fills_and_frees_in_virtual_time(server, client):
    """The windows read the loop clock: a looptime test fills "200/minute" and waits
    for it to free (in no real time), and a slot leaves exactly a minute after it was
    taken, so requests answered at once still take theirs when the window turns."""
    throttle = Throttle(FAST, burst=500, quotas="200/minute")
    statuses = await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(450)))
    assert statuses == [200] * 450
    times = arrival_times(server)
    first = times[0]
    assert [round(t - first, 3) for t in times[::50]] == [0, 0, 0, 0, 60, 60, 60, 60, 120]
    assert most_in_any_window(times, 60.0) == 200
    assert throttle.waiting(server.url) == 0


@pytest.mark.looptime
@pytest.mark.timeout(60)
async def test_two_windows_of_a_quota_each_hold_in_virtual_time(server):
    throttle = Throttle(FAST, burst=100, quotas="10/minute;25/hour")
    no_total = aiohttp.ClientTimeout(total=None)  # the hour's last five wait 58 minutes
    async with aiohttp.ClientSession(timeout=no_total) as client:
        await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(30)))
    times = arrival_times(server)
    first = times[0]
    assert most_in_any_window(times, 60.0) == 10
    assert most_in_any_window(times, 3600.0) == 25
    assert [round(t - first) for t in times[::5]] == [0, 0, 60, 60, 120, 3600]


@pytest.mark.looptime
@pytest.mark.timeout(60)
async def test_windows_in_memory_are_read_and_written_without_an_await(server, client, monkeypatch):
    async def awaited(*_args: object) -> None:
        raise AssertionError("the memory path awaited the quota windows")

    monkeypatch.setattr(Quotas, "room", awaited)
    monkeypatch.setattr(Quotas, "record", awaited)
    throttle = Throttle(FAST, burst=10, quotas="2/second")
    await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(5)))
    times = arrival_times(server)
    assert [round(t - times[0], 3) for t in times] == [0, 0, 1, 1, 2]


def test_quotas_are_parsed_with_limits_syntax():
    assert [str(item) for item in parse_quotas("200/minute;5000/day")] == [
        "200 per 1 minute",
        "5000 per 1 day",
    ]


def test_the_quota_in_the_error_is_the_text_given():
    with pytest.raises(ValueError, match=r"got '200/fortnight'"):
        Throttle(1.0, quotas="200/fortnight")


async def test_a_slot_counts_from_the_response_so_late_arrivals_earn_no_429():
    """The server counts arrivals. The first requests reach the wire late (a new
    connection, a crowded loop: 0-50 ms after they were let through), the next ones
    at once; a slot counted from the send would let the 21st arrive less than a
    window after the 1st. Counted from the response, none is refused, and the quota
    is still used almost to the full."""
    limit, total = 20, 60
    late = [0.05 - 0.0025 * i for i in range(limit)]

    async def reach_the_wire_late(request, handler):
        if late:
            await asyncio.sleep(late.pop(0))
        return await handler(request)

    throttle = Throttle(FAST, burst=100, quotas=f"{limit}/second")
    async with (
        SimulatedAPI(quota=(limit, 1.0)) as api,
        aiohttp.ClientSession(middlewares=(throttle, reach_the_wire_late)) as session,
    ):

        async def one() -> int:
            async with session.get(api.url + "/contacts/1") as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(total)))
    assert statuses.count(429) == 0
    times = sorted(entry.time for entry in api.log)
    rate = (total - limit) / (times[-1] - times[limit - 1])  # after the first window
    assert rate >= 0.9 * limit


async def test_a_cancelled_attempt_still_takes_its_slot_when_it_ends(server, client):
    release = asyncio.Event()

    async def hang(_request):
        await release.wait()
        return web.Response()

    server.script("/hang", hang)
    throttle = Throttle(FAST, burst=10, quotas="1/second")
    loop = asyncio.get_running_loop()
    caller = asyncio.create_task(get(client, server.url + "/hang", throttle))
    await asyncio.sleep(0.1)  # it reached the server
    ended = loop.time()  # its slot is taken at or after this instant
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    async with asyncio.timeout(3.0):  # a request left counted in flight would block the key
        assert await get(client, server.url + "/next", throttle) == 200
    # its slot counts from the cancellation (it may have been served): the next one
    # waits a window from then, and is not stuck behind a request still "in flight"
    waited = loop.time() - ended
    release.set()
    assert 1.0 - JITTER <= waited < 1.5
