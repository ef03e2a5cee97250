"""Pure parsers for the headers that say when to come back. No I/O, never raise.

Every parser returns a delay in seconds from ``now`` (wall-clock epoch seconds,
passed in by the caller), or ``None`` when the header is absent or garbage:

- ``0.0`` means "now" (a zero delay or a date in the past);
- ``math.inf`` means "beyond any wait" (a number too large to represent);
- otherwise a finite delay ``> 0``.

Negative numbers, words ("soon"), exponents ("1e309") and impossible dates are
garbage (``None``): the caller falls back to its own backoff.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = [
    "EPOCH_MS_THRESHOLD",
    "EPOCH_THRESHOLD",
    "parse_ratelimit",
    "parse_reset",
    "parse_retry_after",
    "retry_delay",
    "retry_hint",
]

EPOCH_THRESHOLD = 1_000_000_000.0
"""A reset value at or above this (2001-09-09 in epoch seconds) is an epoch time;
a smaller one is delta seconds. No real delta is 31 years; no real epoch is that early."""

EPOCH_MS_THRESHOLD = 1_000_000_000_000.0
"""A reset value at or above this is an epoch time in *milliseconds* (2001-09-09 in ms;
as seconds it would be the year 33658)."""

_MAX_LEN = 4096
_MAX_DATE_LEN = 64
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_PARAM = re.compile(r"(?:^|[;,\s])(t|reset)\s*=\s*\"?([0-9]+(?:\.[0-9]+)?)\"?", re.IGNORECASE)
_REMAINING = re.compile(r"(?:^|[;,\s])(r|remaining)\s*=\s*\"?([0-9]+)\"?", re.IGNORECASE)


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """``Retry-After`` (RFC 9110 §10.2.3): ``delay-seconds`` or an HTTP-date.

    delay-seconds ``1*DIGIT`` (a decimal fraction is accepted too) -> that many seconds
    (``inf`` if unrepresentable); HTTP-date (IMF-fixdate, RFC 850, asctime; no zone means
    GMT) -> max(0, date - now); anything else (negative, "soon", "1e309") -> ``None``.
    """
    if not value:
        return None
    text = value.strip()
    if _NUMBER.fullmatch(text):  # float() saturates to inf; unlike int() it has no digit limit
        return float(text)
    if len(text) > _MAX_DATE_LEN or not text[:1].isalpha():
        return None
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000", asctime or no zone: HTTP dates are always GMT
            when = when.replace(tzinfo=UTC)
        return max(0.0, when.timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


def parse_ratelimit(value: str | None) -> float | None:
    """IETF ``RateLimit`` header: the reset time ``t=`` (or ``reset=``) in seconds.

    Draft-08+: ``"default";r=0;t=30``; earlier drafts: ``limit=10, remaining=0, reset=30``.
    Among several policies, the longest reset of those with no requests remaining
    (``r=0``; a policy that does not say ``r`` counts as exhausted); ``None`` if no
    exhausted policy gives a reset.
    """
    if not value or len(value) > _MAX_LEN:
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
        delay = float(match.group(2))
        best = delay if best is None else max(best, delay)
    return best


def parse_reset(value: str | None, *, now: float) -> float | None:
    """``X-RateLimit-Reset`` / ``RateLimit-Reset``: when the window resets.

    value >= EPOCH_MS_THRESHOLD -> epoch milliseconds: max(0, value / 1000 - now);
    value >= EPOCH_THRESHOLD    -> epoch seconds:      max(0, value - now);
    smaller value               -> delta seconds;      non-numeric or negative -> ``None``.
    """
    if not value:
        return None
    text = value.strip()
    if not _NUMBER.fullmatch(text):
        return None
    number = float(text)
    if not math.isfinite(number):
        return number
    if number >= EPOCH_MS_THRESHOLD:
        return max(0.0, number / 1000.0 - now)
    if number >= EPOCH_THRESHOLD:
        return max(0.0, number - now)
    return number


def retry_hint(headers: Mapping[str, str], *, now: float) -> tuple[float, str] | None:
    """``(delay, header name)`` from the first header that parses, in this order:
    ``Retry-After``, ``RateLimit`` (``t=``), ``RateLimit-Reset``, ``X-RateLimit-Reset``."""
    delay = parse_retry_after(headers.get("Retry-After"), now=now)
    if delay is not None:
        return delay, "Retry-After"
    delay = parse_ratelimit(headers.get("RateLimit"))
    if delay is not None:
        return delay, "RateLimit"
    for name in ("RateLimit-Reset", "X-RateLimit-Reset"):
        delay = parse_reset(headers.get(name), now=now)
        if delay is not None:
            return delay, name
    return None


def retry_delay(headers: Mapping[str, str], *, now: float) -> float | None:
    """The server's retry time in seconds (see :func:`retry_hint`), or ``None``."""
    hint = retry_hint(headers, now=now)
    return None if hint is None else hint[0]
