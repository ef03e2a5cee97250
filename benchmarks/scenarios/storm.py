"""Scenario 3: a 429 storm.

The server blocks the business for ``B`` seconds (every request answered 429 with the
remaining time in ``Retry-After``); 1,000 callers arrive evenly throughout the block.
A client that shares the pause sends nothing while it lasts; one that does not keeps
knocking. The block is started by exhausting the quota just before the storm (those
warm-up requests are not counted).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from .._clients import HEADERS, launch, make_clients
from .._harness import Config, Outcome, Progress, ScenarioResult, Target, run_virtual

NAME = "storm"
TITLE = "3. 429 storm: 1,000 callers arriving during a 60 s block (virtual time)"
WINDOW = 1.0
PATH = "/contacts/1"


def _sizes(cfg: Config) -> tuple[int, float]:
    """(callers, block seconds)."""
    return cfg.pick((500, 60.0), (1000, 60.0), tiny=(100, 60.0))


def _quota(callers: int) -> tuple[int, float]:
    """Room for every caller once the block is over (so one block is all there is)."""
    return (callers + 100, WINDOW)


def units(cfg: Config) -> float:
    return float(len(make_clients()))


async def _one(factory: Any, callers: int, block: float) -> dict[str, Any]:
    from resilient.testing import SimulatedAPI

    quota = _quota(callers)
    async with SimulatedAPI(quota=quota, block_for=block, retry_after="seconds") as api:
        url = api.url + PATH
        async with aiohttp.ClientSession() as warm:  # fill the window: the next one blocks
            for _ in range(quota[0]):
                async with warm.get(url, headers=HEADERS) as resp:
                    await resp.read()
        skip = len(api.log)
        loop = asyncio.get_running_loop()
        async with factory() as client:
            t0 = loop.time()
            spacing = block / callers
            outcomes: list[Outcome] = await launch(
                client, url, [i * spacing for i in range(callers)]
            )
        log = [(e.time - t0, e.status) for e in api.log[skip:]]
    return {"outcomes": outcomes, "log": log, "t0": t0}


def _block_stats(log: list[tuple[float, int]], block: float) -> dict[str, Any]:
    """Requests during the block (after the one that started it) and probes at its end:
    requests that arrived after the block ended, up to and including the first success."""
    start = next((t for t, status in log if status == 429), None)
    if start is None:
        return {"during": 0, "probes": 0, "start": None}
    end = start + block
    during = sum(1 for t, _ in log if start < t < end)
    after = [(t, s) for t, s in log if t >= end]
    first_ok = next((i for i, (_, s) in enumerate(after) if s < 400), len(after) - 1)
    return {"during": during, "probes": first_ok + 1 if after else 0, "start": start}


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    callers, block = _sizes(cfg)
    rows: list[dict[str, Any]] = []
    series: dict[str, Any] = {"block": block, "arrivals": {}}
    stats_by: dict[str, dict[str, Any]] = {}
    for spec in make_clients():
        progress.set_label(f"storm: {spec.label}")
        data = run_virtual(_one(spec.factory, callers, block))
        outcomes: list[Outcome] = data["outcomes"]
        log: list[tuple[float, int]] = data["log"]
        stats = _block_stats(log, block)
        stats_by[spec.label] = stats
        ok = sum(o.ok for o in outcomes)
        rows.append(
            {
                "client": spec.label,
                "ok %": 100.0 * ok / callers,
                "requests during block": stats["during"],
                "probes at block end": stats["probes"],
                "requests / caller": len(log) / callers,
                "completion s": max(o.end for o in outcomes) - data["t0"],
                "429s": sum(s == 429 for _, s in log),
            }
        )
        series["arrivals"][spec.label] = log
        progress.advance()
    mine = stats_by["resilient"]
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"Virtual time; SimulatedAPI(quota={_quota(callers)}, block_for={block:g} s, "
            "Retry-After in seconds); the quota is filled first, so the first storm request "
            f"starts a {block:g} s block; {callers} callers then arrive evenly over {block:g} s. "
            "Every client with its real defaults."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=[
            Target(
                "requests reaching the server during a block",
                "0",
                str(mine["during"]),
                mine["during"] == 0,
            ),
            Target("probes when the block ends", "1", str(mine["probes"]), mine["probes"] == 1),
        ],
        notes=[
            "requests during block: arrivals after the 429 that started the block and "
            "before it ended; probes: arrivals after the end up to the first success.",
            "completion s: from the first caller's arrival to the last caller's answer "
            "(success or given up).",
        ],
        series=series,
    )
