"""Sage's key: the published rate limit is per business (the ``X-Business`` header)."""

from __future__ import annotations

from aiohttp import ClientRequest

from .._keys import by_host

__all__ = ["BUSINESS_HEADER", "by_business"]

BUSINESS_HEADER = "X-Business"
"""The header that selects the business a Sage request acts for."""


def by_business(request: ClientRequest) -> str:
    """``f"{by_host(request)} business={X-Business}"``; without the header, :func:`by_host`.

    Requests without ``X-Business`` go to the user's lead business and share its key.
    """
    business = request.headers.get(BUSINESS_HEADER)
    host = by_host(request)
    return f"{host} business={business}" if business else host
