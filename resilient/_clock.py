"""The one time seam.

Every duration inside ``resilient`` is measured with :func:`now` (the running
event loop's clock, ``loop.time()``) and every wait goes through :func:`sleep`
(``asyncio.sleep``). Tests fast-forward both with ``looptime``; nothing in the
library reads ``time.monotonic`` or patches ``asyncio.sleep``.

Wall-clock time (:func:`wall`) is read only where the outside world speaks it:
HTTP-date ``Retry-After``, epoch reset headers, the UTC end time in log lines.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from aiohttp import ClientRequest

__all__ = ["DUE_SLACK", "now", "now_for", "sleep", "wall", "wall_after"]

DUE_SLACK = 1e-6
"""Seconds: a time (a pause's or a break's end) due this soon counts as come. asyncio
fires a timer up to a clock tick early, and a loop clock with a coarse tick
(``looptime``) may stop just short of a float ``until``: a caller that sleeps exactly
the ``retry_after`` it was told must find the time come, not "retry in 0.000s"."""


def now() -> float:
    """Seconds on the running event loop's clock (monotonic, arbitrary origin)."""
    return asyncio.get_running_loop().time()


def now_for(request: ClientRequest) -> float:
    """:func:`now` read through the request's own loop: the same clock, about twice as
    cheap on Python 3.11 (no running-loop lookup). For hot paths."""
    return request.loop.time()


async def sleep(seconds: float) -> None:
    """Wait ``seconds`` on the event loop's clock (a non-positive value yields once)."""
    await asyncio.sleep(seconds if seconds > 0.0 else 0.0)


def wall() -> float:
    """Wall-clock seconds since the Unix epoch (for HTTP dates and epoch headers)."""
    return time.time()


def wall_after(seconds: float) -> datetime:
    """The UTC wall-clock instant ``seconds`` from now (for "waiting until ..." logs).

    Never raises: beyond the years datetime holds it saturates (``datetime.max``, or
    ``datetime.min`` for a negative delay); ``nan`` reads as now.
    """
    now = datetime.now(UTC)
    if seconds != seconds:  # nan
        return now
    try:
        return now + timedelta(seconds=seconds)
    except OverflowError:
        return (datetime.max if seconds > 0 else datetime.min).replace(tzinfo=UTC)
