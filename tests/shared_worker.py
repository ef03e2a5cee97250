"""A client in another OS process, for the shared-storage tests.

``python tests/shared_worker.py POLICY URL REDIS_URL N``: send N concurrent GETs to
URL through one policy on REDIS_URL and print one JSON list of outcomes (a status,
or an exception's class name). POLICY: ``quota`` (Throttle, ``5/second``), ``pause``
(RateLimitBackoff), ``breaker`` (CircuitBreaker, min_calls=2).
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp

import resilient


def _policy(name: str, redis_url: str) -> resilient.Policy:
    if name == "quota":
        return resilient.Throttle(1000.0, burst=1000, quotas="5/second", storage=redis_url)
    if name == "pause":
        return resilient.RateLimitBackoff(max_wait=30.0, storage=redis_url)
    if name == "breaker":
        return resilient.CircuitBreaker(min_calls=2, open_for=60.0, storage=redis_url)
    raise SystemExit(f"unknown policy {name!r}")


async def main(name: str, url: str, redis_url: str, count: int) -> None:
    policy = _policy(name, redis_url)

    async def one(session: aiohttp.ClientSession) -> int | str:
        try:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async with aiohttp.ClientSession(middlewares=(policy,)) as session:
        outcomes = await asyncio.gather(*(one(session) for _ in range(count)))
    print(json.dumps(outcomes))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
