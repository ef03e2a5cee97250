"""One client of the ``instructions`` scenario, run as its own process (under valgrind).

``python -m benchmarks._instructions_client LABEL COUNT CONCURRENCY URL``: the client that
``benchmarks._clients.make_clients`` names ``LABEL`` (or a no-op middlewares one, or
the chain on a plain session)
makes ``COUNT`` GETs of ``URL`` with ``CONCURRENCY`` workers, after a warm-up of
``2 x CONCURRENCY`` calls, and exits 1 if any failed.
"""

from __future__ import annotations

import asyncio
import sys
from functools import partial

from ._clients import (
    PLAIN,
    Client,
    OnePassthroughClient,
    PassthroughClient,
    ResilientOptions,
    make_clients,
    timed,
)
from ._harness import gather_calls


def client_named(label: str) -> Client:
    """A fresh client of ``label`` (a name of :func:`make_clients`, or the no-op one)."""
    for noop in (PassthroughClient, OnePassthroughClient):
        if label == noop.name:
            return noop()
    for spec in make_clients(variants=[(PLAIN, ResilientOptions(plain_session=True))]):
        if spec.label == label:
            return spec.factory()
    raise ValueError(f"no benchmark client is named {label!r}")


async def main(label: str, count: int, concurrency: int, url: str) -> int:
    async with client_named(label) as client:
        call = partial(timed, client, "GET", url)
        await gather_calls(call, 2 * concurrency, concurrency)
        outcomes = await gather_calls(call, count, concurrency)
    return 1 if any(not o.ok for o in outcomes) else 0


if __name__ == "__main__":
    label, count, concurrency, url = sys.argv[1:5]
    sys.exit(asyncio.run(main(label, int(count), int(concurrency), url)))
