"""The tests' ``redis-server``: :class:`resilient.testing.RedisServer`, or a skip.

``make test`` finds ``redis-server`` on PATH (Debian: ``apt-get install redis-server``;
``.ci/run`` and ``make test`` as root install it). Without it, Redis tests skip locally
and fail under ``CI=true``: CI never passes by skipping them.
"""

from __future__ import annotations

from required import missing

from resilient.testing import RedisServer, find_redis_server

__all__ = ["evalsha_calls", "new_redis_server"]


def new_redis_server() -> RedisServer:
    """A stopped server; skip (fail under CI=true) when ``redis-server`` is missing."""
    binary = find_redis_server()
    if binary is None:
        missing("redis-server not found (Debian: apt-get install redis-server)")
    return RedisServer(binary)


async def evalsha_calls(url: str) -> int:
    """Scripts the Redis at ``url`` has run (``INFO commandstats``), over a connection of
    its own."""
    import redis.asyncio  # the redis extra: only Redis tests call this

    direct = redis.asyncio.Redis.from_url(url)
    try:
        stats = await direct.info("commandstats")
    finally:
        await direct.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
