"""Events and hooks: every decision emits one frozen Event, hooks never break requests."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

import resilient
from resilient import Event, sage
from resilient.observe._events import EVENT_KINDS, safe_url

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]

SECRET = "s3cr3t-t0ken"


def retry_after(status: int, seconds: int) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Retry-After": str(seconds)})

    return reply


def sage_401(data_code: str) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        body = [{"$severity": "error", "$dataCode": data_code, "$message": "m", "$source": ""}]
        return web.json_response(body, status=401)

    return reply


def key_of(server) -> str:
    return server.url  # by_host: http://127.0.0.1:<port>


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def close_to(when: datetime | None, seconds: float) -> bool:
    """``when`` is a UTC datetime about ``seconds`` from now (real wall clock)."""
    assert when is not None
    assert when.utcoffset() == timedelta(0)
    return abs((when - datetime.now(UTC)) - timedelta(seconds=seconds)) < timedelta(seconds=5)


@pytest.fixture
def events() -> Iterator[list[Event]]:
    seen: list[Event] = []
    remove = resilient.add_hook(seen.append)
    yield seen
    remove()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=resilient.DEFAULT_TIMEOUT) as s:
        yield s


async def fetch(
    session: aiohttp.ClientSession, url: str, *policies: object, **kwargs: object
) -> int:
    async with session.get(url, middlewares=resilient.chain(*policies), **kwargs) as resp:
        await resp.read()
        return resp.status


def retry(**kwargs: object) -> resilient.Retry:
    options: dict[str, object] = {"backoff": lambda attempt: 2.0, "budget": None}
    options.update(kwargs)
    return resilient.Retry(**options)


# --- the event type -------------------------------------------------------------


def test_an_event_is_frozen():
    event = Event("throttled", "k", "throttle")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.key = "other"  # type: ignore[misc]


def test_add_hook_rejects_a_non_callable():
    with pytest.raises(ValueError, match="add_hook: fn must be a callable"):
        resilient.add_hook("not a function")  # type: ignore[arg-type]


# --- one test per event kind --------------------------------------------------------


@pytest.mark.looptime
async def test_retry_scheduled_names_the_attempt_delay_status_and_utc_end(server, session, events):
    server.script("/r", 503)
    assert await fetch(session, server.url + "/r", retry()) == 200
    (event,) = events
    assert (event.kind, event.policy, event.key) == ("retry_scheduled", "retry", key_of(server))
    assert (event.method, event.url) == ("GET", server.url + "/r")
    assert (event.attempt, event.delay, event.status) == (1, 2.0, 503)
    assert event.reason == "status 503"
    assert close_to(event.until, 2.0)


@pytest.mark.looptime
async def test_retry_gave_up_after_the_last_attempt(server, session, events):
    server.script("/r", 503, 503)
    assert await fetch(session, server.url + "/r", retry(attempts=2)) == 503
    assert kinds(events) == ["retry_scheduled", "retry_gave_up"]
    gave_up = events[1]
    assert (gave_up.attempt, gave_up.status, gave_up.reason) == (2, 503, "attempts exhausted")
    assert gave_up.delay is None
    assert gave_up.until is None


async def test_retry_gave_up_names_the_server_delay_beyond_max_delay(server, session, events):
    server.script("/r", retry_after(503, 3600))
    assert await fetch(session, server.url + "/r", retry(max_delay=60.0)) == 503
    (event,) = events
    assert (event.kind, event.attempt) == ("retry_gave_up", 1)
    assert event.reason == "server delay beyond max_delay"


@pytest.mark.looptime
async def test_rate_limited_announces_the_pause_and_its_utc_end(server, session, events):
    server.script("/r", retry_after(429, 3600))
    assert await fetch(session, server.url + "/r", resilient.RateLimitBackoff()) == 200
    limited = events[0]
    assert (limited.kind, limited.policy) == ("rate_limited", "rate_limit_backoff")
    assert limited.status == 429
    assert (limited.attempt, limited.delay) == (1, 3600.0)
    assert limited.reason == "429 Retry-After"
    assert close_to(limited.until, 3600.0)


@pytest.mark.looptime
async def test_pause_probe_is_emitted_when_the_pause_ends(server, session, events):
    server.script("/r", retry_after(429, 60))
    assert await fetch(session, server.url + "/r", resilient.RateLimitBackoff()) == 200
    assert kinds(events) == ["rate_limited", "pause_probe"]
    assert events[1].key == key_of(server)


@pytest.mark.looptime
async def test_throttled_is_emitted_for_a_wait_of_a_millisecond_or_more(server, session, events):
    throttle = resilient.Throttle(0.5)
    await fetch(session, server.url + "/r", throttle)
    assert events == []
    await fetch(session, server.url + "/r", throttle)
    (event,) = events
    assert (event.kind, event.policy, event.reason) == ("throttled", "throttle", "rate limit")
    assert event.delay == pytest.approx(2.0, abs=0.05)
    assert close_to(event.until, 2.0)


def breaker() -> resilient.CircuitBreaker:
    return resilient.CircuitBreaker(min_calls=2, failure_ratio=0.5, open_for=30.0)


async def trip(session: aiohttp.ClientSession, server, policy: resilient.CircuitBreaker) -> None:
    server.script("/r", 500, 500)
    for _ in range(2):
        await fetch(session, server.url + "/r", policy)


async def test_circuit_opened_when_the_failure_ratio_is_reached(server, session, events):
    await trip(session, server, breaker())
    (event,) = events
    assert (event.kind, event.policy) == ("circuit_opened", "circuit_breaker")
    assert event.key == key_of(server)
    assert event.reason == "2 of 2 calls failed"
    assert event.delay == 30.0
    assert close_to(event.until, 30.0)


async def test_circuit_rejected_while_open_names_the_request(server, session, events):
    policy = breaker()
    await trip(session, server, policy)
    with pytest.raises(resilient.CircuitOpenError):
        await fetch(session, server.url + "/r?page=2", policy)
    rejected = events[-1]
    assert (rejected.kind, rejected.method, rejected.url) == (
        "circuit_rejected",
        "GET",
        server.url + "/r",
    )
    assert rejected.delay is not None
    assert 0 < rejected.delay <= 30.0
    assert server.count("/r") == 2


@pytest.mark.looptime
async def test_circuit_half_open_then_closed_when_the_probe_succeeds(server, session, events):
    policy = breaker()
    await trip(session, server, policy)
    await asyncio.sleep(30.0)
    assert await fetch(session, server.url + "/r", policy) == 200
    assert kinds(events) == ["circuit_opened", "circuit_half_open", "circuit_closed"]


async def test_token_refreshed_after_an_expired_token(server, session, events):
    server.script("/r", sage_401("AccessTokenExpiredError"))

    async def refresh() -> str:
        return SECRET

    auth = sage.TokenRefresh(refresh)
    assert await fetch(session, server.url + "/r", auth) == 200
    (event,) = events
    assert (event.kind, event.policy, event.status) == ("token_refreshed", "auth", 401)
    assert (event.method, event.url, event.key) == ("GET", server.url + "/r", key_of(server))


async def test_reauthorize_on_a_401_a_refresh_cannot_fix(server, session, events):
    server.script("/r", sage_401("AuthorizationFailure"))

    async def refresh() -> str:
        raise AssertionError("not called")

    assert await fetch(session, server.url + "/r", sage.TokenRefresh(refresh)) == 401
    (event,) = events
    assert (event.kind, event.status, event.reason) == ("reauthorize", 401, "AuthorizationFailure")


def slow(seconds: float) -> Reply:
    async def reply(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(text="slow")

    return reply


@pytest.mark.looptime
async def test_hedge_sent_then_won_when_a_copy_answers_first(server, session, events):
    server.script("/r", slow(10.0))
    assert await fetch(session, server.url + "/r", resilient.Hedge(delay=0.5)) == 200
    sent, won = events
    assert (sent.kind, sent.policy, sent.attempt, sent.key) == (
        "hedge_sent", "hedge", 1, key_of(server),
    )  # fmt: skip
    assert (sent.method, sent.url) == ("GET", server.url + "/r")
    assert (won.kind, won.attempt, won.status) == ("hedge_won", 1, 200)


@pytest.mark.looptime
async def test_hedge_skipped_when_the_budget_is_spent(server, session, events):
    server.script("/r", slow(1.0))
    hedge = resilient.Hedge(delay=0.5, budget=resilient.RetryBudget(0.0, 0.0))
    assert await fetch(session, server.url + "/r", hedge) == 200
    (event,) = events
    assert (event.kind, event.reason) == ("hedge_skipped", "hedge budget exhausted")


@pytest.mark.looptime
async def test_limit_rejected_when_the_queue_is_full(server, session, events):
    server.script("/r", slow(1.0))
    limit = resilient.ConcurrencyLimit(1, max_queue=0)
    first = asyncio.create_task(fetch(session, server.url + "/r", limit))
    while not server.arrivals:
        await asyncio.sleep(0.01)
    with pytest.raises(resilient.LimitExceeded):
        await fetch(session, server.url + "/r", limit)
    await first
    (event,) = events
    assert (event.kind, event.policy, event.key) == (
        "limit_rejected", "concurrency_limit", key_of(server),
    )  # fmt: skip
    assert event.reason == "queue full (max_queue=0 waiting)"


def test_the_tests_above_cover_every_kind():
    covered = {
        "retry_scheduled", "retry_gave_up", "rate_limited", "pause_probe", "throttled",
        "circuit_opened", "circuit_half_open", "circuit_closed", "circuit_rejected",
        "token_refreshed", "reauthorize", "hedge_sent", "hedge_won", "hedge_skipped",
        "limit_rejected",
    }  # fmt: skip
    assert covered == EVENT_KINDS


# --- hooks ------------------------------------------------------------------------


async def test_a_removed_hook_gets_nothing(server, session):
    seen: list[Event] = []
    remove = resilient.add_hook(seen.append)
    remove()
    remove()  # idempotent
    server.script("/r", 503)
    await fetch(session, server.url + "/r", resilient.Retry(backoff=lambda a: 0.0, budget=None))
    assert seen == []


async def test_an_async_hook_receives_the_event(server, session):
    seen: list[Event] = []
    done = asyncio.Event()

    async def hook(event: Event) -> None:
        await asyncio.sleep(0)
        seen.append(event)
        done.set()

    remove = resilient.add_hook(hook)
    try:
        server.script("/r", 503)
        await fetch(session, server.url + "/r", retry(backoff=lambda a: 0.0))
        await asyncio.wait_for(done.wait(), 5.0)
    finally:
        remove()
    assert kinds(seen) == ["retry_scheduled"]


async def test_a_raising_sync_hook_is_logged_and_the_request_succeeds(server, session, caplog):
    def hook(event: Event) -> None:
        raise KeyError("boom")

    remove = resilient.add_hook(hook)
    try:
        server.script("/r", 503)
        assert await fetch(session, server.url + "/r", retry(backoff=lambda a: 0.0)) == 200
    finally:
        remove()
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.name == "resilient"
    assert "KeyError" in record.getMessage()
    assert "hook" in record.getMessage()


async def test_a_raising_async_hook_is_logged_and_the_request_succeeds(server, session, caplog):
    failed = asyncio.Event()

    async def hook(event: Event) -> None:
        failed.set()
        raise RuntimeError("async boom")

    remove = resilient.add_hook(hook)
    try:
        server.script("/r", 503)
        assert await fetch(session, server.url + "/r", retry(backoff=lambda a: 0.0)) == 200
        await asyncio.wait_for(failed.wait(), 5.0)
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        remove()
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.name == "resilient"
    assert "RuntimeError" in record.getMessage()


# --- secrets and logs -----------------------------------------------------------------


def test_an_event_url_drops_query_fragment_and_credentials():
    url = URL(f"https://user:{SECRET}@api.example.com:8443/v3/contacts?token={SECRET}#{SECRET}")
    assert safe_url(url) == "https://api.example.com:8443/v3/contacts"


@pytest.mark.looptime
async def test_no_secret_reaches_events_or_logs(server, session, events, caplog):
    caplog.set_level(logging.DEBUG, logger="resilient")
    server.script("/r", 503, retry_after(429, 5))
    url = server.url + f"/r?token={SECRET}#{SECRET}"
    headers = {"Authorization": f"Bearer {SECRET}"}
    policies = (retry(), resilient.RateLimitBackoff(), resilient.Throttle(0.1))
    status = await fetch(session, url, *policies, headers=headers)
    assert status == 200
    assert {"retry_scheduled", "rate_limited", "pause_probe", "throttled"} <= set(kinds(events))
    assert all(e.url == server.url + "/r" for e in events)
    assert SECRET not in repr(events)
    assert caplog.records
    assert all(SECRET not in r.getMessage() for r in caplog.records)


@pytest.mark.looptime
async def test_a_long_wait_is_logged_at_info_with_the_events_utc_end(
    server, session, events, caplog
):
    caplog.set_level(logging.INFO, logger="resilient")
    server.script("/r", retry_after(429, 7200))
    await fetch(session, server.url + "/r", resilient.RateLimitBackoff())
    (record,) = [r for r in caplog.records if r.levelno == logging.INFO]
    message = record.getMessage()
    assert "429 Retry-After" in message
    assert key_of(server) in message
    assert "2h 0m 0s" in message
    stamp = re.search(r"until (\S+)$", message)
    assert stamp is not None
    assert datetime.fromisoformat(stamp.group(1)) == events[0].until.replace(microsecond=0)


async def test_a_decision_is_logged_at_debug(server, session, caplog):
    caplog.set_level(logging.DEBUG, logger="resilient")
    server.script("/r", 503)
    await fetch(session, server.url + "/r", retry(attempts=1))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("retry_gave_up" in line and "attempts exhausted" in line for line in lines)
