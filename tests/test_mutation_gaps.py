"""Behaviours no other test pinned down, found by mutation testing (see tests/README.md).

Each test names the behaviour; the comment under it names the mutant it kills.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import pytest
from aiohttp import ClientResponseError, RequestInfo, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from resilient import BodyNotReplayable, CircuitOpenError, Retry, RetryBudget
from resilient.breaker._breaker import CircuitBreaker, is_failure
from resilient.throttle._throttle import Throttle


def closed_port_url() -> str:
    """A loopback URL nobody listens on (bind a port, then close it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def response_error(status: int) -> ClientResponseError:
    url = URL("http://127.0.0.1/")
    info = RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return ClientResponseError(info, (), status=status)


async def get(session: aiohttp.ClientSession, url: str, policy: object) -> int:
    async with session.get(url, middlewares=(policy,)) as resp:  # type: ignore[arg-type]
        await resp.read()
        return resp.status


# --- CircuitBreaker -----------------------------------------------------------------


@pytest.mark.parametrize(("status", "failed"), [(499, False), (500, True), (501, True)])
def test_a_raised_response_error_is_a_failure_from_500_up(status, failed):
    # is_failure: `status >= 500` -> `> 500` / `>= 501`
    assert is_failure(response_error(status)) is failed


def test_the_state_of_a_key_never_seen_is_closed():
    # CircuitBreaker.state: the "closed" literal for an unknown key
    assert CircuitBreaker().state("http://never.example:80") == "closed"


def test_breaker_accepts_sub_second_window_and_open_for():
    # _positive_seconds: `0.0 < value` -> `1.0 < value`
    cb = CircuitBreaker(window=0.5, open_for=0.25)
    assert (cb.window, cb.open_for) == (0.5, 0.25)


@pytest.mark.looptime
async def test_a_probe_failing_on_the_network_reopens_the_circuit(client):
    # CircuitBreaker.__call__: record(..., probe) -> record(..., None) on the exception path
    url = closed_port_url()
    cb = CircuitBreaker(min_calls=2, failure_ratio=0.5, window=10.0, open_for=30.0)
    for _ in range(2):
        with pytest.raises(aiohttp.ClientConnectorError):
            await get(client, url, cb)
    assert cb.state(url) == "open"
    await asyncio.sleep(30.0)  # the failures slid out of the window meanwhile
    with pytest.raises(aiohttp.ClientConnectorError):
        await get(client, url, cb)  # the probe
    assert cb.state(url) == "open"
    with pytest.raises(CircuitOpenError) as refused:
        await get(client, url, cb)
    assert refused.value.retry_after == pytest.approx(30.0)


# --- Retry --------------------------------------------------------------------------


@pytest.mark.looptime
async def test_a_retry_after_a_network_failure_logs_the_failures_type(client, caplog):
    # failure_reason: `type(exc).__name__` -> `type(None).__name__`
    retry = Retry(attempts=2, backoff=lambda attempt: 1.0, budget=None)
    caplog.set_level(logging.INFO, logger="resilient")
    with pytest.raises(aiohttp.ClientConnectorError):
        await get(client, closed_port_url(), retry)
    assert "retry: ClientConnectorError on " in caplog.text


@pytest.mark.parametrize("statuses", [{100}, {599}, {100, 599}])
def test_retry_statuses_accept_the_edges_of_100_to_599(statuses):
    # _statuses: `100 <= s <= 599` -> `101 <= s` / `s < 599`
    assert Retry(statuses=statuses).statuses == frozenset(statuses)


@pytest.mark.parametrize("max_delay", [0, 0.5])
def test_retry_max_delay_accepts_zero_and_fractions_of_a_second(max_delay):
    # Retry.__init__: `0.0 <= max_delay` -> `1.0 <= max_delay`
    assert Retry(max_delay=max_delay).max_delay == max_delay


def test_retry_max_delay_that_is_not_a_number_names_the_argument():
    # Retry.__init__: `isinstance(bool) or not isinstance(number)` -> `and` (a TypeError)
    with pytest.raises(ValueError, match="Retry: max_delay must be"):
        Retry(max_delay="300")  # type: ignore[arg-type]


@pytest.mark.looptime
async def test_a_response_discarded_for_an_unreplayable_body_frees_its_connection(server):
    # Retry._retry: `if resp is not None: resp.release()` -> `if resp is None: ...`
    async def body():
        yield b"invoice"

    async def big_503(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=503, body=b"x" * (1 << 20))  # not buffered at once

    server.script("/upload", big_503)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        retry = Retry(backoff=lambda attempt: 0.0, budget=None)
        with pytest.raises(BodyNotReplayable) as raised:  # keeps the retry's frame alive
            await session.post(server.url + "/upload", data=body(), middlewares=(retry,))
        async with asyncio.timeout(5.0):
            assert await get(session, server.url + "/next", retry) == 200
        assert raised.value is not None


def retry_after(seconds: str):
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, headers={"Retry-After": seconds}, text="busy")

    return reply


@pytest.mark.looptime
async def test_max_delay_alone_refuses_a_longer_retry_after_without_any_timeout(server):
    # _wait_time: `None if server > max_delay` -> never None (the total timeout hid it)
    server.script("/", retry_after("3600"), 200)
    retry = Retry(max_delay=10.0, backoff=lambda attempt: 0.0, budget=None)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        start = loop.time()
        assert await get(session, server.url + "/", retry) == 503
        assert loop.time() - start < 1.0
    assert server.count() == 1


@pytest.mark.looptime
async def test_a_retry_after_equal_to_max_delay_is_waited_for(server):
    # _wait_time: `server > max_delay` -> `server >= max_delay`
    server.script("/", retry_after("10"), 200)
    retry = Retry(max_delay=10.0, backoff=lambda attempt: 0.0, budget=None)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        assert await get(session, server.url + "/", retry) == 200
    assert server.arrivals[1].time - server.arrivals[0].time == pytest.approx(10.0, abs=0.01)


def test_retry_keeps_the_budget_it_was_given():
    # Retry.__init__: `self._budget = budget` -> `None`
    budget = RetryBudget(ratio=0.5, min_per_second=1.0)
    assert Retry(budget=budget).budget is budget


# --- Throttle -----------------------------------------------------------------------


def test_the_rate_of_a_key_never_seen_is_the_configured_rate():
    # Throttle.current_rate: `state is None` -> `(state is None) and False`
    assert Throttle(3.0).current_rate("http://never.example:80") == 3.0


def test_no_caller_waits_for_a_key_never_seen():
    # Throttle.waiting: `0 if state is None` -> `1 if ...` / `(state is None) and False`
    assert Throttle(3.0).waiting("http://never.example:80") == 0


@pytest.mark.looptime
async def test_after_a_cut_429s_of_requests_sent_together_cut_the_rate_once_more(server, client):
    # Throttle._adapt: `learned.counts(cuts)` -> `True` (every 429 of a round cuts)
    throttle = Throttle(10.0, burst=10, adaptive=True)
    server.script("/x", *[429] * 6)
    assert await get(client, server.url + "/x", throttle) == 429
    together = await asyncio.gather(*(get(client, server.url + "/x", throttle) for _ in range(5)))
    assert together == [429] * 5
    state = throttle._states.get(server.url)
    assert state is not None
    assert state.learned is not None
    assert state.learned.cuts == 2
