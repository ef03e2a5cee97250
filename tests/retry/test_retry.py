"""Retry against a real loopback server: what is re-sent, when, and what the caller gets."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import math
import socket
import time
from http import HTTPStatus

import aiohttp
import pytest
import tenacity
from aiohttp import web

import resilient
from resilient._errors import BodyNotReplayable, CircuitOpenError, DeadlineExceeded
from resilient.retry._backoff import FullJitter
from resilient.retry._budget import RetryBudget
from resilient.retry._retry import Retry

FAST = FullJitter(base=0.5, cap=1.0)
"""Waits under a second of (virtual) loop time."""


class Attempts:
    """An inner middleware that counts the wire attempts Retry makes (no server needed)."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, request, handler):
        self.count += 1
        return await handler(request)


def closed_port_url() -> str:
    """A loopback URL on a port nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


async def drop_connection(request: web.Request) -> web.StreamResponse:
    """Read the request, then close the connection without answering."""
    await request.read()
    assert request.transport is not None
    request.transport.close()
    raise asyncio.CancelledError


def reply(status: int, headers: dict[str, str] | None = None, body: bytes = b""):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers=headers, body=body or f"s{status}".encode())

    return handler


def gaps(server) -> list[float]:
    times = [a.time for a in server.arrivals]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


# --- statuses ---------------------------------------------------------------------------


@pytest.mark.looptime
async def test_503_is_retried_until_success(server, client):
    server.script("/", 503, 503, 200)
    async with client.get(server.url, middlewares=(Retry(backoff=FAST),)) as resp:
        assert resp.status == 200
    assert server.count() == 3


@pytest.mark.looptime
async def test_exhausted_attempts_return_the_last_response_readable(server, client):
    server.default("/", 503)
    async with client.get(server.url, middlewares=(Retry(attempts=3, backoff=FAST),)) as resp:
        assert resp.status == 503
        assert await resp.text() == "status 503"
    assert server.count() == 3


async def test_500_is_not_retried_by_default(server, client):
    server.script("/", 500, 200)
    async with client.get(server.url, middlewares=(Retry(backoff=FAST),)) as resp:
        assert resp.status == 500
    assert server.count() == 1


async def test_one_attempt_never_retries(server, client):
    server.script("/", 503, 200)
    async with client.get(server.url, middlewares=(Retry(attempts=1),)) as resp:
        assert resp.status == 503
    assert server.count() == 1


@pytest.mark.looptime
async def test_successful_calls_never_build_backoff_state(server, client):
    class Counting:
        def __init__(self) -> None:
            self.calls = 0

        def per_call(self):
            self.calls += 1
            return lambda attempt: 0.1

    backoff = Counting()
    retry = Retry(backoff=backoff)
    for _ in range(3):
        async with client.get(server.url, middlewares=(retry,)) as resp:
            assert resp.status == 200
    assert backoff.calls == 0
    server.script("/", 503)
    async with client.get(server.url, middlewares=(retry,)) as resp:
        assert resp.status == 200
    assert backoff.calls == 1


# --- idempotency: a POST is re-sent only when it provably was not processed ---------------


@pytest.mark.parametrize("status", [502, 504])
async def test_post_is_not_resent_after_a_gateway_error(server, client, status):
    server.script("/invoices", status, 201)
    retry = Retry(backoff=FAST)
    async with client.post(f"{server.url}/invoices", json={}, middlewares=(retry,)) as resp:
        assert resp.status == status
    assert server.count(method="POST") == 1


@pytest.mark.looptime
async def test_post_is_not_resent_after_a_read_timeout(server):
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(status=201)

    server.script("/invoices", slow, 201)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=5)
    async with aiohttp.ClientSession(timeout=timeout, middlewares=(Retry(backoff=FAST),)) as s:
        with pytest.raises(aiohttp.SocketTimeoutError):
            await s.post(f"{server.url}/invoices", json={})
    assert server.count(method="POST") == 1


async def test_post_is_not_resent_after_a_dropped_connection(server, client):
    server.script("/invoices", drop_connection, 201)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post(f"{server.url}/invoices", json={}, middlewares=(Retry(backoff=FAST),))
    assert server.count(method="POST") == 1


@pytest.mark.looptime
async def test_post_is_resent_after_503(server, client):
    server.script("/invoices", 503, 201)
    retry = Retry(backoff=FAST)
    async with client.post(f"{server.url}/invoices", json={}, middlewares=(retry,)) as resp:
        assert resp.status == 201
    assert server.count(method="POST") == 2


@pytest.mark.looptime
async def test_post_is_resent_after_429_when_listed(server, client):
    server.script("/invoices", 429, 201)
    retry = Retry(statuses={429, 503}, backoff=FAST)
    async with client.post(f"{server.url}/invoices", json={}, middlewares=(retry,)) as resp:
        assert resp.status == 201
    assert server.count(method="POST") == 2


@pytest.mark.looptime
async def test_post_is_resent_after_connection_refused(client):
    attempts = Attempts()
    retry = Retry(attempts=3, backoff=FAST)
    with pytest.raises(aiohttp.ClientConnectorError):
        await client.post(closed_port_url(), json={}, middlewares=(retry, attempts))
    assert attempts.count == 3


@pytest.mark.looptime
async def test_post_with_idempotency_key_is_retried_on_502(server, client):
    server.script("/invoices", 502, 201)
    retry = Retry(backoff=FAST)
    headers = {"Idempotency-Key": "6f1c"}
    async with client.post(
        f"{server.url}/invoices", json={}, headers=headers, middlewares=(retry,)
    ) as resp:
        assert resp.status == 201
    assert server.count(method="POST") == 2


@pytest.mark.looptime
async def test_get_is_retried_after_a_dropped_connection(server, client):
    server.script("/", drop_connection, 200)
    async with client.get(server.url, middlewares=(Retry(backoff=FAST),)) as resp:
        assert resp.status == 200
    assert server.count() == 2


@pytest.mark.looptime
async def test_get_is_retried_after_a_read_timeout(server):
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    server.script("/", slow, 200)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=5)
    retry = Retry(backoff=FAST)
    async with (
        aiohttp.ClientSession(timeout=timeout, middlewares=(retry,)) as s,
        s.get(server.url) as resp,
    ):
        assert resp.status == 200
    assert server.count() == 2


async def test_tls_failures_are_not_retried(server, client):
    attempts = Attempts()
    https = server.url.replace("http://", "https://")  # a TLS handshake with a plain server
    with pytest.raises(aiohttp.ClientSSLError):
        await client.get(https, middlewares=(Retry(backoff=FAST), attempts))
    assert attempts.count == 1


@pytest.mark.looptime
async def test_retry_stops_when_the_breaker_opens(server, client):
    server.default("/", 503)
    attempts = Attempts()

    async def breaker(request, handler):
        if attempts.count >= 2:
            raise CircuitOpenError("http://127.0.0.1", 30.0)
        return await handler(request)

    with pytest.raises(CircuitOpenError):
        await client.get(
            server.url, middlewares=(Retry(attempts=5, backoff=FAST), breaker, attempts)
        )
    assert server.count() == 2


# --- bodies and connections ---------------------------------------------------------------


@pytest.mark.looptime
async def test_async_generator_body_is_never_resent_empty(server, client):
    async def body():
        yield b"invoice "
        yield b"lines"

    server.script("/upload", 503, 201)
    retry = Retry(backoff=FAST)
    with pytest.raises(BodyNotReplayable, match="status 503"):
        await client.post(f"{server.url}/upload", data=body(), middlewares=(retry,))
    assert server.count() == 1
    assert server.arrivals[0].body == b"invoice lines"


@pytest.mark.looptime
async def test_bytes_body_is_resent_whole(server, client):
    server.script("/upload", 503, 201)
    retry = Retry(backoff=FAST)
    async with client.put(f"{server.url}/upload", data=b"x" * 1000, middlewares=(retry,)) as r:
        assert r.status == 201
    assert [a.body for a in server.arrivals] == [b"x" * 1000] * 2


@pytest.mark.looptime
async def test_discarded_response_is_released_before_the_retry(server):
    server.script("/big", reply(503, body=b"x" * (1 << 20)), 200)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as s:
        async with asyncio.timeout(10):
            async with s.get(f"{server.url}/big", middlewares=(Retry(backoff=FAST),)) as resp:
                assert resp.status == 200
    assert server.count() == 2


# --- Retry-After and the caller's allowance -----------------------------------------------


@pytest.mark.looptime
async def test_retry_after_seconds_is_honoured(server, client):
    server.script("/", reply(503, {"Retry-After": "7"}), 200)
    async with client.get(server.url, middlewares=(Retry(backoff=FAST),)) as resp:
        assert resp.status == 200
    assert gaps(server) == [pytest.approx(7.0, abs=0.05)]


@pytest.mark.looptime
async def test_retry_after_http_date_is_honoured(server, client):
    when = email.utils.formatdate(time.time() + 40, usegmt=True)
    server.script("/", reply(503, {"Retry-After": when}), 200)
    async with client.get(server.url, middlewares=(Retry(backoff=FAST),)) as resp:
        assert resp.status == 200
    [gap] = gaps(server)
    assert 38.0 <= gap <= 40.5


@pytest.mark.looptime
async def test_retry_after_above_max_delay_returns_the_503_at_once(server, client):
    server.script("/", reply(503, {"Retry-After": "600"}), 200)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with client.get(server.url, middlewares=(Retry(max_delay=300.0),)) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "600"
    assert loop.time() - start < 1.0
    assert server.count() == 1


@pytest.mark.looptime
async def test_unrepresentable_retry_after_returns_the_503(server, client):
    server.script("/", reply(503, {"Retry-After": "9" * 400}), 200)
    async with client.get(server.url, middlewares=(Retry(),)) as resp:
        assert resp.status == 503
    assert server.count() == 1


@pytest.mark.looptime
async def test_retry_after_beyond_the_deadline_returns_the_503_at_once(server, client):
    server.script("/", reply(503, {"Retry-After": "10"}), 200)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with resilient.deadline(5):
        async with client.get(server.url, middlewares=(Retry(),)) as resp:
            assert resp.status == 503
    assert loop.time() - start < 1.0
    assert server.count() == 1


@pytest.mark.looptime
async def test_retry_after_beyond_the_session_total_timeout_returns_the_503(server):
    server.script("/", reply(503, {"Retry-After": "10"}), 200)
    timeout = aiohttp.ClientTimeout(total=3)
    async with (
        aiohttp.ClientSession(timeout=timeout, middlewares=(Retry(),)) as s,
        s.get(server.url) as resp,
    ):
        assert resp.status == 503
    assert server.count() == 1


@pytest.mark.looptime
async def test_backoff_beyond_the_deadline_returns_the_last_response(server, client):
    server.script("/", 503, 200)
    retry = Retry(backoff=lambda attempt: 2.0)
    with resilient.deadline(1):
        async with client.get(server.url, middlewares=(retry,)) as resp:
            assert resp.status == 503
            assert await resp.text() == "status 503"
    assert server.count() == 1


@pytest.mark.looptime
async def test_deadline_raises_deadline_exceeded_after_a_network_failure(client):
    retry = Retry(backoff=lambda attempt: 2.0)
    with resilient.deadline(1), pytest.raises(DeadlineExceeded) as caught:
        await client.get(closed_port_url(), middlewares=(retry,))
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)


@pytest.mark.looptime
async def test_tenacity_wait_strategy_sets_the_wait(server, client):
    server.script("/", 503, 503, 200)
    retry = Retry(backoff=tenacity.wait_fixed(3))
    async with client.get(server.url, middlewares=(retry,)) as resp:
        assert resp.status == 200
    assert gaps(server) == [pytest.approx(3.0, abs=0.05)] * 2


@pytest.mark.looptime
async def test_waits_of_a_second_or_more_are_logged_without_secrets(server, client, caplog):
    server.script("/", reply(503, {"Retry-After": "2"}), 200)
    caplog.set_level(logging.INFO, logger="resilient")
    headers = {"Authorization": "Bearer s3cret-token"}
    async with client.get(
        f"{server.url}/?token=s3cret-query", headers=headers, middlewares=(Retry(backoff=FAST),)
    ) as resp:
        assert resp.status == 200
    [record] = [r for r in caplog.records if r.name == "resilient"]
    assert record.levelno == logging.INFO
    assert "status 503" in record.getMessage()
    assert "s3cret" not in record.getMessage()


# --- jitter and budget under concurrency --------------------------------------------------


@pytest.mark.looptime
async def test_full_jitter_spreads_concurrent_retries(server, client):
    server.script("/", *[503] * 40)
    retry = Retry(backoff=FullJitter(base=4.0, cap=4.0), budget=None)

    async def one() -> int:
        async with client.get(server.url, middlewares=(retry,)) as resp:
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(40))) == [200] * 40
    first = min(a.time for a in server.arrivals)
    retries = sorted(a.time - first for a in server.arrivals[40:])
    assert len(retries) == 40
    assert len({round(t, 3) for t in retries}) >= 35  # distinct arrival times
    assert retries[-1] - retries[0] >= 2.0  # spread over the 4-second window


async def test_budget_caps_a_retry_storm(server, client):
    """Real time, scaled-down waits: 100 calls to an always-503 server."""
    server.default("/", 503)
    budget = RetryBudget(ratio=0.2, min_per_second=1.0)
    retry = Retry(attempts=4, backoff=FullJitter(0.001, 0.005), budget=budget)

    async def one() -> int:
        async with client.get(server.url, middlewares=(retry,)) as resp:
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(100))) == [503] * 100
    extra = server.count() - 100
    assert 10 <= extra <= 0.2 * 100 + 1.0 * 10


async def test_without_a_budget_every_call_uses_all_attempts(server, client):
    server.default("/", 503)
    retry = Retry(attempts=4, backoff=FullJitter(0.001, 0.005), budget=None)

    async def one() -> int:
        async with client.get(server.url, middlewares=(retry,)) as resp:
            return resp.status

    await asyncio.gather(*(one() for _ in range(20)))
    assert server.count() == 20 * 4


@pytest.mark.looptime
async def test_a_hop_resent_by_aiohttp_counts_in_the_budget_when_it_goes(server, client):
    """aiohttp sends an idempotent call again, through every middleware, when the first
    hop ends with a dropped connection: that hop's first attempt is counted at the time
    it goes (not at the call's start, whose one-second bucket may be long gone)."""

    async def drop_after_3s(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3.0)
        return await drop_connection(request)

    server.script("/d", drop_after_3s, 200)
    retry = Retry(attempts=1)  # the dropped hop stands: aiohttp re-sends the call
    loop = asyncio.get_running_loop()
    await asyncio.sleep(math.floor(loop.time()) + 1.5 - loop.time())
    start = loop.time()  # x.5: the first hop in bucket x, the second in bucket x + 3
    async with client.get(server.url + "/d", middlewares=(retry,)) as resp:
        assert resp.status == 200
    assert server.count("/d") == 2
    await asyncio.sleep(start + 10.1 - loop.time())  # bucket x has left the window
    assert retry.stats().first_attempts == 1


@pytest.mark.looptime
async def test_exhausted_budget_reraises_the_last_network_error(client):
    attempts = Attempts()
    retry = Retry(attempts=5, backoff=FAST, budget=RetryBudget(ratio=0.0, min_per_second=0.1))
    with pytest.raises(aiohttp.ClientConnectorError):
        await client.get(closed_port_url(), middlewares=(retry, attempts))
    assert attempts.count == 2  # the first try and the one retry the budget covers


# --- short circuit breaks: waited out, nothing sent while refused ------------------------

BREAK = 0.5
"""The breaker's break in these tests (it trips on one failure; max_open_for = BREAK)."""


def short_breaker(**overrides: object) -> resilient.CircuitBreaker:
    options: dict[str, object] = {
        "consecutive_failures": 1, "open_for": BREAK, "max_open_for": BREAK,
    }  # fmt: skip
    options.update(overrides)
    return resilient.CircuitBreaker(**options)


async def trip_breaker(client, server, breaker) -> float:
    """Open ``breaker`` for ``server`` with one 503 on ``/trip``; the loop time it opened."""
    server.script("/trip", 503)
    async with client.get(server.url + "/trip", middlewares=(breaker,)) as resp:
        assert resp.status == 503
    assert breaker.state(server.url) == "open"
    return asyncio.get_running_loop().time()


class Seen:
    """A middleware between Retry and the breaker: the loop time of every attempt."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def __call__(self, request, handler):
        self.times.append(asyncio.get_running_loop().time())
        return await handler(request)


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_short_break_is_waited_out_and_the_call_succeeds_once_the_upstream_is_back(
    server, client
):
    server.default("/", 503)  # the upstream is down
    breaker = short_breaker()
    opened = await trip_breaker(client, server, breaker)
    loop = asyncio.get_running_loop()
    async with client.get(server.url) as raw:  # raw aiohttp, now: the call fails
        assert raw.status == 503
    loop.call_later(0.2, server.default, "/", 200)  # the upstream is back 0.2 s later
    sent = server.count()
    retry = Retry(backoff=FAST, budget=RetryBudget(ratio=0.0, min_per_second=0.0))
    async with client.get(server.url, middlewares=(retry, breaker)) as resp:
        assert resp.status == 200  # refused, waited out the break, then the probe
        assert await resp.text() == "status 200"
    waited = loop.time() - opened
    assert BREAK <= waited <= BREAK * 1.5
    assert server.count() == sent + 1  # nothing was sent while refused
    assert breaker.state(server.url) == "closed"
    assert retry.stats().retries == 0  # the call had sent nothing: no budget spent


@pytest.mark.timeout(30)
@pytest.mark.looptime
@pytest.mark.parametrize(
    ("open_for", "circuit_wait", "within"),
    [
        (30.0, 1.0, None),  # the break is longer than circuit_wait
        (BREAK, 0.0, None),  # circuit_wait=0: never wait
        (BREAK, 1.0, 0.2),  # the break ends after the caller's deadline
    ],
)
async def test_a_long_break_still_fails_fast_with_nothing_sent(
    server, client, open_for, circuit_wait, within
):
    server.default("/", 503)
    breaker = short_breaker(open_for=open_for, max_open_for=open_for)
    await trip_breaker(client, server, breaker)
    server.default("/", 200)  # back already: only the breaker stands in the way
    sent, loop = server.count(), asyncio.get_running_loop()
    start = loop.time()
    retry = Retry(backoff=FAST, circuit_wait=circuit_wait)
    with resilient.deadline(math.inf if within is None else within):
        with pytest.raises(resilient.CircuitOpenError) as refused:
            await client.get(server.url, middlewares=(retry, breaker))
    assert loop.time() == start  # at once
    assert refused.value.retry_after == pytest.approx(open_for)
    assert server.count() == sent


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_without_retry_a_short_break_fails_fast(server, client):
    server.default("/", 503)
    breaker = short_breaker()
    await trip_breaker(client, server, breaker)
    sent, loop = server.count(), asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(resilient.CircuitOpenError):
        await client.get(server.url, middlewares=(breaker,))
    assert loop.time() == start
    assert server.count() == sent


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_post_refused_by_the_breaker_is_sent_once_after_the_break(server, client):
    server.default("/", 503)
    breaker = short_breaker()
    await trip_breaker(client, server, breaker)
    server.default("/", 201)
    async with client.post(
        server.url, data=b"invoice", middlewares=(Retry(backoff=FAST), breaker)
    ) as resp:
        assert resp.status == 201
    posts = [a for a in server.arrivals if a.method == "POST"]
    assert [a.body for a in posts] == [b"invoice"]  # refused: nothing sent; then once


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_post_whose_502_came_from_the_server_is_not_retried_even_as_the_breaker_opens(
    server, client
):
    server.script("/", 502)  # then 200: a re-sent POST would succeed (and be a duplicate)
    breaker = short_breaker()
    async with client.post(
        server.url, data=b"invoice", middlewares=(Retry(backoff=FAST), breaker)
    ) as resp:
        assert resp.status == 502
    assert breaker.state(server.url) == "open"
    assert server.count(method="POST") == 1


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_callers_refused_by_one_break_come_back_spread_out_and_all_succeed(server, client):
    server.default("/", 503)
    breaker = short_breaker()
    opened = await trip_breaker(client, server, breaker)
    server.default("/", 200)
    seen = Seen()
    retry = Retry(backoff=FAST, budget=None)

    async def one() -> int:
        async with client.get(server.url, middlewares=(retry, seen, breaker)) as resp:
            return resp.status

    sent = server.count()
    assert await asyncio.gather(*(one() for _ in range(20))) == [200] * 20
    assert server.count() == sent + 20  # each call reached the server once
    assert seen.times[:20] == [opened] * 20  # all refused at once
    back = sorted(seen.times[20:40])  # each caller's second attempt
    assert len(set(back)) == 20  # no two at the same loop instant
    assert opened + BREAK <= back[0]
    assert back[-1] < opened + BREAK * 1.5
    assert back[-1] - back[0] >= BREAK * 0.5 * 0.25  # jitter: spread, not bunched


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_retry_the_breaker_refuses_is_given_back_to_the_budget(server, client):
    server.script("/", 503)  # sent, retryable; it trips the breaker
    breaker = short_breaker()
    one_retry = RetryBudget(ratio=0.0, min_per_second=0.1)  # one retry per 10 s
    retry = Retry(attempts=4, backoff=FAST, budget=one_retry)
    seen = Seen()
    async with client.get(server.url, middlewares=(retry, seen, breaker)) as resp:
        assert resp.status == 200
    assert len(seen.times) == 3  # 503; refused (given back); after the break: 200
    assert server.count() == 2
    assert retry.stats().retries == 1


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_call_cancelled_while_it_waits_out_a_break_leaves_no_trace(server, client):
    server.script("/", 503)  # sent: the call's next attempts spend budget
    breaker = short_breaker(open_for=0.9, max_open_for=0.9)
    retry = Retry(attempts=4, backoff=FullJitter(0.1, 0.1))
    seen = Seen()
    task = asyncio.create_task(client.get(server.url, middlewares=(retry, seen, breaker)))
    while len(seen.times) < 2:  # the 503, then refused: now waiting out the break
        await asyncio.sleep(0.01)
    assert breaker.state(server.url) == "open"
    assert retry.stats().retries == 1  # the wait for the break holds one retry
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = retry.stats()
    assert (stats.first_attempts, stats.retries) == (1, 0)
    circuit = breaker.stats()[server.url]
    assert (circuit.state, circuit.probes) == ("open", 0)
    await asyncio.sleep(1.0)  # the break is over: a new call is the probe, and closes
    async with client.get(server.url, middlewares=(breaker,)) as resp:
        assert resp.status == 200
    assert breaker.state(server.url) == "closed"
    assert server.count() == 2
    assert len(seen.times) == 2


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"attempts": 0}, "attempts"),
        ({"attempts": 2.5}, "attempts"),
        ({"attempts": True}, "attempts"),
        ({"statuses": [99]}, "statuses"),
        ({"statuses": [600]}, "statuses"),
        ({"statuses": ["503"]}, "statuses"),
        ({"statuses": 503}, "statuses"),
        ({"backoff": 5}, "backoff"),
        ({"budget": 0.2}, "budget"),
        ({"max_delay": -1.0}, "max_delay"),
        ({"max_delay": math.nan}, "max_delay"),
        ({"max_delay": math.inf}, "max_delay"),
        ({"circuit_wait": -0.1}, "circuit_wait"),
        ({"circuit_wait": math.nan}, "circuit_wait"),
        ({"circuit_wait": math.inf}, "circuit_wait"),
        ({"circuit_wait": True}, "circuit_wait"),
    ],
)
def test_invalid_configuration_names_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=rf"Retry: {named} must be"):
        Retry(**kwargs)


def test_statuses_accept_http_status_members():
    retry = Retry(statuses=[HTTPStatus.SERVICE_UNAVAILABLE, 429])
    assert retry.statuses == frozenset({503, 429})


def test_repr_shows_the_configuration():
    text = repr(Retry(attempts=3, statuses={503}, budget=None))
    assert text == (
        "Retry(attempts=3, statuses=[503], backoff=FullJitter(base=0.5, cap=30.0),"
        " budget=None, max_delay=300.0, circuit_wait=1.0, attempt_timeout=None)"
    )


def test_retry_is_a_retry_policy_placed_outermost_after_auth():
    assert (Retry.kind, Retry.order) == ("retry", 10)
    assert not hasattr(Retry(), "__dict__")
