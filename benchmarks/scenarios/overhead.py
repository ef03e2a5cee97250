"""Scenario 1: end-to-end overhead when nothing fails.

Client CPU µs per request (``time.process_time`` in this process; the simulated API runs
in a separate process so its CPU is not counted) and requests/s, at 1 and 50 concurrent
callers. Clients run interleaved, round after round (the order rotates each round);
the table gives medians over rounds and ratios to raw aiohttp measured in the same rounds.
"""

from __future__ import annotations

import gc
import time
from functools import partial
from typing import Any

from .._clients import (
    PLAIN,
    Client,
    ClientSpec,
    PassthroughClient,
    ResilientOptions,
    make_clients,
    timed,
)
from .._harness import (
    Config,
    Progress,
    ScenarioResult,
    ServerProcess,
    Target,
    gather_calls,
    median,
    run_real,
)

LIMIT = 600.0
"""Wall seconds after which a hung run is cancelled (its scenario fails)."""
NAME = "overhead"
TITLE = "1. Overhead: client CPU per request, nothing failing"
CONCURRENCY = (1, 50)
PATH = "/contacts/1"
CPU_TARGET = 1.03
"""Issue 15: the full chain at 50 concurrent, client CPU x raw aiohttp."""


def _specs() -> list[ClientSpec]:
    specs = make_clients(variants=[(PLAIN, ResilientOptions(plain_session=True))])
    specs.insert(1, ClientSpec(PassthroughClient.name, PassthroughClient))
    return specs


def _sizes(cfg: Config) -> tuple[int, int]:
    """(rounds, requests per measurement)."""
    return cfg.pick((3, 300), (7, 1500), tiny=(1, 50))


def units(cfg: Config) -> float:
    rounds, _ = _sizes(cfg)
    return float(rounds * len(_specs()) * len(CONCURRENCY))


async def _measure(url: str, cfg: Config, progress: Progress) -> dict[str, Any]:
    rounds, count = _sizes(cfg)
    specs = _specs()
    clients: list[Client] = [spec.factory() for spec in specs]
    labels = {id(client): spec.label for client, spec in zip(clients, specs, strict=True)}
    samples: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    for client in clients:
        await client.__aenter__()
    try:
        for client in clients:  # warm up: connections, caches, first-call imports
            for c in CONCURRENCY:
                await gather_calls(partial(timed, client, "GET", url), 2 * c, c)
        for r in range(rounds):
            order = [*clients[r % len(clients) :], *clients[: r % len(clients)]]
            for client in order:
                for c in CONCURRENCY:
                    label = labels[id(client)]
                    progress.set_label(f"overhead: round {r + 1}/{rounds} {label} c={c}")
                    gc.collect()
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    outcomes = await gather_calls(partial(timed, client, "GET", url), count, c)
                    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                    failed = sum(not o.ok for o in outcomes)
                    samples.setdefault((label, c), []).append((cpu, wall, failed))
                    progress.advance()
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
    return {"samples": samples, "count": count, "rounds": rounds}


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    with ServerProcess(quota=None) as base:
        data = run_real(_measure(base + PATH, cfg, progress), LIMIT)
    count: int = data["count"]
    samples: dict[tuple[str, int], list[tuple[float, float, int]]] = data["samples"]
    names = [spec.label for spec in _specs()]

    def cpu_us(name: str, c: int) -> float:
        return median([s[0] for s in samples[(name, c)]]) / count * 1e6

    def rps(name: str, c: int) -> float:
        return count / median([s[1] for s in samples[(name, c)]])

    def ratio(name: str, c: int) -> float:
        """Median over rounds of (client / aiohttp) in the same round."""
        pairs = zip(samples[(name, c)], samples[("aiohttp", c)], strict=True)
        return median([mine[0] / raw[0] for mine, raw in pairs])

    rows = []
    for name in names:
        rows.append(
            {
                "client": name,
                "CPU µs/req c=1": cpu_us(name, 1),
                "CPU µs/req c=50": cpu_us(name, 50),
                "CPU ×aiohttp c=1": ratio(name, 1),
                "CPU ×aiohttp c=50": ratio(name, 50),
                "req/s c=1": rps(name, 1),
                "req/s c=50": rps(name, 50),
                "failed": sum(s[2] for c in CONCURRENCY for s in samples[(name, c)]),
            }
        )
    chain_ratio = ratio("resilient", 50)
    noop_ratio = ratio(PassthroughClient.name, 50)
    retry_ratio = ratio("aiohttp-retry", 50)
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"GET {PATH} on a SimulatedAPI (no quota, no faults) served from a separate "
            f"process; {data['rounds']} rounds x {count} requests per client and concurrency, "
            "interleaved (order rotated each round). resilient = resilient.session(Retry, "
            "CircuitBreaker, RateLimitBackoff, Throttle(rate=1e6/s, burst=1000: never waits)); "
            f"'{PLAIN}' = the same chain on a plain aiohttp.ClientSession (aiohttp's default "
            "timeout), which separates the middlewares' cost from session()'s timeout settings; "
            "'aiohttp + 4 no-op middlewares' measures aiohttp's own per-middleware cost "
            "(it builds the chain's closures on every request)."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=[
            Target(
                "full chain client CPU at 50 concurrent",
                f"≤ {CPU_TARGET:.2f}× aiohttp",
                f"{chain_ratio:.3f}×",
                chain_ratio <= CPU_TARGET,
                f"aiohttp's own middleware machinery (4 do-nothing middlewares) measured "
                f"{noop_ratio:.3f}× in the same rounds; resilient's policies add the rest.",
            ),
            Target(
                "full chain below aiohttp-retry at 50 concurrent (same rounds)",
                "< aiohttp-retry",
                f"{chain_ratio:.3f}× vs {retry_ratio:.3f}×",
                chain_ratio < retry_ratio,
            ),
        ],
        notes=[
            "CPU is the client process's user+system time (time.process_time) divided by "
            "requests; ratios are per-round ratios to raw aiohttp, median over rounds.",
        ],
        series={"samples": {f"{k[0]}@{k[1]}": v for k, v in samples.items()}, "count": count},
    )
