"""From aiohttp-retry to resilient: the same calls, side by side, against the simulated API.

    .venv/bin/python examples/migrate_aiohttp_retry.py

Three situations, each run once through aiohttp-retry's ``RetryClient`` (configured as
its users commonly do) and once through ``resilient.session``, against
``resilient.testing.SimulatedAPI`` started in-process:

1. 20 % of the replies are 503: how many calls succeed, and how many requests the
   server had to answer.
2. The server creates an invoice, then the connection drops before the reply: how many
   invoices exist afterwards (a POST re-sent blindly creates a second one).
3. A server bug: every ``GET /contacts`` answers 500. How many requests 20 calls cost
   (500 is not transient: resilient does not retry it by default).

Prints one table. Needs aiohttp-retry (``pip install aiohttp-retry``; ``make test``
installs it); without it, only resilient's column is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

import resilient
from resilient.testing import SimulatedAPI

CALLS = 100
"""GETs in the 503 situation."""
BUGGY = 20
"""GETs in the 500 situation."""
INVOICE = {"sales_invoice": {"contact_id": "1", "date": "2026-05-01"}}

Row = dict[str, str]


# --- before: aiohttp-retry -------------------------------------------------------------


@contextlib.asynccontextmanager
async def aiohttp_retry_client() -> AsyncIterator[Any]:
    """aiohttp-retry as it is commonly set up: exponential backoff, 4 attempts, retry on
    429 and every 5xx, and on network errors, for every method."""
    from aiohttp_retry import ExponentialRetry, RetryClient

    options = ExponentialRetry(
        attempts=4,
        start_timeout=0.1,  # waits 0.1, 0.2, 0.4 s
        max_timeout=30.0,
        statuses={429},  # plus every 5xx (retry_all_server_errors=True by default)
        exceptions={aiohttp.ClientConnectionError},
    )
    async with RetryClient(retry_options=options) as client:
        yield client


# --- after: resilient ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def resilient_client() -> AsyncIterator[aiohttp.ClientSession]:
    """The same intent with resilient: 4 attempts with full jitter and a retry budget,
    502/503/504 only (500 is a bug), a POST re-sent only when it provably was not
    processed, and 429 handled by one shared pause that honours ``Retry-After``."""
    async with resilient.session(
        resilient.Retry(attempts=4, backoff=resilient.FullJitter(base=0.1, cap=30.0)),
        resilient.RateLimitBackoff(max_wait=300.0),
    ) as session:
        yield session


# --- the three situations --------------------------------------------------------------


async def flaky(client: Any) -> str:
    async with SimulatedAPI(quota=None, error_rate=0.2, seed=3) as api:

        async def one(i: int) -> int:
            async with client.get(f"{api.url}/contacts/{i % 50 + 1}") as resp:
                await resp.read()
                return int(resp.status)

        statuses = await asyncio.gather(*(one(i) for i in range(CALLS)))
        ok = sum(s == 200 for s in statuses)
        return f"{ok}/{CALLS} ok, {len(api.log)} server requests"


async def dropped_post(client: Any) -> str:
    async with SimulatedAPI(quota=None) as api:
        api.inject("/sales_invoices", "drop_after")  # processed, then the connection drops
        try:
            async with client.post(api.url + "/sales_invoices", json=INVOICE) as resp:
                outcome = f"HTTP {resp.status}"
        except aiohttp.ClientError as exc:
            outcome = type(exc).__name__
        return f"{len(api.invoices)} invoice(s) created ({outcome})"


async def server_bug(client: Any) -> str:
    async with SimulatedAPI(quota=None, fail_paths=("/contacts",)) as api:

        async def one() -> int:
            async with client.get(api.url + "/contacts") as resp:
                await resp.read()
                return int(resp.status)

        statuses = await asyncio.gather(*(one() for _ in range(BUGGY)))
        failed = sum(s == 500 for s in statuses)
        return f"{failed}/{BUGGY} answered 500, {len(api.log)} server requests"


SITUATIONS: dict[str, Callable[[Any], Any]] = {
    "20 % 503s": flaky,
    "dropped reply to a POST": dropped_post,
    "every GET answers 500": server_bug,
}


async def run(make_client: Callable[[], Any]) -> Row:
    row: Row = {}
    for name, situation in SITUATIONS.items():
        async with make_client() as client:
            row[name] = await situation(client)
    return row


async def main() -> None:
    columns: dict[str, Row] = {}
    try:
        import aiohttp_retry  # noqa: F401
    except ImportError:
        print("aiohttp-retry is not installed (pip install aiohttp-retry): resilient only")
    else:
        columns["aiohttp-retry"] = await run(aiohttp_retry_client)
    columns["resilient"] = await run(resilient_client)
    width = max(len(name) for name in SITUATIONS)
    for name in SITUATIONS:
        print(f"{name:<{width}}")
        for client, row in columns.items():
            print(f"    {client:<14} {row[name]}")


if __name__ == "__main__":
    asyncio.run(main())
