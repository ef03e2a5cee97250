"""One Redis connection per policy, shared with ``limits``, and the Lua scripts run on it.

The client is ``limits``' async Redis storage built with the ``redis-py``
implementation (one Redis library serves quotas, pauses and breakers); our scripts
run on that storage's own connection pool. Every key starts with ``resilient:`` and
holds the policy key in a hash tag (``{key}``), so one key's data lives on one
Redis Cluster slot and each script is atomic.

Time in Redis is Redis's own clock (``TIME``, inside the scripts): an absolute end
(a pause, an open circuit, a window slot) is written and compared on one clock, so
clock skew between client hosts changes nothing. Only *durations* cross the wire,
and each process turns them into its own event-loop time.

Bounded failure: every call is given :data:`STORAGE_TIMEOUT` seconds in all (connect
timeout :data:`SOCKET_TIMEOUT`, one immediate retry for a stale pooled connection, as after
a Redis restart); any Redis or socket error becomes :class:`~resilient.StorageError`
naming the storage without credentials. There is no per-reply socket timeout: redis-py
waits for a reply with ``asyncio.wait_for``, which on Python 3.11 can swallow the
caller's cancellation (84 of 373 cancelled calls finished normally in a probe), and a
read timeout made redis-py send a script again, counting a slot or an outcome twice.
Our own :data:`STORAGE_TIMEOUT` bounds the wait instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

from .._errors import StorageError
from ..observe._log import logger
from . import redact

__all__ = [
    "KEY_PREFIX",
    "SOCKET_TIMEOUT",
    "STORAGE_TIMEOUT",
    "WARN_EVERY",
    "RedisStore",
    "seconds",
    "tag",
    "text",
]

KEY_PREFIX = "resilient"
"""First part of every Redis key written by ``resilient`` (``limits`` included)."""
SOCKET_TIMEOUT = 1.0
"""Seconds to connect to Redis."""
STORAGE_TIMEOUT = 2.0
"""Seconds one storage call may take in all before it fails with ``StorageError``."""
WARN_EVERY = 10.0
"""With ``on_storage_error="allow"``: seconds between two warnings of one store."""


T = TypeVar("T")


def _same(reply: Any) -> Any:
    return reply


def seconds(value: object, cap: float) -> float:
    """A duration from a script's reply, at most ``cap``; ValueError unless finite and >= 0."""
    number = float(value.decode() if isinstance(value, bytes) else value)  # type: ignore[arg-type]
    if not 0.0 <= number < math.inf:
        raise ValueError(number)
    return min(number, cap)


def text(value: object) -> str:
    """A string from a script's reply (redis-py gives bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def tag(key: str) -> str:
    """``{key}``: the Redis Cluster hash tag that keeps one policy key's data together."""
    return "{" + key + "}"


def _script(name: str) -> str:
    """``resilient/<name>.lua`` (``"breaker/breaker"``: each script lives in its policy's
    folder), with the learned-rate law's constants written into its ``--@CONSTANTS``
    line (one source of truth: :mod:`resilient.ratelimit._learned`)."""
    source = resources.files("resilient").joinpath(f"{name}.lua").read_text("utf-8")
    return source.replace("--@CONSTANTS", _learned_constants(), 1)


def _learned_constants() -> str:
    from ..ratelimit import _learned as law

    names = ("BETA", "PLATEAU", "CUBIC_C", "DOUBLING", "SPAN", "MIN_SPAN", "MIN_RATE")
    lines = [f"local {name} = {getattr(law, name)!r}" for name in names]
    lines += [
        f"local SLOW_START_MIN = {law.SLOW_START_MIN!r}",
        f"local BUCKETS = {law.BUCKETS!r}",
    ]
    return "\n".join(lines)


class RedisStore:
    """A Redis reached through ``limits``' storage (built lazily, inside the event loop).

    ``run(name, keys, args)`` runs ``resilient/<name>.lua`` atomically (EVALSHA, loading the
    script once). ``name`` is the storage URI without credentials.
    """

    __slots__ = ("_limits", "_scripts", "_uri", "_warned", "name")

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self.name = redact(uri)
        self._limits: Any = None
        self._scripts: dict[str, Any] = {}
        self._warned = -WARN_EVERY

    @property
    def limits(self) -> Any:
        """``limits``' async Redis storage on this URI (redis-py implementation)."""
        if self._limits is None:
            self._limits = _limits_storage(self._uri)
        return self._limits

    async def run(
        self, name: str, keys: list[str], args: list[Any], parse: Callable[[Any], T] = _same
    ) -> T:
        """``parse(reply)`` of script ``name``, or StorageError within :data:`STORAGE_TIMEOUT`.

        A reply ``parse`` rejects (ValueError, TypeError, IndexError) is a StorageError
        too: a Redis that answers nonsense never crashes a request in another way.
        """
        try:
            async with asyncio.timeout(STORAGE_TIMEOUT):
                script = self._scripts.get(name)
                if script is None:
                    connection = self.limits.bridge.get_connection()
                    script = self._scripts[name] = connection.register_script(_script(name))
                reply = await script(keys=keys, args=args)
            return parse(reply)
        except (ValueError, TypeError, IndexError):
            raise StorageError(self.name, "malformed reply") from None
        except (OSError, TimeoutError) as exc:
            raise StorageError(self.name, type(exc).__name__) from None
        except Exception as exc:
            if _is_redis_error(exc):
                raise StorageError(self.name, type(exc).__name__) from None
            raise

    def warn(
        self,
        policy: str,
        exc: StorageError,
        now: float,
        then: str = "going on with this process's own state (on_storage_error='allow')",
    ) -> None:
        """Log ``exc`` and what ``policy`` does ``then``, at most every :data:`WARN_EVERY` s."""
        if now - self._warned >= WARN_EVERY and logger.isEnabledFor(logging.WARNING):
            self._warned = now
            logger.warning("%s: %s; %s", policy, exc, then)

    async def close(self) -> None:
        """Close the connection pool (a later call reconnects)."""
        if self._limits is not None:
            await self._limits.bridge.get_connection().aclose()

    def __repr__(self) -> str:
        return f"RedisStore({self.name!r})"


def _limits_storage(uri: str) -> Any:
    """``limits``' storage for ``uri``; a missing ``redis`` package names the extra."""
    try:
        import redis.asyncio.retry
        import redis.backoff
    except ImportError:  # pragma: no cover - the redis extra is installed in tests
        raise ImportError(
            "shared storage needs redis-py: pip install 'aiohttp-resilient[redis]'"
        ) from None
    from limits.storage import storage_from_string

    options: dict[str, Any] = {
        "socket_timeout": None,  # see the module docstring: our own timeout bounds each call
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "retry": redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 1),  # a stale socket
    }
    return storage_from_string(
        "async+" + uri, implementation="redispy", key_prefix=KEY_PREFIX, **options
    )


def _is_redis_error(exc: Exception) -> bool:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, RedisError)
