"""Scenario 7: 10,000 callers waiting behind one pause (virtual time).

One caller earns a 429 (``Retry-After`` 120 s) and pauses the host; then N callers start
(each with its own business, so each has quota left once the pause ends) and park behind
the pause. Memory per waiting caller is measured with tracemalloc once all are parked,
and compared with a baseline: the same N calls parked in a bare middleware that awaits
an ``asyncio.Event`` (aiohttp's own request objects, the task, the session call). Then the
pause ends and the time to drain all N calls is measured (wall clock).
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import Any

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from .._clients import ResilientOptions, build_policies
from .._harness import Config, Progress, ScenarioResult, Target, run_virtual

NAME = "scale"
TITLE = "7. Scale: callers waiting behind one pause"
BLOCK = 120.0
PATH = "/contacts/1"
KIB_TARGET = 4.0


def _callers(cfg: Config) -> int:
    return int(cfg.pick(2_000, 10_000, tiny=300))


def units(cfg: Config) -> float:
    return 2.0


async def _call(session: aiohttp.ClientSession, url: str, business: str) -> int:
    async with session.get(url, headers={"X-Business": business}) as resp:
        await resp.read()
        return resp.status


async def _park_and_drain(
    session: aiohttp.ClientSession, url: str, n: int, release: Any, sent: Any
) -> dict[str, Any]:
    """Start n callers, measure memory once all are parked, then release and drain."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tasks = [asyncio.ensure_future(_call(session, url, f"b{i}")) for i in range(n)]
    await asyncio.sleep(1.0)  # virtual: returns once every task is parked (the loop idles)
    await asyncio.sleep(1.0)
    parked = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    leaked = sent()
    wall0 = time.perf_counter()
    release()
    statuses = await asyncio.gather(*tasks)
    drain = time.perf_counter() - wall0
    return {
        "per_waiter": (parked - before) / n,
        "sent_while_parked": leaked,
        "drain_s": drain,
        "ok": sum(200 <= s < 300 for s in statuses),
    }


async def _baseline(n: int) -> dict[str, Any]:
    from resilient.testing import SimulatedAPI

    gate = asyncio.Event()
    through = 0

    async def bare_wait(req: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        nonlocal through
        await gate.wait()
        through += 1
        return await handler(req)

    async with (
        SimulatedAPI(quota=(1, 60.0)) as api,
        aiohttp.ClientSession(middlewares=(bare_wait,)) as session,
    ):
        url = api.url + PATH
        return await _park_and_drain(session, url, n, gate.set, lambda: through)


async def _resilient(n: int) -> dict[str, Any]:
    import resilient
    from resilient.testing import SimulatedAPI

    async with SimulatedAPI(quota=(1, 60.0), block_for=BLOCK, retry_after="seconds") as api:
        url = api.url + PATH
        async with resilient.session(*build_policies(ResilientOptions())) as session:
            assert await _call(session, url, "trigger") == 200  # fills "trigger"'s quota
            trigger = asyncio.ensure_future(_call(session, url, "trigger"))  # 429: pause
            while api.count() < 2:
                await asyncio.sleep(0)
            await asyncio.sleep(0.1)
            seen = len(api.log)
            result = await _park_and_drain(
                session, url, n, lambda: None, lambda: len(api.log) - seen
            )
            await trigger
            return result


def _virtual(coro: Any) -> dict[str, Any]:
    result: dict[str, Any] = run_virtual(coro, 10 * BLOCK)
    return result


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    n = _callers(cfg)
    progress.set_label(f"scale: {n} callers, baseline")
    base = _virtual(_baseline(n))
    progress.advance()
    progress.set_label(f"scale: {n} callers, resilient")
    mine = _virtual(_resilient(n))
    progress.advance()
    extra = (mine["per_waiter"] - base["per_waiter"]) / 1024
    rows = [
        {
            "client": label,
            "callers": n,
            "KiB / waiter": data["per_waiter"] / 1024,
            "KiB / waiter beyond baseline": None if label.startswith("aiohttp") else extra,
            "sent while parked": data["sent_while_parked"],
            "ok": data["ok"],
            "drain s (wall)": data["drain_s"],
            "drain calls/s": n / data["drain_s"] if data["drain_s"] > 0 else None,
        }
        for label, data in (("aiohttp + bare Event wait", base), ("resilient", mine))
    ]
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"looptime loop; SimulatedAPI(quota=(1, 60 s) per business, block_for={BLOCK:g} s); "
            f"one caller earns the 429 and the pause, then {n} callers (one business each) "
            "start and park. tracemalloc measures the memory they hold while parked."
        ),
        columns=list(rows[0]),
        rows=rows,
        targets=[
            Target(
                "memory per waiting caller beyond aiohttp's own",
                f"≤ {KIB_TARGET:g} KiB",
                f"{extra:.2f} KiB",
                extra <= KIB_TARGET,
                f"resilient holds {mine['per_waiter'] / 1024:.2f} KiB per waiter in all; "
                f"the bare-wait baseline {base['per_waiter'] / 1024:.2f} KiB.",
            ),
        ],
        notes=[
            "baseline: the same calls parked in a one-line middleware awaiting an "
            "asyncio.Event, i.e. aiohttp's request objects, the task and the call frames.",
            "drain: wall time from the end of the pause until all calls have their answer "
            "(the pause itself is skipped on virtual time).",
        ],
    )
