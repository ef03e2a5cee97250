"""The tests' ``redis-server``: :class:`resilient.testing.RedisServer`, or a skip.

``make test`` finds ``redis-server`` on PATH (Debian: ``apt-get install redis-server``;
``.ci/run`` and ``make test`` as root install it). Without it, Redis tests skip locally
and fail under ``CI=true``: CI never passes by skipping them.
"""

from __future__ import annotations

from required import missing

from resilient.testing import RedisServer, find_redis_server

__all__ = ["new_redis_server"]


def new_redis_server() -> RedisServer:
    """A stopped server; skip (fail under CI=true) when ``redis-server`` is missing."""
    binary = find_redis_server()
    if binary is None:
        missing("redis-server not found (Debian: apt-get install redis-server)")
    return RedisServer(binary)
