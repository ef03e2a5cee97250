"""Exception types. All derive from :class:`aiohttp.ClientError`, so code that
already catches aiohttp's errors keeps working."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

__all__ = [
    "BodyNotReplayable",
    "CircuitOpenError",
    "DeadlineExceeded",
    "LimitExceeded",
    "RateLimited",
    "ResilienceError",
    "StorageError",
]


class ResilienceError(aiohttp.ClientError):
    """Base of every error ``resilient`` raises itself."""


class CircuitOpenError(ResilienceError):
    """The circuit for ``key`` is open: the request was not sent.

    ``retry_after`` is the number of seconds until the breaker admits a probe (0 for a
    ``mode="adaptive"`` rejection: no break to wait for). ``Retry`` waits out a short
    one (``0 < retry_after <= Retry.circuit_wait``) and tries again.
    """

    # The fail-fast path: no Python __init__ (BaseException's own keeps ``args`` =
    # ``(key, retry_after)``, and pickles them) and no message until one is shown. This
    # makes a refusal about 0.3 µs cheaper than storing two attributes in an __init__.
    if TYPE_CHECKING:

        def __init__(self, key: str, retry_after: float, /) -> None: ...

    @property
    def key(self) -> str:
        key: str = self.args[0]
        return key

    @property
    def retry_after(self) -> float:
        retry_after: float = self.args[1]
        return retry_after

    def __str__(self) -> str:
        return f"circuit open for {self.key}; retry in {self.retry_after:.3f}s"


class DeadlineExceeded(ResilienceError):
    """A wait would end past the caller's deadline and there is no response to return."""


class RateLimited(ResilienceError):
    """``key`` is paused (HTTP 429) for longer than the caller may wait; nothing was sent.

    ``retry_after`` is the number of seconds until the pause ends.
    """

    def __init__(self, key: str, retry_after: float) -> None:
        self.key = key
        self.retry_after = retry_after
        super().__init__(f"rate limited on {key}; retry in {retry_after:.3f}s")

    def __reduce__(self) -> tuple[type[RateLimited], tuple[str, float]]:
        return (type(self), (self.key, self.retry_after))


class LimitExceeded(ResilienceError):
    """``key`` has ``ConcurrencyLimit``'s requests in flight and the caller may not queue:
    the queue is full (``max_queue``) or its turn would come after its deadline. Nothing
    was sent. ``reason``: ``"queue full"`` or ``"deadline"``.
    """

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"concurrency limit reached on {key} ({reason}); nothing was sent")

    def __reduce__(self) -> tuple[type[LimitExceeded], tuple[str, str]]:
        return (type(self), (self.key, self.reason))


class BodyNotReplayable(ResilienceError):
    """A retry is needed but the request body (e.g. an async generator) was consumed."""


class StorageError(ResilienceError):
    """Shared state (Redis) could not be read or written in time; the request was not sent.

    ``storage`` is the storage URI without credentials or query (scheme, host, port, db);
    ``reason`` the failure's type (``ConnectionError``, ``TimeoutError``, ...).
    """

    def __init__(self, storage: str, reason: str) -> None:
        self.storage = storage
        self.reason = reason
        super().__init__(f"storage {storage} failed ({reason})")

    def __reduce__(self) -> tuple[type[StorageError], tuple[str, str]]:
        return (type(self), (self.storage, self.reason))
