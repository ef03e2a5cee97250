"""Key functions: map a request to the string that names its per-key state."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import ClientRequest

__all__ = ["KeyFunc", "by_host"]

KeyFunc = Callable[[ClientRequest], str]
"""A key function: ``(request) -> key``. Throttle, pause and breaker state is per key."""


def by_host(request: ClientRequest) -> str:
    """``scheme://host[:port]`` of the request (the default key; a default port is omitted)."""
    url = request.url
    return url.scheme + "://" + (url.host_port_subcomponent or "")
