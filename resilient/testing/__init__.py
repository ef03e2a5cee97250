"""Test helpers: a simulated Sage-like API server and client-side fault injection.

:class:`SimulatedAPI` is a real aiohttp server on ``127.0.0.1`` (port 0) that behaves like
the Sage Business Cloud Accounting API: per-business quota windows answered with 429
(``Retry-After`` as seconds, an HTTP-date, or absent; optional long blocks), seeded random
503s, outage windows, 500 paths, OAuth tokens that expire and rotate, 415/422/404/405,
paginated ``/contacts``, and ``POST /sales_invoices`` recorded in ``api.invoices`` so a test
can check at-most-once. ``api.log`` records every request (loop time, method, path,
business, status); ``api.inject(path, fault)`` scripts the next replies of one path.
All its time is on the event loop's clock, so ``@pytest.mark.looptime`` fast-forwards it::

    async with SimulatedAPI(quota=(200, 60.0), block_for=86_400) as api:
        async with resilient.session(resilient.RateLimitBackoff()) as s:
            async with s.get(api.url + "/contacts", headers={"X-Business": "b1"}) as r:
                ...

:class:`FaultInjection` is a client middleware that injects 503s, 429s, connection
errors and latency at seeded rates, for testing your own code against any server.

pytest fixtures (registered by the ``resilient`` pytest plugin, needing pytest-asyncio):

``simulated_api``
    a started ``SimulatedAPI()`` with the defaults, closed after the test.
``simulated_api_factory``
    ``api = await simulated_api_factory(**kwargs)`` starts a ``SimulatedAPI(**kwargs)``;
    every one is closed after the test. Use it for time-dependent set-ups (``outages``)
    in ``looptime`` tests, since fixtures run before virtual time starts.

:class:`RedisServer` runs a real ``redis-server`` on a free loopback port (persistence
off) for tests of shared storage; :func:`find_redis_server` locates the binary.
:class:`NginxServer` runs a real ``nginx`` (a ``limit_req`` rate limiter, or a reverse
proxy) on a free loopback port with a temporary config; :func:`find_nginx` locates it.
"""

from __future__ import annotations

from ._api import DROPPED, FAULTS, LogEntry, SimulatedAPI
from ._faults import FAULT_HEADER, FaultInjection
from ._nginx import NginxServer, find_nginx, limit_req_config, proxy_config
from ._redis import RedisServer, find_redis_server

__all__ = [
    "DROPPED",
    "FAULTS",
    "FAULT_HEADER",
    "FaultInjection",
    "LogEntry",
    "NginxServer",
    "RedisServer",
    "SimulatedAPI",
    "find_nginx",
    "find_redis_server",
    "limit_req_config",
    "proxy_config",
]
