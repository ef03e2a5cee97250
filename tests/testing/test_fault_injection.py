"""FaultInjection: seeded synthetic 503/429s, connection errors and latency on the client."""

from __future__ import annotations

import asyncio
import errno
from collections import Counter

import aiohttp
import pytest

import resilient
from resilient.testing import FAULT_HEADER, FaultInjection


async def outcome(client: aiohttp.ClientSession, url: str, chaos: FaultInjection) -> str:
    """The status of one GET through ``chaos``, or ``"refused"`` for a connection error."""
    try:
        async with client.get(url, middlewares=(chaos,)) as resp:
            await resp.read()
            return str(resp.status)
    except aiohttp.ClientConnectorError:
        return "refused"


async def outcomes(
    client: aiohttp.ClientSession, url: str, chaos: FaultInjection, n: int
) -> list[str]:
    return [await outcome(client, url, chaos) for _ in range(n)]


async def test_seeded_rates_are_roughly_as_configured(server, client):
    chaos = FaultInjection(error_rate=0.2, rate_limit_rate=0.1, connection_error_rate=0.1, seed=1)
    seen = Counter(await outcomes(client, server.url + "/a", chaos, 400))
    assert 0.14 <= seen["503"] / 400 <= 0.26
    assert 0.05 <= seen["429"] / 400 <= 0.15
    assert 0.05 <= seen["refused"] / 400 <= 0.15
    assert server.count() == seen["200"]
    assert chaos.injected == {
        "connection_error": seen["refused"],
        "error": seen["503"],
        "rate_limit": seen["429"],
        "latency": 0,
    }


async def test_the_same_seed_injects_the_same_sequence(server, client):
    def make() -> FaultInjection:
        return FaultInjection(error_rate=0.3, connection_error_rate=0.2, seed=42)

    first = await outcomes(client, server.url + "/a", make(), 50)
    second = await outcomes(client, server.url + "/a", make(), 50)
    assert first == second
    assert len(set(first)) == 3


async def test_no_rates_pass_every_request_through(server, client):
    seen = await outcomes(client, server.url + "/a", FaultInjection(seed=0), 20)
    assert seen == ["200"] * 20
    assert server.count() == 20


async def test_synthetic_503_is_readable_and_never_reaches_the_server(server, client):
    async with client.get(server.url + "/a", middlewares=(FaultInjection(error_rate=1.0),)) as resp:
        body = await resp.json()
        assert resp.status == 503
        assert resp.reason == "Service Unavailable"
        assert resp.headers[FAULT_HEADER] == "error"
        assert "Retry-After" not in resp.headers
    assert body[0]["$dataCode"] == "ServiceUnavailable"
    assert server.count() == 0


async def test_synthetic_response_raise_for_status_raises_client_response_error(server, client):
    resp = await client.get(server.url + "/a", middlewares=(FaultInjection(error_rate=1.0),))
    with pytest.raises(aiohttp.ClientResponseError) as caught:
        resp.raise_for_status()
    assert caught.value.status == 503
    assert str(caught.value.request_info.url) == server.url + "/a"


async def test_synthetic_response_released_unread_behaves_like_a_real_one(server, client):
    fake = await client.get(server.url + "/a", middlewares=(FaultInjection(error_rate=1.0),))
    real = await client.get(server.url + "/a")
    for resp in (fake, real):
        resp.release()
        assert resp.closed
        with pytest.raises(aiohttp.ClientConnectionError):
            await resp.read()  # the body is gone once released


async def test_synthetic_response_text_then_release(server, client):
    resp = await client.get(server.url + "/a", middlewares=(FaultInjection(rate_limit_rate=1.0),))
    text = await resp.text()
    resp.release()
    assert "TooManyRequests" in text


async def test_synthetic_429_carries_retry_after_rounded_up(server, client):
    chaos = FaultInjection(rate_limit_rate=1.0, retry_after=2.5)
    async with client.get(server.url + "/a", middlewares=(chaos,)) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (429, "3")


async def test_synthetic_429_without_retry_after_when_none(server, client):
    chaos = FaultInjection(rate_limit_rate=1.0, retry_after=None)
    async with client.get(server.url + "/a", middlewares=(chaos,)) as resp:
        assert resp.status == 429
        assert "Retry-After" not in resp.headers


async def test_injected_connection_error_is_a_refused_connect(server, client):
    chaos = FaultInjection(connection_error_rate=1.0)
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await client.post(server.url + "/a", json={}, middlewares=(chaos,))
    assert caught.value.os_error.errno == errno.ECONNREFUSED
    assert f"http://{caught.value.host}:{caught.value.port}" == server.url
    assert server.count() == 0


@pytest.mark.looptime
async def test_latency_waits_on_the_loop_clock_then_sends(server, client):
    chaos = FaultInjection(latency=5.0, latency_rate=1.0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with client.get(server.url + "/a", middlewares=(chaos,)) as resp:
        assert resp.status == 200
    assert loop.time() - t0 == pytest.approx(5.0, abs=0.01)
    assert chaos.injected["latency"] == 1
    assert server.count() == 1


def test_chain_places_fault_injection_innermost():
    chaos = FaultInjection()
    retry = resilient.Retry()
    (pipeline,) = resilient.chain(chaos, retry)
    assert pipeline.policies == (retry, chaos)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"error_rate": -0.1}, "error_rate"),
        ({"rate_limit_rate": 1.1}, "rate_limit_rate"),
        ({"latency_rate": 2.0}, "latency_rate"),
        ({"connection_error_rate": -1.0}, "connection_error_rate"),
        ({"error_rate": 0.6, "rate_limit_rate": 0.6}, "at most 1"),
        ({"retry_after": -1.0}, "retry_after"),
        ({"latency": float("inf")}, "latency"),
    ],
)
def test_invalid_configuration_raises_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FaultInjection(**kwargs)


def test_repr_shows_the_rates():
    assert "error_rate=0.25" in repr(FaultInjection(error_rate=0.25))
