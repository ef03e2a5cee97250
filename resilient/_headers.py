"""Pure parsers for the headers that say when to come back. No I/O, never raise.

Every parser returns a delay in seconds from ``now`` (wall-clock epoch seconds,
passed in by the caller), or ``None`` when the header is absent or garbage:

- ``0.0`` means "now" (a zero delay or a date in the past);
- ``math.inf`` means "beyond any wait" (a number too large to represent);
- otherwise a finite delay ``> 0``.

Negative numbers, words ("soon"), exponents ("1e309") and impossible dates are
garbage (``None``): the caller falls back to its own backoff.

:func:`parse_advertised` reads the quota a server *advertises* on every response
(``RateLimit-Policy`` + ``RateLimit``, ``RateLimit-Limit/-Remaining/-Reset``,
``X-RateLimit-*``) into an :class:`Advertised` value, so a caller can wait for the
reset instead of earning a 429, or spread what remains over the time to the reset.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from multidict import istr

__all__ = [
    "EPOCH_MS_THRESHOLD",
    "EPOCH_THRESHOLD",
    "MAX_REMAINING",
    "Advertised",
    "advertises",
    "parse_advertised",
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


# --- advertised limits ---------------------------------------------------------------

MAX_REMAINING = 2**53
"""``remaining`` and ``limit`` are clipped to this (the largest integer a float holds
exactly): a server advertising more has, for any client, no limit at all."""

_MAX_MEMBERS = 16
"""At most this many list members (policies) are read from one field; the rest are
ignored. Real servers send one to three."""

_REQUEST_UNITS = frozenset({"requests", "request"})  # draft-11 says "requests"; -08 "request"


@dataclass(frozen=True, slots=True)
class Advertised:
    """One advertised quota as seen on a response: ``remaining`` requests may still be sent
    in the ``reset`` seconds until the window resets (``reset`` >= 0, may be math.inf);
    ``limit`` (the quota, if said) and ``window`` (seconds, if said); ``policy``: its name
    (``"default"`` for the older dialects), ``partition`` the ``pk`` key if any (str)."""

    remaining: int
    reset: float
    limit: int | None = None
    window: float | None = None
    policy: str = "default"
    partition: str | None = None


def advertises(headers: Mapping[str, str]) -> bool:
    """Whether ``headers`` carry any field :func:`parse_advertised` reads (three lookups:
    a caller checks this before reading the wall clock for ``now``)."""
    return _RATELIMIT in headers or _LEGACY[0][0] in headers or _LEGACY[1][0] in headers


def parse_advertised(headers: Mapping[str, str], *, now: float) -> Advertised | None:
    """The tightest advertised quota on a response, or None (no usable header).

    Dialects, in this order; the first that yields a usable quota wins and they are
    never mixed (a dialect whose fields are present but unusable falls through):

    1. ``RateLimit`` (an RFC 9651 List, draft-ietf-httpapi-ratelimit-headers-08..11:
       ``"burst";r=0;t=30, "daily";r=500;t=3600``), joined by policy name with
       ``RateLimit-Policy`` (``"burst";q=100;w=60``) for ``limit`` (q), ``window`` (w),
       the quota unit ``qu`` and the partition key ``pk``; then the draft-03..07
       Dictionary ``RateLimit: limit=100, remaining=50, reset=30``;
    2. ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset`` (older drafts);
    3. ``X-RateLimit-Limit`` / ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset``.

    A usable quota has a remaining count and a reset; ``now`` (wall-clock epoch seconds)
    is needed only for epoch resets (the ``*-Reset`` fields, through :func:`parse_reset`).

    The rules for what a server did not say, or said badly:

    - *no reset*: an item without ``t`` takes its policy's window ``w`` (the longest the
      reset can be); with neither, or a ``*-Reset`` field absent or garbage, the quota is
      unusable: with no reset there is nothing to wait for and no time to spread over.
    - *no remaining*: unusable (``RateLimit-Policy`` alone says nothing about now).
    - *a quota unit other than requests* (``qu="content-bytes"``,
      ``"concurrent-requests"``): the items of that policy are ignored.
    - *garbage*: a structured item that does not parse, or whose ``r``/``q`` is not a
      non-negative Integer (a Decimal ``r=5.0`` included), or whose ``t``/``w`` is
      negative, is ignored, and the rest of the list is still read. The free-text fields
      of dialects 2 and 3 are floored instead (``"5.0"`` -> 5, ``"4.7"`` -> 4: never more
      than was said). Parameter names are read case-insensitively (RFC 9651 wants
      lowercase; servers do not always comply).
    - *huge numbers*: ``remaining`` and ``limit`` are clipped to :data:`MAX_REMAINING`; a
      reset too large for a float is ``math.inf`` ("beyond any wait").
    - *hostile input*: a field longer than 4096 characters is ignored, and at most 16
      members of a list are read (garbage members included): at most 16 regex matches
      per field, each linear in the (capped) field length and never backtracking.
    - *repeated field lines* (``RateLimit`` split over several lines) are joined as RFC
      9651 lists are when the mapping has ``getall`` (aiohttp's headers do).

    Several quotas: the tightest wins. If any is exhausted (``remaining == 0``) with a
    reset > 0, the one with the longest reset among those (the caller must wait for it);
    otherwise the one with the lowest allowed rate ``remaining / reset`` (``reset`` inf
    counts as rate 0). A reset of 0 means the window restarts now, so that quota does
    not constrain: it is chosen only when no other quota has a reset > 0 (then the one
    with the fewest remaining). Ties go to the first listed.
    """
    if _RATELIMIT in headers:
        quotas = _ietf_list(headers) or _ietf_dictionary(headers.get(_RATELIMIT))
        if quotas:
            return _tightest(quotas)
    for names in _LEGACY:
        if names[0] in headers:
            quota = _legacy(headers, names, now)
            if quota is not None:
                return quota
    return None


# Pre-folded names: aiohttp's CIMultiDictProxy finds an istr without case-folding it
# (~15 ns against ~70 ns for a str), which is most of the cost of a response that
# advertises nothing; in a plain dict an istr is the str it spells.
_RATELIMIT = istr("RateLimit")
_RATELIMIT_POLICY = istr("RateLimit-Policy")
_LEGACY = (
    (istr("RateLimit-Remaining"), istr("RateLimit-Reset"), istr("RateLimit-Limit")),
    (istr("X-RateLimit-Remaining"), istr("X-RateLimit-Reset"), istr("X-RateLimit-Limit")),
)


def _tightness(quota: Advertised) -> tuple[int, float]:
    """Larger is tighter: (2, reset) exhausted; (1, -rate) paced; (0, -remaining) free."""
    if quota.reset > 0.0:
        if quota.remaining == 0:
            return 2, quota.reset
        return 1, -(quota.remaining / quota.reset)
    return 0, -float(quota.remaining)


def _tightest(quotas: list[Advertised]) -> Advertised:
    best, best_key = quotas[0], _tightness(quotas[0])
    for quota in quotas[1:]:
        key = _tightness(quota)
        if key > best_key:
            best, best_key = quota, key
    return best


def _field(headers: Mapping[str, str], name: str) -> str | None:
    """A field's value; several lines of it joined with ", " (RFC 9651 §3.1)."""
    getall = getattr(headers, "getall", None)
    if getall is None:
        return headers.get(name)
    values = getall(name, ())
    if len(values) > 1:
        return ", ".join(values[:_MAX_MEMBERS])
    return values[0] if values else None


def _seconds(number: object) -> float | None:
    """A non-negative Integer or Decimal as seconds (``inf`` if too large); else None."""
    if type(number) is int:
        if number < 0:
            return None
        try:
            return float(number)
        except OverflowError:
            return math.inf
    if type(number) is float and number >= 0.0:
        return number
    return None


def _count(number: object) -> int | None:
    """A non-negative Integer, clipped to MAX_REMAINING; else None."""
    if type(number) is int and number >= 0:
        return min(number, MAX_REMAINING)
    return None


def _text(value: object) -> str | None:
    """A String or Token as is; a Byte Sequence as its base64 text; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("ascii")
    return None


_Policy = tuple[int | None, float | None, str | None]  # q, w, pk
_UNKNOWN_POLICY: _Policy = (None, None, None)  # a RateLimit item without its policy


def _policies(value: str | None) -> dict[str, _Policy | None]:
    """``RateLimit-Policy`` by name; None for a policy not counted in requests."""
    policies: dict[str, _Policy | None] = {}
    for _, name, params in _sf_members(value):
        if not isinstance(name, str) or name in policies:
            continue  # the first policy of a name wins
        quota = _count(params.get("q"))
        unit = params.get("qu", "requests")
        window = _seconds(params["w"]) if "w" in params else None
        partition = _text(params["pk"]) if "pk" in params else None
        if quota is None or ("w" in params and window is None):
            continue
        if "pk" in params and partition is None:
            continue
        policies[name] = (quota, window, partition) if unit in _REQUEST_UNITS else None
    return policies


def _ietf_list(headers: Mapping[str, str]) -> list[Advertised]:
    """``RateLimit`` (an RFC 9651 List) joined with ``RateLimit-Policy`` by name."""
    items = _sf_members(_field(headers, _RATELIMIT))
    if not items:
        return []
    policies = _policies(_field(headers, _RATELIMIT_POLICY))
    quotas: list[Advertised] = []
    for _, name, params in items:
        if not isinstance(name, str):
            continue
        policy = policies.get(name, _UNKNOWN_POLICY)
        if policy is None:
            continue  # its quota is not counted in requests
        limit, window, partition = policy
        remaining = _count(params.get("r"))
        reset = _seconds(params["t"]) if "t" in params else window  # w bounds the reset
        if "pk" in params:
            partition = _text(params["pk"])
            if partition is None:
                continue
        if remaining is not None and reset is not None:
            quotas.append(Advertised(remaining, reset, limit, window, name, partition))
    return quotas


def _ietf_dictionary(value: str | None) -> list[Advertised]:
    """Drafts 03..07: ``RateLimit: limit=100, remaining=50, reset=30`` (a Dictionary)."""
    fields = {key: item for key, item, _ in _sf_members(value, dictionary=True)}
    remaining = _count(fields.get("remaining"))
    reset = _seconds(fields.get("reset"))
    if remaining is None or reset is None:
        return []
    return [Advertised(remaining, reset, _count(fields.get("limit")))]


def _legacy(
    headers: Mapping[str, str], names: tuple[str, str, str], now: float
) -> Advertised | None:
    """``(X-)RateLimit-Remaining`` / ``-Reset`` / ``-Limit`` (free text; the names)."""
    remaining = _floor(headers.get(names[0]))
    if remaining is None:
        return None
    reset = parse_reset(headers.get(names[1]), now=now)
    if reset is None:
        return None
    limit: int | None = None
    window: float | None = None
    members = _sf_members(headers.get(names[2]))  # "100" or "100, 100;w=60"
    if members:
        first = members[0][1]
        limit = _count(_floor_decimal(first))
        for _, quota, params in members:
            if quota == first and ("w" in params or "window" in params):
                window = _seconds(params.get("w", params.get("window")))
                break
    return Advertised(remaining, reset, limit, window)


def _floor_decimal(number: _Item) -> _Item:
    """A non-negative Decimal floored to an Integer (inf: MAX_REMAINING); else as is."""
    if type(number) is float and number >= 0.0:
        return int(number) if number < MAX_REMAINING else MAX_REMAINING
    return number


def _floor(value: str | None) -> int | None:
    """The leading number of a free-text count, floored and clipped; else None."""
    if not value or len(value) > _MAX_LEN:
        return None
    text = value.split(",", 1)[0].split(";", 1)[0].strip()
    if not _NUMBER.fullmatch(text):
        return None
    return min(int(text.partition(".")[0]), MAX_REMAINING)


# --- RFC 9651 structured fields, the subset the RateLimit fields use -----------------
#
# Lists and Dictionaries of Items (no Inner Lists) whose bare items are Integers and
# Decimals (any length: huge values are clipped by the caller, not refused), Strings,
# Tokens, Byte Sequences (kept as their base64 text, as bytes) and Booleans. Lenient
# where servers are sloppy and it costs nothing: OWS around ";", a trailing comma, and
# parameter or key names in any case (lowercased). A member that does not parse is
# dropped and reading resumes after the next comma; at most _MAX_MEMBERS members,
# garbage ones included, are read.
# One regex match per member and one per parameter; every quantifier is possessive,
# so a match never backtracks and the work is linear in the field length.

_SF_KEY = r"[A-Za-z*][A-Za-z0-9_\-.*]*+"
_SF_VALUE = (  # one group of alternatives, told apart by their first character
    r'(?:"(?:[ !#-\[\]-~]|\\["\\])*+"'  # String
    r"|-?[0-9]++(?:\.[0-9]++)?+"  # Integer, Decimal
    r"|:[A-Za-z0-9+/=]*+:"  # Byte Sequence
    r"|\?[01]"  # Boolean
    r"|[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*+)"  # Token
)
_SF_PARAMS = rf"((?:[ \t]*+;[ \t]*+{_SF_KEY}(?:={_SF_VALUE})?+)*+)[ \t]*+(?:,|\Z)"
_SF_LIST_MEMBER = re.compile(rf"[ \t]*+({_SF_VALUE}){_SF_PARAMS}")
_SF_DICT_MEMBER = re.compile(rf"[ \t]*+({_SF_KEY})(?:=({_SF_VALUE}))?+{_SF_PARAMS}")
_SF_PARAM = re.compile(rf";[ \t]*+({_SF_KEY})(?:=({_SF_VALUE}))?+")
_SF_ESCAPE = re.compile(r"\\([\"\\])")

_Item = int | float | str | bytes | bool
_Params = dict[str, _Item]


def _sf_members(text: str | None, *, dictionary: bool = False) -> list[tuple[str, _Item, _Params]]:
    """``(key, item, parameters)`` per member of a List (key ``""``) or Dictionary."""
    members: list[tuple[str, _Item, _Params]] = []
    if not text or len(text) > _MAX_LEN:
        return members
    member = _SF_DICT_MEMBER if dictionary else _SF_LIST_MEMBER
    pos, end = 0, len(text)
    for _ in range(_MAX_MEMBERS):  # garbage members count too: the work is bounded
        if pos >= end:
            break
        match = member.match(text, pos)
        if match is None:  # garbage: skip to the next member
            pos = text.find(",", pos) + 1
            if pos == 0:
                break
            continue
        pos = match.end()
        if dictionary:
            key, value, params = match.groups()
            item = True if value is None else _sf_item(value)
            members.append((key.lower(), item, _sf_params(params)))
        else:
            value, params = match.groups()
            members.append(("", _sf_item(value), _sf_params(params)))
    return members


def _sf_params(text: str) -> _Params:
    """The parameters matched by _SF_PARAMS; a repeated key keeps its last value."""
    if not text:
        return {}
    return {
        key.lower(): _sf_item(value) if value else True  # findall: "" for no "=value"
        for key, value in _SF_PARAM.findall(text)
    }


def _sf_item(text: str) -> _Item:
    """The value of one bare item, as matched by _SF_VALUE."""
    char = text[0]
    if char == '"':
        inner = text[1:-1]
        return _SF_ESCAPE.sub(r"\1", inner) if "\\" in inner else inner
    if char == "-" or "0" <= char <= "9":
        return float(text) if "." in text else int(text)
    if char == ":":
        return text[1:-1].encode("ascii")
    if char == "?":
        return text == "?1"
    return text
