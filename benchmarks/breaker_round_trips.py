"""Redis round trips per request of a shared ``CircuitBreaker`` alone, healthy and in an outage.

``python -m benchmarks.breaker_round_trips [--delay MS] [--calls N] [--rate R]``

The breaker (``storage=redis://...``, defaults otherwise) is called in-process as in
scenario 1b (aiohttp's ``build_client_middlewares`` around a handler that returns one
pre-fetched 200 response, or raises ``ClientConnectionError`` in the outage), ``N``
calls paced at ``R`` calls per second (after a warm-up: connected, script loaded, and
whatever the breaker knew of the key out of date). Redis is reached through a TCP proxy that holds
every reply ``MS`` milliseconds, so a round trip on a caller's path shows as time:

- *caller's path*: mean seconds a call took minus the same run's in memory, divided by
  the median round trip through the proxy (an ``EVALSHA`` of ``return 1``): what
  callers waited for, in round trips;
- *EVALSHA / call*: every script Redis ran, background work included (Redis's own
  ``INFO commandstats``, read on a direct connection).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import time
from typing import Any

import aiohttp
from aiohttp import ClientRequest, ClientResponse
from aiohttp.client_middlewares import build_client_middlewares

from .scenarios.inprocess import _prefetch


class DelayProxy:
    """TCP proxy to ``127.0.0.1:port`` that delivers every reply ``delay`` seconds late
    (in order)."""

    def __init__(self, port: int, delay: float) -> None:
        self._port = port
        self._delay = delay
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        loop = asyncio.get_running_loop()

        async def upstream() -> None:
            while chunk := await reader.read(65536):
                up_writer.write(chunk)
            up_writer.close()

        async def downstream() -> None:
            while chunk := await up_reader.read(65536):
                loop.call_later(self._delay, _write, writer, chunk)
            loop.call_later(self._delay, writer.close)

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)
        writer.close()


def _write(writer: asyncio.StreamWriter, chunk: bytes) -> None:
    with contextlib.suppress(Exception):
        writer.write(chunk)


async def _evalsha(direct: Any) -> int:
    stats = await direct.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def _run(
    name: str, breaker: Any, req: ClientRequest, handler: Any, n: int, rate: float, direct: Any
) -> dict[str, Any]:
    call = build_client_middlewares(handler, (breaker,))
    before = 0 if direct is None else await _evalsha(direct)
    times, outcomes = [], {"ok": 0, "failed": 0, "refused": 0}
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        t0 = time.perf_counter()
        try:
            await call(req)
            outcomes["ok"] += 1
        except aiohttp.ClientConnectionError:
            outcomes["failed"] += 1
        except aiohttp.ClientError as exc:  # CircuitOpenError
            outcomes["refused" if type(exc).__name__ == "CircuitOpenError" else "failed"] += 1
        times.append(time.perf_counter() - t0)
    if direct is None:  # in memory
        return {"name": name, "times": times, "evalsha": 0, **outcomes}
    await breaker._shared.drain()  # private: benchmark plumbing (background outcomes)
    evalsha = await _evalsha(direct) - before
    return {"name": name, "times": times, "evalsha": evalsha, **outcomes}


async def main(delay: float, n: int, rate: float) -> None:
    import redis.asyncio

    import resilient
    from resilient.testing import RedisServer, SimulatedAPI, find_redis_server

    logging.getLogger("resilient").setLevel(logging.ERROR)  # no "opened on ..." lines
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("redis-server not found")
    server = RedisServer(binary)
    server.start()
    proxy = DelayProxy(server.port, delay)
    try:
        await proxy.start()
        direct = redis.asyncio.Redis.from_url(server.url)
        async with SimulatedAPI(quota=None) as api:
            req, resp = await _prefetch(api.url + "/contacts/1")

        async def ok(_: ClientRequest) -> ClientResponse:
            return resp

        async def down(_: ClientRequest) -> ClientResponse:
            raise aiohttp.ClientConnectionError("refused (benchmark)")

        probe = redis.asyncio.Redis.from_url(proxy.url)
        trivial = probe.register_script("return 1")
        await trivial()
        rtts = []
        for _ in range(50):
            t0 = time.perf_counter()
            await trivial()
            rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts)
        rows, memory = [], {}
        for name, handler in (("healthy", ok), ("outage", down)):
            in_memory = resilient.CircuitBreaker()
            memory[name] = await _run(name, in_memory, req, handler, n, rate, None)
            breaker = resilient.CircuitBreaker(storage=proxy.url)
            await _run("warm-up", breaker, req, ok, 5, rate, direct)  # connected, script loaded
            await asyncio.sleep(0.5)  # what this process knew of the key is out of date
            server.flush()
            rows.append(await _run(name, breaker, req, handler, n, rate, direct))
            shared = breaker._shared
            assert shared is not None  # a Redis storage
            await shared._store.close()
        await probe.aclose()
        await direct.aclose()
    finally:
        await proxy.close()
        server.stop()
    print(
        f"round trip through the proxy (EVALSHA 'return 1'): {rtt * 1e3:.2f} ms;"
        f" {n} calls at {rate:g}/s per run"
    )
    print(
        f"{'run':<8} {'ok':>5} {'failed':>6} {'refused':>7} {'caller RT/call':>15}"
        f" {'mean ms':>8} {'p50 ms':>7} {'EVALSHA/call':>13}"
    )
    for row in rows:
        mean = statistics.fmean(row["times"])
        waited = mean - statistics.fmean(memory[row["name"]]["times"])
        print(
            f"{row['name']:<8} {row['ok']:>5} {row['failed']:>6} {row['refused']:>7}"
            f" {waited / rtt:>15.3f} {mean * 1e3:>8.3f}"
            f" {statistics.median(row['times']) * 1e3:>7.3f} {row['evalsha'] / n:>13.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.breaker_round_trips")
    parser.add_argument("--delay", type=float, default=2.0, help="ms added to every reply")
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second")
    args = parser.parse_args()
    asyncio.run(main(args.delay / 1e3, args.calls, args.rate))
