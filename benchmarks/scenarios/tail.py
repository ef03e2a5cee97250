"""Scenario 11: a slow tail, with and without Hedge.

The server answers each request after a latency drawn at random: 95 % of them around
the median M = 100 ms (lognormal, σ = 0.1: ±10 % jitter), 5 % of them 20 × M (2 s, same
jitter). Calls arrive open-loop (Poisson, 50 calls/s), GETs, on virtual time (server and
client on one looptime loop; the server is a real aiohttp app on loopback).

Clients: raw aiohttp (no hedging); ``resilient.session(Hedge())`` with its defaults
(the delay learned as the key's p95, budget 0.1 per call + 5/s); and Polly-style fixed
delays, ``Hedge(delay=d, budget=None)`` (Polly's hedging has a fixed ``Delay``, default
2 s, one hedged attempt, no budget) at d = M, 1.5 × M, 2 × M and Polly's 2 s.

Per client: p50 / p99 / p99.9 of the call latency (time to the response body), p99 / p50,
requests at the server per call, and copies sent per call. Targets (issue 16), for
``Hedge()``: p99 within 2 × the median, at most 1.1 requests per call.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from .._harness import (
    Config,
    Outcome,
    Progress,
    ScenarioResult,
    Target,
    percentile,
    run_virtual,
    serve,
)

NAME = "tail"
TITLE = "11. Tail latency: 5 % of responses take 20 × the median, with and without Hedge (virtual)"
MEDIAN = 0.1
"""Seconds: the median latency of the fast 95 %."""
SLOW = 20.0
"""The slow 5 % take this multiple of the median."""
SLOW_SHARE = 0.05
SIGMA = 0.1
"""Jitter of every latency: lognormal with this σ around its centre."""
RATE = 50.0
"""Calls per second (Poisson arrivals)."""
SEED = 16
P99_TARGET = 2.0
"""p99 / p50 at most this."""
LOAD_TARGET = 1.1
"""Requests at the server per call, at most this."""
DEFAULT = "resilient Hedge()"


def _calls(cfg: Config) -> int:
    return int(cfg.pick(1_500, 20_000, tiny=300))


@dataclass(frozen=True)
class Spec:
    label: str
    policies: Callable[[], tuple[Any, ...]]


def _specs() -> list[Spec]:
    import resilient

    def fixed(delay: float) -> Callable[[], tuple[Any, ...]]:
        return lambda: (resilient.Hedge(delay=delay, budget=None),)

    return [
        Spec("aiohttp (no hedge)", lambda: ()),
        Spec(DEFAULT, lambda: (resilient.Hedge(),)),
        Spec(f"Polly-style delay {MEDIAN * 1e3:g} ms (1 × median)", fixed(MEDIAN)),
        Spec(f"Polly-style delay {1.5 * MEDIAN * 1e3:g} ms (1.5 × median)", fixed(1.5 * MEDIAN)),
        Spec(f"Polly-style delay {2 * MEDIAN * 1e3:g} ms (2 × median)", fixed(2 * MEDIAN)),
        Spec("Polly default delay 2 s", fixed(2.0)),
    ]


def units(cfg: Config) -> float:
    return float(len(_specs()))


class TailServer:
    """A loopback aiohttp server whose n-th request waits ``latencies[n]`` (virtual) s."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.arrivals = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    def latency(self) -> float:
        centre = MEDIAN * SLOW if self.rng.random() < SLOW_SHARE else MEDIAN
        return centre * math.exp(self.rng.gauss(0.0, SIGMA))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrivals += 1
        await asyncio.sleep(self.latency())
        return web.Response(text="ok")

    async def __aenter__(self) -> TailServer:
        self.runner, self.url = await serve(self.handle, "/item")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Run:
    outcomes: list[Outcome]
    arrivals: int
    hedged: int


async def open_loop(spec: Spec, calls: int) -> Run:
    """``calls`` GETs at Poisson times (:data:`RATE`/s) through ``spec``'s policies."""
    import resilient

    arrivals_rng = random.Random(SEED)
    times, t = [], 0.0
    for _ in range(calls):
        t += arrivals_rng.expovariate(RATE)
        times.append(t)
    policies = spec.policies()
    async with TailServer(SEED + 1) as server, resilient.session(*policies) as session:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(at: float) -> Outcome:
            await asyncio.sleep(t0 + at - loop.time())
            start = loop.time()
            try:
                async with session.get(server.url) as resp:
                    await resp.read()
                    status: int | None = resp.status
                    error = None
            except aiohttp.ClientError as exc:
                status, error = None, type(exc).__name__
            return Outcome(status, error, start, loop.time())

        outcomes = list(await asyncio.gather(*(one(at) for at in times)))
        await asyncio.sleep(SLOW * MEDIAN * 2)  # let cancelled losers finish at the server
        hedged = sum(s.hedged for p in policies for s in getattr(p, "stats", dict)().values())
    return Run(outcomes, server.arrivals, hedged)


def row(label: str, run: Run) -> dict[str, Any]:
    latencies = [o.latency for o in run.outcomes if o.ok]
    calls = len(run.outcomes)
    p50 = percentile(latencies, 0.5)
    p99 = percentile(latencies, 0.99)
    return {
        "client": label,
        "ok": sum(o.ok for o in run.outcomes),
        "calls": calls,
        "p50 ms": 1e3 * p50,
        "p99 ms": 1e3 * p99,
        "p99.9 ms": 1e3 * percentile(latencies, 0.999),
        "max ms": 1e3 * max(latencies, default=math.nan),
        "p99 / p50": p99 / p50 if p50 > 0 else None,
        "server req / call": run.arrivals / calls if calls else None,
        "copies / call": run.hedged / calls if calls else None,
    }


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    calls = _calls(cfg)
    rows: list[dict[str, Any]] = []
    for spec in _specs():
        progress.set_label(f"{NAME}: {spec.label}")
        rows.append(row(spec.label, run_virtual(open_loop(spec, calls))))
        progress.advance()
    mine = next(r for r in rows if r["client"] == DEFAULT)
    raw = rows[0]
    ratio, load = mine["p99 / p50"] or math.inf, mine["server req / call"] or math.inf
    why = (
        f"the learned delay is the p95 of the responses, ≈ {math.exp(1.645 * SIGMA):.2f} × M "
        "here (the fast responses' own spread); a slow call is then answered at delay + a "
        "fast response, ≈ 2.2 × M. With load ≤ 1.1 the delay cannot go below about the p90, "
        "so p99 ≤ 2 × M is reachable only if the fast responses had no spread at all"
    )
    targets = [
        Target(
            "Hedge(): p99 within 2 × the median",
            f"p99 / p50 ≤ {P99_TARGET:g}",
            f"{ratio:.2f} (p99 {mine['p99 ms']:.0f} ms, p50 {mine['p50 ms']:.0f} ms; "
            f"no hedge: {raw['p99 / p50']:.1f})",
            ratio <= P99_TARGET,
            "" if ratio <= P99_TARGET else why,
        ),
        Target(
            "Hedge(): load",
            f"≤ {LOAD_TARGET:g} server requests per call",
            f"{load:.3f}",
            load <= LOAD_TARGET,
        ),
    ]
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"Virtual time; a loopback aiohttp server answering after M = {MEDIAN * 1e3:g} ms "
            f"(95 %) or {SLOW:g} × M (5 %), each × lognormal(σ = {SIGMA:g}); {calls} GETs "
            f"arriving at {RATE:g}/s (Poisson, seed {SEED}). resilient: session(Hedge()) with "
            "its defaults; Polly-style: Hedge(delay=d, budget=None), one copy, no budget."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=targets,
        notes=[
            "latency: from the call to its response body read, on the loop clock. server "
            "req / call: requests that reached the server (losers included) per call. "
            "copies / call: hedged copies sent per call.",
            "Hedge() learns its delay from the first responses (1 s until 20 were seen).",
        ],
    )
