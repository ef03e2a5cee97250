"""A client in another OS process for the quota-lease tests (test_quota_lease.py).

``python tests/throttle/lease_worker.py URL REDIS_URL QUOTAS LANES COUNT``: LANES lanes,
each sending COUNT GETs to URL one after another, all through one
``Throttle(1000, burst=1000, quotas=QUOTAS, storage=REDIS_URL)`` in a ``chain()``.
Prints one JSON object: ``statuses``; ``sends``, the wall-clock time (``time.time()``,
comparable between processes of one machine) at which each request left the policies,
taken just before it; and ``boarded``, the requests that boarded through a round trip
(the others took leased places).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

import resilient
from resilient.throttle._redis import RedisQuotas

boarded = 0
_ask = RedisQuotas.ask


async def _counted(self: RedisQuotas, key: str, in_flight: int) -> tuple[float, str]:
    global boarded
    answer = await _ask(self, key, in_flight)
    boarded += not answer[0]
    return answer


RedisQuotas.ask = _counted  # type: ignore[method-assign]


async def main(url: str, redis_url: str, quotas: str, lanes: int, count: int) -> None:
    throttle = resilient.Throttle(1000.0, burst=1000, quotas=quotas, storage=redis_url)
    sends: list[float] = []

    async def stamp(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        sends.append(time.time())
        return await handler(request)

    async def lane(session: aiohttp.ClientSession) -> list[Any]:
        statuses: list[Any] = []
        for _ in range(count):
            async with session.get(url) as resp:
                await resp.read()
                statuses.append(resp.status)
        return statuses

    quota_store: Any = throttle._quotas
    try:
        async with aiohttp.ClientSession(middlewares=(*resilient.chain(throttle), stamp)) as s:
            outcomes = await asyncio.gather(*(lane(s) for _ in range(lanes)))
    finally:
        await quota_store.drain()
        await quota_store.store.close()
    statuses = [status for statuses in outcomes for status in statuses]
    print(json.dumps({"statuses": statuses, "sends": sends, "boarded": boarded}))


if __name__ == "__main__":
    url, redis_url, quotas, lanes, count = sys.argv[1:6]
    asyncio.run(main(url, redis_url, quotas, int(lanes), int(count)))
