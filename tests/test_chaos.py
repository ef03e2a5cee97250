"""Chaos soak: the full chain under load, faults and hostile headers, in virtual time.

One seeded soak (run once per module, on a ``looptime`` loop) sends 2,400 GETs and POSTs
from 100 concurrent workers through ``chain(Retry, CircuitBreaker, RateLimitBackoff,
Throttle)`` on a ``TCPConnector(limit=10)`` to a :class:`~resilient.testing.SimulatedAPI`.
A server-side chaos middleware draws, per arrival and from a seeded RNG, one of: 503,
500, 429 with a valid ``Retry-After`` (fractional seconds or a past HTTP-date), 429 with
a garbage one, the connection dropped before or after the request was processed, a
slow reply below or above the client's read timeout, or nothing. Midway the server
restarts on the same port and refuses connections while it is down. Workers honour
``CircuitOpenError.retry_after`` / ``RateLimited.retry_after`` like a polite client.
Each test below asserts one property of that run.

Virtual time: the soak first froze ``looptime`` (the "freeze with many jittered sleeps"
the project had seen). The cause was :class:`~resilient.ratelimit._pause.PauseGate`: a pause whose
float end lay a rounding error past the loop's clock tick re-armed a zero-length timer
forever (asyncio fires timers up to a tick early, and a frozen clock never catches up).
:func:`test_pause_ends_when_its_end_falls_between_clock_ticks` pins the fix.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import aiohttp
import looptime
import pytest
from aiohttp import web

import resilient
from resilient import sage
from resilient.testing import SimulatedAPI

SEED = 20_241_108
CALLS = 2_400
POST_SHARE = 0.3
CONCURRENCY = 100
POOL = 10
BUSINESSES = 12
LATENCY = 0.02
"""Server seconds per request (virtual), so the soak spans several seconds of traffic."""
READ_TIMEOUT = 1.0
DOWNTIME = 6.0
"""Virtual seconds the server is down midway. Long enough that some calls fail on it: Retry
rides over shorter outages (it retries refused connections and waits out the breaker's
short breaks, up to about 3 s for 4 attempts), and the soak then never saw the restart's
refusals (0.5 s, then 1.5 s, became too short as the chain got better at outages)."""
SOAK_LIMIT = 120.0
"""Virtual seconds the soak may take; beyond it the test fails as hung."""
DRAIN_LIMIT = 10.0
MAX_POLITE_WAIT = 1.0

HandlerT = Callable[[web.Request], Awaitable[web.StreamResponse]]

GARBAGE_RETRY_AFTER = (
    "soon",
    "-5",
    "1e309",
    "NaN",
    "0x10",
    "",
    "   ",
    "Fri, 31 Feb 2024 25:61:00 GMT",
    "Mon, 01 Jan 10000 00:00:00 GMT",
    "3 seconds",
    "1,5",
    "x" * 5000,
)
"""``Retry-After`` values a broken or hostile server might send; none is a usable time."""

INVOICES = "/sales_invoices"

FAULT_PLAN = (
    ("503", 0.06),
    ("500", 0.02),
    ("429 valid", 0.03),
    ("429 garbage", 0.03),
    ("drop_before", 0.01),
    ("drop_after", 0.03),
    ("slow", 0.04),
    ("slow past read timeout", 0.005),
)
"""(fault, probability per arrival); the remaining mass is no fault."""


@dataclass
class Chaos:
    """The server-side fault plan and what it drew."""

    rng: random.Random
    active: bool = True
    drawn: Counter[str] = field(default_factory=Counter)

    def draw(self) -> str:
        u = self.rng.random()
        for fault, p in FAULT_PLAN:
            if u < p:
                return fault
            u -= p
        return "none"


def chaos_middleware(api: SimulatedAPI, chaos: Chaos) -> Any:
    """After ``LATENCY``, queue the drawn fault with ``api.inject`` for this very request
    (the API's handler pops it before any await), or answer a 429 itself."""

    @web.middleware
    async def middleware(request: web.Request, handler: HandlerT) -> web.StreamResponse:
        await asyncio.sleep(LATENCY)
        if not chaos.active:
            return await handler(request)
        fault = chaos.draw()
        chaos.drawn[fault] += 1
        rng, path = chaos.rng, request.path
        if fault == "429 garbage":
            value = rng.choice(GARBAGE_RETRY_AFTER)
            return web.json_response([], status=429, headers={"Retry-After": value})
        if fault == "429 valid":
            if rng.random() < 0.5:
                value = f"{rng.uniform(0.0, 0.5):.3f}"
            else:  # an HTTP-date in the past: "now"
                value = formatdate(rng.uniform(0.0, 1e9), usegmt=True)
            return web.json_response([], status=429, headers={"Retry-After": value})
        if fault in ("503", "500", "drop_before", "drop_after"):
            api.inject(path, fault)
        elif fault == "slow":
            api.inject(path, "slow_after", delay=rng.uniform(0.0, 0.5) * READ_TIMEOUT)
        elif fault == "slow past read timeout":
            api.inject(path, "slow_after", delay=2.0 * READ_TIMEOUT)
        return await handler(request)

    return middleware


def policies() -> tuple[resilient.Policy, ...]:
    key = sage.by_business
    return (
        resilient.Retry(attempts=4, backoff=resilient.FullJitter(0.05, 0.5)),
        resilient.CircuitBreaker(
            failure_ratio=0.5, min_calls=20, window=2.0, open_for=0.25, key=key
        ),
        resilient.RateLimitBackoff(max_wait=5.0, base=0.05, cap=0.5, key=key),
        resilient.Throttle(2_000.0, burst=CONCURRENCY, key=key),
    )


@dataclass(frozen=True)
class Job:
    method: str
    path: str
    business: str
    reference: str = ""


def make_jobs(rng: random.Random) -> list[Job]:
    jobs = []
    for i in range(CALLS):
        business = f"b{rng.randrange(BUSINESSES)}"
        if rng.random() < POST_SHARE:
            jobs.append(Job("POST", INVOICES, business, f"ref-{i}"))
        else:
            path = rng.choice(("/contacts", f"/contacts/{rng.randint(1, 450)}"))
            jobs.append(Job("GET", path, business))
    return jobs


async def run_job(session: aiohttp.ClientSession, url: str, job: Job) -> tuple[str, float]:
    """``("200", 0)``-style status, or the ``aiohttp.ClientError`` subclass name and the
    wait it asks for; anything else escaping is recorded as ``"ESCAPED <type>"``."""
    kwargs: dict[str, Any] = {"headers": {"X-Business": job.business}}
    if job.method == "POST":  # no Idempotency-Key: at most once
        kwargs["json"] = {
            "sales_invoice": {"contact_id": "1", "date": "2024-05-01", "reference": job.reference}
        }
    try:
        async with session.request(job.method, url + job.path, **kwargs) as resp:
            await resp.read()
            return str(resp.status), 0.0
    except (resilient.CircuitOpenError, resilient.RateLimited) as exc:
        return type(exc).__name__, exc.retry_after
    except aiohttp.ClientError as exc:
        return type(exc).__name__, 0.0
    except Exception as exc:  # the soak's point: nothing else may escape
        return f"ESCAPED {type(exc).__name__}: {exc}", 0.0


@dataclass
class Soak:
    outcomes: Counter[str] = field(default_factory=Counter)
    post_outcomes: Counter[str] = field(default_factory=Counter)
    drawn: Counter[str] = field(default_factory=Counter)
    references: Counter[str] = field(default_factory=Counter)
    restarted_at: float | None = None
    served_after_restart: int = 0
    drained: list[str] = field(default_factory=list)
    acquired_after: int = -1
    left_behind: set[asyncio.Task[Any]] = field(default_factory=set)
    elapsed: float = 0.0


async def soak() -> Soak:
    loop = asyncio.get_running_loop()
    tasks_before = asyncio.all_tasks()
    result = Soak()
    chaos = Chaos(random.Random(SEED + 1))
    api = SimulatedAPI(quota=None, seed=SEED)
    api.app.middlewares.append(chaos_middleware(api, chaos))
    await api.start()
    connector = aiohttp.TCPConnector(limit=POOL)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=READ_TIMEOUT, sock_read=READ_TIMEOUT)
    queue = list(reversed(make_jobs(random.Random(SEED))))
    restart_when = len(queue) // 2
    background: list[asyncio.Task[None]] = []

    async def restart() -> None:
        await api.restart(downtime=DOWNTIME)
        result.restarted_at = loop.time()

    try:
        async with resilient.session(*policies(), connector=connector, timeout=timeout) as s:

            async def worker() -> None:
                while queue:
                    job = queue.pop()
                    if len(queue) == restart_when:
                        background.append(asyncio.create_task(restart()))
                    outcome, wait = await run_job(s, api.url, job)
                    result.outcomes[outcome] += 1
                    if job.method == "POST":
                        result.post_outcomes[outcome] += 1
                    if wait:  # a polite caller honours retry_after
                        await asyncio.sleep(min(wait, MAX_POLITE_WAIT))

            started = loop.time()
            async with asyncio.timeout(SOAK_LIMIT):
                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
                await asyncio.gather(*background)
            result.elapsed = loop.time() - started
            chaos.active = False
            drain_job = Job("GET", "/contacts/1", "drain-check")
            async with asyncio.timeout(DRAIN_LIMIT):
                drained = await asyncio.gather(
                    *(run_job(s, api.url, drain_job) for _ in range(2 * POOL))
                )
            result.drained = [outcome for outcome, _ in drained]
            result.acquired_after = len(connector._acquired)  # aiohttp has no public count
    finally:
        await api.close()
    # aiohttp's server leaves a handler past its shutdown timeout running (a slow reply):
    # give the slowest one time to end, then nothing at all may be left.
    await asyncio.sleep(3 * READ_TIMEOUT)
    result.left_behind = asyncio.all_tasks() - tasks_before
    result.drawn = chaos.drawn
    result.references = Counter(str(i.get("reference")) for i in api.invoices)
    if result.restarted_at is not None:
        result.served_after_restart = sum(e.time > result.restarted_at for e in api.log)
    return result


@pytest.fixture(scope="module")
def soaked() -> Iterator[Soak]:
    loop = looptime.new_event_loop(start=0.0)
    try:
        yield loop.run_until_complete(soak())
    finally:
        loop.close()


def test_soak_completes_every_call(soaked):
    assert sum(soaked.outcomes.values()) == CALLS
    assert soaked.elapsed < SOAK_LIMIT


def test_soak_every_call_returns_a_response_or_raises_a_client_error(soaked):
    escaped = [o for o in soaked.outcomes if o.startswith("ESCAPED")]
    assert escaped == []


def test_soak_processes_no_post_twice(soaked):
    twice = {ref: n for ref, n in soaked.references.items() if n > 1}
    assert twice == {}
    assert soaked.references.total() >= soaked.post_outcomes["201"] > 0


def test_soak_leaks_no_connection(soaked):
    assert soaked.drained == ["200"] * (2 * POOL)
    assert soaked.acquired_after == 0


def test_soak_leaves_no_task_behind(soaked):
    assert soaked.left_behind == set()


def test_soak_met_every_fault_and_the_restart(soaked):
    assert {fault for fault, _ in FAULT_PLAN} <= set(soaked.drawn)
    assert soaked.restarted_at is not None
    assert soaked.served_after_restart > 0
    assert soaked.outcomes["ClientConnectorError"] + soaked.outcomes["CircuitOpenError"] > 0


@pytest.mark.looptime
@pytest.mark.timeout(10)
async def test_pause_ends_when_its_end_falls_between_clock_ticks(server):
    """Regression: at loop time 0.1 a 0.2 s pause ends at 0.30000000000000004, which
    looptime's 1 µs clock reaches as 0.3; the head waiter used to re-arm a zero-length
    timer forever (the loop never idled, so virtual time never moved)."""

    async def too_many(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "0.2"})

    server.script("/", too_many)
    await asyncio.sleep(0.1)
    async with aiohttp.ClientSession(middlewares=(resilient.RateLimitBackoff(),)) as s:
        async with s.get(server.url) as resp:
            assert resp.status == 200
    assert server.count() == 2


@pytest.mark.looptime
async def test_simulated_api_restart_refuses_while_down_then_serves_on_the_same_port():
    async with SimulatedAPI(quota=None) as api, aiohttp.ClientSession() as s:
        url = api.url
        api.inject("/contacts/1", "500")  # queued faults, like logs, survive a restart
        restarting = asyncio.create_task(api.restart(downtime=5.0))
        await asyncio.sleep(1.0)
        with pytest.raises(aiohttp.ClientConnectorError):
            await s.get(url + "/contacts/1")
        await restarting
        async with s.get(url + "/contacts/1") as resp:
            assert resp.status == 500
    assert api.url == url
    assert api.count("/contacts/1") == 1
