"""SimulatedAPI: an in-process aiohttp server that behaves like Sage Business Cloud Accounting.

Every request goes through the same stages, in order:

1. ``latency`` (server-side delay), then the next fault :meth:`SimulatedAPI.inject`-ed
   for the path, if any;
2. outage windows (503 for everything), then the seeded random 503s (``error_rate``,
   not on ``/token``);
3. authentication (``auth=True``; not on ``/token``);
4. the per-business rate limiter (``X-Business``; not on ``/token``): the ``quota``
   moving window by default, or the ``limiter`` (a leaky bucket or a fixed window);
5. the endpoint: ``fail_paths`` answer 500, unknown paths 404, wrong verbs 405.

With ``advertise``, every response of a limited path then carries the limiter's state
in RateLimit headers of the chosen dialect.

All times are on the event loop's clock (``loop.time()``), so ``looptime`` fast-forwards
quota windows, leaky buckets, 24-hour blocks, token expiry and outages.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Literal, Protocol

from aiohttp import web

from .. import _clock
from .._validate import integer, number, optional_number

__all__ = [
    "ADVERTISE_DIALECTS",
    "DEFAULT_ACCESS_TOKEN_TTL",
    "DEFAULT_CONTACTS",
    "DEFAULT_ITEMS_PER_PAGE",
    "DEFAULT_QUOTA",
    "FAULTS",
    "LIMITERS",
    "MAX_ITEMS_PER_PAGE",
    "LogEntry",
    "SimulatedAPI",
]

DEFAULT_QUOTA = (200, 60.0)
"""Sage's published limit: 200 requests per 60 seconds per business."""
DEFAULT_ACCESS_TOKEN_TTL = 300.0
"""Sage access tokens live 5 minutes."""
REFRESH_TOKEN_TTL = 31 * 86_400
"""Reported as ``refresh_token_expires_in`` (not enforced)."""
DEFAULT_CONTACTS = 450
DEFAULT_ITEMS_PER_PAGE = 20
MAX_ITEMS_PER_PAGE = 200
BUSINESS_HEADER = "X-Business"
DEFAULT_BUSINESS = "default"
"""The quota key of requests without an ``X-Business`` header."""
SHUTDOWN_TIMEOUT = 0.1
"""Seconds :meth:`SimulatedAPI.close` lets in-flight handlers (a ``slow_after``) finish."""
DROPPED = 0
"""``LogEntry.status`` of a request whose connection was dropped without a response."""

FAULTS = frozenset({"503", "500", "429", "drop_before", "drop_after", "slow_after"})
"""Fault names :meth:`SimulatedAPI.inject` accepts."""
_OWNER = "SimulatedAPI"
LIMITERS = ("moving", "fixed", "leaky")
"""Kinds of ``limiter=(kind, a, b)``: ``("moving", limit, window)`` (as ``quota``),
``("fixed", limit, window)``, ``("leaky", rate, burst)``."""
ADVERTISE_DIALECTS = ("ietf", "x", "legacy")
"""Header dialects of ``advertise``: ``"ietf"`` (``RateLimit-Policy`` + ``RateLimit``,
draft-ietf-httpapi-ratelimit-headers-11), ``"x"`` (``X-RateLimit-Limit/-Remaining/-Reset``)
and ``"legacy"`` (``RateLimit-Limit/-Remaining/-Reset``); ``advertise=True`` is ``"ietf"``."""
POLICY_NAME = "default"
"""The name of the one quota policy in ``RateLimit-Policy`` / ``RateLimit``."""
_STATUS_FAULTS = frozenset({"503", "500", "429"})
_RETRY_AFTER_STYLES = ("seconds", "date", "none")
_EPSILON = 1e-9  # float slack: a client that waits exactly Retry-After gets in

# route pattern -> {method: handler name}; an id segment is written "{id}"
_ROUTES: dict[str, dict[str, str]] = {
    "/contacts": {"GET": "_list_contacts"},
    "/contacts/{id}": {"GET": "_show_contact"},
    "/sales_invoices": {"GET": "_list_invoices", "POST": "_create_invoice"},
    "/sales_invoices/{id}": {"GET": "_show_invoice"},
}
_TOKEN_PATH = "/token"

_MESSAGES = {
    "PathNotFound": "The requested path is not found.",
    "MethodNotAllowed": "The requested method is not allowed on this path.",
    "RecordNotFound": "The requested record was not found.",
    "UnsupportedMediaType": "The Accounting API only accepts application/json.",
    "InternalServerError": "Dammit, you ran into a bug in our application.",
    "ServiceUnavailable": (
        "One of our servers required to serve this request could not be reached. "
        "Please retry later."
    ),
    "TooManyRequests": "Too many requests have been made against the API. Please retry later.",
    "AccessTokenExpiredError": "Your Access token has expired.",
    "AuthorizationFailure": "The access token is missing, invalid or revoked.",
}


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One request the server handled.

    ``time`` is the loop clock when it was handled (after ``latency``); ``business`` is
    the ``X-Business`` header (``None`` if absent); ``status`` is the status sent, or
    ``0`` when the connection was dropped without a response.
    """

    time: float
    method: str
    path: str
    business: str | None
    status: int


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: str
    delay: float


class _Limit(Protocol):
    """One business's rate-limiter state, on the loop clock.

    ``admit(now)`` counts a request and returns ``None``, or refuses it (counting
    nothing) and returns the seconds until a request would be admitted.
    ``state(now)`` is ``(remaining, reset)``: requests admissible right now, and the
    seconds until the state resets, as advertised (before rounding).
    """

    def admit(self, now: float) -> float | None: ...

    def state(self, now: float) -> tuple[int, float]: ...


class _MovingWindow:
    """At most ``limit`` admitted requests in any moving window ``(now - window, now]``.

    Refused: wait until the oldest counted request leaves the window. Advertised:
    remaining = ``limit`` − requests counted in the window; reset = seconds until the
    oldest of them leaves it (the next slot frees), ``window`` when none is counted.
    """

    __slots__ = ("_hits", "_limit", "_window")

    def __init__(self, limit: int, window: float) -> None:
        self._limit, self._window = limit, window
        self._hits: deque[float] = deque()  # admitted request times, oldest first

    def _expire(self, now: float) -> None:
        hits = self._hits
        while hits and hits[0] + self._window <= now + _EPSILON:
            hits.popleft()

    def admit(self, now: float) -> float | None:
        self._expire(now)
        if len(self._hits) < self._limit:
            self._hits.append(now)
            return None
        return self._hits[0] + self._window - now

    def state(self, now: float) -> tuple[int, float]:
        self._expire(now)
        reset = self._hits[0] + self._window - now if self._hits else self._window
        return self._limit - len(self._hits), reset


class _FixedWindow:
    """At most ``limit`` admitted requests per fixed window ``[origin + k·window,
    origin + (k+1)·window)``, the windows aligned on the server's start (``origin``).

    Refused: wait until the next window starts. Advertised: remaining = ``limit`` −
    requests admitted in the current window; reset = seconds until the next window.
    """

    __slots__ = ("_count", "_index", "_limit", "_origin", "_window")

    def __init__(self, limit: int, window: float, origin: float) -> None:
        self._limit, self._window, self._origin = limit, window, origin
        self._index, self._count = 0, 0

    def _roll(self, now: float) -> float:
        """Enter the window holding ``now``; return the loop time it ends."""
        index = math.floor((now - self._origin + _EPSILON) / self._window)
        if index != self._index:
            self._index, self._count = index, 0
        return self._origin + (index + 1) * self._window

    def admit(self, now: float) -> float | None:
        end = self._roll(now)
        if self._count < self._limit:
            self._count += 1
            return None
        return end - now

    def state(self, now: float) -> tuple[int, float]:
        end = self._roll(now)
        return self._limit - self._count, end - now


class _LeakyBucket:
    """nginx ``limit_req`` with ``nodelay``: a bucket of ``burst + 1`` requests draining
    at ``rate`` per second.

    ``level(now) = max(0, level − rate·(now − last))``; a request is admitted iff
    ``level(now) ≤ burst`` (its own drop fits), and then adds 1; a refused request adds
    nothing. (nginx's ``excess`` is ``level − 1`` after an admission: it admits iff the
    new excess ≤ ``burst``; so ``burst + 1`` requests pass at once, then one per
    ``1/rate`` s.) Refused: wait ``(level(now) − burst) / rate``, until one slot frees.
    Advertised: remaining = ``burst + 1 − ceil(level(now))``, the requests admissible at
    once; reset = ``level(now) / rate``, the seconds for the bucket to drain fully.
    """

    __slots__ = ("_burst", "_last", "_level", "_rate")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate, self._burst = rate, burst
        self._level, self._last = 0.0, -math.inf

    def _drain(self, now: float) -> float:
        if now > self._last:
            self._level = max(0.0, self._level - self._rate * (now - self._last))
            self._last = now
        return self._level

    def admit(self, now: float) -> float | None:
        level = self._drain(now)
        if level <= self._burst + _EPSILON:
            self._level = level + 1.0
            return None
        return (level - self._burst) / self._rate

    def state(self, now: float) -> tuple[int, float]:
        level = self._drain(now)
        return max(0, self._burst + 1 - math.ceil(level - _EPSILON)), level / self._rate


def _policy(kind: str, a: float, b: float) -> tuple[int, float]:
    """The advertised quota policy ``(q, w)`` of a limiter: ``(limit, window)`` for the
    windows; a leaky bucket has no window, so ``(burst + 1, (burst + 1) / rate)``: its
    capacity and the time it takes to drain from full."""
    if kind == "leaky":
        return int(b) + 1, (int(b) + 1) / a
    return int(a), b


def _rate_limit_headers(
    dialect: str, policy: tuple[int, float], remaining: int, reset: float
) -> dict[str, str]:
    """The limiter's state in ``dialect``; seconds are whole, rounded up (a client that
    waits ``reset`` is never early), the window at least 1."""
    quota, window = policy
    left, until = str(max(0, remaining)), str(max(0, math.ceil(reset - _EPSILON)))
    if dialect == "ietf":
        return {
            "RateLimit-Policy": f'"{POLICY_NAME}";q={quota};w={max(1, math.ceil(window))}',
            "RateLimit": f'"{POLICY_NAME}";r={left};t={until}',
        }
    prefix = "X-RateLimit" if dialect == "x" else "RateLimit"
    return {f"{prefix}-Limit": str(quota), f"{prefix}-Remaining": left, f"{prefix}-Reset": until}


def error_body(
    data_code: str, message: str | None = None, source: str = ""
) -> list[dict[str, str]]:
    """A Sage error body: a list of ``{"$severity", "$dataCode", "$message", "$source"}``."""
    return [
        {
            "$severity": "error",
            "$dataCode": data_code,
            "$message": message if message is not None else _MESSAGES.get(data_code, data_code),
            "$source": source,
        }
    ]


def _error(
    status: int,
    data_code: str,
    message: str | None = None,
    source: str = "",
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(data_code, message, source), status=status, headers=headers)


def _route(path: str) -> str | None:
    """``/contacts/42 -> "/contacts/{id}"``; ``None`` for a path no route matches."""
    if path in _ROUTES:
        return path
    collection, slash, ident = path.rpartition("/")
    if slash and ident and collection + "/{id}" in _ROUTES:
        return collection + "/{id}"
    return None


def _int_param(query: Any, name: str, default: int, high: int | None) -> int | None:
    """An integer query parameter in ``1..high``, ``default`` if absent, ``None`` if invalid."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        return None
    if value < 1 or (high is not None and value > high):
        return None
    return value


def _is_iso_date(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _validate_limiter(
    quota: tuple[int, float] | None, limiter: tuple[str, float, float] | None
) -> None:
    if limiter is None:
        return
    if not isinstance(limiter, tuple) or len(limiter) != 3 or limiter[0] not in LIMITERS:
        raise ValueError(f"limiter must be (kind, a, b) with kind in {LIMITERS}, got {limiter!r}")
    if quota is not None and quota != DEFAULT_QUOTA:
        raise ValueError(
            f"limiter replaces quota: pass quota=None or leave it out, got quota={quota!r}"
        )
    kind, a, b = limiter
    if kind == "leaky":
        number(
            _OWNER,
            "limiter's leaky rate (per second)",
            a,
            0.0,
            math.inf,
            low_open=True,
            high_open=True,
        )
        integer(_OWNER, "limiter's leaky burst", b, 0)
        return
    integer(_OWNER, f"limiter's {kind} limit", a, 1)
    number(
        _OWNER,
        f"limiter's {kind} window (seconds)",
        b,
        0.0,
        math.inf,
        low_open=True,
        high_open=True,
    )


def _validate(
    *,
    quota: tuple[int, float] | None,
    limiter: tuple[str, float, float] | None,
    advertise: bool | str,
    retry_after: str,
    block_for: float | None,
    error_rate: float,
    outages: Sequence[tuple[float, float]],
    latency: float,
    access_token_ttl: float,
    contacts: int,
) -> None:
    if quota is not None:
        limit, window = quota
        integer(_OWNER, "quota's limit", limit, 1)
        number(
            _OWNER, "quota's window (seconds)", window, 0.0, math.inf, low_open=True, high_open=True
        )
    _validate_limiter(quota, limiter)
    if not isinstance(advertise, bool) and advertise not in ADVERTISE_DIALECTS:
        raise ValueError(
            f"advertise must be a bool or one of {ADVERTISE_DIALECTS}, got {advertise!r}"
        )
    if advertise is not False and quota is None and limiter is None:
        raise ValueError("advertise needs a limiter or a quota to advertise, got neither")
    if retry_after not in _RETRY_AFTER_STYLES:
        raise ValueError(f"retry_after must be one of {_RETRY_AFTER_STYLES}, got {retry_after!r}")
    optional_number(_OWNER, "block_for", block_for, 0.0, math.inf, low_open=True, high_open=True)
    number(_OWNER, "error_rate", error_rate, 0.0, 1.0)
    for start, end in outages:
        if not 0.0 <= start < end:
            raise ValueError(
                f"outages: each (start, end) needs 0 <= start < end, got {(start, end)!r}"
            )
    number(_OWNER, "latency", latency, 0.0, math.inf, high_open=True)
    number(
        _OWNER, "access_token_ttl", access_token_ttl, 0.0, math.inf, low_open=True, high_open=True
    )
    integer(_OWNER, "contacts", contacts, 0)


class SimulatedAPI:
    """A Sage-like JSON API on ``127.0.0.1`` (port 0) with configurable trouble.

    ``quota=(limit, window)``: per business, at most ``limit`` requests in any moving
    ``window`` seconds (every path but ``/token``; refused requests do not count); the
    next one gets 429 with ``Retry-After`` = seconds until the window frees (rounded up),
    or, with ``block_for``, the business is refused for ``block_for`` seconds.
    ``limiter`` replaces ``quota`` with another per-business limiter the client is not
    told (``quota`` must then be left out or ``None``; refused requests never count):
    ``("leaky", rate, burst)``, nginx's ``limit_req ... nodelay``: ``burst + 1`` requests
    at once, then ``rate`` per second (see :class:`_LeakyBucket`);
    ``("fixed", limit, window)``: ``limit`` per window, windows aligned on :meth:`start`;
    ``("moving", limit, window)``: the same as ``quota=(limit, window)``.
    A 429 says, in ``Retry-After``, the seconds until a request would be admitted.
    ``advertise`` (``True`` = ``"ietf"``, ``"x"``, ``"legacy"``; default ``False``): every
    response of a limited path (every path but ``/token``) carries the limiter's state
    for the business after the request, in RateLimit headers of that dialect (see
    :data:`ADVERTISE_DIALECTS`): the quota ``q``/Limit, what ``r``/Remaining admits at
    once, and ``t``/Reset in whole seconds, rounded up. Windows: the limit and window,
    exact remaining, reset = until the next slot frees (moving) or the next window
    (fixed). Leaky bucket: limit ``burst + 1``, window ``(burst + 1) / rate``, remaining
    ``burst + 1 − ceil(level)``, reset = until the bucket has drained fully.
    ``retry_after`` says how 429s tell the time: ``"seconds"``, ``"date"`` (HTTP-date,
    rounded up to the second plus one second of slack) or ``"none"``.
    ``error_rate``: seeded random 503s (no ``Retry-After``); ``outages``: ``(start, end)``
    seconds since :meth:`start` during which every request gets 503; ``fail_paths``
    answer 500 (not processed); ``latency``: server-side delay per request.
    ``auth=True``: every path but ``/token`` needs ``Authorization: Bearer <token>``
    (see :meth:`issue_tokens`); access tokens expire after ``access_token_ttl``.
    """

    def __init__(
        self,
        *,
        quota: tuple[int, float] | None = DEFAULT_QUOTA,
        limiter: tuple[Literal["leaky", "fixed", "moving"], float, float] | None = None,
        advertise: bool | Literal["ietf", "x", "legacy"] = False,
        retry_after: Literal["seconds", "date", "none"] = "seconds",
        block_for: float | None = None,
        error_rate: float = 0.0,
        seed: int = 0,
        outages: Sequence[tuple[float, float]] = (),
        fail_paths: Collection[str] = (),
        latency: float = 0.0,
        auth: bool = False,
        access_token_ttl: float = DEFAULT_ACCESS_TOKEN_TTL,
        contacts: int = DEFAULT_CONTACTS,
    ) -> None:
        _validate(
            quota=quota,
            limiter=limiter,
            advertise=advertise,
            retry_after=retry_after,
            block_for=block_for,
            error_rate=error_rate,
            outages=outages,
            latency=latency,
            access_token_ttl=access_token_ttl,
            contacts=contacts,
        )
        self._limiter: tuple[str, float, float] | None = (
            limiter if limiter is not None else None if quota is None else ("moving", *quota)
        )
        self._advertise: str | None = (
            None if advertise is False else "ietf" if advertise is True else advertise
        )
        self._policy = _policy(*self._limiter) if self._limiter is not None else (0, 0.0)
        self._retry_after = retry_after
        self._block_for = block_for
        self._error_rate = error_rate
        self._random = random.Random(seed)
        self._outages = tuple((float(s), float(e)) for s, e in outages)
        self._fail_paths = frozenset(fail_paths)
        self._latency = latency
        self._auth = auth
        self._access_token_ttl = access_token_ttl

        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)
        self.app.on_startup.append(self._on_startup)
        self.url = ""
        self.log: list[LogEntry] = []
        self.invoices: list[dict[str, Any]] = []

        self._contacts = [
            {
                "id": str(i),
                "displayed_as": f"Contact {i} (C{i:05d})",
                "$path": f"/contacts/{i}",
                "name": f"Contact {i}",
                "reference": f"C{i:05d}",
                "contact_types": [{"id": "CUSTOMER", "displayed_as": "Customer"}],
            }
            for i in range(1, contacts + 1)
        ]
        self._faults: dict[str, deque[_Fault]] = {}
        self._limits: dict[str, _Limit] = {}  # business -> its limiter state
        self._blocked: dict[str, float] = {}  # business -> loop time the block ends
        self._access: dict[str, float] = {}  # access token -> loop time it expires
        self._refresh: set[str] = set()  # refresh tokens that may still be used (once)
        self._revoked: set[str] = set()
        self._t0 = 0.0
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"<SimulatedAPI {self.url or '(not started)'} requests={len(self.log)}>"

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> str:
        """Serve on ``127.0.0.1``, a free port; return (and set) :attr:`url`.

        The clock origin of ``outages`` is now.
        """
        if self._runner is not None:
            raise RuntimeError("SimulatedAPI.start: already started")
        await self._serve(0)
        return self.url

    async def _serve(self, port: int) -> None:
        runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        host, bound = runner.addresses[0][:2]
        self.url = f"http://{host}:{bound}"

    async def restart(self, downtime: float = 0.0) -> None:
        """Stop serving like :meth:`close` (open connections are closed, in-flight
        handlers get :data:`SHUTDOWN_TIMEOUT`), stay down ``downtime`` seconds (loop
        clock; connections are refused meanwhile), then serve again on the same port.

        Logs, invoices, tokens, queued faults and the outage clock origin are kept.
        """
        if self._runner is None:
            raise RuntimeError("SimulatedAPI.restart: not started")
        number("SimulatedAPI.restart", "downtime", downtime, 0.0, math.inf, high_open=True)
        port, t0 = int(self.url.rpartition(":")[2]), self._t0
        await self.close()
        if downtime:
            await asyncio.sleep(downtime)
        await self._serve(port)
        self._t0 = t0

    async def _on_startup(self, app: web.Application) -> None:
        """The clock origin of ``outages``, also when ``app`` is served by another runner."""
        self._t0 = _clock.now()

    async def close(self) -> None:
        """Stop serving (idempotent); in-flight handlers get :data:`SHUTDOWN_TIMEOUT`."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> SimulatedAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- test controls ---------------------------------------------------------------

    def issue_tokens(self) -> tuple[str, str]:
        """A fresh ``(access_token, refresh_token)`` pair, valid from now (loop clock)."""
        access = secrets.token_urlsafe(24)
        refresh = secrets.token_urlsafe(24)
        self._access[access] = _clock.now() + self._access_token_ttl
        self._refresh.add(refresh)
        return access, refresh

    def expire_access_tokens(self) -> None:
        """Every access token issued so far answers 401 ``AccessTokenExpiredError`` from now."""
        for token in self._access:
            self._access[token] = -math.inf

    def revoke(self, token: str) -> None:
        """An access or refresh token answers 401 ``AuthorizationFailure`` from now on."""
        self._revoked.add(token)
        self._refresh.discard(token)

    def inject(self, path: str, fault: str, count: int = 1, *, delay: float = 0.0) -> None:
        """Queue ``fault`` for the next ``count`` requests to ``path`` (exact match, no query).

        ``"503"``, ``"500"``: that status, nothing processed. ``"429"``: a 429 whose
        ``Retry-After`` (in the configured style) says ``delay`` seconds, or 1 if 0.
        ``"drop_before"``: close the connection without processing. ``"drop_after"``:
        process the request (e.g. create the invoice), then close without replying.
        ``"slow_after"``: process, then wait ``delay`` seconds before replying.

        Note: aiohttp's client re-sends an idempotent request (GET, PUT, DELETE ...) once
        by itself when a *reused* keep-alive connection drops, which takes the next
        queued fault; a POST is never re-sent by aiohttp.
        """
        if fault not in FAULTS:
            raise ValueError(f"inject: fault must be one of {sorted(FAULTS)}, got {fault!r}")
        integer("SimulatedAPI.inject", "count", count, 1)
        number("SimulatedAPI.inject", "delay", delay, 0.0, math.inf, high_open=True)
        self._faults.setdefault(path, deque()).extend([_Fault(fault, delay)] * count)

    def count(
        self, path: str | None = None, method: str | None = None, status: int | None = None
    ) -> int:
        """How many logged requests match every given criterion."""
        return sum(
            1
            for e in self.log
            if (path is None or e.path == path)
            and (method is None or e.method == method)
            and (status is None or e.status == status)
        )

    # --- request pipeline ------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self._latency:
            await asyncio.sleep(self._latency)
        now = _clock.now()
        business = request.headers.get(BUSINESS_HEADER)
        queue = self._faults.get(request.path)
        fault = queue.popleft() if queue else None
        if fault is None:
            response = await self._respond(request, business, now)
        elif fault.kind == "drop_before":
            return self._drop(request, business, now)
        elif fault.kind in _STATUS_FAULTS:
            response = self._fault_response(fault)
        else:
            response = await self._respond(request, business, now)
            if fault.kind == "drop_after":
                return self._drop(request, business, now)
        if self._advertise is not None and request.path != _TOKEN_PATH:
            response.headers.update(self._advertised(business or DEFAULT_BUSINESS, now))
        self.log.append(LogEntry(now, request.method, request.path, business, response.status))
        if fault is not None and fault.kind == "slow_after":
            await asyncio.sleep(fault.delay)
        return response

    async def _respond(
        self, request: web.Request, business: str | None, now: float
    ) -> web.Response:
        path = request.path
        if self._outages and self._in_outage(now):
            return _error(503, "ServiceUnavailable")
        if path == _TOKEN_PATH:
            return await self._token(request)
        if self._error_rate and self._random.random() < self._error_rate:
            return _error(503, "ServiceUnavailable")
        if self._auth and (denied := self._authenticate(request, now)) is not None:
            return denied
        if self._limiter is not None:
            wait = self._admit(business or DEFAULT_BUSINESS, now)
            if wait is not None:
                return self._too_many(wait)
        if path in self._fail_paths:
            return _error(500, "InternalServerError")
        return await self._endpoint(request)

    def _in_outage(self, now: float) -> bool:
        since = now - self._t0
        return any(start <= since < end for start, end in self._outages)

    def _authenticate(self, request: web.Request, now: float) -> web.Response | None:
        """``None`` if the bearer token is valid now, else the 401 to send."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token not in self._access or token in self._revoked:
            return _error(
                401,
                "AuthorizationFailure",
                source="Authorization",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if now >= self._access[token]:
            return _error(
                401,
                "AccessTokenExpiredError",
                source="Authorization",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return None

    def _limit(self, business: str) -> _Limit:
        """``business``'s limiter state, created on its first request."""
        limit = self._limits.get(business)
        if limit is None:
            assert self._limiter is not None
            kind, a, b = self._limiter
            if kind == "leaky":
                limit = _LeakyBucket(a, int(b))
            elif kind == "fixed":
                limit = _FixedWindow(int(a), b, self._t0)
            else:
                limit = _MovingWindow(int(a), b)
            self._limits[business] = limit
        return limit

    def _admit(self, business: str, now: float) -> float | None:
        """Count a request of ``business``; ``None`` if admitted, else seconds to wait.

        The limiter decides (see the class docstring). Refused with ``block_for``: the
        business is blocked until ``now + block_for``.
        """
        blocked_until = self._blocked.get(business)
        if blocked_until is not None:
            if now < blocked_until:
                return blocked_until - now
            del self._blocked[business]
        wait = self._limit(business).admit(now)
        if wait is None:
            return None
        if self._block_for is not None:
            self._blocked[business] = now + self._block_for
            return self._block_for
        return wait

    def _advertised(self, business: str, now: float) -> dict[str, str]:
        """The RateLimit headers of ``business``'s limiter now (nothing left while blocked)."""
        assert self._advertise is not None
        blocked_until = self._blocked.get(business)
        if blocked_until is not None and now < blocked_until:
            remaining, reset = 0, blocked_until - now
        else:
            remaining, reset = self._limit(business).state(now)
        return _rate_limit_headers(self._advertise, self._policy, remaining, reset)

    def _too_many(self, wait: float) -> web.Response:
        return _error(429, "TooManyRequests", headers=self._retry_after_header(wait))

    def _retry_after_header(self, wait: float) -> dict[str, str]:
        """``Retry-After`` for a wait of ``wait`` seconds, in the configured style."""
        if self._retry_after == "seconds":
            return {"Retry-After": str(max(1, math.ceil(wait - _EPSILON)))}
        if self._retry_after == "date":
            # an HTTP-date has whole seconds and the client reads it against its own
            # wall clock: round up and add a second so it never comes back early
            return {"Retry-After": formatdate(math.ceil(_clock.wall() + wait) + 1, usegmt=True)}
        return {}

    def _fault_response(self, fault: _Fault) -> web.Response:
        if fault.kind == "429":
            return self._too_many(fault.delay or 1.0)
        if fault.kind == "500":
            return _error(500, "InternalServerError")
        return _error(503, "ServiceUnavailable")

    def _drop(self, request: web.Request, business: str | None, now: float) -> web.Response:
        """Close the connection without a response.

        aiohttp then fails to write the returned response to the closed transport and
        drops it quietly; the client sees the connection end (ServerDisconnectedError).
        """
        self.log.append(LogEntry(now, request.method, request.path, business, DROPPED))
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response(status=HTTPStatus.INTERNAL_SERVER_ERROR)

    # --- endpoints ---------------------------------------------------------------------

    async def _endpoint(self, request: web.Request) -> web.Response:
        pattern = _route(request.path)
        if pattern is None:
            return _error(404, "PathNotFound", source="Gateway")
        methods = _ROUTES[pattern]
        name = methods.get(request.method)
        if name is None:
            return _error(
                405, "MethodNotAllowed", source="Gateway", headers={"Allow": ", ".join(methods)}
            )
        handler = getattr(self, name)
        response: web.Response = await handler(request)
        return response

    async def _list_contacts(self, request: web.Request) -> web.Response:
        return _page(request, self._contacts)

    async def _show_contact(self, request: web.Request) -> web.Response:
        ident = request.path.rpartition("/")[2]
        index = int(ident) - 1 if ident.isdecimal() else -1
        if not 0 <= index < len(self._contacts):
            return _error(404, "RecordNotFound", source="id")
        return web.json_response(self._contacts[index])

    async def _list_invoices(self, request: web.Request) -> web.Response:
        return _page(request, self.invoices)

    async def _show_invoice(self, request: web.Request) -> web.Response:
        ident = request.path.rpartition("/")[2]
        for invoice in self.invoices:
            if invoice["id"] == ident:
                return web.json_response(invoice)
        return _error(404, "RecordNotFound", source="id")

    async def _create_invoice(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return _error(415, "UnsupportedMediaType", source="Content-Type")
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(422, "RecordInvalid", "The request body is not valid JSON.", "body")
        fields = body.get("sales_invoice") if isinstance(body, dict) else None
        if not isinstance(fields, dict):
            return _error(422, "RecordInvalid", "sales_invoice is required.", "sales_invoice")
        if not isinstance(fields.get("contact_id"), str) or not fields["contact_id"]:
            return _error(422, "RecordInvalid", "contact_id can't be blank.", "contact_id")
        if not _is_iso_date(fields.get("date")):
            return _error(422, "RecordInvalid", "date must be a date (YYYY-MM-DD).", "date")
        lines = fields.get("invoice_lines", [])
        if not isinstance(lines, list):
            return _error(422, "RecordInvalid", "invoice_lines must be a list.", "invoice_lines")
        number = len(self.invoices) + 1
        invoice = {
            **fields,
            "id": str(number),
            "displayed_as": f"SI-{number}",
            "invoice_number": f"SI-{number}",
            "$path": f"/sales_invoices/{number}",
            "invoice_lines": lines,
        }
        self.invoices.append(invoice)
        return web.json_response(invoice, status=201)

    async def _token(self, request: web.Request) -> web.Response:
        """OAuth refresh: ``grant_type=refresh_token`` + a refresh token, used at most once."""
        if request.method != "POST":
            return _error(405, "MethodNotAllowed", source="Gateway", headers={"Allow": "POST"})
        params = await _token_params(request)
        if params.get("grant_type") != "refresh_token":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        refresh = params.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            return web.json_response({"error": "invalid_request"}, status=400)
        if refresh in self._revoked:
            return _error(401, "AuthorizationFailure", source="refresh_token")
        if refresh not in self._refresh:
            return web.json_response(
                {"error": "invalid_grant", "error_description": "refresh token is invalid or used"},
                status=400,
            )
        self._refresh.discard(refresh)
        access, new_refresh = self.issue_tokens()
        return web.json_response(
            {
                "access_token": access,
                "refresh_token": new_refresh,
                "expires_in": math.ceil(self._access_token_ttl),
                "refresh_token_expires_in": REFRESH_TOKEN_TTL,
                "token_type": "bearer",
            }
        )


async def _token_params(request: web.Request) -> dict[str, Any]:
    """The token request's parameters, from a JSON or a form body (``{}`` if neither)."""
    if request.content_type == "application/json":
        try:
            body = json.loads(await request.read())
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}
    form = await request.post()
    return {key: value for key, value in form.items() if isinstance(value, str)}


def _page(request: web.Request, items: Sequence[dict[str, Any]]) -> web.Response:
    """One page of ``items`` in Sage's list format (``$items``, ``$next``, ``$total`` ...)."""
    page = _int_param(request.query, "page", 1, None)
    if page is None:
        return _error(422, "RecordInvalid", "page must be an integer >= 1.", "page")
    per = _int_param(request.query, "items_per_page", DEFAULT_ITEMS_PER_PAGE, MAX_ITEMS_PER_PAGE)
    if per is None:
        return _error(
            422,
            "RecordInvalid",
            f"items_per_page must be an integer from 1 to {MAX_ITEMS_PER_PAGE}.",
            "items_per_page",
        )
    start = (page - 1) * per
    path = request.path
    return web.json_response(
        {
            "$total": len(items),
            "$page": page,
            "$next": f"{path}?page={page + 1}&items_per_page={per}"
            if start + per < len(items)
            else None,
            "$back": f"{path}?page={page - 1}&items_per_page={per}" if page > 1 else None,
            "$itemsPerPage": per,
            "$items": [
                {"id": item["id"], "displayed_as": item["displayed_as"], "$path": item["$path"]}
                for item in items[start : start + per]
            ],
        }
    )
