"""What every policy is: an aiohttp client middleware with a place in the chain."""

from __future__ import annotations

from typing import ClassVar

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

__all__ = ["Policy"]


class Policy:
    """Base of every ``resilient`` middleware.

    ``order`` ranks a policy in :func:`resilient.chain` (smaller is outer):
    auth 0, hedge 5, retry 10, circuit breaker 20, 429 backoff 30, concurrency limit 35,
    throttle 40, chaos 50.
    ``kind`` names the slot: a chain holds at most one policy of each kind.
    """

    __slots__ = ()

    kind: ClassVar[str] = "policy"
    order: ClassVar[int] = 100

    async def __call__(
        self, request: ClientRequest, handler: ClientHandlerType
    ) -> ClientResponse:  # pragma: no cover - overridden
        raise NotImplementedError
