"""``chain()`` orders policies; ``session()`` builds a ClientSession around them."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import ClientMiddlewareType

from ._policy import Policy

__all__ = ["DEFAULT_TIMEOUT", "chain", "session"]

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(
    total=None, connect=60.0, sock_connect=30.0, sock_read=120.0
)
"""``session()``'s timeout: no total (a 429 may ask for a 24-hour wait, and aiohttp's
``total`` wraps the whole middleware chain), but finite connect and read timeouts."""


def chain(*policies: ClientMiddlewareType) -> tuple[ClientMiddlewareType, ...]:
    """Return ``policies`` outermost first in the recommended order.

    Order: auth -> Hedge -> Retry -> CircuitBreaker -> RateLimitBackoff ->
    ConcurrencyLimit -> Throttle -> fault injection, then any other middlewares in the
    order given (innermost, so they run on every wire attempt). Two policies of one kind
    are rejected. With a RateLimitBackoff and a Throttle, the key has one learned rate: the
    backoff's, capped by the Throttle's rate (an adaptive Throttle keyed alike reads it, see
    :meth:`Throttle.follow`).
    """
    seen: dict[str, Policy] = {}
    ours: list[Policy] = []
    others: list[ClientMiddlewareType] = []
    for policy in policies:
        if isinstance(policy, Policy):
            if policy.kind in seen:
                raise ValueError(
                    f"chain: two {policy.kind} policies ({seen[policy.kind]!r} and {policy!r});"
                    " a chain holds at most one of each kind"
                )
            seen[policy.kind] = policy
            ours.append(policy)
        elif callable(policy):
            others.append(policy)
        else:
            raise TypeError(f"chain: {policy!r} is not a middleware (not callable)")
    ours.sort(key=lambda p: p.order)
    backoff, throttle = seen.get("rate_limit_backoff"), seen.get("throttle")
    if backoff is not None and throttle is not None:  # one learned rate per key, capped
        backoff.cap_rate(throttle.rate)  # type: ignore[attr-defined]
        throttle.follow(backoff.rate, backoff.key)  # type: ignore[attr-defined]
    return (*ours, *others)


def session(*policies: ClientMiddlewareType, **kwargs: Any) -> aiohttp.ClientSession:
    """``aiohttp.ClientSession(middlewares=chain(*policies), **kwargs)``.

    Unless ``timeout`` is given, uses :data:`DEFAULT_TIMEOUT` (``total=None``, finite
    connect/read timeouts) so that long waits can happen. Must be called inside a
    running event loop, like ``ClientSession`` itself.
    """
    if "middlewares" in kwargs:
        raise ValueError("session: pass the policies positionally, not as middlewares=")
    kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
    return aiohttp.ClientSession(middlewares=chain(*policies), **kwargs)
