"""The four policies together, through resilient.session(), against real loopback servers."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

import resilient
from resilient.testing import SimulatedAPI


def full_chain(**throttle: float) -> tuple[resilient.Policy, ...]:
    return (
        resilient.Throttle(throttle.get("rate", 1000.0), burst=int(throttle.get("burst", 50))),
        resilient.RateLimitBackoff(),
        resilient.CircuitBreaker(min_calls=4, failure_ratio=0.5, open_for=30.0),
        resilient.Retry(attempts=10, backoff=resilient.FullJitter(0.01, 0.05)),
    )


@pytest.mark.looptime
async def test_retry_stops_at_the_real_breaker_when_it_opens(server):
    server.default("/", 503)
    async with resilient.session(*full_chain()) as s:
        with pytest.raises(resilient.CircuitOpenError) as caught:
            await s.get(server.url)
    # 4 calls fill min_calls at 100 % failures; attempt 5 is refused without the network.
    assert server.count() == 4
    assert caught.value.retry_after == pytest.approx(30.0, abs=1.0)


@pytest.mark.looptime
async def test_full_chain_survives_a_24_hour_block_in_virtual_time():
    async with SimulatedAPI(quota=(2, 60.0), block_for=86_400.0) as api:
        async with resilient.session(*full_chain()) as s:
            loop = asyncio.get_running_loop()
            start = loop.time()
            statuses = []
            for _ in range(3):
                async with s.get(api.url + "/contacts", headers={"X-Business": "b1"}) as r:
                    statuses.append(r.status)
                    await r.read()
            elapsed = loop.time() - start
    assert statuses == [200, 200, 200]
    assert elapsed >= 86_400.0
    # Two admitted, one 429 that started the day-long pause, then the probe that succeeded.
    assert api.count(status=429) == 1
    assert api.count() == 4


@pytest.mark.looptime
async def test_callers_behind_one_block_send_nothing_until_it_ends():
    async with SimulatedAPI(quota=(1, 60.0), block_for=3_600.0) as api:
        async with resilient.session(*full_chain()) as s:

            async def call() -> int:
                async with s.get(api.url + "/contacts", headers={"X-Business": "b1"}) as r:
                    await r.read()
                    return r.status

            assert await call() == 200
            blocked = await call()  # the 429 comes back only if the wait is refused
            assert blocked == 200
            block_start = api.log[1].time
            results = await asyncio.gather(*(call() for _ in range(10)))
    assert results == [200] * 10
    during_block = [e for e in api.log if block_start < e.time < block_start + 3_600.0]
    assert during_block == []


@pytest.mark.looptime
async def test_plain_client_session_gets_the_429_instead_of_a_timeout(server):
    async def long_429(request):
        return aiohttp.web.Response(status=429, headers={"Retry-After": "3600"})

    server.script("/", long_429)
    async with aiohttp.ClientSession(middlewares=resilient.chain(*full_chain())) as s:
        async with s.get(server.url) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "3600"
    assert server.count() == 1


@pytest.mark.looptime
async def test_post_refused_with_503_is_created_exactly_once_through_the_full_chain():
    async with SimulatedAPI(quota=None) as api:
        api.inject("/sales_invoices", "503", count=2)
        async with resilient.session(*full_chain()) as s:
            body = {"sales_invoice": {"contact_id": "1", "date": "2026-11-23"}}
            async with s.post(api.url + "/sales_invoices", json=body) as r:
                assert r.status == 201
    assert len(api.invoices) == 1
    assert api.count(path="/sales_invoices") == 3


@pytest.mark.looptime
async def test_post_dropped_after_processing_is_not_resent_through_the_full_chain():
    async with SimulatedAPI(quota=None) as api:
        api.inject("/sales_invoices", "drop_after")
        async with resilient.session(*full_chain()) as s:
            body = {"sales_invoice": {"contact_id": "1", "date": "2026-11-23"}}
            with pytest.raises(aiohttp.ClientConnectionError):
                await s.post(api.url + "/sales_invoices", json=body)
    assert len(api.invoices) == 1
    assert api.count(path="/sales_invoices") == 1


@pytest.mark.looptime
async def test_deadline_bounds_the_whole_chain(server):
    async def slow_503(request):
        return aiohttp.web.Response(status=503, headers={"Retry-After": "120"})

    server.default("/", slow_503)
    async with resilient.session(*full_chain()) as s:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with resilient.deadline(60.0):
            async with s.get(server.url) as r:
                assert r.status == 503
        assert loop.time() - start < 1.0
    assert server.count() == 1
