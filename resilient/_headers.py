"""Pure parsers for the headers that say when to come back. No I/O, never raise.

Every parser returns a delay in seconds from ``now`` (wall-clock epoch seconds,
passed in by the caller), or ``None`` when the header is absent or garbage:

- ``0.0`` means "now" (a zero delay or a date in the past);
- ``math.inf`` means "beyond any wait" (a delay-seconds too large to represent);
- otherwise a finite delay ``> 0``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = [
    "EPOCH_THRESHOLD",
    "parse_ratelimit",
    "parse_reset",
    "parse_retry_after",
    "retry_delay",
]

EPOCH_THRESHOLD = 1_000_000_000.0
"""A reset value at or above this (2001-09-09 in epoch seconds) is an epoch time;
a smaller one is delta seconds. No real delta is 31 years; no real epoch is that early."""

_MAX_DATE_LEN = 64
_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_PARAM = re.compile(r"(?:^|[;,\s])(t|reset)\s*=\s*\"?([0-9]+(?:\.[0-9]+)?)\"?", re.IGNORECASE)
_REMAINING = re.compile(r"(?:^|[;,\s])(r|remaining)\s*=\s*\"?([0-9]+)\"?", re.IGNORECASE)


def _seconds(text: str) -> float:
    """Decimal seconds as float; too large to represent -> ``inf``."""
    try:
        value = float(text) if len(text) < 300 else math.inf
    except OverflowError:  # pragma: no cover - float() saturates to inf instead
        value = math.inf
    return value


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """``Retry-After`` (RFC 9110 §10.2.3): ``delay-seconds`` or an HTTP-date.

    delay-seconds = 1*DIGIT  ->  that many seconds (``inf`` if unrepresentable);
    HTTP-date               ->  max(0, date - now);  anything else -> ``None``.
    """
    if not value:
        return None
    text = value.strip()
    if _DIGITS.fullmatch(text):
        return _seconds(text)
    if len(text) > _MAX_DATE_LEN or not text[:1].isalpha():
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always UTC
        when = when.replace(tzinfo=UTC)
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None


def parse_ratelimit(value: str | None) -> float | None:
    """IETF ``RateLimit`` header: the reset time ``t=`` (or ``reset=``) in seconds.

    Draft-08+: ``"default";r=0;t=30``; earlier drafts: ``limit=10, remaining=0, reset=30``.
    With several policies, the longest reset among those with no requests remaining
    (all of them if none says ``r``); ``None`` if no reset is given.
    """
    if not value or len(value) > 4096:
        return None
    best: float | None = None
    items = value.split(",") if ";" in value else [value]  # SF list vs. one old-style policy
    for item in items:
        match = _PARAM.search(item)
        if match is None:
            continue
        remaining = _REMAINING.search(item)
        if remaining is not None and remaining.group(2).strip("0") != "":
            continue  # this policy still has room: it does not gate us
        delay = _seconds(match.group(2))
        best = delay if best is None else max(best, delay)
    return best


def parse_reset(value: str | None, *, now: float) -> float | None:
    """``X-RateLimit-Reset`` / ``RateLimit-Reset``: when the window resets.

    value >= EPOCH_THRESHOLD -> epoch seconds: max(0, value - now);
    smaller value            -> delta seconds;  non-numeric -> ``None``.
    """
    if not value:
        return None
    text = value.strip()
    if not _NUMBER.fullmatch(text):
        return None
    number = _seconds(text)
    if number >= EPOCH_THRESHOLD and math.isfinite(number):
        return max(0.0, number - now)
    return number


def retry_delay(headers: Mapping[str, str], *, now: float) -> float | None:
    """The server's retry time from the first header that parses, in this order:
    ``Retry-After``, ``RateLimit`` (``t=``), ``RateLimit-Reset``, ``X-RateLimit-Reset``."""
    delay = parse_retry_after(headers.get("Retry-After"), now=now)
    if delay is None:
        delay = parse_ratelimit(headers.get("RateLimit"))
    if delay is None:
        delay = parse_reset(headers.get("RateLimit-Reset"), now=now)
    if delay is None:
        delay = parse_reset(headers.get("X-RateLimit-Reset"), now=now)
    return delay
