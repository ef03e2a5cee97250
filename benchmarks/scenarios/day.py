"""Scenario 6: a 24-hour 429 block, on virtual time.

The event loop is a ``looptime`` loop (``looptime.new_event_loop()``: outside pytest the
loop class is patched directly), so ``asyncio.sleep(86_400)`` fast-forwards the loop clock
when nothing else is ready. Server and client share that loop: the SimulatedAPI's quota
and block run on the same virtual clock. Reported: wall time, virtual time, requests.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp

from .._clients import HEADERS, ClientSpec, launch, make_clients
from .._harness import Config, Outcome, Progress, ScenarioResult, Target, run_virtual

NAME = "day"
TITLE = "6. A 24-hour 429 block on virtual time"
DAY = 86_400.0
QUOTA = (200, 60.0)
PATH = "/contacts/1"
WALL_TARGET = 2.0


def _callers(cfg: Config) -> int:
    return int(cfg.pick(50, 100, tiny=20))


def _runs() -> list[tuple[ClientSpec, float]]:
    runs = [(spec, DAY) for spec in make_clients()]
    resilient = next(spec for spec, _ in runs if spec.label == "resilient")
    runs.insert(2, (ClientSpec(SHORT_LABEL, resilient.factory), SHORTER))
    return runs


def units(cfg: Config) -> float:
    return float(len(_runs()))


SHORTER = DAY - 600.0
"""A block ten minutes shorter than RateLimitBackoff's default max_wait (24 h)."""
SHORT_LABEL = "resilient, block 23 h 50 min"


async def _one(factory: Any, callers: int, block: float = DAY) -> dict[str, Any]:
    from resilient.testing import SimulatedAPI

    async with SimulatedAPI(quota=QUOTA, block_for=block, retry_after="seconds") as api:
        url = api.url + PATH
        async with aiohttp.ClientSession() as warm:  # fill the window: the next one blocks
            for _ in range(QUOTA[0]):
                async with warm.get(url, headers=HEADERS) as resp:
                    await resp.read()
        skip = len(api.log)
        loop = asyncio.get_running_loop()
        async with factory() as client:
            t0 = loop.time()
            outcomes: list[Outcome] = await launch(client, url, [0.0] * callers)
        log = [(e.time - t0, e.status) for e in api.log[skip:]]
    return {"outcomes": outcomes, "log": log, "t0": t0}


def _run_virtual(factory: Any, callers: int, block: float) -> tuple[dict[str, Any], float]:
    wall0 = time.perf_counter()
    data: dict[str, Any] = run_virtual(_one(factory, callers, block), 3 * DAY)
    return data, time.perf_counter() - wall0


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    callers = _callers(cfg)
    rows: list[dict[str, Any]] = []
    for spec, block in _runs():
        progress.set_label(f"day: {spec.label} (virtual time)")
        data, wall = _run_virtual(spec.factory, callers, block)
        outcomes: list[Outcome] = data["outcomes"]
        log: list[tuple[float, int]] = data["log"]
        errors = Counter(o.error or f"HTTP {o.status}" for o in outcomes if not o.ok)
        rows.append(
            {
                "client": spec.label,
                "ok %": 100.0 * sum(o.ok for o in outcomes) / callers,
                "requests sent": len(log),
                "429s": sum(s == 429 for _, s in log),
                "virtual h": (max(o.end for o in outcomes) - data["t0"]) / 3600.0,
                "wall s": wall,
                "not ok": ", ".join(f"{n} {kind}" for kind, n in errors.most_common()) or None,
            }
        )
        progress.advance()
    mine = next(r for r in rows if r["client"] == "resilient")
    shorter = next(r for r in rows if r["client"] == SHORT_LABEL)
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"SimulatedAPI(quota={QUOTA}, block_for=24 h) on a looptime loop; the quota is "
            f"filled first, then {callers} callers start at once: the first 429 starts the "
            "24-hour block. resilient: RateLimitBackoff(max_wait=86,400) in resilient.session() "
            "(total timeout None)."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=[
            Target(
                "a virtual day of waiting",
                f"< {WALL_TARGET:g} s wall",
                f"{mine['wall s']:.2f} s",
                mine["wall s"] < WALL_TARGET,
            ),
            Target(
                "every caller served once the 24-hour block ends",
                "100 % ok",
                f"{mine['ok %']:.0f} % ok",
                mine["ok %"] == 100.0,
                ""
                if mine["ok %"] == 100.0
                else f"resilient's callers not served: {mine['not ok']}. The block equals "
                "RateLimitBackoff's default max_wait (86,400 s): the callers wait the whole "
                "day, then give up instead of following the probe. With a block 10 minutes "
                f"shorter, {shorter['ok %']:.0f} % were served (row '{SHORT_LABEL}').",
            ),
        ],
        notes=[
            f"{callers} callers start at once, so all reach the server before the first 429 "
            "is answered (each gets a 429); a client that shares the pause then sends one "
            "probe when the block ends and the rest follow it.",
            f"'{SHORT_LABEL}': the same run with block_for={SHORTER:,.0f} s, under "
            "RateLimitBackoff's default max_wait.",
            "Only a client that waits the whole day finishes its calls; the others give up "
            "within seconds (virtual), so their wall time is small too.",
            "Wall time includes creating the looptime loop, the server, the warm-up that "
            "fills the quota and every request. looptime outside pytest: "
            "loop = looptime.new_event_loop(); loop.run_until_complete(main()).",
        ],
    )
