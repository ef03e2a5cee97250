"""Scenario 4: a flaky server, 30 % of requests answered 503 (seeded).

Success rate, amplification (server requests / caller requests) against the limit
1/(1−p) that unbounded retries approach, and latency. resilient runs twice: with its
default retry budget and with ``budget=None``, so the trade-off between load and
success is visible.
"""

from __future__ import annotations

from typing import Any

from .._clients import ResilientOptions, make_clients, timed
from .._harness import (
    Config,
    Outcome,
    Progress,
    ScenarioResult,
    Target,
    gather_calls,
    percentile,
    run_virtual,
)

NAME = "flaky"
TITLE = "4. Flaky server: 30 % of requests answered 503 (virtual time)"
P = 0.3
LIMIT = 1 / (1 - P)
AMPLIFICATION_TOLERANCE = 0.05
CONCURRENCY = 50
PATH = "/contacts/1"
NO_BUDGET = "resilient budget=None"
SEED = 0
"""SimulatedAPI's default seed."""


def _calls(cfg: Config) -> int:
    return int(cfg.pick(500, 1000, tiny=200))


def _specs(scale: float) -> list[Any]:
    return make_clients(scale, variants=[(NO_BUDGET, ResilientOptions(budget=False))])


def units(cfg: Config) -> float:
    return float(len(_specs(1.0)))


async def _one(factory: Any, calls: int, seed: int) -> tuple[list[Outcome], int]:
    from resilient.testing import SimulatedAPI

    async with SimulatedAPI(quota=None, error_rate=P, seed=seed) as api:
        async with factory() as client:
            outcomes = await gather_calls(
                lambda: timed(client, "GET", api.url + PATH), calls, CONCURRENCY
            )
        return outcomes, len(api.log)


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    calls = _calls(cfg)
    rows: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = {}
    for spec in _specs(1.0):
        progress.set_label(f"flaky: {spec.label}")
        outcomes, server = run_virtual(_one(spec.factory, calls, seed=SEED))
        lat = [o.latency for o in outcomes]
        latencies[spec.label] = lat
        rows.append(
            {
                "client": spec.label,
                "ok %": 100.0 * sum(o.ok for o in outcomes) / calls,
                "amplification": server / calls,
                "vs 1/(1−p)": server / calls / LIMIT,
                "p50 s": percentile(lat, 0.5),
                "p90 s": percentile(lat, 0.9),
                "p99 s": percentile(lat, 0.99),
                "CircuitOpenError": sum(o.error == "CircuitOpenError" for o in outcomes),
                "other errors": sum(o.error not in (None, "CircuitOpenError") for o in outcomes),
            }
        )
        progress.advance()
    by = {r["client"]: r for r in rows}
    tol = AMPLIFICATION_TOLERANCE

    def target(label: str, note: str) -> Target:
        ratio = by[label]["vs 1/(1−p)"]
        return Target(
            f"amplification within 5 % of 1/(1−p) = {LIMIT:.3f} ({label})",
            f"{LIMIT * (1 - tol):.3f} – {LIMIT * (1 + tol):.3f}",
            f"{by[label]['amplification']:.3f} (ok {by[label]['ok %']:.1f} %)",
            abs(ratio - 1) <= tol,
            note,
        )

    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"Virtual time; {calls} GET {PATH} with {CONCURRENCY} concurrent callers; "
            f"SimulatedAPI(error_rate={P}, seed={SEED}). Every client with its real defaults; "
            "latencies are virtual seconds, i.e. the waits (backoff sleeps), not CPU."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=[
            target(
                NO_BUDGET,
                "resilient's Retry with budget=None: 4 attempts give "
                f"1+p+p²+p³ = {1 + P + P**2 + P**3:.3f} at most.",
            ),
            target(
                "resilient",
                "with the default RetryBudget(0.2, 10/s) retries are capped "
                "at 20 % of first attempts plus 10/s (by design: the budget trades success "
                "rate for load, so a MISS here is the budget doing its job).",
            ),
        ],
        notes=[
            "amplification = requests the server received / calls made; 1/(1−p) is the "
            "limit with unbounded retries.",
            "aiohttp-retry's default is 3 attempts, so its ceiling is 1+p+p².",
            "resilient runs its full chain, breaker included: CircuitOpenError counts calls "
            "failed fast because the breaker opened (failure ratio ≥ 0.5 over ≥ 10 calls).",
        ],
        series={"latency_s": latencies},
    )
