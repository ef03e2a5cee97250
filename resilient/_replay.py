"""Can a request be sent again? (Retry and RateLimitBackoff both ask.)"""

from __future__ import annotations

from aiohttp import ClientRequest
from aiohttp.payload import Payload

__all__ = ["body_replayable"]


def body_replayable(request: ClientRequest) -> bool:
    """False when the body was a one-shot stream (async generator, pipe) already read;
    bytes and re-readable payloads (aiohttp >= 3.12 rewinds them) can be sent again."""
    body = request.body
    return not (isinstance(body, Payload) and body.consumed)
