"""Scenario 10: a rate limit the server advertises.

The simulated API enforces N = 100 requests per W = 10 s per business and says so on
every response: a fixed window in the IETF dialect (``RateLimit-Policy: "default";
q=100;w=10`` + ``RateLimit: "default";r=R;t=T``, draft-ietf-httpapi-ratelimit-headers-11)
and, in a second run, a moving window in the X- dialect (``X-RateLimit-Limit/-Remaining/
-Reset``, reset in delta seconds: until the next slot frees). 25 closed-loop callers, on
virtual time, as in :mod:`.unknown` (same measures, same cut-off at 3 × calls / R).

A client that reads the headers can stop before the window is spent and wait for the
reset, earning no 429 at all: resilient's default chain (``RateLimitBackoff``'s
``proactive`` reading, on by default) against the baselines, which read none of them.
"""

from __future__ import annotations

from .._clients import (
    AiohttpRetry429Client,
    AiohttpRetryClient,
    ChainClient,
    Client,
    ClientSpec,
    TenacityClient,
)
from .._harness import Config, Progress, ScenarioResult
from .unknown import (
    BASELINE,
    CALLERS,
    CUTOFF,
    DEFAULT,
    RAW,
    Limit,
    run_limits,
)

NAME = "advertised"
TITLE = "10. Advertised limit: RateLimit headers on every response (virtual time)"
RATE_TARGET = 0.95
SPECS = [
    ClientSpec(RAW, Client),
    ClientSpec(DEFAULT, ChainClient),
    ClientSpec("aiohttp-retry", AiohttpRetryClient),
    ClientSpec(BASELINE, AiohttpRetry429Client),
    ClientSpec("tenacity", TenacityClient),
]


def _limits(cfg: Config) -> list[Limit]:
    calls = cfg.pick(300, 1500, tiny=150)
    return [
        Limit("IETF, fixed window N=100 per W=10 s", ("fixed", 100, 10.0), 10.0, "ietf", calls),
        Limit("X-, moving window N=100 per W=10 s", ("moving", 100, 10.0), 10.0, "x", calls),
    ]


def _wall_limit(cfg: Config) -> float:
    return float(cfg.pick(30.0, 240.0, tiny=20.0))


def units(cfg: Config) -> float:
    return float(len(SPECS) * len(_limits(cfg)))


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    rows, targets, series = run_limits(
        NAME, _limits(cfg), lambda _limit: SPECS, _wall_limit(cfg), (RATE_TARGET, None), progress
    )
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            "Virtual time; SimulatedAPI(limiter=..., advertise=...) per business: "
            + "; ".join(
                f"{lim.label} ({lim.calls} calls, ideal {lim.ideal:g} s)" for lim in _limits(cfg)
            )
            + f". {CALLERS} closed-loop callers; each client cut off at {CUTOFF:g} × calls / R "
            "(virtual). resilient: session(Retry(), CircuitBreaker(), RateLimitBackoff()) "
            "with the library's defaults, no Throttle."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=targets,
        notes=[
            "Columns as in scenario 9 (ideal: (ceil(calls / N) − 1) · W, a window's worth "
            "at each window's start). The headers advertise whole seconds, rounded up: "
            "Reset/t never sends a client back early.",
        ],
        series=series,
    )
