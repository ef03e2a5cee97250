"""Scenario 5: an outage. Every request is answered 503 for 10 s, then healthy.

Runs on virtual time (a looptime loop, server and client in it), so the real durations
and every client's real defaults are used: 30 s of healthy traffic (one breaker window:
a client in its steady state), the 10 s outage, then 40 s healthy. Callers arrive
open-loop at 100 per second. resilient also runs from a cold start (the outage begins 1 s
after the first call), where its breaker has no history of successes.

Reported: requests reaching the server during the outage, the caller-seen fail-fast
latency of ``CircuitOpenError`` (wall clock), and time to recover: from the end of the
outage until every call started from then on succeeds (virtual seconds).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from .._clients import ClientSpec, launch, make_clients
from .._harness import (
    Config,
    Outcome,
    Progress,
    ScenarioResult,
    median,
    percentile,
    run_virtual,
)

NAME = "outage"
TITLE = "5. Outage: 100 % 503 for 10 s, then healthy (virtual time)"
OUTAGE = 10.0
LEAD = 30.0
"""Seconds of healthy traffic before the outage: one breaker window (steady state)."""
COLD_LEAD = 1.0
AFTER = 40.0
"""Seconds after the outage: more than the breaker's open_for (30 s)."""
PATH = "/contacts/1"
COLD = "resilient, cold start"


def _rate(cfg: Config) -> float:
    """Caller arrivals per (virtual) second."""
    return float(cfg.pick(40.0, 100.0, tiny=20.0))


def _runs() -> list[tuple[ClientSpec, float]]:
    runs = [(spec, LEAD) for spec in make_clients()]
    resilient = next(spec for spec, _ in runs if spec.label == "resilient")
    runs.insert(2, (ClientSpec(COLD, resilient.factory), COLD_LEAD))
    return runs


def units(cfg: Config) -> float:
    return float(len(_runs()))


async def _one(factory: Any, lead: float, rate: float) -> dict[str, Any]:
    from resilient.testing import SimulatedAPI

    end = lead + OUTAGE
    arrivals = [i / rate for i in range(int((end + AFTER) * rate))]
    async with SimulatedAPI(quota=None, outages=[(lead, end)]) as api, factory() as client:
        t0 = asyncio.get_running_loop().time()  # start() has run: the outages' origin
        outcomes: list[Outcome] = await launch(client, api.url + PATH, arrivals)
        log = [(e.time - t0, e.status) for e in api.log]
    return {"outcomes": outcomes, "log": log, "t0": t0}


def _recovery(outcomes: list[Outcome], t0: float, end: float) -> float:
    """Seconds after ``end`` from which every call started succeeds."""
    last_bad = max((o.start - t0 for o in outcomes if not o.ok), default=-math.inf)
    later = [o.start - t0 for o in outcomes if o.start - t0 > last_bad]
    if not later:
        return math.inf
    return max(0.0, min(later) - end)


def _breaker_note(rows: list[dict[str, Any]]) -> list[str]:
    steady = next(r for r in rows if r["client"] == "resilient")
    raw = next(r for r in rows if r["client"] == "aiohttp")
    if steady["failed fast"]:
        return []
    extra = steady["server req during outage"] - raw["server req during outage"]
    return [
        "In steady state resilient's breaker did not open: its window held "
        f"{LEAD:g} s of successes and the {OUTAGE:g} s of failures (with retries) stayed "
        "under failure_ratio 0.5; the retry budget is what bounded the load "
        f"({extra} retries during the outage on top of the calls)."
    ]


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    rate = _rate(cfg)
    rows: list[dict[str, Any]] = []
    series: dict[str, Any] = {"outage": [LEAD, LEAD + OUTAGE], "arrivals": {}}
    fail_fast: list[float] = []
    for spec, lead in _runs():
        progress.set_label(f"outage: {spec.label} (virtual time)")
        data = run_virtual(_one(spec.factory, lead, rate))
        outcomes: list[Outcome] = data["outcomes"]
        log: list[tuple[float, int]] = data["log"]
        t0: float = data["t0"]
        start, end = lead, lead + OUTAGE
        fast = [o.wall * 1e6 for o in outcomes if o.error == "CircuitOpenError"]
        fail_fast += fast
        rows.append(
            {
                "client": spec.label,
                "server req during outage": sum(1 for t, _ in log if start <= t < end),
                "calls during outage": sum(1 for o in outcomes if start <= o.start - t0 < end),
                "ok % overall": 100.0 * sum(o.ok for o in outcomes) / len(outcomes),
                "failed fast": len(fast),
                "fail-fast p50 µs": median(fast) if fast else None,
                "fail-fast p90 µs": percentile(fast, 0.9) if fast else None,
                "recovery s": _recovery(outcomes, t0, end),
            }
        )
        if lead == LEAD:
            series["arrivals"][spec.label] = log
        progress.advance()
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"Virtual time; SimulatedAPI(outages=[({LEAD:g}, {LEAD + OUTAGE:g})]): {LEAD:g} s "
            f"healthy, {OUTAGE:g} s of 503s, {AFTER:g} s healthy; callers arrive at {rate:g}/s "
            "(open loop). Every client with its real defaults (resilient: CircuitBreaker("
            "failure_ratio=0.5, min_calls=10, window=30, open_for=30), RetryBudget(0.2, 10/s)). "
            f"'{COLD}': the outage starts {COLD_LEAD:g} s after the first call."
        ),
        columns=list(rows[0]),
        rows=rows,
        notes=[
            "fail-fast µs: caller-seen wall-clock latency of calls answered CircuitOpenError, "
            "through aiohttp's session.get (request building included), on a busy loop. The "
            "policy's own in-process fail-fast cost and its target are in 1b.",
            "recovery s (virtual): from the end of the outage until every call started from "
            "then on succeeds; when the breaker opened it includes its open_for, by design.",
            *_breaker_note(rows),
        ],
        series={**series, "fail_fast_us": fail_fast},
    )
