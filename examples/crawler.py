"""A crawler that fans out over many hosts: a throttle per host, one shared breaker.

    .venv/bin/python examples/crawler.py [HOSTS] [PAGES]

Starts HOSTS (default 6) simulated APIs on loopback, each its own host (its own port),
and crawls PAGES (default 30) pages of each with several workers at once. Every worker
has its own ``aiohttp.ClientSession``, but all of them share the same policy objects:

- one ``Throttle(rate=RATE, burst=BURST)``: a token bucket *per host* (its default key is
  the host), so a fast host is not held back by a slow one, and no host gets more than
  RATE requests per second from the whole crawler, however many workers there are;
- one ``CircuitBreaker()``: a circuit per host, shared by every worker, so once one host
  is seen down every worker skips it at once (``CircuitOpenError``, nothing sent) instead
  of each worker finding out on its own;
- one ``Retry(circuit_wait=0)``, whose retry budget is shared too: retries stay a
  fraction of the crawler's traffic, whatever fails; ``circuit_wait=0`` skips a dead
  host's page at once instead of waiting out the breaker's short breaks (the default,
  which suits a client with one upstream).

One host is down for the whole crawl (every request answers 503) and one answers 20 % of
its requests with 503. Prints, per host, the pages fetched, skipped by the open circuit
and failed, and the requests the host received: the dead host receives a handful, not
PAGES × attempts. The breaker's transitions are logged (logger ``resilient``, WARNING).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
from contextlib import AsyncExitStack

import aiohttp

import resilient
from resilient.testing import SimulatedAPI

RATE = 20.0
"""Requests per second per host, for the whole crawler."""
BURST = 5
WORKERS = 8
"""Sessions crawling at once (each with its own connection pool)."""
DOWN_FOR = 3_600.0
"""The dead host's outage, in seconds: longer than the crawl."""


async def crawl(urls: list[str], policies: tuple[resilient.Policy, ...]) -> dict[str, str]:
    """Fetch every URL with WORKERS sessions sharing ``policies``; url -> outcome."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)
    outcomes: dict[str, str] = {}

    async def worker() -> None:
        async with resilient.session(*policies) as session:
            while not queue.empty():
                url = queue.get_nowait()
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        outcomes[url] = "fetched" if resp.status == 200 else "failed"
                except resilient.CircuitOpenError:
                    outcomes[url] = "skipped"  # the host's circuit is open: nothing sent
                except aiohttp.ClientError:
                    outcomes[url] = "failed"

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return outcomes


async def main(hosts: int, pages: int) -> None:
    async with AsyncExitStack() as stack:
        apis: list[SimulatedAPI] = []
        for i in range(hosts):
            if i == 0:
                api = SimulatedAPI(quota=None, outages=[(0.0, DOWN_FOR)])  # down
            elif i == 1:
                api = SimulatedAPI(quota=None, error_rate=0.2, seed=i)  # flaky
            else:
                api = SimulatedAPI(quota=None)
            apis.append(await stack.enter_async_context(api))
        urls = [f"{api.url}/contacts/{page}" for page in range(1, pages + 1) for api in apis]
        policies = (
            resilient.Retry(circuit_wait=0),  # a crawler has other hosts: skip, do not wait
            resilient.CircuitBreaker(),
            resilient.Throttle(rate=RATE, burst=BURST),
        )
        outcomes = await crawl(urls, policies)

    print(f"{'host':<24} {'fetched':>7} {'skipped':>7} {'failed':>6} {'server requests':>15}")
    for i, api in enumerate(apis):
        counts = collections.Counter(o for url, o in outcomes.items() if url.startswith(api.url))
        label = api.url.removeprefix("http://") + (" (down)" if i == 0 else "")
        label += " (flaky)" if i == 1 else ""
        print(
            f"{label:<24} {counts['fetched']:>7} {counts['skipped']:>7}"
            f" {counts['failed']:>6} {len(api.log):>15}"
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    args = [int(a) for a in sys.argv[1:3]]
    asyncio.run(main(*args) if args else main(6, 30))
