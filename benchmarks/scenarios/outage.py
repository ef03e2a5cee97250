"""Scenario 5: outages of 2, 4, 10 and 60 s at 100 calls/s, then healthy again.

Runs on virtual time (a looptime loop, server and client in it), so the real durations
and every client's real defaults are used. For each outage length: ``LEAD`` seconds of
healthy traffic (the breaker's window is warm), the outage (every request answered
503), then ``AFTER`` seconds healthy. Callers arrive open-loop at 100 per second.
resilient also runs cold (the outage begins ``COLD_LEAD`` s after the first call), with
``CircuitBreaker(mode="adaptive")`` (Google's client-side adaptive throttling) and with
``Retry(circuit_wait=0)`` (every refusal fails the call at once, as before 0.2.0).

Reported per outage and client: server requests per call during the outage, calls
failed, time to the first success after the upstream is back (the first 2xx the server
sends from the outage's end on), calls ok overall, and ok calls against raw aiohttp's in
the same outage. ``python -m benchmarks.scenarios.outage --sweep`` compares breaker
settings (how the defaults were chosen).
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import aiohttp

from .._clients import Client, ClientSpec, ResilientOptions, build_policies, launch, make_clients
from .._harness import (
    Config,
    Outcome,
    Progress,
    ScenarioResult,
    Target,
    median,
    percentile,
    run_virtual,
)

NAME = "outage"
TITLE = "5. Outages of 2-60 s at 100 calls/s: load, failures and recovery (virtual time)"
OUTAGES = (2.0, 4.0, 10.0, 60.0)
OUTAGE = 10.0
"""The outage drawn in the plot (and the only one of a tiny run)."""
LEAD = 10.0
"""Seconds of healthy traffic before the outage (several breaker windows: warm)."""
COLD_LEAD = 1.0
AFTER = 10.0
"""Seconds after the outage."""
PATH = "/contacts/1"
COLD = "resilient, cold start"
ADAPTIVE = "resilient mode=adaptive"
ADAPTIVE_COLD = "resilient mode=adaptive, cold"
OLD = "resilient 0.1.0 breaker"
NO_WAIT = "resilient, Retry(circuit_wait=0)"
LOAD_TARGET = 0.2
"""Server requests per call during outages of 4 s and more."""
FIRST_SUCCESS_TARGET = 1.5
"""Seconds from the upstream's return to the first success."""


def _rate(cfg: Config) -> float:
    """Caller arrivals per (virtual) second."""
    return float(cfg.pick(100.0, 100.0, tiny=20.0))


def _outages(cfg: Config) -> tuple[float, ...]:
    return cfg.pick((2.0, OUTAGE), OUTAGES, tiny=(OUTAGE,))


class _Breaker(Client):
    """resilient's chain with its defaults, the breaker built by ``breaker()`` (and the
    Retry by ``retry()`` when given)."""

    def __init__(
        self,
        breaker: Callable[[], Any],
        scale: float = 1.0,
        retry: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(scale)
        self.breaker = breaker
        self.retry = retry

    def _session(self) -> aiohttp.ClientSession:
        import resilient

        retry, _, backoff, throttle = build_policies(ResilientOptions(), self.scale)
        if self.retry is not None:
            retry = self.retry()
        return resilient.session(retry, self.breaker(), backoff, throttle)


def _breaker(**kwargs: Any) -> Callable[[], Any]:
    import resilient

    return partial(resilient.CircuitBreaker, **kwargs)


def _client(kwargs: dict[str, Any]) -> Callable[[], Client]:
    """The chain with ``CircuitBreaker(**kwargs)``; a ``"retry"`` entry holds Retry's."""
    import resilient

    kwargs = dict(kwargs)
    retry = kwargs.pop("retry", None)
    make_retry = None if retry is None else partial(resilient.Retry, **retry)
    return partial(_Breaker, _breaker(**kwargs), retry=make_retry)


OLD_BREAKER = {
    "failure_ratio": 0.5, "min_calls": 10, "window": 30.0, "open_for": 30.0,
    "consecutive_failures": None,
}  # fmt: skip
"""The defaults of 0.1.0 (the issue's starting point)."""
NO_WAIT_RETRY = {"circuit_wait": 0.0}
"""Retry failing fast on every CircuitOpenError (before short breaks were waited out)."""


def _runs(cfg: Config) -> list[tuple[ClientSpec, float]]:
    specs = make_clients(names=("aiohttp", "resilient", "aiohttp-retry", "tenacity"))
    runs = [(spec, LEAD) for spec in specs]
    resilient = runs[1][0]
    adaptive = ClientSpec(ADAPTIVE, partial(_Breaker, _breaker(mode="adaptive")))
    extra = [(ClientSpec(COLD, resilient.factory), COLD_LEAD), (adaptive, LEAD)]
    if not (cfg.quick or cfg.tiny):
        extra.append((ClientSpec(ADAPTIVE_COLD, adaptive.factory), COLD_LEAD))
        extra.append((ClientSpec(OLD, partial(_Breaker, _breaker(**OLD_BREAKER))), LEAD))
        extra.append((ClientSpec(NO_WAIT, _client({"retry": NO_WAIT_RETRY})), LEAD))
    runs[2:2] = extra
    return runs


def units(cfg: Config) -> float:
    return float(len(_runs(cfg)) * len(_outages(cfg)))


async def _one(factory: Any, lead: float, outage: float, rate: float) -> dict[str, Any]:
    from resilient.testing import SimulatedAPI

    end = lead + outage
    arrivals = [i / rate for i in range(int((end + AFTER) * rate))]
    async with SimulatedAPI(quota=None, outages=[(lead, end)]) as api, factory() as client:
        t0 = asyncio.get_running_loop().time()  # start() has run: the outages' origin
        outcomes: list[Outcome] = await launch(client, api.url + PATH, arrivals)
        log = [(e.time - t0, e.status) for e in api.log]
    return {"outcomes": outcomes, "log": log, "t0": t0}


def measure(factory: Any, lead: float, outage: float, rate: float) -> dict[str, Any]:
    """One client through one outage: the row's figures, plus the server log."""
    data = run_virtual(_one(factory, lead, outage, rate))
    outcomes: list[Outcome] = data["outcomes"]
    log: list[tuple[float, int]] = data["log"]
    t0: float = data["t0"]
    start, end = lead, lead + outage
    calls = sum(1 for o in outcomes if start <= o.start - t0 < end)
    first = min((t for t, status in log if t >= end and 200 <= status < 300), default=math.inf)
    refused = [o for o in outcomes if o.error == "CircuitOpenError"]
    fast = [o.wall * 1e6 for o in refused if o.end == o.start]  # refused without a wait
    during = sum(1 for t, _ in log if start <= t < end)
    return {
        "server req / call in outage": during / calls,
        "server req during outage": during,
        "calls during outage": calls,
        "calls": len(outcomes),
        "calls failed": sum(1 for o in outcomes if not o.ok),
        "ok": sum(1 for o in outcomes if o.ok),
        "ok vs aiohttp": sum(1 for o in outcomes if o.ok) - (len(outcomes) - calls),
        "first success after s": first - end,
        "refused": len(refused),
        "fast": fast,
        "log": log,
    }


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    rate = _rate(cfg)
    rows: list[dict[str, Any]] = []
    series: dict[str, Any] = {"outage": [LEAD, LEAD + OUTAGE], "arrivals": {}}
    fail_fast: list[float] = []
    for outage in _outages(cfg):
        for spec, lead in _runs(cfg):
            progress.set_label(f"outage {outage:g} s: {spec.label} (virtual time)")
            m = measure(spec.factory, lead, outage, rate)
            fail_fast += m["fast"]
            rows.append(
                {
                    "outage s": outage,
                    "client": spec.label,
                    "server req / call in outage": m["server req / call in outage"],
                    "server req during outage": m["server req during outage"],
                    "calls during outage": m["calls during outage"],
                    "calls failed": m["calls failed"],
                    "first success after s": m["first success after s"],
                    "ok % overall": 100.0 * m["ok"] / m["calls"],
                    "ok vs aiohttp": m["ok vs aiohttp"],
                    "CircuitOpenError": m["refused"],
                }
            )
            if outage == OUTAGE and lead == LEAD:
                series["arrivals"][spec.label] = m["log"]
            progress.advance()
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"Virtual time; SimulatedAPI(outages=[(lead, lead + outage)]) for outages of "
            f"{', '.join(f'{o:g}' for o in _outages(cfg))} s: {LEAD:g} s healthy, the outage "
            f"(every request 503), {AFTER:g} s healthy; callers arrive at {rate:g}/s (open "
            "loop). Every client with its real defaults (resilient: the full chain, "
            "CircuitBreaker() and RetryBudget(0.2, 10/s) defaults). Cold: the outage starts "
            f"{COLD_LEAD:g} s after the first call."
            + (f" '{OLD}': CircuitBreaker({_kwargs(OLD_BREAKER)})." if OLD in _labels(rows) else "")
            + (
                f" '{NO_WAIT}': every CircuitOpenError fails the call at once."
                if NO_WAIT in _labels(rows)
                else ""
            )
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=_targets(rows),
        notes=[
            "server req / call in outage: requests reaching the server during the outage per "
            "call started in it (retries included). first success after s: from the outage's "
            "end to the first 2xx the server sent (virtual seconds). ok vs aiohttp: calls ok "
            "minus raw aiohttp's on the same schedule (every call outside the outage; "
            "negative: worse than no policy).",
            "A breaker cannot know the upstream is back before a request succeeds. Retry waits "
            "out a short break (CircuitOpenError.retry_after <= Retry(circuit_wait=1 s); each "
            "refusal uses an attempt, nothing was sent) and tries again, so the calls refused "
            "between the recovery and the probe's success are not lost, and calls started in "
            "the outage's last seconds succeed after it. CircuitOpenError: calls that still "
            "ended refused (after up to attempts - 1 breaks).",
            _fail_fast_note(fail_fast),
        ],
        series={**series, "fail_fast_us": fail_fast},
    )


def _fail_fast_note(fail_fast: Sequence[float]) -> str:
    """The wall-clock cost of the calls refused without a wait (none when every break is
    short enough for Retry to wait out)."""
    if not fail_fast:
        return ("fail-fast µs: no call was refused without a wait here (Retry waits out "
                "short breaks); a long break's fail-fast cost is in 1b.")  # fmt: skip
    return (
        "fail-fast µs (calls refused without a wait; caller-seen, wall clock, through "
        f"aiohttp's session.get on a busy loop): p50 {median(fail_fast):.1f}, p90 "
        f"{percentile(fail_fast, 0.9):.1f} over {len(fail_fast)} calls; the policy's own "
        "cost is in 1b."
    )


def _labels(rows: Sequence[dict[str, Any]]) -> set[str]:
    return {str(r["client"]) for r in rows}


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _targets(rows: Sequence[dict[str, Any]]) -> list[Target]:
    """Issue 13's targets for resilient's default chain, warm and cold."""
    mine = [r for r in rows if r["client"] in ("resilient", COLD)]
    long = [r for r in mine if r["outage s"] >= 4.0]
    load = max((r["server req / call in outage"] for r in long), default=math.nan)
    first = max((r["first success after s"] for r in long), default=math.nan)
    worst = min(mine, key=lambda r: r["ok vs aiohttp"], default=None)
    return [
        Target("server requests per call, outages >= 4 s", f"≤ {LOAD_TARGET}",
               f"{load:.3f} (worst)", bool(load <= LOAD_TARGET) if long else None),
        Target("first success after the upstream is back, outages >= 4 s",
               f"≤ {FIRST_SUCCESS_TARGET} s", f"{first:.2f} s (worst)",
               bool(first <= FIRST_SUCCESS_TARGET) if long else None),
        Target("calls ok overall vs raw aiohttp, every outage", "≥ aiohttp's",
               "n/a" if worst is None else
               f"{worst['ok vs aiohttp']:+d} calls (worst: {worst['outage s']:g} s, "
               f"{worst['client']})",
               None if worst is None else worst["ok vs aiohttp"] >= 0,
               "calls refused past their last attempt while the upstream was back"),
    ]  # fmt: skip


# --- how the defaults were chosen ------------------------------------------------------


SWEEP: dict[str, dict[str, Any]] = {
    "defaults (open_for=0.5 max=1)": {},
    "adaptive": {"mode": "adaptive"},
    "adaptive window=1": {"mode": "adaptive", "window": 1.0},
    "open_for=0.25 max=1": {"open_for": 0.25, "max_open_for": 1.0},
    "open_for=0.5 max=1": {"open_for": 0.5, "max_open_for": 1.0},
    "open_for=0.5 max=1.5": {"open_for": 0.5, "max_open_for": 1.5},
    "open_for=0.5 max=2": {"open_for": 0.5, "max_open_for": 2.0},
    "open_for=0.5 max=2, Retry(circuit_wait=2)": {
        "open_for": 0.5,
        "max_open_for": 2.0,
        "retry": {"circuit_wait": 2.0},
    },
    "open_for=1 max=1": {"open_for": 1.0, "max_open_for": 1.0},
    "open_for=1 max=4": {"open_for": 1.0, "max_open_for": 4.0},
    "open_for=1 max=4, Retry(circuit_wait=4)": {
        "open_for": 1.0,
        "max_open_for": 4.0,
        "retry": {"circuit_wait": 4.0},
    },
    "open_for=1 max=30": {"open_for": 1.0, "max_open_for": 30.0},
    "window=5": {"window": 5.0},
    "consecutive=5": {"consecutive_failures": 5},
    "consecutive=20": {"consecutive_failures": 20},
    "consecutive off": {"consecutive_failures": None},
    "0.1.0 defaults": OLD_BREAKER,
    "Retry(circuit_wait=0)": {"retry": NO_WAIT_RETRY},
}


def sweep(outages: Sequence[float] = OUTAGES, seeds: int = 3, rate: float = 100.0) -> None:
    """Print, per breaker setting and outage (warm and cold, ``seeds`` runs each, jitter
    differs): mean server requests per call, worst first success, mean ok vs aiohttp."""
    import random

    print("setting | outage s | lead | req/call | first success s (worst) | ok vs aiohttp")
    for name, kwargs in SWEEP.items():
        for outage in outages:
            for lead in (LEAD, COLD_LEAD):
                got = []
                for seed in range(seeds):
                    random.seed(seed)
                    got.append(measure(_client(kwargs), lead, outage, rate))
                load = sum(m["server req / call in outage"] for m in got) / len(got)
                first = max(m["first success after s"] for m in got)
                diff = sum(m["ok vs aiohttp"] for m in got) / len(got)
                print(f"{name} | {outage:g} | {'warm' if lead == LEAD else 'cold'} | "
                      f"{load:.3f} | {first:.2f} | {diff:+.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    if "--sweep" in sys.argv:
        after = sys.argv[sys.argv.index("--sweep") + 1 :]
        sweep(seeds=int(after[0]) if after else 3)
