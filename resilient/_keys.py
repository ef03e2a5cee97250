"""Key functions: map a request to the string that names its per-key state."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import ClientRequest

__all__ = ["KeyFunc", "by_host"]

KeyFunc = Callable[[ClientRequest], str]
"""A key function: ``(request) -> key``. Throttle, pause and breaker state is per key."""


_HOST = "_resilient_by_host"
"""Where :func:`by_host` keeps its answer on the request (every policy asks for it)."""


def by_host(request: ClientRequest) -> str:
    """``scheme://host[:port]`` of the request (the default key; a default port is omitted).

    Computed once per request and kept in its ``__dict__``: the policies of one chain all
    key by it, and a request's URL does not change (aiohttp makes a new request for a
    redirect)."""
    cache = vars(request)
    key: str | None = cache.get(_HOST)
    if key is None:
        url = request.url
        key = cache[_HOST] = url.scheme + "://" + (url.host_port_subcomponent or "")
    return key
