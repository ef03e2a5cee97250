"""One of the client processes of the ``shared`` scenario (``benchmarks/scenarios/shared.py``).

``python -m benchmarks._shared_worker URL STORAGE QUOTA COUNT``: build
``Throttle(rate=QUOTA, burst=5, quotas="QUOTA/second", storage=STORAGE)`` and
``RateLimitBackoff(storage=STORAGE)``, connect to the storage, print ``ready``, wait for
a line on stdin, then send COUNT concurrent GETs to URL and print one JSON object:
``started`` and ``ends`` (``time.time()``, comparable between processes of one
machine) and ``statuses`` (a status, or an exception's class name).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

import resilient

from ._harness import BUSINESS

BURST = 5


async def _connect(throttle: resilient.Throttle) -> None:
    """Open the Redis connection before the start (one PING), so it is not timed."""
    quotas: Any = throttle._quotas  # private: benchmark plumbing
    store = getattr(quotas, "_store", None)
    if store is not None:
        await store.limits.bridge.get_connection().ping()


async def _close(throttle: resilient.Throttle, backoff: resilient.RateLimitBackoff) -> None:
    """Let background landings reach Redis, then close the connection pools."""
    quotas: Any = throttle._quotas
    if hasattr(quotas, "drain"):
        await quotas.drain()
    for store in (getattr(quotas, "_store", None), getattr(backoff._shared, "_store", None)):
        if store is not None:
            await store.close()


async def main(url: str, storage: str, quota: int, count: int) -> None:
    throttle = resilient.Throttle(
        float(quota), burst=BURST, quotas=f"{quota}/second", storage=storage
    )
    backoff = resilient.RateLimitBackoff(storage=storage)
    headers = {"X-Business": BUSINESS}

    async def one(session: aiohttp.ClientSession) -> tuple[int | str, float]:
        try:
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                status: int | str = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            status = type(exc).__name__
        return status, time.time()

    try:
        await _connect(throttle)
        async with resilient.session(backoff, throttle) as session:
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            started = time.time()
            outcomes = await asyncio.gather(*(one(session) for _ in range(count)))
    finally:
        await _close(throttle, backoff)
    print(
        json.dumps(
            {
                "started": started,
                "ends": [end for _, end in outcomes],
                "statuses": [status for status, _ in outcomes],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
