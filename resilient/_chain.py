"""``chain()`` orders policies; ``session()`` builds a ClientSession around them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
from aiohttp import ClientMiddlewareType

from ._pipeline import Pipeline
from ._policy import Policy

__all__ = ["DEFAULT_TIMEOUT", "chain", "ordered", "session"]

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(
    total=None, connect=60.0, sock_connect=30.0, sock_read=120.0
)
"""``session()``'s timeout: no total (a 429 may ask for a 24-hour wait, and aiohttp's
``total`` wraps the whole middleware chain), but finite connect and read timeouts."""


def chain(*policies: ClientMiddlewareType) -> tuple[ClientMiddlewareType, ...]:
    """One :class:`~resilient._pipeline.Pipeline` of resilient's policies in the
    recommended order (its ``.policies``, outermost first), then the other middlewares.

    Order: auth -> Hedge -> Retry -> CircuitBreaker -> RateLimitBackoff ->
    ConcurrencyLimit -> Throttle -> fault injection, then any other middlewares in the
    order given (innermost, so they run on every wire attempt). Two policies of one kind
    are rejected. With a RateLimitBackoff and a Throttle, the key has one learned rate: the
    backoff's, capped by the Throttle's rate (an adaptive Throttle keyed alike reads it, see
    :meth:`Throttle.follow`). A Pipeline given again (an earlier ``chain()``) is opened up.
    """
    ours, others = _order(policies)
    return (Pipeline(ours), *others) if ours else others


def ordered(*policies: ClientMiddlewareType) -> tuple[ClientMiddlewareType, ...]:
    """:func:`chain`'s order as a flat tuple: the policies outermost first, then the
    other middlewares (what ``sage.policies()`` returns)."""
    ours, others = _order(policies)
    return (*ours, *others)


def _order(
    policies: Sequence[ClientMiddlewareType],
) -> tuple[tuple[Policy, ...], tuple[ClientMiddlewareType, ...]]:
    """Resilient's policies sorted (each kind once, linked: see :func:`chain`) and the
    other middlewares in the order given."""
    seen: dict[str, Policy] = {}
    ours: list[Policy] = []
    others: list[ClientMiddlewareType] = []
    for policy in _flat(policies):
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
    return tuple(ours), tuple(others)


def _flat(items: Sequence[ClientMiddlewareType]) -> Iterator[ClientMiddlewareType]:
    """``items`` with every :class:`Pipeline` (an earlier ``chain()``) opened up."""
    for item in items:
        if isinstance(item, Pipeline):
            yield from item.policies
        else:
            yield item


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
