"""Scenario 8: quota windows shared through Redis (``Throttle(storage="redis://...")``).

a. Cost per request. ``Throttle(1e6, burst=10**6, quotas="1000000/minute")`` never
   waits; it is called in-process as in 1b (aiohttp's ``build_client_middlewares``
   around a handler returning a pre-fetched ``ClientResponse``), with
   ``storage=<redis>`` and with ``storage="memory://"``. Redis cost = µs per call with
   Redis − µs per call in memory, in units of the median loopback round trip (a
   ``PING`` through the same redis-py client, timed one by one). The variants take
   turns in chunks of :data:`CHUNK` calls, so all of them see the same machine load.
   *Caller's path*: each call timed alone, its background landing drained before the
   next (untimed). *Back-to-back*: n calls in a tight loop plus the drain of their
   landings, divided by n (the landings' client CPU lands on the loop's time).
b. Four OS processes share one quota. The benchmark process serves
   ``SimulatedAPI(quota=(Q, 1 s))`` (real time); four workers
   (``benchmarks/_shared_worker.py``) each send their GETs at once through
   ``Throttle(rate=Q, burst=5, quotas="Q/second")`` + ``RateLimitBackoff``, both on
   the shared Redis, or (baseline) both in memory, where each process believes it owns
   the whole quota. Achieved rate / quota as in scenario 2.
c. Round trips per request on the caller's path, for Throttle(quotas), RateLimitBackoff,
   CircuitBreaker alone and the full chain: Redis behind a proxy that holds every reply
   :data:`DELAY` s (``benchmarks/_delay_proxy.py``), calls timed one by one as in a;
   (µs on Redis − µs in memory) / µs of one PING through the proxy. Redis scripts/req:
   every script Redis ran during those calls (background sends included), per call.
   Callers waiting: the share of calls that took at least one proxy delay (each waited
   for Redis; the median above does not show a round trip that 1 caller in 16 pays).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from aiohttp.client_middlewares import build_client_middlewares

from .._harness import Config, Progress, ScenarioResult, Target, median, run_real
from .inprocess import _prefetch
from .quota import _max_in_window

NAME = "shared"
TITLE = (
    "8. Shared Redis storage: throttle cost per request, 4 processes on one quota, round "
    "trips per request"
)
LIMIT = 300.0
"""Wall seconds after which a hung part is cancelled (its scenario fails)."""
COST_TARGET = 1.5
"""Round trips: the Redis throttle's cost per request on the caller's path."""
COST_NAME = "Redis-backed throttle cost (caller's path)"
FIDELITY_TARGET = 0.95
COST_QUOTAS = "1000000/minute"
QUOTA = 100
WINDOW = 1.0
PROCESSES = 4
PATH = "/contacts/1"
READY_TIMEOUT = 60.0
"""Seconds a worker process may take to import, connect and say ``ready``."""
ROOT = Path(__file__).resolve().parents[2]
CHUNK = 50
"""Calls per variant in turn: the variants are interleaved in chunks of this many."""
COUNTED = 500
"""Calls whose Redis commands are counted (Redis's INFO counters)."""


def _cost_sizes(cfg: Config) -> tuple[int, int]:
    """(rounds, calls per variant per round)."""
    return cfg.pick((3, 1_000), (7, 3_000), tiny=(1, 200))


def _per_process(cfg: Config) -> int:
    return int(cfg.pick(50, 100, tiny=30))


def units(cfg: Config) -> float:
    rounds, _ = _cost_sizes(cfg)
    return float(rounds + 2)


# --- a. cost per request ---------------------------------------------------------------


async def _tight(handler: ClientHandlerType, req: ClientRequest, n: int, drain: Any) -> float:
    """µs per call of ``n`` calls back to back, the drain of their landings included."""
    t0 = time.perf_counter()
    for _ in range(n):
        await handler(req)
    if drain is not None:
        await drain()
    return (time.perf_counter() - t0) / n * 1e6


async def _paced(handler: ClientHandlerType, req: ClientRequest, n: int, drain: Any) -> float:
    """Median µs of one call, each timed alone, its landing drained (untimed) before the next."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await handler(req)
        times.append(time.perf_counter() - t0)
        if drain is not None:
            await drain()
    return statistics.median(times) * 1e6


async def _round_trip(call: Any, n: int) -> float:
    """Median µs of ``await call()``, each timed alone."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


async def _commands(conn: Any) -> tuple[int, int]:
    """(commands processed, EVALSHA calls) so far: Redis's own counters (each INFO counts)."""
    stats = await conn.info("stats")
    evalsha = (await conn.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
    return int(stats["total_commands_processed"]), int(evalsha)


async def _cost(redis_url: str, cfg: Config, progress: Progress) -> dict[str, Any]:
    import resilient
    from resilient.testing import SimulatedAPI

    rounds, n = _cost_sizes(cfg)
    async with SimulatedAPI(quota=None) as api:
        req, resp = await _prefetch(api.url + PATH)

    async def bare(_: ClientRequest) -> ClientResponse:
        return resp

    memory = resilient.Throttle(1e6, burst=10**6, quotas=COST_QUOTAS, storage="memory://")
    shared = resilient.Throttle(1e6, burst=10**6, quotas=COST_QUOTAS, storage=redis_url)
    quotas: Any = shared._quotas  # private: benchmark plumbing (drain, the connection)
    conn = quotas._store.limits.bridge.get_connection()
    trivial = conn.register_script("return 1")
    on_memory = build_client_middlewares(bare, (memory,))
    on_redis = build_client_middlewares(bare, (shared,))
    times: dict[str, list[float]] = {
        k: [] for k in ("ping", "evalsha", "memory", "memory tight", "redis", "redis tight")
    }
    try:
        for handler in (on_memory, on_redis):  # warm-up (connection, scripts loaded)
            await _tight(handler, req, 200, quotas.drain)
        await trivial()
        counted = min(n, COUNTED)
        before = await _commands(conn)
        await _paced(on_redis, req, counted, quotas.drain)  # the Throttle's commands only
        after = await _commands(conn)
        scripts = (after[1] - before[1]) / counted
        inner = (after[0] - before[0] - 2) / counted - scripts  # minus the 2 INFOs of before
        for r in range(rounds):
            progress.set_label(f"shared: cost, round {r + 1}/{rounds}")
            gc.collect()
            chunks: dict[str, list[float]] = {k: [] for k in times}
            for _ in range(max(1, n // CHUNK)):  # fine interleaving: all see the same load
                chunks["ping"].append(await _round_trip(conn.ping, CHUNK))
                chunks["evalsha"].append(await _round_trip(trivial, CHUNK))
                chunks["memory"].append(await _paced(on_memory, req, CHUNK, None))
                chunks["redis"].append(await _paced(on_redis, req, CHUNK, quotas.drain))
                chunks["memory tight"].append(await _tight(on_memory, req, CHUNK, None))
                chunks["redis tight"].append(await _tight(on_redis, req, CHUNK, quotas.drain))
            for name, values in chunks.items():
                times[name].append(median(values))
            progress.advance()
    finally:
        await quotas.drain()  # no landing may outlive the connection (or the server)
        await quotas._store.close()
    return {"times": times, "scripts": scripts, "inner": inner}


def _cost_rows(measured: dict[str, Any]) -> tuple[list[dict[str, Any]], float, float]:
    """The rows of part a, the caller's-path ratio and the back-to-back ratio."""
    t = {name: median(values) for name, values in measured["times"].items()}
    rtt = t["ping"]
    path = (t["redis"] - t["memory"]) / rtt
    tight = (t["redis tight"] - t["memory tight"]) / rtt
    rows = [
        {"variant": "Redis round trip: PING (redis-py)", "µs/req": rtt, "round trips": 1.0},
        {
            "variant": "Redis round trip: EVALSHA 'return 1'",
            "µs/req": t["evalsha"],
            "round trips": t["evalsha"] / rtt,
        },
        {"variant": "Throttle(quotas), memory://", "µs/req": t["memory"]},
        {
            "variant": "Throttle(quotas), Redis: caller's path",
            "µs/req": t["redis"],
            "round trips": path,
            "Redis scripts/req": measured["scripts"],
        },
        {"variant": "Throttle(quotas), memory://, back-to-back", "µs/req": t["memory tight"]},
        {
            "variant": "Throttle(quotas), Redis, back-to-back",
            "µs/req": t["redis tight"],
            "round trips": tight,
            "Redis scripts/req": measured["scripts"],
        },
    ]
    return rows, path, tight


# --- c. round trips per request, each policy and the full chain -------------------------

DELAY = 0.002
"""Seconds the delay proxy adds to every Redis reply (part c): a round trip shows as time."""
TRIP_CALLS = 100
"""Sequential calls per variant and storage in part c."""


def _trip_variants(storage: str) -> dict[str, tuple[Any, ...]]:
    import resilient

    def throttle() -> Any:
        return resilient.Throttle(1e6, burst=10**6, quotas=COST_QUOTAS, storage=storage)

    return {
        "Throttle(quotas)": (throttle(),),
        "RateLimitBackoff": (resilient.RateLimitBackoff(storage=storage),),
        "CircuitBreaker": (resilient.CircuitBreaker(storage=storage),),
        "full chain": resilient.chain(
            resilient.Retry(),
            resilient.CircuitBreaker(storage=storage),
            resilient.RateLimitBackoff(storage=storage),
            throttle(),
        ),
    }


async def _shutdown(policies: tuple[Any, ...]) -> None:
    """Drain each policy's background Redis work, then close its connections."""
    for policy in getattr(policies[0], "policies", policies):
        for name in ("_shared", "_quotas", "_store"):
            part = getattr(policy, name, None)
            if part is None:
                continue
            drain = getattr(part, "drain", None)
            if drain is not None:
                await drain()
            store = getattr(part, "_store", None)
            if store is not None:
                await store.close()


async def _timed_calls(
    handler: ClientHandlerType, req: ClientRequest, n: int
) -> tuple[float, float]:
    """Median µs of ``n`` sequential calls, each timed alone, and the share of them that
    took at least one proxy delay (waited for Redis); background work between them is
    given a few proxy delays, untimed."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await handler(req)
        times.append(time.perf_counter() - t0)
        await asyncio.sleep(3 * DELAY)
    return statistics.median(times) * 1e6, sum(t >= DELAY for t in times) / n


async def _trips(redis_port: int, progress: Progress) -> list[dict[str, Any]]:
    """Round trips on the caller's path per request: (µs through the delay proxy − µs in
    memory) / µs of one PING through the proxy, for each policy alone and the chain."""
    from resilient.storage._redis import RedisStore
    from resilient.testing import SimulatedAPI

    from .._delay_proxy import DelayProxy

    async with SimulatedAPI(quota=None) as api:
        req, resp = await _prefetch(api.url + PATH)

    async def bare(_: ClientRequest) -> ClientResponse:
        return resp

    rows: list[dict[str, Any]] = []
    counter = RedisStore(f"redis://127.0.0.1:{redis_port}/0")  # counts, past the proxy
    direct = counter.limits.bridge.get_connection()
    async with DelayProxy(redis_port, DELAY) as proxy:
        store = RedisStore(proxy.url)
        conn = store.limits.bridge.get_connection()
        await conn.ping()
        ping = await _round_trip(conn.ping, 30)
        await store.close()
        memory, shared = _trip_variants("memory://"), _trip_variants(proxy.url)
        try:
            for name in memory:
                progress.set_label(f"shared: round trips, {name}")
                on_memory = build_client_middlewares(bare, memory[name])
                on_redis = build_client_middlewares(bare, shared[name])
                await _timed_calls(on_memory, req, 5)  # warm-up: connections, scripts
                await _timed_calls(on_redis, req, 5)
                mem, _ = await _timed_calls(on_memory, req, TRIP_CALLS)
                before = await _commands(direct)
                red, waiting = await _timed_calls(on_redis, req, TRIP_CALLS)
                after = await _commands(direct)
                rows.append({
                    "variant": f"round trips per request: {name}",
                    "µs/req": red,
                    "round trips": (red - mem) / ping,
                    "Redis scripts/req": (after[1] - before[1]) / TRIP_CALLS,
                    "callers waiting": waiting,
                })  # fmt: skip
        finally:
            for policies in shared.values():
                await _shutdown(policies)
            await counter.close()
    rows.insert(
        0,
        {
            "variant": f"round trip through the {DELAY * 1e3:g} ms proxy: PING",
            "µs/req": ping,
            "round trips": 1.0,
        },
    )
    return rows


# --- b. four processes, one quota ------------------------------------------------------


async def _spawn(url: str, storage: str, count: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks._shared_worker",
        url,
        storage,
        str(QUOTA),
        str(count),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _ready(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
    if line.strip() != b"ready":
        raise RuntimeError(f"worker did not start: {await _stderr(proc)}")


async def _stderr(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    return (await proc.stderr.read()).decode(errors="replace")[-500:]


async def _result(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker exited {proc.returncode}: {err.decode()[-500:]}")
    data: dict[str, Any] = json.loads(out)
    return data


async def _share(storage: str, count: int) -> dict[str, Any]:
    """Four workers against one SimulatedAPI, started together."""
    from resilient.testing import SimulatedAPI

    async with SimulatedAPI(quota=(QUOTA, WINDOW), retry_after="seconds") as api:
        procs = [await _spawn(api.url + PATH, storage, count) for _ in range(PROCESSES)]
        try:
            await asyncio.gather(*(_ready(p) for p in procs))
            t0 = asyncio.get_running_loop().time()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            results = await asyncio.gather(*(_result(p) for p in procs))
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        arrivals = [(entry.time - t0, entry.status) for entry in api.log]
    return {"results": results, "arrivals": arrivals}


def _share_row(label: str, total: int, measured: dict[str, Any]) -> dict[str, Any]:
    results, arrivals = measured["results"], measured["arrivals"]
    statuses = [s for r in results for s in r["statuses"]]
    ok = sum(isinstance(s, int) and 200 <= s < 300 for s in statuses)
    elapsed = max(e for r in results for e in r["ends"]) - min(r["started"] for r in results)
    ideal = (math.ceil(total / QUOTA) - 1) * WINDOW
    return {
        "variant": label,
        "ok": ok,
        "failed": total - ok,
        "429s received": sum(status == 429 for _, status in arrivals),
        "max in any 1 s": _max_in_window(arrivals),
        "time s": elapsed,
        "ideal s": ideal,
        "rate / quota": ok / elapsed / (QUOTA / WINDOW) if ok == total and elapsed else None,
        "ideal / time": ideal / elapsed if ok == total and elapsed else None,
        "window pacing": _pacing(arrivals, total) if ok == total else None,
    }


def _pacing(arrivals: list[tuple[float, int]], total: int) -> float | None:
    """``k`` windows / the time from the first arrival to the first of the ``k+1``-th
    window's requests, ``k = ceil(total / Q) − 1``: 1.0 when each window's requests start
    exactly one window after the previous one's (what the throttle controls; the time to
    push a window's requests through the machine is not counted)."""
    times = sorted(t for t, _ in arrivals)
    k = math.ceil(total / QUOTA) - 1
    if k < 1 or len(times) <= k * QUOTA:
        return None
    span = times[k * QUOTA] - times[0]
    return k * WINDOW / span if span > 0 else None


# --- the scenario ----------------------------------------------------------------------


COLUMNS = [
    "variant",
    "µs/req",
    "round trips",
    "Redis scripts/req",
    "callers waiting",
    "ok",
    "failed",
    "429s received",
    "max in any 1 s",
    "time s",
    "ideal s",
    "rate / quota",
    "ideal / time",
    "window pacing",
]


def _not_run(reason: str) -> ScenarioResult:
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup="needs redis-server (Debian: apt-get install redis-server; `make redis`)",
        columns=["status", "reason"],
        rows=[{"status": "not run", "reason": reason}],
        targets=[
            Target(name, goal, "not run", None, reason)
            for name, goal in (
                (COST_NAME, f"≤ {COST_TARGET:g} round trips"),
                ("round trips per request on the caller's path: full chain", "≤ 1"),
                (f"{PROCESSES} processes on one quota: 429s", "0"),
                (f"{PROCESSES} processes on one quota: window pacing", f"≥ {FIDELITY_TARGET:.0%}"),
            )
        ],
    )


def run(cfg: Config, progress: Progress) -> ScenarioResult:
    from resilient.testing import RedisServer, find_redis_server

    binary = find_redis_server()
    if binary is None:
        return _not_run("redis-server not found on PATH or in /usr/bin, /usr/sbin")
    if importlib.util.find_spec("redis") is None:
        return _not_run("redis-py not installed (pip install 'aiohttp-resilient[redis]')")
    server = RedisServer(binary)
    server.start()
    try:
        cost = run_real(_cost(server.url, cfg, progress), LIMIT)
        trips = run_real(_trips(server.port, progress), LIMIT)
        count = _per_process(cfg)
        total = PROCESSES * count
        share: dict[str, dict[str, Any]] = {}
        for label, storage in (("memory://", "memory://"), ("Redis", server.url)):
            progress.set_label(f"shared: {PROCESSES} processes, {label}")
            server.flush()
            share[label] = run_real(_share(storage, count), LIMIT)
            progress.advance()
    finally:
        server.stop()
    rows, path, tight = _cost_rows(cost)
    memory_row = _share_row(
        f"{PROCESSES} processes, memory:// (a quota each)", total, share["memory://"]
    )
    redis_row = _share_row(f"{PROCESSES} processes, one Redis quota", total, share["Redis"])
    rows += [memory_row, redis_row, *trips]
    fidelity = redis_row["window pacing"] or 0.0
    rtt = rows[0]["µs/req"]
    return ScenarioResult(
        name=NAME,
        title=TITLE,
        setup=(
            f"a. Throttle(1e6, burst=10**6, quotas='{COST_QUOTAS}') in-process as in 1b, "
            f"storage=redis:// vs memory://, {_cost_sizes(cfg)[0]} interleaved rounds x "
            f"{_cost_sizes(cfg)[1]} sequential calls; round trip = median PING through the "
            "same redis-py client, same rounds. Local redis-server (persistence off). "
            f"b. {PROCESSES} worker processes x {count} concurrent GET {PATH} against "
            f"SimulatedAPI(quota=({QUOTA}, {WINDOW:g} s)) in the benchmark process (real "
            f"time); each: resilient.session(RateLimitBackoff(storage=S), Throttle(rate={QUOTA}"
            f", burst=5, quotas='{QUOTA}/second', storage=S)), S = the Redis or memory://."
        ),
        columns=COLUMNS,
        rows=rows,
        targets=[
            Target(
                COST_NAME,
                f"≤ {COST_TARGET:g} round trips",
                f"{path:.2f} round trips",
                path <= COST_TARGET,
                f"Redis − memory = {path * rtt:.0f} µs, round trip (PING) {rtt:.0f} µs "
                f"({path * rtt / rows[1]['µs/req']:.2f} EVALSHA round trips); back-to-back "
                f"{tight:.2f} round trips (background landings' CPU included).",
            ),
            Target(
                "round trips per request on the caller's path: full chain",
                "≤ 1",
                f"{trips[-1]['round trips']:.2f}",
                trips[-1]["round trips"] <= 1.0,
                "through a proxy adding "
                f"{DELAY * 1e3:g} ms to every Redis reply: "
                + ", ".join(
                    f"{r['variant'].split(': ')[1]} {r['round trips']:.2f}" for r in trips[1:]
                )
                + "; callers waiting for Redis: "
                + ", ".join(
                    f"{r['variant'].split(': ')[1]} {r['callers waiting']:.0%}" for r in trips[1:]
                ),
            ),
            Target(
                f"{PROCESSES} processes on one quota: 429s",
                "0",
                str(redis_row["429s received"]),
                redis_row["429s received"] == 0,
            ),
            Target(
                f"{PROCESSES} processes on one quota: window pacing",
                f"≥ {FIDELITY_TARGET:.0%}",
                f"{fidelity:.1%}",
                fidelity >= FIDELITY_TARGET and redis_row["ok"] == total,
            ),
        ],
        notes=[
            "Caller's path: one round trip (the quota_board script) is all a request waits "
            "for; its landing (the quota_land script, a second EVALSHA) runs in the "
            "background after the response. Redis scripts/req counts both, as Redis counted "
            f"them (EVALSHA calls); inside them Redis ran {cost['inner']:.1f} commands per "
            "request (TIME, ZREMRANGEBYSCORE, ZCARD, LINDEX, ZADD, EXPIRE; TIME, ZREM, "
            "LPUSH, LTRIM, EXPIRE).",
            "Back-to-back: nothing overlaps the landings, so their client-side CPU (redis-py "
            "packing and parsing, the event loop's socket I/O: most of a loopback round "
            "trip) is paid inside the loop, and each of the two sends per request wakes "
            "redis-server on the same cores. A real request's own network time overlaps it.",
            "Round trips (part c): a busy key's requests take places leased ahead in one "
            "script call (demand + 1 places, at most a quarter of the room left, renewed in "
            "the background), so a caller waits for Redis only when its process holds none; "
            "near the limit every request boards alone. Part a's paced calls drain between "
            "calls (every spare handed back, the demand forgotten): each boards alone, as "
            "before; back-to-back calls lease.",
            "4 processes: time s runs from the start signal to the last response (worker "
            "clocks, time.time()); rate / quota = ok / time / quota (ideal s: the fastest "
            "schedule a moving window allows, (ceil(total/quota) − 1) windows). max in any "
            f"1 s: most requests the server saw in any {WINDOW:g} s window (429s too). Four "
            f"Throttles of rate {QUOTA}/s release {PROCESSES * QUOTA} tokens/s together, so the "
            "shared window alone paces them: a full window goes at once, and the ideal "
            "schedule is above 100 % of the quota; ideal / time compares the run with that "
            "fastest schedule, start-up and the time to push a window's requests through "
            "this machine included. window pacing (the target) = k windows / (first request "
            "of the (k+1)-th window − first request), k = ceil(total/quota) − 1: how close to "
            "one window apart the shared throttle starts each window.",
        ],
        series={
            "times_us": cost["times"],
            "quota": QUOTA,
            "window": WINDOW,
            "arrivals": {label: value["arrivals"] for label, value in share.items()},
        },
    )
