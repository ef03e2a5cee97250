"""Scenario 12: an overloaded server with a fixed capacity, with and without a
ConcurrencyLimit.

The server (a real aiohttp app on loopback, virtual time) has W workers and a base
service time S = 50 ms. A request that arrives while n requests (itself included) are in
progress takes ``S × max(1, n / W) × (1 + K × max(0, n − W) / W)`` (processor sharing,
plus contention that grows with the excess: past W its throughput falls), and one that
would make more than C = 4 × W in progress is refused at once with 503. Its best
throughput is W / S, at n = W. For the first half of the run W = 16 (320/s at best);
then the server loses half its workers, W = 8 (160/s), as a degraded deploy or a noisy
neighbour would.

Calls arrive open-loop at 400/s (Poisson), 1.25 × the healthy server's best and 2.5 ×
the degraded one's. Every client is ``resilient.session(Retry(), ...)`` with a total
timeout of 1 s per call (aiohttp's ``ClientTimeout.total``, which the policies read):
no limit (aiohttp's connection pool of 100 is the only bound), ``ConcurrencyLimit(16)``
(tuned to the healthy server), ``ConcurrencyLimit(64)`` (the server's admission
capacity C), ``ConcurrencyLimit(8)`` (tuned to the degraded server), the tuned limit with
a queue of 16 and with no queue (``max_queue=0``), and three adaptive limits as Netflix's
concurrency-limits defines them (Vegas, Gradient2, AIMD, starting at 20, no queue, as
Netflix's ``SimpleLimiter`` rejects at the limit), prototyped here on ConcurrencyLimit's
slots: ConcurrencyLimit would offer one only if it beat the fixed limit here.

Per client and per phase: goodput (calls answered 200 per second), p50 / p99 latency of
those, and what happened to the others (503 after retries, LimitExceeded, timeouts).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
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

NAME = "overload"
TITLE = "12. Overload: a server with fixed capacity, with and without ConcurrencyLimit (virtual)"
SERVICE = 0.05
"""Seconds: the base service time S."""
WORKERS = (16, 8)
"""W in the first and the second half of the run."""
CONTENTION = 0.5
"""K: the extra slowdown per W requests beyond W."""
ADMIT = 4
"""The server refuses (503) beyond ADMIT × W requests in progress."""
RATE = 400.0
"""Calls per second (Poisson)."""
TIMEOUT = 1.0
"""aiohttp's total timeout per call (seconds)."""
SEED = 12
NO_LIMIT = "no limit (Retry only)"
TUNED = "ConcurrencyLimit(16)"
BEST_FIXED = "ConcurrencyLimit(16, max_queue=16)"
ADAPTIVE = "adaptive, max_queue=0: "


def _phase(cfg: Config) -> float:
    """Seconds of each phase."""
    return float(cfg.pick(4.0, 30.0, tiny=1.0))


@dataclass(frozen=True)
class Spec:
    label: str
    policies: Callable[[], tuple[Any, ...]]


def _specs() -> list[Spec]:
    import resilient

    def limited(n: int, **kw: Any) -> Callable[[], tuple[Any, ...]]:
        return lambda: (resilient.Retry(), resilient.ConcurrencyLimit(n, **kw))

    def adaptive(law: Callable[[], Law], **kw: Any) -> Callable[[], tuple[Any, ...]]:
        return lambda: (resilient.Retry(), AdaptiveLimit(law, **kw))

    return [
        Spec(NO_LIMIT, lambda: (resilient.Retry(),)),
        Spec(TUNED, limited(16)),
        Spec("ConcurrencyLimit(16, max_queue=16)", limited(16, max_queue=16)),
        Spec("ConcurrencyLimit(64)", limited(64)),
        Spec("ConcurrencyLimit(8)", limited(8)),
        Spec("ConcurrencyLimit(16, max_queue=0)", limited(16, max_queue=0)),
        *(Spec(f"{ADAPTIVE}{law.__name__}", adaptive(law, max_queue=0)) for law in LAWS),
    ]


# --- adaptive limits, as Netflix's concurrency-limits defines them ------------------------


class Law:
    """An adaptive concurrency limit: ``sample(rtt, in_flight, dropped)`` after each
    attempt; ``limit`` is the current limit (a float; the policy uses its floor)."""

    limit = 20.0

    def sample(self, rtt: float, in_flight: int, dropped: bool) -> None:
        raise NotImplementedError


class Vegas(Law):
    """Netflix ``VegasLimit`` (defaults): queue = limit × (1 − rtt_noload / rtt);
    below log10(limit): + 3·log10(limit); below 3·log10: + log10; above 6·log10: −
    log10; a drop: − log10. rtt_noload: the least RTT seen, re-probed every 30 × limit
    samples. Unlike Netflix's, a drop's RTT (a 503 answered at once) is not taken as the
    no-load RTT: it would read as a server with no latency at all."""

    def __init__(self) -> None:
        self.limit = 20.0
        self.noload = 0.0
        self.count = 0
        self.probe = 30 * self.limit

    def sample(self, rtt: float, in_flight: int, dropped: bool) -> None:
        self.count += 1
        if not dropped and self.count >= self.probe:  # probe: forget the no-load RTT
            self.count, self.noload = 0, rtt
            self.probe = 30 * self.limit
            return
        if not dropped and (self.noload == 0.0 or rtt < self.noload):
            self.noload = rtt
            return
        limit = self.limit
        step = math.log10(max(limit, 2.0))
        if dropped:
            limit -= step
        elif in_flight * 2 < limit:
            return
        else:
            queue = math.ceil(limit * (1.0 - self.noload / rtt))
            if queue <= step:
                limit += 3 * step
            elif queue < 3 * step:
                limit += step
            elif queue > 6 * step:
                limit -= step
            else:
                return
        self.limit = max(1.0, min(1000.0, limit))


class Gradient2(Law):
    """Netflix ``Gradient2Limit`` (defaults): gradient = clamp(1.5 × long RTT / RTT, 0.5,
    1); new = limit × gradient + 4, smoothed by 0.2; long RTT: an EWMA over 600 samples,
    decayed when it exceeds twice the RTT; no growth while in flight < limit / 2. Drops
    (503 answered at once, timeouts) are not RTT samples."""

    def __init__(self) -> None:
        self.limit = 20.0
        self.long = 0.0
        self.count = 0

    def sample(self, rtt: float, in_flight: int, dropped: bool) -> None:
        if rtt <= 0.0 or dropped:
            return
        self.count += 1
        if self.long == 0.0:
            self.long = rtt
        else:
            factor = 2.0 / (600 + 1) if self.count > 10 else 1.0 / self.count
            self.long += factor * (rtt - self.long)
        if self.long / rtt > 2.0:
            self.long *= 0.95
        if in_flight < self.limit / 2:
            return
        gradient = max(0.5, min(1.0, 1.5 * self.long / rtt))
        new = self.limit * gradient + 4.0
        new = self.limit * 0.8 + new * 0.2
        self.limit = max(1.0, min(200.0, new))


class Aimd(Law):
    """Netflix ``AIMDLimit``: a drop (503, timeout) × 0.9; else + 1 while in flight ≥
    limit / 2."""

    def sample(self, rtt: float, in_flight: int, dropped: bool) -> None:
        if dropped:
            self.limit = max(1.0, self.limit * 0.9)
        elif in_flight * 2 >= self.limit:
            self.limit = min(1000.0, self.limit + 1.0)


LAWS: tuple[type[Law], ...] = (Vegas, Gradient2, Aimd)


def AdaptiveLimit(law: Callable[[], Law], max_queue: int | None = None) -> Any:
    """A ``ConcurrencyLimit`` whose per-key limit follows ``law()`` (measured per attempt:
    RTT to the response headers, slots held when it started, dropped = 503 or an
    exception)."""
    import resilient

    class _Adaptive(resilient.ConcurrencyLimit):
        def __init__(self) -> None:
            super().__init__(20, max_queue=max_queue)
            self.laws: dict[str, Law] = {}

        async def __call__(self, request: Any, handler: Any) -> Any:
            key = self._key(request)
            state = self._states.get_or_create(key)
            rule = self.laws.get(key) or self.laws.setdefault(key, law())
            loop = asyncio.get_running_loop()

            async def measured(req: Any) -> Any:
                in_flight, t0 = state.flying, loop.time()
                dropped = True
                try:
                    resp = await handler(req)
                    dropped = resp.status == 503
                    return resp
                finally:
                    rule.sample(loop.time() - t0, in_flight, dropped)
                    state.limit = max(1, int(rule.limit))

            return await super().__call__(request, measured)

    return _Adaptive()


def units(cfg: Config) -> float:
    return float(len(_specs()))


def service_time(n: int, workers: int) -> float:
    """Seconds a request takes when it finds ``n`` in progress (itself included)."""
    share = max(1.0, n / workers)
    return SERVICE * share * (1.0 + CONTENTION * max(0, n - workers) / workers)


class CapacityServer:
    """The server of the module docstring; ``workers`` may change while it runs."""

    def __init__(self) -> None:
        self.workers = WORKERS[0]
        self.busy = 0
        self.log: list[tuple[float, int]] = []  # (loop time of arrival, status)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        n = self.busy + 1
        if n > ADMIT * self.workers:
            self.log.append((loop.time(), 503))
            return web.Response(status=503, text="overloaded")
        self.busy = n
        try:
            await asyncio.sleep(service_time(n, self.workers))
        finally:
            self.busy -= 1
        self.log.append((loop.time(), 200))
        return web.Response(text="ok")

    async def __aenter__(self) -> CapacityServer:
        self.runner, self.url = await serve(self.handle, "/work")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Run:
    outcomes: list[Outcome]
    log: list[tuple[float, int]]
    t0: float
    extra: dict[str, Any] = field(default_factory=dict)


async def open_loop(spec: Spec, phase: float) -> Run:
    """Poisson calls at :data:`RATE` for two phases of ``phase`` seconds; the server's
    workers drop from ``WORKERS[0]`` to ``WORKERS[1]`` between them."""
    import resilient

    random.seed(SEED)  # Retry's jitter: the same draws in every run
    rng = random.Random(SEED)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(RATE)
        if t >= 2 * phase:
            break
        times.append(t)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    policies = spec.policies()
    async with (
        CapacityServer() as server,
        resilient.session(*policies, timeout=timeout) as session,
    ):
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def degrade() -> None:
            server.workers = WORKERS[1]

        loop.call_at(t0 + phase, degrade)

        async def one(at: float) -> Outcome:
            await asyncio.sleep(t0 + at - loop.time())
            start = loop.time()
            try:
                async with session.get(server.url) as resp:
                    await resp.read()
                    status: int | None = resp.status
                    error = None
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, error = None, type(exc).__name__
            return Outcome(status, error, start - t0, loop.time() - t0)

        outcomes = list(await asyncio.gather(*(one(at) for at in times)))
        log = [(at - t0, status) for at, status in server.log]
    return Run(outcomes, log, t0)


def rows_of(label: str, run: Run, phase: float) -> list[dict[str, Any]]:
    """One row per phase: goodput, latency of the successes, the failures by kind."""
    rows = []
    for index, (lo, hi) in enumerate(((0.0, phase), (phase, 2 * phase))):
        mine = [o for o in run.outcomes if lo <= o.start < hi]
        ok = [o.latency for o in mine if o.ok]
        fails = Counter(o.error or str(o.status) for o in mine if not o.ok)
        at_server = [s for at, s in run.log if lo <= at < hi]
        rows.append(
            {
                "client": label,
                "phase": f"W={WORKERS[index]} (best {WORKERS[index] / SERVICE:.0f}/s)",
                "goodput /s": len(ok) / phase,
                "ok %": 100.0 * len(ok) / len(mine) if mine else None,
                "p50 ms": 1e3 * percentile(ok, 0.5),
                "p99 ms": 1e3 * percentile(ok, 0.99),
                "503 at server": sum(s == 503 for s in at_server),
                "failed calls": ", ".join(f"{k} {v}" for k, v in fails.most_common()) or "–",
            }
        )
    return rows


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    phase = _phase(cfg)
    rows: list[dict[str, Any]] = []
    for spec in _specs():
        progress.set_label(f"{NAME}: {spec.label}")
        rows += rows_of(spec.label, run_virtual(open_loop(spec, phase)), phase)
        progress.advance()
    by = {(r["client"], r["phase"]): r for r in rows}
    phases = list(dict.fromkeys(r["phase"] for r in rows))
    targets = []
    for p in phases:
        tuned, raw = by[(BEST_FIXED, p)], by[(NO_LIMIT, p)]
        better = tuned["goodput /s"] > raw["goodput /s"]
        targets.append(
            Target(
                f"{p}: {BEST_FIXED} vs no limit",
                "more goodput",
                f"{tuned['goodput /s']:.0f}/s vs {raw['goodput /s']:.0f}/s; p99 "
                f"{tuned['p99 ms']:.0f} ms vs {raw['p99 ms']:.0f} ms",
                better,
            )
        )

    def total(label: str) -> float:
        return sum(float(by[(label, p)]["goodput /s"]) for p in phases)

    laws = [f"{ADAPTIVE}{law.__name__}" for law in LAWS]
    best = max(laws, key=total)
    wins = total(best) > total(BEST_FIXED)
    targets.append(
        Target(
            "adaptive limit (best of Vegas, Gradient2, AIMD) vs the fixed limit: offered only"
            " if it wins",
            f"more goodput than {BEST_FIXED} over both phases",
            f"{best.removeprefix(ADAPTIVE)}: {total(best):.0f}/s vs {total(BEST_FIXED):.0f}/s "
            "(sum of the two phases)",
            wins,
            "" if wins else "not offered: see the README (ConcurrencyLimit, adaptive)",
        )
    )
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"Virtual time; a loopback aiohttp server with W workers, S = {SERVICE * 1e3:g} ms, "
            f"latency S·max(1, n/W)·(1 + {CONTENTION:g}·max(0, n−W)/W) for n in progress, 503 "
            f"beyond {ADMIT}·W; W = {WORKERS[0]} for {phase:g} s, then W = {WORKERS[1]} for "
            f"{phase:g} s. Calls: GET at {RATE:g}/s (Poisson, seed {SEED}); every client "
            f"resilient.session(Retry(), [limit], timeout=ClientTimeout(total={TIMEOUT:g}))."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=targets,
        notes=[
            "goodput: calls answered 200 (within the 1 s total timeout) per second of the "
            "phase, by the phase the call started in. p50/p99: of those calls. 503 at "
            "server: refusals the server sent (retries included). failed calls: final "
            "outcome of the others (503 = Retry gave up or its budget was spent).",
        ],
    )
