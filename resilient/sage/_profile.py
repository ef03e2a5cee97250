"""Sage's defaults: ``policies()`` and ``session()``.

Rates come from the published limit, 200 calls per 60 seconds per business
(``X-Business``): a ``"200 per 60 seconds"`` quota window per business plus a
smooth token bucket of 200/60 calls per second with a small burst, adaptive (a
429 cuts the rate, successes restore it). A 429 may ask for a 24-hour wait, so
``RateLimitBackoff`` may wait that long.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import ClientMiddlewareType
from multidict import CIMultiDict

from .._chain import ordered
from .._chain import session as _session
from .._policy import Policy
from ..breaker._breaker import CircuitBreaker
from ..ratelimit._ratelimit import RateLimitBackoff
from ..retry._retry import Retry
from ..throttle._throttle import Throttle
from ._auth import ReauthorizeFunc, RefreshFunc, TokenRefresh
from ._keys import by_business

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_BURST",
    "DEFAULT_HEADERS",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_QUOTAS",
    "DEFAULT_RATE",
    "OVERRIDABLE",
    "PUBLISHED_LIMIT",
    "PUBLISHED_PERIOD",
    "policies",
    "session",
]

PUBLISHED_LIMIT = 200
"""Calls per :data:`PUBLISHED_PERIOD` per business (Sage Accounting v3 docs)."""

PUBLISHED_PERIOD = 60.0
"""Seconds of the published limit's window."""

DEFAULT_QUOTAS = f"{PUBLISHED_LIMIT} per {PUBLISHED_PERIOD:.0f} seconds"
"""The throttle's quota window (``limits`` syntax): never more than the published limit."""

DEFAULT_RATE = PUBLISHED_LIMIT / PUBLISHED_PERIOD
"""The throttle's smooth rate: 200 / 60 = 3.33 calls per second per business."""

DEFAULT_BURST = 10
"""Calls a business may make at once before the smooth rate applies."""

DEFAULT_MAX_WAIT = 86_400.0
"""Sage may ask a client to wait up to 24 hours after a 429."""

DEFAULT_BASE_URL = "https://api.accounting.sage.com/v3.1/"
"""The Accounting API; pass relative paths (``"contacts"``) to the session's methods."""

DEFAULT_HEADERS: Mapping[str, str] = {
    "Accept": "application/json",
    "Content-Type": "application/json",
}
"""Sent on every request: the API accepts only ``application/json`` (else 415)."""

_KINDS: dict[str, type[Policy]] = {
    "retry": Retry,
    "circuit_breaker": CircuitBreaker,
    "rate_limit_backoff": RateLimitBackoff,
    "throttle": Throttle,
}

OVERRIDABLE = frozenset(_KINDS)
"""Names accepted as ``policies(**overrides)``: the ``kind`` of each default policy."""


def _defaults(storage: str) -> dict[str, dict[str, Any]]:
    """Sage's keyword arguments for each policy kind."""
    return {
        "retry": {},
        "circuit_breaker": {"storage": storage},
        "rate_limit_backoff": {
            "max_wait": DEFAULT_MAX_WAIT,
            "key": by_business,
            "storage": storage,
        },
        "throttle": {
            "rate": DEFAULT_RATE,
            "burst": DEFAULT_BURST,
            "quotas": DEFAULT_QUOTAS,
            "key": by_business,
            "storage": storage,
            "adaptive": True,
        },
    }


def _build(name: str, kwargs: dict[str, Any], override: object) -> Policy | None:
    """Apply the override rule for one policy kind (see :func:`policies`)."""
    if override is None:
        return None
    if isinstance(override, Policy):
        if override.kind != name:
            raise ValueError(
                f"policies: {name}= must be a {_KINDS[name].__name__}, a dict of its keyword"
                f" arguments or None; got a {override.kind} policy ({type(override).__name__})"
            )
        return override
    if isinstance(override, Mapping):
        return _KINDS[name](**{**kwargs, **override})
    raise ValueError(
        f"policies: {name}= must be a {_KINDS[name].__name__}, a dict of its keyword arguments"
        f" or None; got {type(override).__name__}"
    )


def policies(
    *,
    refresh: RefreshFunc | None = None,
    on_reauthorize: ReauthorizeFunc | None = None,
    storage: str = "memory://",
    **overrides: object,
) -> tuple[ClientMiddlewareType, ...]:
    """Sage's policies, outermost first (the order of :func:`resilient.chain`).

    - :class:`TokenRefresh` (only when ``refresh`` is given);
    - ``Retry()`` with its defaults (502/503/504, full jitter, retry budget; POSTs
      re-sent only after 429/503 or a failed connect);
    - ``CircuitBreaker(storage=storage)`` per host;
    - ``RateLimitBackoff(max_wait=86400, key=by_business, storage=storage)``;
    - ``Throttle(200/60, burst=10, quotas="200 per 60 seconds", key=by_business,
      storage=storage, adaptive=True)``.

    Overrides, by policy kind (``retry``, ``circuit_breaker``, ``rate_limit_backoff``,
    ``throttle``): a dict updates Sage's keyword arguments for that policy
    (``throttle={"rate": 1.0}`` keeps the quota, key and adaptivity); a policy
    instance of that kind replaces it as is; ``None`` leaves it out. Any other name
    raises ``ValueError``.
    """
    unknown = sorted(set(overrides) - OVERRIDABLE)
    if unknown:
        raise ValueError(
            f"policies: unknown override {', '.join(unknown)};"
            f" accepted: {', '.join(sorted(OVERRIDABLE))}"
        )
    if on_reauthorize is not None and refresh is None:
        raise ValueError("policies: on_reauthorize needs refresh (both belong to TokenRefresh)")
    built: list[Policy] = []
    if refresh is not None:
        built.append(TokenRefresh(refresh, on_reauthorize=on_reauthorize))
    for name, kwargs in _defaults(storage).items():
        policy = _build(name, kwargs, overrides.get(name, {}))
        if policy is not None:
            built.append(policy)
    return ordered(*built)


def session(
    *,
    refresh: RefreshFunc | None = None,
    on_reauthorize: ReauthorizeFunc | None = None,
    base_url: str | None = DEFAULT_BASE_URL,
    storage: str = "memory://",
    policies: Sequence[ClientMiddlewareType] | None = None,
    **client_session_kwargs: Any,
) -> aiohttp.ClientSession:
    """A ``resilient.session`` for the Accounting API with :func:`policies`' defaults.

    ``base_url`` (default :data:`DEFAULT_BASE_URL`; ``None`` for none) lets callers
    write ``s.get("contacts")``. :data:`DEFAULT_HEADERS` (JSON ``Accept`` and
    ``Content-Type``) are merged under the caller's ``headers`` (the caller's win);
    put ``Authorization`` and ``X-Business`` there. ``policies`` replaces the
    default policies (e.g. ``sage.policies(throttle={...})``); it cannot be combined
    with ``refresh``, ``on_reauthorize`` or ``storage``. Other keyword arguments go to
    :class:`aiohttp.ClientSession` (``timeout`` defaults to
    :data:`resilient.DEFAULT_TIMEOUT`).
    """
    if policies is None:
        chosen = _policies(refresh=refresh, on_reauthorize=on_reauthorize, storage=storage)
    elif refresh is not None or on_reauthorize is not None or storage != "memory://":
        raise ValueError(
            "session: pass refresh, on_reauthorize and storage to sage.policies(), not"
            " together with policies="
        )
    else:
        chosen = tuple(policies)
    headers: CIMultiDict[str] = CIMultiDict(DEFAULT_HEADERS)
    headers.update(client_session_kwargs.pop("headers", None) or {})
    return _session(*chosen, base_url=base_url, headers=headers, **client_session_kwargs)


_policies = policies
