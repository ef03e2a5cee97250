"""The tests' ``redis-server``: :class:`resilient.testing.RedisServer`, or a skip.

``make test`` finds ``redis-server`` on PATH (Debian: ``apt-get install redis-server``;
``.ci/run`` and ``make test`` as root install it). Without it, Redis tests skip locally
and fail under ``CI=true``: CI never passes by skipping them.
"""

from __future__ import annotations

import os

import pytest

from resilient.testing import RedisServer, find_redis_server

__all__ = ["new_redis_server"]


def new_redis_server() -> RedisServer:
    """A stopped server; skip (fail under CI=true) when ``redis-server`` is missing."""
    binary = find_redis_server()
    if binary is None:
        message = "redis-server not found (Debian: apt-get install redis-server)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI=true forbids skipping Redis tests")
        pytest.skip(message)
    return RedisServer(binary)
