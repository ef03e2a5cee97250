"""resilient: resilience middlewares for aiohttp clients.

Throttle, 429 backoff that can wait 24 hours, retry with jitter and a budget, and a
circuit breaker, each a native aiohttp client middleware::

    async with resilient.session(resilient.Retry(), resilient.Throttle(5.0)) as s:
        async with s.get(url) as resp:
            ...
"""

from __future__ import annotations

from ._chain import DEFAULT_TIMEOUT, chain, session
from ._deadline import deadline
from ._errors import (
    BodyNotReplayable,
    CircuitOpenError,
    DeadlineExceeded,
    LimitExceeded,
    RateLimited,
    ResilienceError,
    StorageError,
)
from ._keys import KeyFunc, by_host
from ._policy import Policy
from .breaker._breaker import CircuitBreaker
from .hedge._hedge import Hedge
from .limit._limit import ConcurrencyLimit
from .observe._events import Event, add_hook
from .observe._otel import instrument_opentelemetry
from .observe._stats import (
    CircuitStats,
    HedgeStats,
    LimitStats,
    PauseStats,
    RetryStats,
    ThrottleStats,
)
from .ratelimit._ratelimit import RateLimitBackoff
from .retry._retry import DecorrelatedJitter, FullJitter, Retry, RetryBudget
from .throttle._throttle import Throttle

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_TIMEOUT",
    "BodyNotReplayable",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitStats",
    "ConcurrencyLimit",
    "DeadlineExceeded",
    "DecorrelatedJitter",
    "Event",
    "FullJitter",
    "Hedge",
    "HedgeStats",
    "KeyFunc",
    "LimitExceeded",
    "LimitStats",
    "PauseStats",
    "Policy",
    "RateLimitBackoff",
    "RateLimited",
    "ResilienceError",
    "Retry",
    "RetryBudget",
    "RetryStats",
    "StorageError",
    "Throttle",
    "ThrottleStats",
    "__version__",
    "add_hook",
    "by_host",
    "chain",
    "deadline",
    "instrument_opentelemetry",
    "session",
]
