"""Cancellation at every await point of every policy leaves its state consistent.

For each place a policy suspends (a queue, a sleep, a request on the wire, a shared
refresh), a caller is driven there, cancelled, and then: the policy's state holds no
trace of it that could block or skew others (tokens, waiters, the probe, the budget,
half-open slots, the refresh), and the same session, on a ``TCPConnector(limit=1)``
(a leaked connection would block it), still serves a request. Virtual time (looptime).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import resilient
from resilient import sage
from resilient.retry._budget import Balance

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]

RATE = 1.0
"""Throttle tokens per second: the head of a queue sleeps a whole second per token."""
PAUSE = 10.0
"""Retry-After of the 429 that pauses a key."""
TICK = 1e-3


@pytest.fixture
async def hold() -> AsyncIterator[asyncio.Event]:
    """Replies made with :func:`held` wait for this event; set at teardown."""
    event = asyncio.Event()
    yield event
    event.set()


def held(event: asyncio.Event, status: int = 200, **headers: str) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        await event.wait()
        return web.Response(status=status, text="held", headers=headers)

    return reply


def too_many(seconds: float = PAUSE) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=429, headers={"Retry-After": f"{seconds:g}"})

    return reply


async def until(condition: Callable[[], bool], steps: int = 2_000) -> None:
    """Let the loop run (1 ms of virtual time per step) until ``condition()`` holds."""
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(TICK)
    raise AssertionError("condition not reached")


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def one_connection(*middlewares: Any) -> aiohttp.ClientSession:
    """A session whose single pooled connection a leak would keep busy forever."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), middlewares=middlewares)


async def status(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> int:
    async with session.get(url, **kwargs) as resp:
        await resp.read()
        return resp.status


def arrivals(server, path: str) -> list[float]:
    return [a.time for a in server.arrivals if a.path == path]


def key_of(server) -> str:
    return server.url


# --- Throttle ---------------------------------------------------------------------


@pytest.mark.looptime
async def test_throttle_cancelled_while_queued_leaves_the_queue_and_the_pacing(server):
    throttle = resilient.Throttle(RATE)
    async with one_connection(throttle) as s:
        assert await status(s, server.url + "/a") == 200  # spends the only token
        head = asyncio.create_task(status(s, server.url + "/head"))
        queued = asyncio.create_task(status(s, server.url + "/queued"))
        await until(lambda: throttle.waiting(key_of(server)) == 2)
        await cancel(queued)
        assert throttle.waiting(key_of(server)) == 1
        assert await head == 200
        assert await status(s, server.url + "/next") == 200
    t0 = server.arrivals[0].time
    assert arrivals(server, "/head") == [pytest.approx(t0 + 1.0, abs=0.01)]
    assert arrivals(server, "/next") == [pytest.approx(t0 + 2.0, abs=0.01)]
    assert arrivals(server, "/queued") == []
    assert throttle.waiting(key_of(server)) == 0


@pytest.mark.looptime
async def test_throttle_head_cancelled_in_its_token_sleep_hands_the_token_on(server):
    throttle = resilient.Throttle(RATE)
    async with one_connection(throttle) as s:
        assert await status(s, server.url + "/a") == 200
        head = asyncio.create_task(status(s, server.url + "/head"))
        queued = asyncio.create_task(status(s, server.url + "/queued"))
        await until(lambda: throttle.waiting(key_of(server)) == 2)
        await asyncio.sleep(0.5)
        await cancel(head)
        assert await queued == 200
    t0 = server.arrivals[0].time
    # the token due at 1.0 goes to the next in line: not lost, not granted early
    assert arrivals(server, "/queued") == [pytest.approx(t0 + 1.0, abs=0.01)]
    assert throttle.waiting(key_of(server)) == 0


@pytest.mark.looptime
async def test_throttle_cancelled_on_the_wire_keeps_its_token_spent(server, hold):
    """The request may have reached the server: its token is not given back."""
    throttle = resilient.Throttle(RATE)
    server.default("/held", held(hold))
    async with one_connection(throttle) as s:
        flying = asyncio.create_task(status(s, server.url + "/held"))
        await until(lambda: server.count("/held") == 1)
        await cancel(flying)
        assert throttle.waiting(key_of(server)) == 0
        assert await status(s, server.url + "/next") == 200
    t0 = server.arrivals[0].time
    assert arrivals(server, "/next") == [pytest.approx(t0 + 1.0, abs=0.01)]


@pytest.mark.looptime
async def test_throttle_quota_cancelled_on_the_wire_takes_its_slot_and_lands(server, hold):
    """Cancelled in flight, a request still takes its quota slot (it may have arrived)
    and stops counting as in flight, so the window reads exactly one slot used."""
    throttle = resilient.Throttle(1000.0, quotas="2/minute")
    server.default("/held", held(hold))
    async with one_connection(throttle) as s:
        flying = asyncio.create_task(status(s, server.url + "/held"))
        await until(lambda: server.count("/held") == 1)
        await cancel(flying)
        assert await status(s, server.url + "/second") == 200  # slot 2 of 2: no wait
        with resilient.deadline(1.0), pytest.raises(resilient.DeadlineExceeded):
            await status(s, server.url + "/third")  # the window is full: 2 of 2
        assert throttle.waiting(key_of(server)) == 0
    assert server.count("/third") == 0


@pytest.mark.looptime
async def test_throttle_quota_head_cancelled_waiting_for_a_landing_leaves_the_queue(server, hold):
    throttle = resilient.Throttle(1000.0, quotas="1/minute")
    server.default("/held", held(hold))
    async with aiohttp.ClientSession(middlewares=(throttle,)) as s:
        flying = asyncio.create_task(status(s, server.url + "/held"))
        await until(lambda: server.count("/held") == 1)
        waiting = asyncio.create_task(status(s, server.url + "/waiting"))
        await until(lambda: throttle.waiting(key_of(server)) == 1)
        await cancel(waiting)
        assert throttle.waiting(key_of(server)) == 0
        hold.set()
        assert await flying == 200
        # the window (1 per minute) is now full: the next caller is told so at once
        with resilient.deadline(1.0), pytest.raises(resilient.DeadlineExceeded):
            await status(s, server.url + "/next")
    assert server.count("/waiting") == 0


# --- RateLimitBackoff ---------------------------------------------------------------


def paused_gate(policy: resilient.RateLimitBackoff, key: str) -> Any:
    gate = policy._gates.get(key)
    assert gate is not None
    return gate


@pytest.mark.looptime
async def test_pause_owner_cancelled_in_its_wait_hands_the_probe_to_the_next(server):
    policy = resilient.RateLimitBackoff()
    server.script("/owner", too_many())
    async with one_connection(policy) as s:
        owner = asyncio.create_task(status(s, server.url + "/owner"))
        await until(lambda: policy.paused_for(key_of(server)) > 0)
        others = [asyncio.create_task(status(s, server.url + "/other")) for _ in range(3)]
        await until(lambda: paused_gate(policy, key_of(server)).waiting() == 4)
        await asyncio.sleep(PAUSE / 2)
        await cancel(owner)
        assert await asyncio.gather(*others) == [200, 200, 200]
        gate = paused_gate(policy, key_of(server))
        assert (gate.closed, gate.probing, gate.waiting()) == (False, False, 0)
        assert await status(s, server.url + "/next") == 200
    t429 = arrivals(server, "/owner")[0]
    assert arrivals(server, "/owner") == [t429]  # the cancelled owner never re-sent
    assert min(arrivals(server, "/other")) == pytest.approx(t429 + PAUSE, abs=0.01)


@pytest.mark.looptime
async def test_pause_waiter_cancelled_behind_the_pause_leaves_the_queue(server):
    policy = resilient.RateLimitBackoff()
    server.script("/owner", too_many())
    async with one_connection(policy) as s:
        owner = asyncio.create_task(status(s, server.url + "/owner"))
        await until(lambda: policy.paused_for(key_of(server)) > 0)
        waiter = asyncio.create_task(status(s, server.url + "/waiter"))
        await until(lambda: paused_gate(policy, key_of(server)).waiting() == 2)
        await cancel(waiter)
        assert paused_gate(policy, key_of(server)).waiting() == 1
        assert await owner == 200
        gate = paused_gate(policy, key_of(server))
        assert (gate.closed, gate.probing, gate.waiting()) == (False, False, 0)
        assert await status(s, server.url + "/next") == 200
    assert server.count("/waiter") == 0


@pytest.mark.looptime
async def test_pause_probe_cancelled_on_the_wire_hands_the_probe_over(server, hold):
    policy = resilient.RateLimitBackoff()
    server.script("/probe", too_many(), held(hold))
    async with one_connection(policy) as s:
        probe = asyncio.create_task(status(s, server.url + "/probe"))
        await until(lambda: policy.paused_for(key_of(server)) > 0)
        await asyncio.sleep(0.1)
        follower = asyncio.create_task(status(s, server.url + "/follower"))
        await asyncio.sleep(PAUSE)
        await until(lambda: server.count("/probe") == 2)  # the probe is on the wire
        assert paused_gate(policy, key_of(server)).probing
        await cancel(probe)
        assert await follower == 200  # it probed in turn, and the key opened
        gate = paused_gate(policy, key_of(server))
        assert (gate.closed, gate.probing, gate.waiting()) == (False, False, 0)


# --- Retry ----------------------------------------------------------------------------


def constant(seconds: float) -> Callable[[int], float]:
    return lambda attempt: seconds


def one_retry_budget() -> resilient.RetryBudget:
    """No ratio, a reserve of exactly one retry per 10-second window."""
    return resilient.RetryBudget(ratio=0.0, min_per_second=0.1)


@pytest.mark.looptime
async def test_retry_cancelled_in_its_backoff_does_not_spend_the_budget(server):
    """The retry it was waiting for never happened, so the budget gets it back."""
    retry = resilient.Retry(attempts=2, backoff=constant(5.0), budget=one_retry_budget())
    server.script("/a", 503)
    server.script("/b", 503, 200)
    async with one_connection(retry) as s:
        waiting = asyncio.create_task(status(s, server.url + "/a"))
        await until(lambda: server.count("/a") == 1)
        await asyncio.sleep(1.0)  # in the 5 s backoff
        await cancel(waiting)
        assert await status(s, server.url + "/b") == 200  # its retry is covered
    assert server.count("/a") == 1
    assert server.count("/b") == 2


@pytest.mark.parametrize(
    "refund_at",
    [0.5, 3.5, 12.5],
    ids=["same second", "older bucket in the window", "after the window"],
)
def test_budget_refund_gives_back_exactly_the_withdrawn_retry(refund_at):
    """One retry of reserve, withdrawn at 0.5 s and refunded when the clock reads
    ``refund_at``: exactly one retry is available again (inside the window thanks to the
    refund; after it because the bucket left, and the late refund adds nothing)."""
    balance = Balance(one_retry_budget())
    assert balance.withdraw(0.5)
    balance.deposit(refund_at)  # the clock moves on
    balance.refund(0.5)
    assert balance.withdraw(refund_at) is True
    assert balance.withdraw(refund_at) is False


@pytest.mark.looptime
async def test_retry_cancelled_on_its_retry_attempt_has_spent_the_budget(server, hold):
    """The retry went to the wire, so it counts."""
    retry = resilient.Retry(attempts=2, backoff=constant(5.0), budget=one_retry_budget())
    server.script("/a", 503, held(hold))
    server.script("/b", 503, 200)
    async with one_connection(retry) as s:
        flying = asyncio.create_task(status(s, server.url + "/a"))
        await asyncio.sleep(5.0)
        await until(lambda: server.count("/a") == 2)
        await cancel(flying)
        assert await status(s, server.url + "/b") == 503  # the window's one retry is spent
    assert server.count("/b") == 1


@pytest.mark.looptime
async def test_retry_cancelled_on_its_first_attempt_leaves_the_session_usable(server, hold):
    retry = resilient.Retry(attempts=2, backoff=constant(5.0), budget=one_retry_budget())
    server.script("/a", held(hold))
    server.script("/b", 503, 200)
    async with one_connection(retry) as s:
        flying = asyncio.create_task(status(s, server.url + "/a"))
        await until(lambda: server.count("/a") == 1)
        await cancel(flying)
        assert await status(s, server.url + "/b") == 200
    assert server.count("/b") == 2


# --- CircuitBreaker ---------------------------------------------------------------


@pytest.mark.looptime
async def test_breaker_does_not_count_a_cancelled_call_as_a_failure(server, hold):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0, open_for=30.0)
    server.script("/a", held(hold))
    async with one_connection(breaker) as s:
        flying = asyncio.create_task(status(s, server.url + "/a"))
        await until(lambda: server.count("/a") == 1)
        await cancel(flying)
        assert breaker.state(key_of(server)) == "closed"
        assert await status(s, server.url + "/b") == 200


@pytest.mark.looptime
async def test_breaker_probe_cancelled_on_the_wire_frees_the_half_open_slot(server, hold):
    breaker = resilient.CircuitBreaker(min_calls=1, failure_ratio=1.0, open_for=30.0)
    server.script("/trip", 503)
    server.script("/probe", held(hold))
    async with one_connection(breaker) as s:
        assert await status(s, server.url + "/trip") == 503
        assert breaker.state(key_of(server)) == "open"
        await asyncio.sleep(30.0)
        probe = asyncio.create_task(status(s, server.url + "/probe"))
        await until(lambda: server.count("/probe") == 1)
        with pytest.raises(resilient.CircuitOpenError):  # the one slot is taken
            await status(s, server.url + "/refused")
        await cancel(probe)
        assert await status(s, server.url + "/next") == 200  # admitted as the probe
        assert breaker.state(key_of(server)) == "closed"
    assert server.count("/refused") == 0


# --- sage.TokenRefresh -------------------------------------------------------------


class Tokens:
    """A token server: after ``n`` refreshes only ``access-n`` is valid (none before)."""

    def __init__(self) -> None:
        self.refreshes = 0
        self.gate: asyncio.Event | None = None

    async def refresh(self) -> str:
        if self.gate is not None:
            await self.gate.wait()
        self.refreshes += 1
        return f"access-{self.refreshes}"

    async def reply(self, request: web.Request) -> web.StreamResponse:
        valid = f"Bearer access-{self.refreshes}" if self.refreshes else None
        if request.headers.get("Authorization") == valid:
            return web.Response(text="ok")
        return web.json_response(
            [
                {
                    "$severity": "error",
                    "$dataCode": "AccessTokenExpiredError",
                    "$message": "",
                    "$source": "",
                }
            ],
            status=401,
        )


def expired() -> dict[str, str]:
    return {"Authorization": "Bearer access-0"}


@pytest.mark.looptime
async def test_refresh_cancelled_callers_leave_the_shared_refresh_to_finish(server):
    """Every caller waiting on the refresh is cancelled: the refresh still completes,
    and the token they sent is remembered as replaced, so a later request carrying it
    (a session's default header) goes out with the new token, without a second refresh."""
    tokens = Tokens()
    tokens.gate = asyncio.Event()
    server.default("/r", tokens.reply)
    auth = sage.TokenRefresh(tokens.refresh)
    async with one_connection(auth) as s:
        callers = [
            asyncio.create_task(status(s, server.url + "/r", headers=expired())) for _ in range(3)
        ]
        await until(lambda: server.count("/r") == 3)
        await asyncio.sleep(0.1)  # all three wait on the one refresh
        for caller in callers:
            await cancel(caller)
        tokens.gate.set()
        await until(lambda: auth.generation == 1)
        assert await status(s, server.url + "/r", headers=expired()) == 200
    assert tokens.refreshes == 1
    assert server.count("/r") == 4


@pytest.mark.looptime
async def test_refresh_caller_cancelled_reading_the_401_body_releases_the_connection(server):
    """The 401's body is read to find its ``$dataCode``; a caller cancelled mid-body
    must not keep the connection (the pool holds one)."""
    stall = asyncio.Event()

    async def half_a_401(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=401, headers={"Content-Type": "application/json"})
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b'[{"$dataCode": ')
        await stall.wait()
        return resp

    server.script("/r", half_a_401)
    auth = sage.TokenRefresh(Tokens().refresh)
    async with one_connection(auth) as s:
        reading = asyncio.create_task(status(s, server.url + "/r"))
        await until(lambda: server.count("/r") == 1)
        await asyncio.sleep(0.1)
        await cancel(reading)
        async with asyncio.timeout(5.0):
            assert await status(s, server.url + "/next") == 200
    stall.set()


@pytest.mark.looptime
async def test_reauthorize_cancelled_releases_the_401(server):
    started = asyncio.Event()

    async def on_reauthorize() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def revoked(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            [
                {
                    "$severity": "error",
                    "$dataCode": "AuthorizationFailure",
                    "$message": "",
                    "$source": "",
                }
            ],
            status=401,
        )

    server.script("/r", revoked)
    auth = sage.TokenRefresh(Tokens().refresh, on_reauthorize=on_reauthorize)
    async with one_connection(auth) as s:
        caller = asyncio.create_task(status(s, server.url + "/r"))
        await started.wait()
        await cancel(caller)
        async with asyncio.timeout(5.0):
            assert await status(s, server.url + "/next") == 200
