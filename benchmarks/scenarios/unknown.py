"""Scenario 9: a rate limit the client is not told.

The simulated API enforces, per business, a leaky bucket like nginx's ``limit_req``
(R = 50 requests/s, burst B = 5, ``nodelay``, 429 with ``Retry-After: 1``) and, in a
second run, a fixed window (N = 100 per W = 10 s, 429 with ``Retry-After`` = seconds to
the next window). Neither is told to the client: no RateLimit headers, no Throttle rate.
25 callers make the calls in a closed loop (each sends its next call when its previous
one has returned), on virtual time (server and clients on one looptime loop).

Clients: raw aiohttp (a 429 is a failed call); resilient's default chain without a
Throttle, ``resilient.session(Retry(), CircuitBreaker(), RateLimitBackoff())`` with the
library's defaults; the same plus ``Throttle(rate=4·R, adaptive=True)`` (a guess 4× too
high); aiohttp-retry with its defaults and with 429 added (4 attempts); tenacity.

Per client: calls done (2xx) of the total; time / ideal, where ideal is the fastest
schedule the server allows (:meth:`Limit.ideal_for`: about calls / R, R the server's
sustained rate, N/W for the window); the achieved rate as % of the server's: the ideal
time of the calls done / the time taken (so 100 % is the server's rate, bursts and
window edges included); 429s at the server as % of the calls; requests at the server
per call started. A client still running at 3 × calls / R (virtual) is cut off there,
and what it finished is reported (also after :func:`_wall_limit` seconds of real time).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._clients import (
    AiohttpRetry429Client,
    AiohttpRetryClient,
    ChainClient,
    Client,
    ClientSpec,
    TenacityClient,
    default_chain,
    timed,
)
from .._harness import Config, Outcome, Progress, ScenarioResult, Target, run_virtual

NAME = "unknown"
TITLE = "9. Unknown limit: a leaky bucket and a fixed window the client is not told (virtual)"
PATH = "/contacts/1"
CALLERS = 25
CUTOFF = 3.0
"""A client is cut off at this multiple of the ideal time (virtual seconds)."""
BUCKET = 0.5
"""Seconds per bucket of the sending-rate plot."""
DEFAULT = "resilient default chain"
THROTTLED = "resilient + Throttle(4×R, adaptive)"
RAW = "aiohttp"
BASELINE = "aiohttp-retry +429"
"""The baseline drawn next to resilient in the plot."""
DONE_TARGET = 1.0
RATE_TARGET = 0.85
REJECT_TARGET = 0.10


@dataclass(frozen=True)
class Limit:
    """One server set-up: the SimulatedAPI ``limiter`` (and ``advertise``) and its
    sustained rate R in requests per second."""

    label: str
    limiter: tuple[str, float, float]
    rate: float
    advertise: bool | str = False
    calls: int = 0

    def api_kwargs(self) -> dict[str, Any]:
        return {"quota": None, "limiter": self.limiter, "advertise": self.advertise}

    @property
    def ideal(self) -> float:
        """Virtual seconds the calls take on the fastest schedule the server allows."""
        return self.ideal_for(self.calls)

    def ideal_for(self, n: int) -> float:
        """The earliest time ``n`` calls can all be admitted, starting with the server:
        ``(n − burst − 1) / rate`` for the bucket (``burst + 1`` pass at once), ``(ceil(n
        / N) − 1) · W`` for the windows (a full window's worth at each window's start)."""
        kind, a, b = self.limiter
        if kind == "leaky":
            return max(0, n - int(b) - 1) / a
        return max(0, math.ceil(n / a) - 1) * b

    @property
    def cutoff(self) -> float:
        """Virtual seconds a client may run: :data:`CUTOFF` × calls / R."""
        return CUTOFF * self.calls / self.rate


def _limits(cfg: Config) -> list[Limit]:
    return [
        Limit(
            "leaky bucket R=50/s, burst 5",
            ("leaky", 50.0, 5),
            50.0,
            calls=cfg.pick(400, 1500, tiny=100),
        ),
        Limit(
            "fixed window N=100 per W=10 s",
            ("fixed", 100, 10.0),
            10.0,
            calls=cfg.pick(300, 1500, tiny=150),
        ),
    ]


def _wall_limit(cfg: Config) -> float:
    """Real seconds one client run may take before it is cut off (a client that spins
    on virtual time without sleeping would otherwise never reach the virtual cut-off)."""
    return float(cfg.pick(30.0, 240.0, tiny=20.0))


def _specs(limit: Limit) -> list[ClientSpec]:
    """The clients compared, in report order (the Throttle guesses 4× the server's R)."""

    def throttled() -> tuple[Any, ...]:
        import resilient

        return default_chain(resilient.Throttle(4 * limit.rate, adaptive=True))

    return [
        ClientSpec(RAW, Client),
        ClientSpec(DEFAULT, ChainClient),
        ClientSpec(THROTTLED, lambda: ChainClient(throttled)),
        ClientSpec("aiohttp-retry", AiohttpRetryClient),
        ClientSpec(BASELINE, AiohttpRetry429Client),
        ClientSpec("tenacity", TenacityClient),
    ]


def units(cfg: Config) -> float:
    return float(sum(len(_specs(limit)) for limit in _limits(cfg)))


@dataclass
class Run:
    """One client against one server: its calls, the server's log (seconds since the
    clients started, status), whether it was cut off, and its wall seconds."""

    outcomes: list[Outcome]
    log: list[tuple[float, int]]
    elapsed: float
    started: int
    cut: str = ""
    wall: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


async def closed_loop(
    factory: Callable[[], Client], limit: Limit, wall_limit: float, callers: int = CALLERS
) -> Run:
    """``limit.calls`` GETs from ``callers`` closed-loop callers against a fresh
    SimulatedAPI set up as ``limit``; cut off at :data:`CUTOFF` × ideal (virtual) or
    after ``wall_limit`` real seconds."""
    from resilient.testing import SimulatedAPI

    async with SimulatedAPI(**limit.api_kwargs()) as api:
        url = api.url + PATH
        loop = asyncio.get_running_loop()
        outcomes: list[Outcome] = []
        started = 0
        wall0 = time.perf_counter()

        async def caller() -> None:
            nonlocal started
            while started < limit.calls and time.perf_counter() - wall0 < wall_limit:
                started += 1
                outcomes.append(await timed(client, "GET", url))

        async with factory() as client:
            t0 = loop.time()
            cut = ""
            try:
                async with asyncio.timeout(limit.cutoff):
                    await asyncio.gather(*(caller() for _ in range(callers)))
            except TimeoutError:
                cut = f"{limit.cutoff:g} s"
            elapsed = loop.time() - t0
            if not cut and len(outcomes) < limit.calls:
                cut = f"{wall_limit:g} s real"
        log = [(e.time - t0, e.status) for e in api.log]
    return Run(outcomes, log, elapsed, started, cut, time.perf_counter() - wall0)


def row(label: str, limit: Limit, run: Run) -> dict[str, Any]:
    """The report row of one run (rates as fractions; see the module docstring)."""
    ok = sum(o.ok for o in run.outcomes)
    rejected = sum(status == 429 for _, status in run.log)
    elapsed = run.elapsed
    rate = limit.ideal_for(ok) / elapsed if elapsed > 0 else None
    return {
        "client": label,
        "calls done": f"{ok}/{limit.calls}",
        "done %": 100.0 * ok / limit.calls,
        "time s": elapsed,
        "time / ideal": elapsed / limit.ideal,
        "rate % of server": None if rate is None else 100.0 * rate,
        "429 % of calls": 100.0 * rejected / limit.calls,
        "server req / call": len(run.log) / run.started if run.started else None,
        "cut off at": run.cut or None,
        "wall s": run.wall,
    }


def peak(log: Sequence[tuple[float, int]], width: float = BUCKET) -> int:
    """Most server arrivals in one ``width``-second bucket (accepted or not)."""
    counts: dict[int, int] = {}
    for t, _ in log:
        counts[math.floor(t / width)] = counts.get(math.floor(t / width), 0) + 1
    return max(counts.values(), default=0)


def chain_targets(
    limit: Limit,
    mine: dict[str, Any],
    log: Sequence[tuple[float, int]],
    rate_goal: float,
    reject_goal: float | None,
) -> list[Target]:
    """The default chain's targets against ``limit``: every call done, at least
    ``rate_goal`` of R, and 429s at most ``reject_goal`` of the calls (0 if None)."""
    done, rate, rejected = mine["done %"], mine["rate % of server"] or 0.0, mine["429 % of calls"]
    kind, a, b = limit.limiter
    at_once = int(b) + 1 if kind == "leaky" else int(a)
    first = next((f"{t:.1f} s" for t, status in log if status == 429), "never")
    why = (
        f"first 429 at {first}; most server arrivals in one {BUCKET:g} s bucket: "
        f"{peak(log)} (the limiter admits {at_once} at once, then R = {limit.rate:g}/s); "
        f"time / ideal {mine['time / ideal']:.2f}"
        + (f"; cut off at {mine['cut off at']}" if mine["cut off at"] else "")
    )
    reject_ok = rejected == 0 if reject_goal is None else rejected <= 100 * reject_goal
    reject_text = "0 × 429" if reject_goal is None else f"≤ {reject_goal:.0%} of calls"
    measured_429 = f"{rejected:.1f} % ({round(rejected * limit.calls / 100)} × 429)"
    return [
        Target(
            f"{limit.label}: calls done",
            f"{DONE_TARGET:.0%}",
            f"{done:.1f} %",
            done >= 100 * DONE_TARGET,
            "" if done >= 100 else why,
        ),
        Target(
            f"{limit.label}: rate of the server's",
            f"≥ {rate_goal:.0%}",
            f"{rate:.1f} %",
            rate >= 100 * rate_goal,
            "" if rate >= 100 * rate_goal else why,
        ),
        Target(
            f"{limit.label}: 429s at the server",
            reject_text,
            measured_429,
            reject_ok,
            "" if reject_ok else why,
        ),
    ]


def run_limits(
    name: str,
    limits: Sequence[Limit],
    specs: Callable[[Limit], Sequence[ClientSpec]],
    wall_limit: float,
    targets_of: tuple[float, float | None],
    progress: Progress,
) -> tuple[list[dict[str, Any]], list[Target], dict[str, Any]]:
    """Every client of ``specs(limit)`` against every limit, closed loop on virtual time:
    the table's rows, the default chain's targets (``targets_of``: the rate and 429
    targets, see :func:`chain_targets`) and the plots' series."""
    rows: list[dict[str, Any]] = []
    targets: list[Target] = []
    series: dict[str, Any] = {"bucket": BUCKET, "runs": {}}
    for limit in limits:
        plotted: dict[str, list[tuple[float, int]]] = {}
        for spec in specs(limit):
            progress.set_label(f"{name}: {limit.label}: {spec.label}")
            result: Run = run_virtual(closed_loop(spec.factory, limit, wall_limit))
            rows.append({"server": limit.label, **row(spec.label, limit, result)})
            if spec.label in (DEFAULT, BASELINE):
                plotted[spec.label] = result.log
            if spec.label == DEFAULT:
                targets += chain_targets(limit, rows[-1], result.log, *targets_of)
            progress.advance()
        series["runs"][limit.label] = {"rate": limit.rate, "arrivals": plotted}
    return rows, targets, series


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    rows, targets, series = run_limits(
        NAME, _limits(cfg), _specs, _wall_limit(cfg), (RATE_TARGET, REJECT_TARGET), progress
    )
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            "Virtual time; SimulatedAPI(limiter=...) per business, not told to the client: "
            + "; ".join(
                f"{lim.label} ({lim.calls} calls, ideal {lim.ideal:g} s)" for lim in _limits(cfg)
            )
            + f". {CALLERS} closed-loop callers (each sends its next call when the previous "
            f"returns); each client cut off at {CUTOFF:g} × calls / R (virtual). resilient: "
            "session(Retry(), CircuitBreaker(), RateLimitBackoff()) with the library's "
            "defaults, and with Throttle(rate=4·R, adaptive=True) added."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=targets,
        notes=[
            "done %: calls answered 2xx (raw aiohttp and the retry libraries count a final "
            "429 as a failed call). time: from the first call to the last answer, or the "
            "cut-off (3 × calls / R). ideal: the fastest schedule the server allows, "
            "(calls − burst − 1) / R for the bucket (R = 50/s), (ceil(calls / N) − 1) · W "
            "for the window (its calls go at each window's start). rate % of server: the "
            "ideal time of the calls done / the time taken. 429 %: 429s the server sent, "
            "per call. server req / call: requests at the server per call started.",
            "On virtual time a request takes no time: a client that never waits finishes at "
            "once (time 0, no rate), its calls failed.",
        ],
        series=series,
    )
