"""Key functions: map a request to the string that names its per-key state."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import ClientRequest

__all__ = ["KeyFunc", "by_host"]

KeyFunc = Callable[[ClientRequest], str]
"""A key function: ``(request) -> key``. Throttle, pause and breaker state is per key."""


def by_host(request: ClientRequest) -> str:
    """``scheme://host:port`` of the request (the default key)."""
    url = request.url
    return f"{url.scheme}://{url.raw_host}:{url.port}"
