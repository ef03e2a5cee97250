"""CircuitBreaker against a real loopback server; waits run in virtual time (looptime)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from resilient import CircuitOpenError, RateLimited
from resilient.breaker._breaker import CircuitBreaker, next_break, reject_probability
from resilient.breaker._window import Window

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_FOR = 30.0
WINDOW = 10.0


def breaker(**overrides: object) -> CircuitBreaker:
    """A breaker that trips after 4 calls at a 50 % failure ratio (no run rule, one
    fixed break unless ``max_open_for`` is given)."""
    options: dict[str, object] = {
        "min_calls": 4,
        "failure_ratio": 0.5,
        "window": WINDOW,
        "open_for": OPEN_FOR,
        "consecutive_failures": None,
    }
    options.update(overrides)
    return CircuitBreaker(**options)


def key_of(base_url: str) -> str:
    """The ``by_host`` key of ``http://host:port``."""
    host, port = base_url.removeprefix("http://").split(":")
    return f"http://{host}:{port}"


def closed_port_url() -> str:
    """A loopback URL nobody listens on (bind a port, then close it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def held(gate: asyncio.Event, status: int = 200) -> Reply:
    """A reply that waits for ``gate`` before answering ``status``."""

    async def reply(request: web.Request) -> web.StreamResponse:
        await gate.wait()
        return web.Response(status=status, text="held")

    return reply


@pytest.fixture
async def gate(server):
    """An event that held replies wait for; set at teardown so the server can stop."""
    event = asyncio.Event()
    yield event
    event.set()


async def status(client: aiohttp.ClientSession, url: str, cb: CircuitBreaker) -> int:
    async with client.get(url, middlewares=(cb,)) as resp:
        await resp.read()
        return resp.status


async def outcomes(client, url: str, cb: CircuitBreaker, *statuses: int) -> None:
    """Make one call per status, the server answering each in turn."""
    for expected in statuses:
        assert await status(client, url, cb) == expected


async def trip(client, server, cb: CircuitBreaker, key: str | None = None) -> None:
    """Open the circuit for ``server`` (or for ``key``) with four 500s on ``/trip``."""
    server.script("/trip", 500, 500, 500, 500)
    await outcomes(client, server.url + "/trip", cb, 500, 500, 500, 500)
    assert cb.state(key or key_of(server.url)) == "open"


async def until(condition: Callable[[], bool]) -> None:
    """Yield in 1 ms virtual steps until ``condition`` holds (at most 10 s)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


# --- closed: counting -------------------------------------------------------------


async def test_stays_closed_below_min_calls(server, client):
    cb = breaker()
    server.script("/x", 500, 500, 500)
    await outcomes(client, server.url + "/x", cb, 500, 500, 500)
    assert cb.state(key_of(server.url)) == "closed"
    assert await status(client, server.url + "/x", cb) == 200
    assert server.count() == 4


@pytest.mark.parametrize(
    ("statuses", "state"),
    [
        ((200, 200, 200, 500), "closed"),  # 25 %
        ((200, 200, 500, 500), "open"),  # 50 % reaches the ratio
        ((500, 500, 500, 200), "closed"),  # only a failure trips it (as in the Lua script)
        ((200, 500, 500, 500), "open"),
    ],
)
async def test_opens_exactly_when_the_failure_ratio_is_reached(server, client, statuses, state):
    cb = breaker()
    server.script("/x", *statuses)
    await outcomes(client, server.url + "/x", cb, *statuses)
    assert cb.state(key_of(server.url)) == state


@pytest.mark.parametrize("code", [429, 404, 400, 422])
async def test_429_and_other_4xx_are_not_failures(server, client, code):
    cb = breaker()
    server.default("/x", code)
    await outcomes(client, server.url + "/x", cb, *[code] * 8)
    assert cb.state(key_of(server.url)) == "closed"


@pytest.mark.parametrize("code", [500, 502, 503, 504])
async def test_5xx_are_failures(server, client, code):
    cb = breaker()
    server.default("/x", code)
    await outcomes(client, server.url + "/x", cb, *[code] * 4)
    assert cb.state(key_of(server.url)) == "open"


async def test_network_errors_count_as_failures(client):
    cb = breaker()
    url = closed_port_url()
    for _ in range(4):
        with pytest.raises(aiohttp.ClientConnectorError):
            await status(client, url + "/x", cb)
    assert cb.state(key_of(url)) == "open"
    with pytest.raises(CircuitOpenError):
        await status(client, url + "/x", cb)


@pytest.mark.looptime
async def test_read_timeouts_count_as_failures(server, gate):
    cb = breaker()
    server.default("/slow", held(gate))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=1.0)
    async with aiohttp.ClientSession(timeout=timeout, middlewares=(cb,)) as session:
        for _ in range(4):
            with pytest.raises(asyncio.TimeoutError):
                await session.get(server.url + "/slow")
    assert cb.state(key_of(server.url)) == "open"


async def test_errors_raised_by_inner_policies_are_not_outcomes(server, client):
    async def paused(request, handler):
        raise RateLimited(key_of(server.url), 60.0)

    cb = breaker()
    for _ in range(6):
        with pytest.raises(RateLimited):
            await client.get(server.url + "/x", middlewares=(cb, paused))
    assert cb.state(key_of(server.url)) == "closed"


@pytest.mark.parametrize(("code", "state"), [(404, "closed"), (503, "open")])
async def test_statuses_raised_by_inner_middlewares_count_by_their_code(
    server, client, code, state
):
    async def strict(request, handler):
        resp = await handler(request)
        resp.raise_for_status()
        return resp

    cb = breaker()
    server.default("/x", code)
    for _ in range(4):
        with pytest.raises(aiohttp.ClientResponseError):
            await client.get(server.url + "/x", middlewares=(cb, strict))
    assert cb.state(key_of(server.url)) == state


@pytest.mark.looptime
async def test_old_failures_slide_out_of_the_window(server, client):
    cb = breaker()
    server.script("/x", 500, 500, 500)
    await outcomes(client, server.url + "/x", cb, 500, 500, 500)
    await asyncio.sleep(WINDOW)
    # Counted with the three old failures this would be 4 of 7 (57 %): open.
    server.script("/x", 500, 200, 200, 200)
    await outcomes(client, server.url + "/x", cb, 500, 200, 200, 200)
    assert cb.state(key_of(server.url)) == "closed"


@pytest.mark.looptime
async def test_failures_within_the_window_still_count(server, client):
    cb = breaker()
    server.script("/x", 500, 200)
    await outcomes(client, server.url + "/x", cb, 500, 200)
    await asyncio.sleep(WINDOW * 0.8)
    server.script("/x", 500)
    await outcomes(client, server.url + "/x", cb, 500)
    assert cb.state(key_of(server.url)) == "closed"  # 2 of 3: below min_calls
    server.script("/x", 200, 500)
    await outcomes(client, server.url + "/x", cb, 200, 500)
    assert cb.state(key_of(server.url)) == "open"


# --- open: failing fast -----------------------------------------------------------


@pytest.mark.looptime
async def test_open_circuit_fails_fast_without_sending(server, client):
    cb = breaker()
    await trip(client, server, cb)
    sent = server.count()
    await asyncio.sleep(10.0)
    with pytest.raises(CircuitOpenError) as caught:
        await status(client, server.url + "/x", cb)
    assert server.count() == sent
    assert caught.value.key == key_of(server.url)
    assert caught.value.retry_after == pytest.approx(OPEN_FOR - 10.0, abs=0.05)


async def test_breaker_is_per_host(server, client):
    cb = breaker()
    dead = closed_port_url()
    for _ in range(4):
        with pytest.raises(aiohttp.ClientConnectorError):
            await status(client, dead + "/x", cb)
    assert cb.state(key_of(dead)) == "open"
    assert await status(client, server.url + "/x", cb) == 200
    assert cb.state(key_of(server.url)) == "closed"


async def test_a_custom_key_separates_circuits_on_one_host(server, client):
    cb = breaker(key=lambda request: request.url.path)
    await trip(client, server, cb, key="/trip")
    assert await status(client, server.url + "/other", cb) == 200


# --- half-open: probing -----------------------------------------------------------


@pytest.mark.looptime
async def test_after_open_for_it_half_opens_and_sends_a_probe(server, client):
    cb = breaker()
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    assert cb.state(key_of(server.url)) == "half_open"
    sent = server.count()
    assert await status(client, server.url + "/x", cb) == 200
    assert server.count() == sent + 1


@pytest.mark.looptime
@pytest.mark.parametrize("probes", [1, 3])
async def test_half_open_admits_exactly_half_open_probes_at_once(server, client, probes, gate):
    cb = breaker(half_open_probes=probes)
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    server.default("/probe", held(gate))
    tasks = [asyncio.create_task(status(client, server.url + "/probe", cb)) for _ in range(probes)]
    await until(lambda: server.count("/probe") == probes)
    for _ in range(3):
        with pytest.raises(CircuitOpenError):
            await status(client, server.url + "/probe", cb)
    assert server.count("/probe") == probes
    gate.set()
    assert await asyncio.gather(*tasks) == [200] * probes


@pytest.mark.looptime
async def test_retry_after_while_probing_is_the_time_until_the_probe_is_given_up(
    server, client, gate
):
    cb = breaker()
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    server.default("/probe", held(gate))
    probe = asyncio.create_task(status(client, server.url + "/probe", cb))
    await until(lambda: server.count("/probe") == 1)
    await asyncio.sleep(5.0)
    with pytest.raises(CircuitOpenError) as caught:
        await status(client, server.url + "/probe", cb)
    assert caught.value.retry_after == pytest.approx(OPEN_FOR - 5.0, abs=0.05)
    gate.set()
    await probe


@pytest.mark.looptime
async def test_probe_success_closes_the_circuit(server, client):
    cb = breaker()
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    assert await status(client, server.url + "/x", cb) == 200
    assert cb.state(key_of(server.url)) == "closed"


@pytest.mark.looptime
async def test_closing_empties_the_window(server, client):
    cb = breaker(window=1000.0)  # the tripping failures would otherwise still be counted
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    assert await status(client, server.url + "/x", cb) == 200
    server.script("/x", 500)
    await outcomes(client, server.url + "/x", cb, 500)
    assert cb.state(key_of(server.url)) == "closed"


@pytest.mark.looptime
async def test_every_probe_must_succeed_before_closing(server, client):
    cb = breaker(half_open_probes=2)
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    assert await status(client, server.url + "/x", cb) == 200
    assert cb.state(key_of(server.url)) == "half_open"
    assert await status(client, server.url + "/x", cb) == 200
    assert cb.state(key_of(server.url)) == "closed"


@pytest.mark.looptime
async def test_probe_failure_reopens_for_another_open_for(server, client):
    cb = breaker()
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    server.script("/x", 503)
    await outcomes(client, server.url + "/x", cb, 503)
    assert cb.state(key_of(server.url)) == "open"
    with pytest.raises(CircuitOpenError) as caught:
        await status(client, server.url + "/x", cb)
    assert caught.value.retry_after == pytest.approx(OPEN_FOR, abs=0.05)


@pytest.mark.looptime
async def test_a_cancelled_probe_frees_its_slot(server, client, gate):
    cb = breaker()
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    server.default("/probe", held(gate))
    probe = asyncio.create_task(status(client, server.url + "/probe", cb))
    await until(lambda: server.count("/probe") == 1)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert cb.state(key_of(server.url)) == "half_open"
    assert await status(client, server.url + "/x", cb) == 200
    assert cb.state(key_of(server.url)) == "closed"


@pytest.mark.looptime
async def test_an_unanswered_probe_is_given_up_after_open_for(server, client, gate):
    cb = breaker()
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    server.default("/probe", held(gate))
    stuck = asyncio.create_task(status(client, server.url + "/probe", cb))
    await until(lambda: server.count("/probe") == 1)
    await asyncio.sleep(OPEN_FOR)
    assert await status(client, server.url + "/x", cb) == 200
    assert cb.state(key_of(server.url)) == "closed"
    gate.set()
    await stuck


@pytest.mark.looptime
async def test_a_late_outcome_of_a_call_admitted_before_opening_is_ignored(server, client, gate):
    cb = breaker(window=1000.0)  # the tripping failures stay in the window
    server.script("/slow", held(gate, status=500))
    slow = asyncio.create_task(status(client, server.url + "/slow", cb))
    await until(lambda: server.count("/slow") == 1)
    await trip(client, server, cb)
    await asyncio.sleep(OPEN_FOR)
    gate.set()
    assert await slow == 500  # fails while half-open, but it is not a probe
    assert cb.state(key_of(server.url)) == "half_open"
    assert await status(client, server.url + "/x", cb) == 200
    assert cb.state(key_of(server.url)) == "closed"


# --- fast detection, growing breaks (issue 13) ----------------------------------------


async def refused_for(client, url: str, cb: CircuitBreaker) -> float:
    """The ``retry_after`` of a call refused now (the circuit must be open)."""
    with pytest.raises(CircuitOpenError) as caught:
        await status(client, url, cb)
    return caught.value.retry_after


@pytest.mark.looptime
async def test_consecutive_failures_open_a_circuit_whose_window_is_full_of_successes(
    server, client
):
    cb = breaker(consecutive_failures=5, min_calls=4, window=1000.0)
    server.default("/x", 200)
    await outcomes(client, server.url + "/x", cb, *[200] * 50)
    server.default("/x", 503)
    await outcomes(client, server.url + "/x", cb, *[503] * 4)
    assert cb.state(key_of(server.url)) == "closed"  # 4 of 54, 4 in a row
    await outcomes(client, server.url + "/x", cb, 503)
    assert cb.state(key_of(server.url)) == "open"
    assert await refused_for(client, server.url + "/x", cb) == pytest.approx(OPEN_FOR, abs=0.01)


@pytest.mark.looptime
async def test_a_success_breaks_the_run_of_failures(server, client):
    cb = breaker(consecutive_failures=3, min_calls=1000)
    server.script("/x", 503, 503, 200, 503, 503, 200, 503, 503)
    await outcomes(client, server.url + "/x", cb, 503, 503, 200, 503, 503, 200, 503, 503)
    assert cb.state(key_of(server.url)) == "closed"
    server.script("/x", 503)
    await outcomes(client, server.url + "/x", cb, 503)
    assert cb.state(key_of(server.url)) == "open"


@pytest.mark.looptime
async def test_the_short_window_forgets_old_successes_and_trips_on_the_ratio(server, client):
    cb = CircuitBreaker(window=2.0, min_calls=10, consecutive_failures=None)
    server.default("/x", 200)
    for _ in range(100):  # a busy healthy spell: 10 s at 10 calls/s
        await outcomes(client, server.url + "/x", cb, 200)
        await asyncio.sleep(0.1)
    server.default("/x", 503)
    started = asyncio.get_running_loop().time()
    while cb.state(key_of(server.url)) == "closed":
        await outcomes(client, server.url + "/x", cb, 503)
        await asyncio.sleep(0.1)
    # The successes leave a 2 s window within 1 to 2 s: the failures outweigh them then.
    assert asyncio.get_running_loop().time() - started <= 2.0


@pytest.mark.looptime
async def test_each_failed_probe_doubles_the_break_with_jitter_up_to_max_open_for(server, client):
    open_for, max_open_for = 1.0, 16.0
    cb = breaker(open_for=open_for, max_open_for=max_open_for)
    await trip(client, server, cb)
    url = server.url + "/x"
    server.default("/x", 503)
    breaks = [await refused_for(client, url, cb)]
    for _ in range(8):
        await asyncio.sleep(breaks[-1])
        await outcomes(client, url, cb, 503)  # the probe fails
        breaks.append(await refused_for(client, url, cb))
    assert breaks[0] == pytest.approx(open_for, abs=0.01)
    for level, pause in enumerate(breaks[1:], start=1):
        nominal = min(max_open_for, open_for * 2**level)
        assert max(open_for, nominal / 2) - 0.01 <= pause <= nominal + 0.01, (level, breaks)
    assert max(breaks) <= max_open_for
    assert sum(breaks[5:]) > 3 * max_open_for / 2  # at the cap: between 8 and 16 s each


@pytest.mark.looptime
async def test_closing_resets_the_break_to_open_for(server, client):
    cb = breaker(open_for=1.0, max_open_for=60.0)
    await trip(client, server, cb)
    url = server.url + "/x"
    server.default("/x", 503)
    pause = await refused_for(client, url, cb)
    for _ in range(4):  # four failed probes: the break is 8 to 16 s now
        await asyncio.sleep(pause)
        await outcomes(client, url, cb, 503)
        pause = await refused_for(client, url, cb)
    assert pause >= 8.0 - 0.01
    await asyncio.sleep(pause)
    server.default("/x", 200)
    await outcomes(client, url, cb, 200)  # the probe succeeds: closed
    assert cb.state(key_of(server.url)) == "closed"
    await trip(client, server, cb)
    assert await refused_for(client, url, cb) == pytest.approx(1.0, abs=0.01)


@given(
    open_for=st.floats(0.001, 100.0),
    factor=st.floats(1.0, 1000.0),
    level=st.integers(0, 10_000),
    u=st.floats(0.0, 1.0, exclude_max=True),
)
def test_a_break_lies_between_open_for_and_the_doubled_nominal(open_for, factor, level, u):
    max_open_for = open_for * factor
    pause = next_break(open_for, max_open_for, level, u)
    nominal = min(max_open_for, open_for * 2.0 ** min(level, 64))
    assert open_for <= pause <= nominal
    assert pause >= nominal / 2 or pause == open_for
    if level == 0:
        assert pause == open_for


def test_breaks_at_the_cap_are_spread_by_the_jitter():
    pauses = {next_break(1.0, 8.0, 10, u / 100) for u in range(100)}
    assert min(pauses) == 4.0
    assert max(pauses) == pytest.approx(8.0, abs=0.05)
    assert len(pauses) == 100


# --- mode="adaptive": client-side adaptive throttling ---------------------------------


@pytest.mark.parametrize(
    ("requests", "accepts", "p"),
    [
        (0, 0, 0.0),
        (10, 5, 0.0),
        (10, 6, 0.0),
        (10, 4, 2 / 11),
        (10, 0, 10 / 11),
        (100, 0, 100 / 101),
    ],
)
def test_reject_probability_is_the_sre_books_formula(requests, accepts, p):
    assert reject_probability(requests, accepts) == pytest.approx(p)


@pytest.mark.looptime
async def test_adaptive_mode_never_rejects_while_half_the_calls_succeed(server, client):
    cb = CircuitBreaker(mode="adaptive", min_calls=4)
    server.default("/x", 503)
    server.script("/x", *[200, 503] * 100)
    await outcomes(client, server.url + "/x", cb, *[200, 503] * 100)
    assert cb.state(key_of(server.url)) == "closed"


@pytest.mark.looptime
async def test_adaptive_mode_rejects_most_calls_while_all_fail_and_lets_a_few_through(
    server, client
):
    cb = CircuitBreaker(mode="adaptive", window=2.0, min_calls=10)
    server.default("/x", 503)
    refused = 0
    for _ in range(400):  # 4 s at 100 calls/s
        try:
            await outcomes(client, server.url + "/x", cb, 503)
        except CircuitOpenError:
            refused += 1
        await asyncio.sleep(0.01)
    assert cb.state(key_of(server.url)) == "open"
    sent = server.count("/x")
    assert 10 <= sent <= 80  # about 1 / (requests in the window + 1) of the calls pass
    assert sent + refused == 400
    server.default("/x", 200)
    ok = []
    for _ in range(2000):  # recovering: each window's successes earn the next one's calls
        with contextlib.suppress(CircuitOpenError):
            ok.append(await status(client, server.url + "/x", cb) == 200)
        await asyncio.sleep(0.01)
    assert cb.state(key_of(server.url)) == "closed"
    assert all(ok)
    assert 200 < len(ok) < 2000  # slow: the rejections count as requests not accepted


# --- memory -----------------------------------------------------------------------


async def test_closed_circuits_of_many_keys_stay_bounded():
    cb = breaker(max_keys=64)
    for i in range(50_000):
        cb._circuits.get_or_create(f"k{i}")
        assert len(cb._circuits) <= 64


async def test_requests_with_many_keys_keep_the_map_bounded(server, client):
    keys = iter(range(1_000_000))
    cb = breaker(max_keys=8, key=lambda request: f"k{next(keys)}")
    for _ in range(40):
        assert await status(client, server.url + "/x", cb) == 200
    assert len(cb._circuits) <= 8


@pytest.mark.looptime
async def test_open_circuits_survive_eviction_until_open_for_ends(server, client):
    cb = breaker(max_keys=8)
    await trip(client, server, cb)
    for i in range(100):
        cb._circuits.get_or_create(f"k{i}")
    assert cb.state(key_of(server.url)) == "open"
    await asyncio.sleep(OPEN_FOR)
    for i in range(100, 200):
        cb._circuits.get_or_create(f"k{i}")
    assert key_of(server.url) not in cb._circuits


async def test_a_key_evicted_while_closed_counts_again_when_it_returns(server, client):
    """A closed key is let through from the store's ``closed`` map without a call; when
    its circuit is evicted it leaves the map too, so it is counted again on its return."""
    cb = breaker(max_keys=8)
    assert await status(client, server.url + "/x", cb) == 200
    assert key_of(server.url) in cb._memory.closed
    for i in range(100):  # other keys evict the idle circuit
        cb._memory.admit(f"k{i}", None)  # type: ignore[arg-type]
    assert key_of(server.url) not in cb._circuits
    assert key_of(server.url) not in cb._memory.closed
    assert len(cb._memory.closed) <= 8
    await trip(client, server, cb)


# --- logging ----------------------------------------------------------------------


@pytest.mark.looptime
async def test_transitions_are_logged(server, client, caplog):
    caplog.set_level(logging.INFO, logger="resilient")
    cb = breaker()
    await trip(client, server, cb)
    opened = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(opened) == 1
    message = opened[0].getMessage()
    assert key_of(server.url) in message
    when = datetime.fromisoformat(re.search(r"half-open at (\S+)", message)[1])
    assert abs(when - (datetime.now(UTC) + timedelta(seconds=OPEN_FOR))) < timedelta(seconds=5)
    caplog.clear()
    await asyncio.sleep(OPEN_FOR)
    await outcomes(client, server.url + "/x", cb, 200)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == [logging.INFO, logging.INFO]
    assert "half-open" in messages[0][1]
    assert "closed" in messages[1][1]


# --- configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("failure_ratio", 0),
        ("failure_ratio", 0.0),
        ("failure_ratio", 1.01),
        ("failure_ratio", float("nan")),
        ("failure_ratio", True),
        ("failure_ratio", "0.5"),
        ("min_calls", 0),
        ("min_calls", 2.0),
        ("min_calls", True),
        ("window", 0),
        ("window", -1.0),
        ("window", float("inf")),
        ("window", float("nan")),
        ("open_for", 0.0),
        ("open_for", float("inf")),
        ("open_for", None),
        ("half_open_probes", 0),
        ("half_open_probes", 1.5),
        ("consecutive_failures", 0),
        ("consecutive_failures", 2.0),
        ("consecutive_failures", True),
        ("max_open_for", 0.25),  # below open_for (0.5 s)
        ("max_open_for", float("inf")),
        ("max_open_for", float("nan")),
        ("max_open_for", "5"),
        ("mode", "ratio"),
        ("key", "by_host"),
        ("max_keys", 0),
        ("max_keys", 10.0),
        ("storage", "memory"),
        ("storage", None),
    ],
)
def test_invalid_configuration_raises_value_error_naming_the_argument(argument, value):
    with pytest.raises(ValueError, match=argument):
        CircuitBreaker(**{argument: value})


def test_adaptive_mode_with_a_redis_storage_is_refused_naming_the_mode():
    with pytest.raises(ValueError, match="mode='adaptive'"):
        CircuitBreaker(mode="adaptive", storage="redis://localhost:6379/0")


def test_an_unknown_storage_is_refused_without_echoing_the_uri():
    with pytest.raises(ValueError, match=r"storage") as caught:
        CircuitBreaker(storage="mongodb://admin:hunter2@cache.internal:27017/0")
    assert "hunter2" not in str(caught.value)


def test_a_redis_uri_is_accepted_and_its_password_never_shown():
    breaker = CircuitBreaker(storage="redis://:hunter2@cache.internal:6379/0")
    assert "hunter2" not in repr(breaker)
    assert "redis://cache.internal:6379/0" in repr(breaker)


def test_defaults_and_repr():
    cb = CircuitBreaker()
    assert (cb.failure_ratio, cb.min_calls, cb.window, cb.open_for) == (0.5, 10, 2.0, 0.5)
    assert (cb.consecutive_failures, cb.max_open_for, cb.mode) == (10, 1.0, "circuit")
    assert (cb.half_open_probes, cb.storage, cb.max_keys) == (1, "memory://", 10_000)
    assert repr(cb) == (
        "CircuitBreaker(failure_ratio=0.5, min_calls=10, window=2.0, open_for=0.5,"
        " half_open_probes=1, consecutive_failures=10, max_open_for=1.0, mode='circuit',"
        " key=by_host, storage='memory://', max_keys=10000)"
    )
    assert (cb.kind, cb.order) == ("circuit_breaker", 20)


@pytest.mark.parametrize(("open_for", "expected"), [(0.25, 1.0), (1.0, 1.0), (60.0, 60.0)])
def test_max_open_for_defaults_to_the_larger_of_one_second_and_open_for(open_for, expected):
    assert CircuitBreaker(open_for=open_for).max_open_for == expected


# --- the window counter -----------------------------------------------------------

BUCKETS = 10
WIDTH = 0.5


@given(
    st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=3.0), st.booleans()),
        max_size=200,
    )
)
def test_window_counts_exactly_the_calls_of_the_last_buckets(events):
    window = Window(WIDTH, BUCKETS)
    now, seen = 1000.0, []
    for gap, failed in events:
        now += gap
        window.add(now, failed)
        seen.append((now, failed))
        tick = int(now // WIDTH)
        recent = [f for t, f in seen if tick - int(t // WIDTH) < BUCKETS]
        assert window.calls == len(recent)
        assert window.fails == sum(recent)
        assert all(calls >= fails >= 0 for calls, fails in window.buckets())
        assert sum(c for c, _ in window.buckets()) == window.calls
        assert sum(f for _, f in window.buckets()) == window.fails


def test_window_empties_after_a_long_quiet_spell():
    window = Window(WIDTH, BUCKETS)
    for i in range(50):
        window.add(100.0 + i * 0.01, True)
    window.add(100.0 + 10 * WIDTH * BUCKETS, False)
    assert (window.calls, window.fails) == (1, 0)


def test_window_restarts_on_an_earlier_clock():
    window = Window(WIDTH, BUCKETS)
    window.add(5000.0, True)
    window.add(10.0, False)  # another event loop's clock
    assert (window.calls, window.fails) == (1, 0)
