"""The Sage Business Cloud Accounting profile.

``sage.session(refresh=...)`` is a ClientSession with Sage's defaults: token refresh
on ``AccessTokenExpiredError``, retry with a budget, a circuit breaker, 429 backoff
that may wait 24 hours, and a throttle per business from the published 200 calls
per 60 seconds. ``await sage.raise_for_error(resp)`` raises typed errors.
"""

from __future__ import annotations

from ._auth import ReauthorizeFunc, RefreshFunc, TokenRefresh, TokenRefreshError
from ._errors import (
    REDACTED,
    AuthorizationError,
    ErrorDetail,
    MethodNotAllowed,
    NotFound,
    SageAPIError,
    ServerError,
    TooManyRequests,
    UnsupportedMediaType,
    ValidationError,
    parse_errors,
    raise_for_error,
)
from ._keys import BUSINESS_HEADER, by_business
from ._profile import (
    DEFAULT_BASE_URL,
    DEFAULT_BURST,
    DEFAULT_HEADERS,
    DEFAULT_MAX_WAIT,
    DEFAULT_QUOTAS,
    DEFAULT_RATE,
    PUBLISHED_LIMIT,
    PUBLISHED_PERIOD,
    policies,
    session,
)

__all__ = [
    "BUSINESS_HEADER",
    "DEFAULT_BASE_URL",
    "DEFAULT_BURST",
    "DEFAULT_HEADERS",
    "DEFAULT_MAX_WAIT",
    "DEFAULT_QUOTAS",
    "DEFAULT_RATE",
    "PUBLISHED_LIMIT",
    "PUBLISHED_PERIOD",
    "REDACTED",
    "AuthorizationError",
    "ErrorDetail",
    "MethodNotAllowed",
    "NotFound",
    "ReauthorizeFunc",
    "RefreshFunc",
    "SageAPIError",
    "ServerError",
    "TokenRefresh",
    "TokenRefreshError",
    "TooManyRequests",
    "UnsupportedMediaType",
    "ValidationError",
    "by_business",
    "parse_errors",
    "policies",
    "raise_for_error",
    "session",
]
