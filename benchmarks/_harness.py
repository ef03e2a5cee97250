"""Runner plumbing: configuration, the result types, a progress bar, timing statistics,
and the simulated API served from a separate process (so its CPU is not the client's)."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TextIO, TypeVar

import aiohttp
from aiohttp import web

__all__ = [
    "Config",
    "Outcome",
    "Progress",
    "ScenarioResult",
    "ServerProcess",
    "Target",
    "machine",
    "median",
    "percentile",
    "serve",
]

T = TypeVar("T")
BUSINESS = "bench"
"""``X-Business`` header every benchmark request carries (the simulated API's quota key)."""


@dataclass(frozen=True)
class Config:
    """How big a run is. ``quick`` shrinks counts and durations (the whole run about 1.5
    min, 3 with valgrind); ``tiny`` (tests only) shrinks them further, to check
    correctness, not speed."""

    quick: bool = False
    tiny: bool = False

    def pick(self, quick: T, full: T, tiny: T | None = None) -> T:
        """``quick`` in a quick run (``tiny`` in a tiny one, if given), else ``full``."""
        if self.tiny and tiny is not None:
            return tiny
        return quick if self.quick or self.tiny else full


@dataclass
class Outcome:
    """One caller's call: final status (None on an exception), the error's type name,
    and its start/end on the loop clock."""

    status: int | None
    error: str | None
    start: float
    end: float
    wall: float = 0.0
    """Wall-clock (perf_counter) seconds of the call, meaningful on virtual time too."""

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class Target:
    """A target from issue 4, measured: ``passed`` is None when it could not be measured."""

    name: str
    goal: str
    measured: str
    passed: bool | None
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]


@dataclass
class ScenarioResult:
    """What a scenario hands to the report: a table (``rows`` keyed by ``columns``),
    targets, series for the plots, and notes in words."""

    name: str
    title: str
    setup: str
    columns: list[str]
    rows: list[dict[str, Any]]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    wall: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = [{**asdict(t), "verdict": t.verdict} for t in self.targets]
        return data


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def machine() -> dict[str, Any]:
    """The machine the numbers come from."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }


class Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal, otherwise
    a line at most every few seconds. ``total`` is in arbitrary units."""

    WIDTH = 28

    def __init__(self, total: float, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.started = time.perf_counter()
        self._last_line = 0.0
        self.label = ""

    def advance(self, units: float = 1.0, label: str | None = None) -> None:
        self.done = min(self.total, self.done + units)
        if label is not None:
            self.label = label
        self._draw()

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw()

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and not final and now - self._last_line < 3.0:
            return
        self._last_line = now
        frac = self.done / self.total
        filled = round(frac * self.WIDTH)
        elapsed = now - self.started
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        text = f"[{bar}] {frac:4.0%} {elapsed:5.0f}s  {self.label}"[:110]
        if self.tty:
            self.stream.write("\r" + text.ljust(110))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.done = self.total
        self._draw(final=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --- the simulated API in a separate process -------------------------------------------


def _serve(conn: Connection, kwargs: dict[str, Any]) -> None:
    """Child process: run a SimulatedAPI until the parent says stop."""

    async def main() -> None:
        from resilient.testing import SimulatedAPI

        api = SimulatedAPI(**kwargs)
        url = await api.start()
        conn.send(url)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, conn.recv)
        finally:
            conn.send(len(api.log))
            await api.close()

    asyncio.run(main())


class ServerProcess:
    """``with ServerProcess(quota=None) as url:`` serves a SimulatedAPI from another
    process (spawned, so nothing of the parent's loop is inherited)."""

    def __init__(self, **api_kwargs: Any) -> None:
        self.api_kwargs = api_kwargs
        self.requests = 0
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, api_kwargs), daemon=True)

    def __enter__(self) -> str:
        self._proc.start()
        if not self._conn.poll(30.0):
            self._proc.kill()
            raise RuntimeError("benchmark server process did not start within 30 s")
        url: str = self._conn.recv()
        return url

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
            if self._conn.poll(10.0):
                self.requests = self._conn.recv()
        finally:
            self._proc.join(10.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()


async def gather_calls(call: Callable[[], Any], count: int, concurrency: int) -> list[Outcome]:
    """Run ``count`` calls of ``call()`` (an awaitable factory returning an Outcome) with
    ``concurrency`` workers pulling from a shared counter."""
    remaining = count
    results: list[Outcome] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            results.append(await call())

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return results


def run_virtual(coro: Any, limit: float = 7 * 86_400.0) -> Any:
    """Run ``coro`` to completion on a looptime loop (virtual time: the clock jumps to the
    next timer whenever the loop is idle); ``limit`` bounds it in virtual seconds."""
    import looptime

    loop = looptime.new_event_loop(start=0.0)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, limit))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def run_real(coro: Any, limit: float) -> Any:
    """Run ``coro`` on a fresh asyncio loop, cancelled after ``limit`` wall seconds (a hung
    run fails its scenario instead of hanging the suite)."""
    return asyncio.run(asyncio.wait_for(coro, limit))


async def serve(handler: Callable[[web.Request], Any], path: str) -> tuple[web.AppRunner, str]:
    """``handler`` answering every GET on a free 127.0.0.1 port: its runner (clean it up)
    and the URL of ``path`` there."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}{path}"
