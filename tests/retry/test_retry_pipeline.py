"""Retry's fast path in the pipeline (``resilient.chain``): the pipeline makes the first
attempt, ``after`` lets a plain outcome stand, ``resume`` runs the retry loop from any
other; against a real loopback server, the same events, stats and releases as Retry alone.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import scripted
from aiohttp import web
from scripted import drop_connection, facts, held, until

import resilient
from resilient.retry._budget import RetryBudget
from resilient.retry._retry import Retry

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]
TICK = 1e-3


class Watched(scripted.Watched, Retry):
    """A Retry that counts how the pipeline ran it (``scripted.Watched``)."""


def constant(seconds: float) -> Callable[[int], float]:
    return lambda attempt: seconds


def closed_port_url() -> str:
    """A loopback URL on a port nothing listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


async def big_503(request: web.Request) -> web.StreamResponse:
    """A 503 whose body is not read at once: its connection stays busy until released."""
    await request.read()
    return web.Response(status=503, body=b"x" * (1 << 20))


def retry_after(status: int, seconds: str) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Retry-After": seconds}, text="busy")

    return reply


@pytest.fixture
async def hold() -> AsyncIterator[asyncio.Event]:
    """Replies made with :func:`held` wait for this event; set at teardown."""
    event = asyncio.Event()
    yield event
    event.set()


def one_connection() -> aiohttp.ClientSession:
    """A session whose single pooled connection a leaked response would keep busy."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))


async def call(
    session: aiohttp.ClientSession, method: str, url: str, middlewares: Any
) -> int | str:
    """The status of one call, or the name of the exception it raised."""
    try:
        data = b"x" if method == "POST" else None
        async with session.request(method, url, data=data, middlewares=middlewares) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


# --- the fast path and the hand-over -----------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_plain_success_stays_on_the_fast_path(server, client):
    retry = Watched()
    async with client.get(server.url, middlewares=resilient.chain(retry)) as resp:
        assert resp.status == 200
    assert (retry.whole, retry.tickets, retry.resumed) == (0, 1, 0)
    stats = retry.stats()
    assert (stats.first_attempts, stats.retries) == (1, 0)
    assert server.count() == 1


@pytest.mark.timeout(30)
async def test_a_status_that_is_not_retried_stands_on_the_fast_path(server, client, events):
    server.script("/", 500)
    retry = Watched()
    async with client.get(server.url, middlewares=resilient.chain(retry)) as resp:
        assert resp.status == 500
        assert await resp.text() == "status 500"
    assert (retry.whole, retry.resumed) == (0, 0)
    assert events == []


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_503_is_handed_to_resume_released_and_retried(server, events):
    server.script("/", big_503, 200)
    retry = Watched(backoff=constant(0.25))
    async with (
        one_connection() as session,  # the 503 must be released for the retry to connect
        session.get(server.url, middlewares=resilient.chain(retry)) as resp,
    ):
        assert resp.status == 200
        assert await resp.text() == "status 200"
    assert (retry.whole, retry.tickets, retry.resumed) == (0, 1, 1)
    assert server.count() == 2
    gap = server.arrivals[1].time - server.arrivals[0].time
    assert gap == pytest.approx(0.25, abs=0.01)
    assert [(e.kind, e.attempt, e.status, e.reason) for e in events] == [
        ("retry_scheduled", 1, 503, "status 503")
    ]
    stats = retry.stats()
    assert (stats.first_attempts, stats.retries) == (1, 1)


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_post_is_not_resent_after_a_502_through_the_chain(server, client, events):
    server.script("/invoices", 502, 201)
    retry = Watched(backoff=constant(0.25))
    async with client.post(
        server.url + "/invoices", json={}, middlewares=resilient.chain(retry)
    ) as resp:
        assert resp.status == 502
        assert await resp.text() == "status 502"  # handed back unchanged, readable
    assert server.count(method="POST") == 1
    assert retry.resumed == 1  # a listed status: resume decides, and gives up
    assert [(e.kind, e.attempt, e.status, e.reason) for e in events] == [
        ("retry_gave_up", 1, 502, "not retryable")
    ]
    assert retry.stats().retries == 0


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_retryable_exception_is_resumed_and_reraised_after_the_last_attempt(client, events):
    retry = Watched(attempts=3, backoff=constant(0.25))
    with pytest.raises(aiohttp.ClientConnectorError):
        await client.get(closed_port_url(), middlewares=resilient.chain(retry))
    assert retry.resumed == 1
    assert [(e.kind, e.attempt, e.reason) for e in events] == [
        ("retry_scheduled", 1, "ClientConnectorError"),
        ("retry_scheduled", 2, "ClientConnectorError"),
        ("retry_gave_up", 3, "attempts exhausted (ClientConnectorError)"),
    ]


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_an_exception_that_is_not_retried_stands_on_the_fast_path(server, client, events):
    server.script("/invoices", drop_connection, 201)
    retry = Watched(backoff=constant(0.25))
    with pytest.raises(aiohttp.ServerDisconnectedError):  # a POST may have been processed
        await client.post(server.url + "/invoices", json={}, middlewares=resilient.chain(retry))
    assert (retry.whole, retry.resumed) == (0, 0)
    assert server.count(method="POST") == 1
    assert events == []


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_short_circuit_break_is_handed_to_resume_and_waited_out(server, client):
    breaker = resilient.CircuitBreaker(consecutive_failures=1, open_for=0.5, max_open_for=0.5)
    server.script("/trip", 503)
    async with client.get(server.url + "/trip", middlewares=(breaker,)) as resp:
        assert resp.status == 503
    assert breaker.state(server.url) == "open"
    loop = asyncio.get_running_loop()
    opened = loop.time()
    retry = Watched(backoff=constant(0.25), budget=RetryBudget(ratio=0.0, min_per_second=0.0))
    async with client.post(
        server.url + "/invoices", data=b"invoice", middlewares=resilient.chain(retry, breaker)
    ) as resp:
        assert resp.status == 200  # refused, waited out the break, then sent (the probe)
    assert 0.5 <= loop.time() - opened <= 0.75
    assert retry.resumed == 1
    assert [a.body for a in server.arrivals if a.method == "POST"] == [b"invoice"]
    assert retry.stats().retries == 0  # the call had sent nothing: no budget spent


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_with_an_attempt_timeout_the_pipeline_runs_retry_whole(server, client):
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    server.script("/", slow, 200)
    retry = Watched(backoff=constant(0.25), attempt_timeout=2.0)
    async with client.get(server.url, middlewares=resilient.chain(retry)) as resp:
        assert resp.status == 200
    assert (retry.whole, retry.tickets, retry.resumed) == (1, 0, 0)
    assert server.count() == 2


# --- cancellation: released, never resumed ------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_call_cancelled_on_its_first_attempt_is_not_resumed(server, hold, events):
    server.script("/a", held(hold))
    retry = Watched(backoff=constant(5.0))
    async with one_connection() as session:
        flying = asyncio.create_task(
            call(session, "GET", server.url + "/a", resilient.chain(retry))
        )
        await until(lambda: server.count("/a") == 1)
        flying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flying
        assert await call(session, "GET", server.url + "/b", resilient.chain(retry)) == 200
    assert retry.resumed == 0
    assert events == []
    stats = retry.stats()
    assert (stats.first_attempts, stats.retries) == (2, 0)


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_call_cancelled_in_its_retry_attempt_leaks_nothing(server, hold):
    server.script("/a", big_503, held(hold))
    retry = Watched(backoff=constant(5.0))
    async with one_connection() as session:  # a response still held would block /b forever
        flying = asyncio.create_task(
            call(session, "GET", server.url + "/a", resilient.chain(retry))
        )
        await until(lambda: server.count("/a") == 1)
        await asyncio.sleep(5.0)  # the backoff
        await until(lambda: server.count("/a") == 2)  # the retry is on the wire
        flying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flying
        async with asyncio.timeout(5.0):
            assert await call(session, "GET", server.url + "/b", resilient.chain(retry)) == 200
    assert retry.resumed == 1
    stats = retry.stats()
    assert (stats.first_attempts, stats.retries) == (2, 1)  # the retry went to the wire


@pytest.mark.timeout(30)
@pytest.mark.looptime
async def test_a_call_cancelled_in_its_backoff_gives_the_retry_back(server):
    server.script("/a", big_503)
    retry = Watched(backoff=constant(5.0))
    async with one_connection() as session:
        waiting = asyncio.create_task(
            call(session, "GET", server.url + "/a", resilient.chain(retry))
        )
        await until(lambda: server.count("/a") == 1)
        await asyncio.sleep(1.0)  # in the 5 s backoff
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        async with asyncio.timeout(5.0):  # the 503 was released before the wait
            assert await call(session, "GET", server.url + "/b", resilient.chain(retry)) == 200
    assert server.count("/a") == 1
    stats = retry.stats()
    assert (stats.first_attempts, stats.retries) == (2, 0)


# --- identical to Retry alone ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.looptime
async def test_events_stats_and_requests_are_those_of_retry_alone(server, client, events):
    """Every case run twice in turn, by Retry alone as a middleware and by the same
    configuration in the pipeline: the same outcome, requests, events and budget."""
    cases: list[tuple[str, str, list[int | Reply], int | str]] = [
        ("GET", "/ok", [], 200),
        ("GET", "/flaky", [503, 502, 200], 200),
        ("GET", "/down", [503, 503, 503, 503], 503),
        ("GET", "/bug", [500], 500),
        ("POST", "/gateway", [502], 502),
        ("POST", "/busy", [retry_after(503, "1"), 201], 201),
        ("GET", "/later", [retry_after(503, "3600")], 503),
        ("POST", "/dropped", [drop_connection], "ServerDisconnectedError"),
        ("GET", "/dropped", [drop_connection, 200], 200),
        ("GET", closed_port_url(), [], "ClientConnectorError"),
    ]
    options: dict[str, Any] = {"backoff": constant(0.125), "max_delay": 60.0}
    alone, piped = Retry(**options), Retry(**options)
    for method, path, replies, expected in cases:
        url = path if path.startswith("http") else server.url + path
        seen: list[tuple[Any, ...]] = []
        for middlewares in ((alone,), resilient.chain(piped)):
            server.script(path, *replies)
            events.clear()
            before = len(server.arrivals)
            outcome = await call(client, method, url, middlewares)
            sent = [(a.method, a.path) for a in server.arrivals[before:]]
            seen.append((outcome, sent, facts(events)))
        assert seen[0][0] == expected, f"{method} {path}"
        assert seen[1] == seen[0], f"{method} {path}"
    assert alone.stats() == piped.stats()
    assert alone.stats().retries == 10  # flaky 2, down 3, busy 1, dropped 1, refused 3
