"""Scenario 2: quota fidelity.

1,000 requests against Sage's published quota, 200 per 60 s per business, time-scaled
60x (the server allows 200 per 1 s moving window on its loop clock). resilient's Throttle
is configured to the same quota the way the README configures Sage's (rate = quota/window,
a small burst, and the quota as a limits moving window). All callers start at once.

Achieved rate / quota = (successes / time to finish) / (200 per window), the time counted
from the first request's arrival at the server to the last response: the ~0.1 s before
that first arrival is aiohttp building 1,000 requests in one loop (raw aiohttp pays it too,
no policy can spend the quota in it), and it is reported on its own ("first arrival").
Ideal time is the fastest schedule the moving window allows: (ceil(n/200) − 1) windows.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from .._clients import ResilientOptions, launch, make_clients
from .._harness import Config, Outcome, Progress, ScenarioResult, Target, run_real

LIMIT = 60.0
"""Wall seconds after which a hung run is cancelled (its scenario fails)."""
NAME = "quota"
TITLE = "2. Quota fidelity: 1,000 requests against 200 per window (60 s scaled to 1 s)"
QUOTA = 200
WINDOW = 1.0
SCALE = WINDOW / 60.0
FIDELITY_TARGET = 0.99
PATH = "/contacts/1"


def _count(cfg: Config) -> int:
    return int(cfg.pick(400, 1000, tiny=300))


def units(cfg: Config) -> float:
    return float(len(make_clients()))


def options() -> ResilientOptions:
    return ResilientOptions(
        throttle_rate=QUOTA / WINDOW, throttle_burst=5, throttle_quotas=f"{QUOTA}/second"
    )


async def _one(spec_factory: Any, n: int) -> tuple[list[Outcome], list[tuple[float, int]], float]:
    from resilient.testing import SimulatedAPI

    async with SimulatedAPI(quota=(QUOTA, WINDOW), retry_after="seconds") as api:
        loop = asyncio.get_running_loop()
        async with spec_factory() as client:
            t0 = loop.time()
            outcomes = await launch(client, api.url + PATH, [0.0] * n)
        arrivals = [(entry.time - t0, entry.status) for entry in api.log]
    return outcomes, arrivals, t0


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    n = _count(cfg)
    ideal = (math.ceil(n / QUOTA) - 1) * WINDOW
    rows: list[dict[str, Any]] = []
    series: dict[str, Any] = {"quota": QUOTA, "window": WINDOW, "arrivals": {}}
    for spec in make_clients(SCALE, options()):
        progress.set_label(f"quota: {spec.label}")
        outcomes, arrivals, t0 = run_real(_one(spec.factory, n), LIMIT)
        ok = sum(o.ok for o in outcomes)
        elapsed = max(o.end for o in outcomes) - t0
        first = arrivals[0][0] if arrivals else 0.0
        serving = elapsed - first
        rate = ok / serving / (QUOTA / WINDOW) if serving > 0 else math.nan
        rows.append(
            {
                "client": spec.label,
                "ok": ok,
                "failed": n - ok,
                "429s received": sum(status == 429 for _, status in arrivals),
                "server requests": len(arrivals),
                "time s": elapsed,
                "first arrival s": first,
                "ideal s": ideal,
                "rate / quota": rate if ok == n else None,
                "max in any window": _max_in_window(arrivals),
            }
        )
        series["arrivals"][spec.label] = arrivals
        progress.advance()
    mine = next(r for r in rows if r["client"] == "resilient")
    fidelity = mine["rate / quota"] or 0.0
    skew = _skew_note(series["arrivals"]["resilient"])
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"{n} GET {PATH}, all callers at once, one business; SimulatedAPI(quota=({QUOTA}, "
            f"{WINDOW} s), Retry-After in seconds). resilient: Throttle(rate={QUOTA / WINDOW:.0f}"
            f"/s, burst=5, quotas='{QUOTA}/second') + the other policies. Client-side delays "
            f"(backoffs, fixed sleeps) scaled by 1/60 like the window."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=[
            Target(
                "quota fidelity (rate / quota)",
                f"≥ {FIDELITY_TARGET:.0%}",
                f"{fidelity:.1%}",
                fidelity >= FIDELITY_TARGET and mine["ok"] == n,
            ),
            Target(
                "429s received under the quota",
                "0",
                str(mine["429s received"]),
                mine["429s received"] == 0,
            ),
        ],
        notes=[
            "rate / quota is shown only for clients that completed every request; the others "
            "gave up on 429s (see ok / failed). It counts from the first arrival at the server "
            "(first arrival s: aiohttp building the requests, the same for every client).",
            "max in any window: most requests the server saw in any window of "
            f"{WINDOW:g} s (the quota is {QUOTA}; 429s count too).",
            *skew,
        ],
        series=series,
    )


def _skew_note(arrivals: list[tuple[float, int]]) -> list[str]:
    """Why resilient got a 429, if it did: the request a quota earlier arrived less than
    a window before it, at the server."""
    index = next((i for i, (_, s) in enumerate(arrivals) if s == 429), None)
    if index is None or index < QUOTA:
        return []
    t, earlier = arrivals[index][0], arrivals[index - QUOTA][0]
    first = arrivals[0][0]
    return [
        f"resilient's first 429: request {index + 1} reached the server at {t:.4f} s and "
        f"request {index + 1 - QUOTA} at {earlier:.4f} s, only {t - earlier:.4f} s apart "
        f"(< {WINDOW:g} s). The first request reached the server {first * 1e3:.0f} ms after "
        "the callers started (connections being opened), while the Throttle's window "
        "counts a request when it admits it: arrivals at the server lag admissions by a "
        "varying delay, and a window exactly as large as the server's then overlaps it."
    ]


def _max_in_window(arrivals: list[tuple[float, int]]) -> int:
    times = sorted(t for t, _ in arrivals)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - WINDOW:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
