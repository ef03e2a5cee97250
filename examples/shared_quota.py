"""Several worker processes share one API quota, one 429 pause and one breaker on Redis.

    .venv/bin/python examples/shared_quota.py [REDIS_URL]

Without ``REDIS_URL`` it starts a throwaway ``redis-server`` (Debian's package) on a
free loopback port. It serves ``resilient.testing.SimulatedAPI`` with a quota of 20
requests per second per business, then runs 3 worker processes of 30 requests each,
all through ``sage.policies(storage=REDIS_URL)``: together they never exceed the
quota, so the server answers no 429. Prints each worker's statuses and the server's
count of 429s.
"""

from __future__ import annotations

import asyncio
import collections
import sys

import aiohttp

from resilient import sage
from resilient.testing import RedisServer, SimulatedAPI, find_redis_server

QUOTA = 20
"""Requests per second per business at the simulated server (and in the Throttle)."""
WORKERS = 3
REQUESTS = 30


async def worker(base_url: str, redis_url: str) -> None:
    """One process: REQUESTS concurrent GETs through the Sage profile on shared Redis."""
    policies = sage.policies(
        storage=redis_url, throttle={"rate": QUOTA, "burst": 5, "quotas": f"{QUOTA}/second"}
    )
    async with aiohttp.ClientSession(middlewares=policies) as session:

        async def one() -> int:
            headers = {"X-Business": "b1"}
            async with session.get(base_url + "/contacts", headers=headers) as resp:
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(REQUESTS)))
    print(dict(collections.Counter(statuses)))


async def main(redis_url: str | None) -> None:
    redis = None
    if redis_url is None:
        binary = find_redis_server()
        if binary is None:
            raise SystemExit("redis-server not found: apt-get install redis-server")
        redis = RedisServer(binary)
        redis.start()
        redis_url = redis.url
    try:
        async with SimulatedAPI(quota=(QUOTA, 1.0)) as api:
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--worker", api.url, redis_url
                )
                for _ in range(WORKERS)
            ]
            await asyncio.gather(*(p.wait() for p in procs))
            print(f"server: {len(api.log)} requests, {sum(e.status == 429 for e in api.log)} 429s")
    finally:
        if redis is not None:
            redis.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        asyncio.run(worker(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
