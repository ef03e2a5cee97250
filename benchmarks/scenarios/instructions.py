"""Scenario 1c: CPU instructions per request, counted by valgrind (deterministic).

Scenario 1 times the client's CPU, which a shared machine makes noisy (±10 % between
rounds on two cores). This one counts the instructions the client process executes,
with valgrind's cachegrind, for the same clients and the same server: each client runs
as its own process twice, with ``small`` and ``large`` requests, and the cost per request
is the difference divided by ``large − small`` (start-up, imports and warm-up cancel
out). Ratios move by 1–3 % between runs on a busy machine (the event loop batches
responses differently), against ±10 % for CPU time; counts do not see cache misses or
branch mispredictions, so they are a floor of what time measures.

Skipped (targets n/a) when valgrind is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .._clients import PLAIN, OnePassthroughClient, PassthroughClient
from .._harness import Config, Progress, ScenarioResult, ServerProcess, Target

NAME = "instructions"
TITLE = "1c. CPU instructions per request (valgrind), nothing failing"
PATH = "/contacts/1"
CONCURRENCY = (1, 50)
CLIENTS = (
    "aiohttp",
    OnePassthroughClient.name,
    PassthroughClient.name,
    "resilient",
    PLAIN,
    "aiohttp-retry",
    "tenacity",
)
"""Measured in a full run; the no-op middlewares show aiohttp's own cost per middleware
(one of them: the least any middleware-based client can cost)."""
CHAIN_TARGET = 1.03
"""Issue 15: the full chain at 50 concurrent, x raw aiohttp (here: instructions)."""
RUN_LIMIT = 600.0
"""Wall seconds one valgrind run may take."""
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def _sizes(cfg: Config) -> tuple[int, int]:
    """(small, large) requests per client process."""
    return cfg.pick((50, 250), (200, 1000))


def _clients(cfg: Config) -> tuple[str, ...]:
    """The clients measured (a quick run: only those the targets compare; each costs
    four valgrind runs of several seconds)."""
    return cfg.pick(("aiohttp", "resilient", "aiohttp-retry"), CLIENTS)


def units(cfg: Config) -> float:
    return float(len(_clients(cfg)) * len(CONCURRENCY) * 2)


def _instructions(valgrind: str, label: str, count: int, concurrency: int, url: str) -> int:
    """Instructions the client process ``label`` executed for ``count`` requests."""
    root = Path(__file__).resolve().parents[2]
    command = [
        valgrind,
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks._instructions_client",
        label,
        str(count),
        str(concurrency),
        url,
    ]
    done = subprocess.run(
        command, cwd=root, capture_output=True, text=True, timeout=RUN_LIMIT, check=False
    )
    found = _REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = done.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"{label} c={concurrency}, valgrind: exit {done.returncode}; {tail}")
    return int(found.group(1).replace(",", ""))


def _skipped() -> ScenarioResult:
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup="valgrind is not installed: not measured.",
        columns=["client"],
        rows=[{"client": name} for name in CLIENTS],
        targets=[
            Target(
                "full chain instructions at 50 concurrent",
                f"≤ {CHAIN_TARGET:.2f}× aiohttp",
                "not measured",
                None,
                "install valgrind to count instructions",
            )
        ],
    )


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return _skipped()
    small, large = _sizes(cfg)
    clients = _clients(cfg)
    per_request: dict[tuple[str, int], float] = {}
    with ServerProcess(quota=None) as base:
        for label in clients:
            for c in CONCURRENCY:
                progress.set_label(f"instructions: {label} c={c}")
                counts = []
                for count in (small, large):
                    counts.append(_instructions(valgrind, label, count, c, base + PATH))
                    progress.advance()
                per_request[(label, c)] = (counts[1] - counts[0]) / (large - small)

    def ratio(label: str, c: int) -> float:
        return per_request[(label, c)] / per_request[("aiohttp", c)]

    rows: list[dict[str, Any]] = [
        {
            "client": label,
            "instructions/req c=1": per_request[(label, 1)],
            "instructions/req c=50": per_request[(label, 50)],
            "×aiohttp c=1": ratio(label, 1),
            "×aiohttp c=50": ratio(label, 50),
        }
        for label in clients
    ]
    chain, retry = ratio("resilient", 50), ratio("aiohttp-retry", 50)
    floors = [
        f"{noop.name.removeprefix('aiohttp + ')}: {ratio(noop.name, 50):.3f}×"
        for noop in (OnePassthroughClient, PassthroughClient)
        if noop.name in clients
    ]
    extra = per_request[("resilient", 50)] - per_request[("aiohttp", 50)]
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"GET {PATH} on a SimulatedAPI (no quota, no faults) in a separate process; each "
            f"client in its own process under valgrind --tool=cachegrind, {small} and "
            f"{large} requests (after 2 x concurrency warm-up calls); instructions per "
            "request = the difference / the difference in requests. Clients as in 1 "
            f"('{PLAIN}': the chain without session()'s timeouts)."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=[
            Target(
                "full chain instructions at 50 concurrent",
                f"≤ {CHAIN_TARGET:.2f}× aiohttp",
                f"{chain:.3f}× (+{extra:,.0f} per request)",
                chain <= CHAIN_TARGET,
                "; ".join(floors),
            ),
            Target(
                "full chain below aiohttp-retry at 50 concurrent (instructions)",
                "< aiohttp-retry",
                f"{chain:.3f}× vs {retry:.3f}×",
                chain < retry,
            ),
        ],
        notes=[
            "Instructions, not time: no cache misses, no branch mispredictions, no "
            "scheduling. Their ratios repeat within 1–3 % on a busy machine, where the "
            "CPU times of 1 swing by ±10 %.",
        ],
        series={"per_request": {f"{k[0]}@{k[1]}": v for k, v in per_request.items()}},
    )
