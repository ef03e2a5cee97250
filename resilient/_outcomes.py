"""What an outcome means: is it a failure of the host, may the request be sent again.

Retry, RateLimitBackoff, Hedge and CircuitBreaker all ask; the answers live here once.
"""

from __future__ import annotations

import aiohttp
from aiohttp import ClientRequest
from aiohttp.payload import Payload

from ._errors import ResilienceError

__all__ = [
    "IDEMPOTENCY_KEY",
    "IDEMPOTENT_METHODS",
    "body_replayable",
    "failure_reason",
    "is_failure",
    "is_idempotent",
]


def body_replayable(request: ClientRequest) -> bool:
    """False when the body was a one-shot stream (async generator, pipe) already read;
    bytes and re-readable payloads (aiohttp >= 3.12 rewinds them) can be sent again."""
    body = request.body
    return not (isinstance(body, Payload) and body.consumed)


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 §9.2.2. Any other method is idempotent only with an ``Idempotency-Key``."""
IDEMPOTENCY_KEY = "Idempotency-Key"


# Failed before anything was sent: safe to re-send any request.
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# Transient, but the request may have been processed: re-send idempotent requests only.
_TRANSIENT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
# Never retried as failures: TLS / certificate problems, a pinned fingerprint, our own
# errors (a CircuitOpenError of a short break is waited out instead, see Retry).
_NEVER = (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch, ResilienceError)


def is_idempotent(request: ClientRequest) -> bool:
    """GET, HEAD, OPTIONS, TRACE, PUT, DELETE; any method with an ``Idempotency-Key``."""
    return request.method in IDEMPOTENT_METHODS or IDEMPOTENCY_KEY in request.headers


def failure_reason(request: ClientRequest, exc: BaseException) -> str | None:
    """Why ``exc`` may be retried for ``request``, or ``None`` if it must not be.

    Connect failures (refused, DNS, connect timeout): any method. Read timeouts,
    dropped connections, broken payloads: idempotent requests only. TLS errors and
    ``ResilienceError`` (e.g. ``CircuitOpenError``): never.
    """
    if isinstance(exc, _NEVER):
        return None
    if isinstance(exc, _NOT_SENT) or (isinstance(exc, _TRANSIENT) and is_idempotent(request)):
        return type(exc).__name__
    return None


def is_failure(exc: BaseException) -> bool:
    """A network error or timeout of the attempt, or a 5xx raised as an exception.

    Not failures: ``ResilienceError`` (an inner policy's verdict, nothing was learnt
    about the host), a ``ClientResponseError`` below 500 (the host answered), and
    anything that is not an aiohttp error or a timeout (cancellation, bugs).
    """
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status >= 500
    return isinstance(exc, (aiohttp.ClientError, TimeoutError)) and not isinstance(
        exc, ResilienceError
    )
