"""Chaos soak: the full chain under load, faults and hostile headers.

Thousands of GETs and POSTs at concurrency 100 go through
``chain(Retry, CircuitBreaker, RateLimitBackoff, Throttle)`` on a ``TCPConnector(limit=10)``
to a :class:`~resilient.testing.SimulatedAPI` whose server-side chaos middleware draws,
per arrival and from a seeded RNG, one of: 503, 500, 429 with a valid ``Retry-After``,
429 with a garbage one, the connection dropped before or after the request was
processed, a slow reply (below and above the client's read timeout), or nothing.
Midway the server restarts on the same port (connections refused while it is down).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate

import aiohttp
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
SOAK_LIMIT = 25.0
"""Seconds (loop clock) the whole soak may take; beyond it the test fails as hung."""

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
)
"""``Retry-After`` values a hostile or broken server might send (none is a usable time)."""

INVOICES = "/sales_invoices"


@dataclass
class Chaos:
    """Server-side fault plan: per arrival, one draw picks at most one fault.

    ``scale`` multiplies every server-side delay (1.0 in virtual time).
    """

    rng: random.Random
    read_timeout: float
    scale: float = 1.0
    active: bool = True
    drawn: Counter[str] = field(default_factory=Counter)

    # (fault, probability); the rest of the mass is "none"
    PLAN = (
        ("503", 0.06),
        ("500", 0.02),
        ("429 valid", 0.03),
        ("429 garbage", 0.03),
        ("drop_before", 0.01),
        ("drop_after", 0.03),
        ("slow", 0.04),
        ("slow past read timeout", 0.005),
    )

    def draw(self) -> str:
        u = self.rng.random()
        for fault, p in self.PLAN:
            if u < p:
                return fault
            u -= p
        return "none"


def chaos_middleware(api: SimulatedAPI, chaos: Chaos) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Queue the drawn fault with ``api.inject`` for this very request (the handler pops
    it before any await), or answer a hostile 429 itself."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not chaos.active:
            return await handler(request)
        fault = chaos.draw()
        chaos.drawn[fault] += 1
        rng, path, scale = chaos.rng, request.path, chaos.scale
        if fault == "429 garbage":
            value = rng.choice(GARBAGE_RETRY_AFTER)
            return web.json_response([], status=429, headers={"Retry-After": value})
        if fault == "429 valid":
            if rng.random() < 0.5:
                value = f"{rng.uniform(0.0, 0.05 * scale):.3f}"
            else:  # an HTTP-date in the past: "now"
                value = formatdate(rng.uniform(0.0, 1e9), usegmt=True)
            return web.json_response([], status=429, headers={"Retry-After": value})
        if fault in ("503", "500", "drop_before", "drop_after"):
            api.inject(path, fault)
        elif fault == "slow":
            api.inject(path, "slow_after", delay=rng.uniform(0.0, 0.5) * chaos.read_timeout)
        elif fault == "slow past read timeout":
            api.inject(path, "slow_after", delay=2.0 * chaos.read_timeout)
        return await handler(request)

    return middleware


def policies(scale: float) -> tuple[resilient.Policy, ...]:
    key = sage.by_business
    return (
        resilient.Retry(attempts=4, backoff=resilient.FullJitter(0.01 * scale, 0.05 * scale)),
        resilient.CircuitBreaker(
            failure_ratio=0.5, min_calls=20, window=2.0 * scale, open_for=0.1 * scale, key=key
        ),
        resilient.RateLimitBackoff(
            max_wait=2.0 * scale, base=0.01 * scale, cap=0.05 * scale, key=key
        ),
        resilient.Throttle(5_000.0 / scale, burst=CONCURRENCY, key=key),
    )


@dataclass(frozen=True)
class Job:
    method: str
    path: str
    business: str
    reference: str


def jobs(rng: random.Random) -> list[Job]:
    out = []
    for i in range(CALLS):
        business = f"b{rng.randrange(BUSINESSES)}"
        if rng.random() < POST_SHARE:
            out.append(Job("POST", INVOICES, business, f"ref-{i}"))
        else:
            path = rng.choice(("/contacts", f"/contacts/{rng.randint(1, 450)}"))
            out.append(Job("GET", path, business, ""))
    return out


async def run_job(session: aiohttp.ClientSession, url: str, job: Job) -> str:
    """``"200"``-style status, or the ``aiohttp.ClientError`` subclass name; anything
    else is recorded as ``"ESCAPED <type>"``."""
    kwargs: dict[str, object] = {"headers": {"X-Business": job.business}}
    if job.method == "POST":
        kwargs["json"] = {
            "sales_invoice": {"contact_id": "1", "date": "2024-05-01", "reference": job.reference}
        }
    try:
        async with session.request(job.method, url + job.path, **kwargs) as resp:  # type: ignore[arg-type]
            await resp.read()
            return str(resp.status)
    except aiohttp.ClientError as exc:
        return type(exc).__name__
    except Exception as exc:  # the soak's point: nothing else may escape
        return f"ESCAPED {type(exc).__name__}: {exc}"


async def soak(scale: float) -> dict[str, object]:
    """Run the soak; return what the assertions need."""
    loop = asyncio.get_running_loop()
    tasks_before = asyncio.all_tasks()
    rng = random.Random(SEED)
    read_timeout = 0.5 * scale
    chaos = Chaos(random.Random(SEED + 1), read_timeout, scale)
    api = SimulatedAPI(quota=None, seed=SEED)
    api.app.middlewares.append(chaos_middleware(api, chaos))
    await api.start()
    connector = aiohttp.TCPConnector(limit=POOL)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=read_timeout, sock_read=read_timeout)
    outcomes: Counter[str] = Counter()
    post_outcomes: Counter[str] = Counter()
    todo = jobs(rng)
    queue = list(reversed(todo))
    restart_at = len(todo) // 2
    restarted = asyncio.Event()
    started = loop.time()
    try:
        async with resilient.session(
            *policies(scale), connector=connector, timeout=timeout
        ) as session:

            async def worker() -> None:
                while queue:
                    job = queue.pop()
                    if len(queue) == restart_at:
                        restarter.append(asyncio.ensure_future(restart()))
                    outcome = await run_job(session, api.url, job)
                    outcomes[outcome] += 1
                    if job.method == "POST":
                        post_outcomes[outcome] += 1

            async def restart() -> None:
                await api.restart(downtime=0.2 * scale)
                restarted.set()

            restarter: list[asyncio.Future[None]] = []
            async with asyncio.timeout(SOAK_LIMIT * scale):
                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
                await asyncio.gather(*restarter)
            elapsed = loop.time() - started
            chaos.active = False
            drained = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        run_job(session, api.url, Job("GET", "/contacts/1", "drain-check", ""))
                        for _ in range(2 * POOL)
                    )
                ),
                5.0 * scale,
            )
            acquired_after = len(connector._acquired)  # aiohttp has no public count
    finally:
        await api.close()
    for _ in range(5):
        await asyncio.sleep(0)
    left_behind = asyncio.all_tasks() - tasks_before
    return {
        "outcomes": outcomes,
        "post_outcomes": post_outcomes,
        "api": api,
        "chaos": chaos,
        "drained": drained,
        "acquired_after": acquired_after,
        "left_behind": left_behind,
        "elapsed": elapsed,
        "restarted": restarted.is_set(),
    }


@pytest.mark.looptime
async def test_soak_prototype_looptime():
    result = await soak(1.0)
    api = result["api"]
    print(result["outcomes"], result["elapsed"], result["chaos"].drawn, result["drained"], result["left_behind"], result["restarted"], len(api.log), Counter(e.status for e in api.log))
    print(sorted(Counter(round(e.time - api.log[0].time, 1) for e in api.log).items()))


async def test_soak_prototype_realtime():
    result = await soak(1.0)
    api = result["api"]
    print(result["outcomes"], result["elapsed"], result["chaos"].drawn, result["drained"], result["left_behind"], result["restarted"], len(api.log), Counter(e.status for e in api.log))
    print(sorted(Counter(round(e.time - api.log[0].time, 1) for e in api.log).items()))
